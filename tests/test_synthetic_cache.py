"""conilium.testing.write_synthetic_cache: the cache tests and benchmarks are built on."""

import numpy as np
import pytest

from conilium.extract import verify_cache
from conilium.testing import write_synthetic_cache


def test_same_seed_same_cache(tmp_path):
    a = write_synthetic_cache(tmp_path / "a", clips=9, dim=3, seed=7, clips_per_shard=4)
    b = write_synthetic_cache(tmp_path / "b", clips=9, dim=3, seed=7, clips_per_shard=4)
    assert list(a.names) == list(b.names) and len(a) == 9 and len(a.manifest["shards"]) == 3
    for name in a.names:
        assert a.clips[name] == b.clips[name]
        np.testing.assert_array_equal(a.frames(name), b.frames(name))
        np.testing.assert_array_equal(a.pooled(name), b.pooled(name))
    assert verify_cache(a.path).ok


def test_layers_frame_counts_and_augmented_copies(tmp_path):
    c = write_synthetic_cache(tmp_path / "c", dim=4, stored_layers=(2,), all_layers=3, num_frames=[5, 8, 3, 6, 7, 9],
                              augmented_copies=2)
    originals = [n for n in c.names if not c.is_augmented(n)]
    assert len(originals) == 6 and [c.num_frames(n) for n in originals] == [5, 8, 3, 6, 7, 9]
    assert c.layers == [2] and c.pooled(originals[0]).shape == (3, 2, 4)
    copies = [n for n in c.names if c.is_augmented(n)]
    assert len(copies) == 2 and all(c.source(n) == n.split("#")[0] for n in copies)
    assert {c.clips[c.source(n)].split for n in copies} == {"Train"}


def test_stored_layers_beyond_the_upstream_are_refused(tmp_path):
    with pytest.raises(ValueError, match="must lie in 0..3"):
        write_synthetic_cache(tmp_path / "bad", clips=4, stored_layers=(4,))
    assert not (tmp_path / "bad").exists()

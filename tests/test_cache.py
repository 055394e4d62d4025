"""The feature cache on disk: reading, verify-cache, repair, incomplete caches."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from conilium.cache import FeatureCache
from conilium.cache.store import load_manifest
from conilium.errors import CacheError
from conilium.extract import extract_features, verify_cache
from conilium.extract.cli import verify_cache_cmd


@pytest.fixture(scope="module")
def small_cache(small_demo_corpus, tmp_path_factory):
    """60 demo clips, demo-wav2vec2-large, layers 1 and 3, shards of 16 clips, 4 s."""
    return extract_features(small_demo_corpus, "demo-wav2vec2-large", tmp_path_factory.mktemp("sc") / "cache",
                            random_init=True, layers="1,3", shard_size=16, max_seconds=4.0, device="cpu",
                            verbose=False)


def _copy(cache, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(cache, dst)
    return dst


def test_reader(small_cache, small_demo_corpus):
    cache = FeatureCache(small_cache)
    assert len(cache) == 60 and cache.layers == [1, 3] and cache.dim == 96
    assert len(cache.manifest["shards"]) == 4
    assert set(cache.splits) == {"Train", "Development", "Test3"}
    assert sum(len(cache.split(s)) for s in cache.splits) == 60
    name = cache.split("Development")[0]
    assert name in cache and "nope.wav" not in cache
    x = cache.frames(name)
    assert x.shape == (cache.num_frames(name), 2, 96) and x.dtype == np.float32
    assert cache.frames(name, dtype=np.float16).dtype == np.float16
    assert [n for n, _ in cache.iter_frames(cache.names[:3])] == cache.names[:3]
    assert not cache.has_pooled and cache.has_annotations
    assert cache.source(name) == name and not cache.is_augmented(name)
    with pytest.raises(KeyError, match="nope.wav"):
        cache.frames("nope.wav")
    cache.close()


def test_verify_cache_ok(small_cache):
    r = CliRunner().invoke(verify_cache_cmd, [str(small_cache)])
    assert r.exit_code == 0, r.output
    assert "OK (4 shard(s), 60 clip(s)" in r.output and "checksums verified" in r.output


def test_verify_catches_corrupted_shard_and_rerun_repairs_it(small_cache, small_demo_corpus, tmp_path):
    cache = _copy(small_cache, tmp_path)
    shard = cache / "shards" / "shard-00002.h5"
    original = shard.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    shard.write_bytes(bytes(data))
    r = CliRunner().invoke(verify_cache_cmd, [str(cache)])
    assert r.exit_code == 1
    assert "shard-00002.h5: SHA-256 differs" in r.output and "1 problem(s)" in r.output
    assert "shard-00001" not in r.output

    # the same options again: the damaged shard is redone, the others kept
    from conilium.extract import ExtractStats

    st = ExtractStats()
    extract_features(small_demo_corpus, "demo-wav2vec2-large", cache, random_init=True, layers="1,3", shard_size=16,
                     max_seconds=4.0, device="cpu", verbose=False, stats=st)
    assert st.shards_kept == 3 and st.shards_written == 1
    assert verify_cache(cache).ok
    assert shard.read_bytes() == original


def test_verify_catches_missing_shard_and_wrong_clips(small_cache, tmp_path):
    cache = _copy(small_cache, tmp_path)
    (cache / "shards" / "shard-00001.h5").unlink()
    records = json.loads((cache / "clips.json").read_text())
    records[0]["num_frames"] += 1
    (cache / "clips.json").write_text(json.dumps(records))
    report = verify_cache(cache)
    text = "\n".join(report.problems)
    assert "shard-00001.h5: missing" in text
    assert "clips.json: checksum differs" in text
    assert f"clip {records[0]['name']} frames have shape" in text
    with pytest.raises(CacheError, match="shard file\\(s\\) missing"):
        FeatureCache(cache)


def test_incomplete_cache_is_refused(small_cache, tmp_path):
    cache = _copy(small_cache, tmp_path)
    (cache / "manifest.json").unlink()
    for call in (FeatureCache, load_manifest, verify_cache):
        with pytest.raises(CacheError, match="incomplete.*rerun extract-features"):
            call(cache)
    r = CliRunner().invoke(verify_cache_cmd, [str(cache)])
    assert r.exit_code == 1 and r.output.startswith("Error: ")
    with pytest.raises(CacheError, match="not found"):
        FeatureCache(tmp_path / "nowhere")


def test_augmented_names_in_reader(tmp_path, small_demo_corpus):
    from conilium.demo import make_demo_corpus

    noise = tmp_path / "noise"
    make_demo_corpus(tmp_path / "c", clips=12, seed=2, noise_dir=noise, noise_files=2)
    out = extract_features(tmp_path / "c", "demo-wavlm", tmp_path / "cache", random_init=True, device="cpu",
                           max_seconds=2.0, augment_noise=noise, augment_fraction=1.0, copies=1, verbose=False)
    cache = FeatureCache(out)
    train = cache.split("Train", augmented=False)
    assert len(cache.split("Train")) == 2 * len(train)
    for n in train:
        assert cache.is_augmented(n + "#aug1") and cache.source(n + "#aug1") == n

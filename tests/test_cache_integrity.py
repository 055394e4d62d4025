"""No silent corruption: a flipped bit in a shard's frames, an edited label in clips.json or an
edited setting in manifest.json is an error when the cache is read or opened, in verify-cache
and in train-head; rerunning extract-features rewrites a damaged clips.json or manifest."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conilium.cache import FeatureCache
from conilium.cli.extract import verify_cache_cmd
from conilium.errors import CacheError
from conilium.extract import ExtractConfig, ExtractStats, extract_features, verify_cache
from conilium.heads.data import ClipDataset, select_input
from conilium.heads.train import TrainConfig, train_head
from conilium.testing import write_synthetic_cache


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    return write_synthetic_cache(tmp_path_factory.mktemp("integrity") / "cache", clips=40, dim=8, clips_per_shard=10,
                                 seed=2, signal=0.5)


@pytest.fixture
def copy(syn, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(syn.path, dst)
    return dst


def _flip_bit(cache_dir: Path, name: str, layer: int, where: float = 0.5) -> Path:
    """Flip one bit inside ``name``'s frames of stored layer ``layer`` (same file size); the shard."""
    cache = FeatureCache(cache_dir)
    index = cache.shard_index(cache.shard_of(name))
    i = index.position[name]
    offset = index.layer_offset(layer, int(index.offsets[i])) + int(cache.num_frames(name) * index.row_bytes * where)
    data = bytearray(index.path.read_bytes())
    data[offset] ^= 0x04
    index.path.write_bytes(bytes(data))
    return index.path


def _train(cache_dir, out, **kw):
    return train_head(TrainConfig(cache=str(cache_dir), device="cpu", epochs=1, hidden=16, **kw), out, progress=False)


# ----------------------------------------------------------------------------- a flipped bit in the frames


def test_a_flipped_bit_in_a_shard_is_a_cache_error_naming_shard_and_clip(copy):
    cache = FeatureCache(copy)
    name = cache.split("Train")[3]
    before = {n: cache.frames(n) for n in cache.shard_names(cache.shard_of(name))}
    shard = _flip_bit(copy, name, layer=1)
    cache = FeatureCache(copy)
    damaged = rf"{shard}: clip {name}: frames of layer 3 fail their CRC-32 check"
    with pytest.raises(CacheError, match=damaged):
        cache.frames(name)
    with pytest.raises(CacheError, match=damaged):
        cache.frames(name, layer=1)
    with pytest.raises(CacheError, match=damaged):
        list(cache.iter_frames(cache.names))
    np.testing.assert_array_equal(cache.frames(name, layer=0)[:, 0], before[name][:, 0])  # the other layer is intact
    for n, x in before.items():  # and so are the shard's other clips
        if n != name:
            np.testing.assert_array_equal(cache.frames(n), x)
    report = verify_cache(copy)
    assert len(report.problems) == 1
    assert f"{shard}: SHA-256 differs" in report.problems[0] and f"CRC-32 check: {name}" in report.problems[0]


def test_a_flipped_bit_in_pooled_statistics_is_a_cache_error(copy):
    cache = FeatureCache(copy)
    name = cache.names[7]
    index = cache.shard_index(cache.shard_of(name))
    offset = index.pooled_offset + index.position[name] * index.pooled_bytes + 5
    data = bytearray(index.path.read_bytes())
    data[offset] ^= 0x01
    index.path.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=rf"{index.path}: clip {name}: pooled statistics fail their CRC-32 check"):
        FeatureCache(copy).pooled(name)


@pytest.mark.parametrize("preload", ["yes", "no"])
def test_train_head_stops_at_a_damaged_clip(copy, tmp_path, preload):
    cache = FeatureCache(copy)
    name = [n for n in cache.split("Train") if cache.clips[n].scoreable][5]  # a clip the run trains on
    shard = _flip_bit(copy, name, layer=0, where=0.1)
    with pytest.raises(CacheError, match=rf"{shard}: clip {name}: frames of layer 1 fail"):
        _train(copy, tmp_path / "run", preload=preload, loss="wce", labels="hard")
    assert not (tmp_path / "run" / "metrics.json").exists()
    cache = FeatureCache(copy)
    with pytest.raises(CacheError, match=name):
        ClipDataset(cache, cache.split("Train"), select_input(cache, 1), preload=True)


# ----------------------------------------------------------------------------- clips.json and the manifest


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


def test_an_edited_label_in_clips_json_is_refused_on_open(copy, tmp_path):
    def relabel(records):
        r = next(r for r in records if r["split"] == "Train" and r["emo_class"] == "N")
        r["emo_class"] = "A"  # still valid JSON, still a valid class

    _edit_json(copy / "clips.json", relabel)
    message = r"clips\.json: checksum differs from the manifest's: the file was edited or damaged"
    with pytest.raises(CacheError, match=message):
        FeatureCache(copy)
    with pytest.raises(CacheError, match=message):
        _train(copy, tmp_path / "run")
    assert any("clips.json: checksum differs" in p for p in verify_cache(copy).problems)


@pytest.mark.parametrize("field,change", [
    ("layers", lambda m: m["layers"].__setitem__(0, 2)),
    ("normalize_stats", lambda m: m.__setitem__("normalize_stats", {"mean": 0.0, "std": 2.0, "samples": 10})),
    ("frame_rate", lambda m: m.__setitem__("frame_rate", 25.0)),
    ("shard checksum", lambda m: m["shards"][0].__setitem__("sha256", "0" * 64)),
])
def test_an_edited_manifest_is_refused_on_open_and_by_verify_cache(copy, tmp_path, field, change):
    _edit_json(copy / "manifest.json", change)
    message = r"manifest\.json: its checksum does not match its content: the manifest was edited or damaged"
    for call in (FeatureCache, verify_cache):
        with pytest.raises(CacheError, match=message):
            call(copy)
    r = CliRunner().invoke(verify_cache_cmd, [str(copy)])
    assert r.exit_code == 1 and "edited or damaged" in r.output and "Traceback" not in r.output
    with pytest.raises(CacheError, match=message):
        _train(copy, tmp_path / "run")


# ----------------------------------------------------------------------------- repair by rerunning


TINY = ExtractConfig("demo-wavlm", random_init=True, layers="1,3", shard_size=16, max_seconds=2.0)


@pytest.fixture(scope="module")
def extracted(small_demo_corpus, tmp_path_factory):
    out = extract_features(TINY, small_demo_corpus, tmp_path_factory.mktemp("rep") / "cache", device="cpu",
                           verbose=False)
    return out, {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


def _damage_clips(cache):
    _edit_json(cache / "clips.json", lambda records: records[0].__setitem__("emo_class", "X"))


def _damage_manifest_layers(cache):
    _edit_json(cache / "manifest.json", lambda m: m.__setitem__("layers", [1, 2]))


def _truncate_manifest(cache):
    (cache / "manifest.json").write_bytes((cache / "manifest.json").read_bytes()[:300])


def _remove_clips(cache):
    (cache / "clips.json").unlink()


@pytest.mark.parametrize("damage", [_damage_clips, _damage_manifest_layers, _truncate_manifest, _remove_clips])
def test_rerunning_extraction_rewrites_a_damaged_clips_json_or_manifest(extracted, small_demo_corpus, tmp_path,
                                                                        damage):
    original, files = extracted
    cache = tmp_path / "cache"
    shutil.copytree(original, cache)
    shards = {p.name: p.stat().st_mtime_ns for p in (cache / "shards").iterdir()}
    damage(cache)
    with pytest.raises(CacheError):
        FeatureCache(cache)
    stats = ExtractStats()
    extract_features(TINY, small_demo_corpus, cache, device="cpu", verbose=False, stats=stats)
    assert stats.shards_written == 0 and stats.shards_kept == 4 and stats.clips == 0  # nothing extracted again
    assert {p.name: p.stat().st_mtime_ns for p in (cache / "shards").iterdir()} == shards
    assert {p.name: p.read_bytes() for p in cache.iterdir() if p.is_file()} == files
    assert verify_cache(cache).ok and len(FeatureCache(cache)) == 60


def test_a_reader_checks_each_clip_once_and_always_when_asked(copy, monkeypatch):
    """The CRC-32 of a clip's layer is computed on its first read by a reader (a 40-epoch
    head pays it once); ``verify="always"`` checks every read and so sees a shard damaged
    after a first read; a damaged clip is found on its first read either way."""
    import conilium.cache.reader as store

    calls = []
    real = store.crc32
    monkeypatch.setattr(store, "crc32", lambda data: calls.append(1) or real(data))
    cache = FeatureCache(copy)
    names = cache.split("Train")[:4]
    layers = len(cache.layers)
    for _ in range(3):  # three "epochs"
        for n in names:
            cache.frames(n)
        list(cache.iter_frames(names))
    assert len(calls) == len(names) * layers
    calls.clear()
    always = FeatureCache(copy, verify="always")
    for _ in range(3):
        always.frames(names[1])
    assert len(calls) == 3 * layers
    shard = _flip_bit(copy, names[1], layer=0)  # damaged after the reader has read it
    with pytest.raises(CacheError, match=rf"{shard}: clip {names[1]}: frames of layer"):
        always.frames(names[1])
    with pytest.raises(CacheError, match=rf"clip {names[1]}"):
        FeatureCache(copy).frames(names[1])  # a new reader: first read, checked
    with pytest.raises(ValueError, match="verify must be"):
        FeatureCache(copy, verify="sometimes")

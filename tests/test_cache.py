"""The feature cache on disk: reading, verify-cache, repair, incomplete caches."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from conilium.cache import FeatureCache
from conilium.cache.reader import load_manifest
from conilium.cache.shards import FORMAT_VERSION
from conilium.errors import CacheError
from conilium.extract import ExtractConfig, NoiseAugmentation, extract_features, verify_cache
from conilium.cli.extract import verify_cache_cmd


SMALL = ExtractConfig("demo-wav2vec2-large", random_init=True, layers="1,3", shard_size=16, max_seconds=4.0)


@pytest.fixture(scope="module")
def small_cache(small_demo_corpus, tmp_path_factory):
    """60 demo clips, demo-wav2vec2-large, layers 1 and 3, shards of 16 clips, 4 s."""
    return extract_features(SMALL, small_demo_corpus, tmp_path_factory.mktemp("sc") / "cache", device="cpu",
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
    extract_features(SMALL, small_demo_corpus, cache, device="cpu", verbose=False, stats=st)
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
    config = ExtractConfig("demo-wavlm", random_init=True, max_seconds=2.0,
                           augmentation=NoiseAugmentation(noise, fraction=1.0, copies=1))
    out = extract_features(config, tmp_path / "c", tmp_path / "cache", device="cpu", verbose=False)
    cache = FeatureCache(out)
    train = cache.split("Train", augmented=False)
    assert len(cache.split("Train")) == 2 * len(train)
    for n in train:
        assert cache.is_augmented(n + "#aug1") and cache.source(n + "#aug1") == n


# ----------------------------------------------------------------------------- the writer


def _writer_settings(dim=4, layers=(0,)):
    from conilium.cache.writer import SETTINGS_FIELDS

    s = {k: None for k in SETTINGS_FIELDS}
    s.update(upstream={"name": "test"}, layers=list(layers), dim=dim, dtype="float16", pooled_stats=False)
    return s


def _items(n, dim=4, fail_at=None, first=0):
    rng = np.random.default_rng(0)
    for i in range(first, first + n):
        if i == fail_at:
            raise RuntimeError("decoding failed")
        yield f"c{i}.wav", rng.normal(size=(5 + i, 1, dim)).astype(np.float32), None


def _record(name, shard, frames):
    return {"name": name, "split": "Train", "emo_class": "N", "shard": shard, "num_frames": frames}


def _leftovers(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".tmp" in p.name)


def test_writer_failure_leaves_no_manifest_and_no_temporary_file(tmp_path):
    from conilium.cache.writer import CacheWriter

    out = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="decoding failed"):
        with CacheWriter(out) as w:
            w.begin()
            w.write_settings(_writer_settings())
            w.write_shard(0, _items(3))
            w.write_shard(1, _items(3, fail_at=2))  # fails half-way through the shard
    assert not (out / "manifest.json").exists() and not (out / "clips.json").exists()
    assert _leftovers(out) == []
    assert not (out / "shards" / "shard-00001.h5").exists() and not (out / "shards" / "shard-00001.json").exists()
    with pytest.raises(CacheError, match="incomplete"):
        FeatureCache(out)
    # the complete shard is kept for a rerun with the same settings
    w = CacheWriter(out)
    assert w.existing_settings(_writer_settings()) is not None
    assert w.valid_shard(0, ["c0.wav", "c1.wav", "c2.wav"]) is not None


def test_writer_failure_while_finishing_leaves_no_clips_json(tmp_path, monkeypatch):
    import conilium.cache.writer as writer_module
    from conilium.util import atomic_path

    def broken(path, manifest):
        with atomic_path(path / "manifest.json") as tmp:
            tmp.write_text('{"format": 1, "comp')
            raise OSError("no space left on device")

    monkeypatch.setattr(writer_module, "write_manifest", broken)
    out = tmp_path / "cache"
    with pytest.raises(OSError, match="no space"):
        with writer_module.CacheWriter(out) as w:
            w.begin()
            w.write_settings(_writer_settings())
            w.write_shard(0, _items(2))
            w.finish([_record("c0.wav", 0, 5), _record("c1.wav", 0, 6)])
    assert not (out / "manifest.json").exists() and not (out / "clips.json").exists()
    assert _leftovers(out) == []


def test_writer_finish_writes_the_manifest_last(tmp_path, monkeypatch):
    import os

    from conilium.cache.writer import CacheWriter

    out = tmp_path / "cache"
    renamed = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append(os.path.relpath(b, out)), real(a, b))[1])
    with CacheWriter(out) as w:
        w.begin()
        w.write_settings(_writer_settings())
        w.write_shard(0, _items(2))
        w.write_shard(1, _items(1, first=2))
        manifest = w.finish([_record("c0.wav", 0, 5), _record("c1.wav", 0, 6), _record("c2.wav", 1, 7)])
    assert renamed[0] == "extraction.json"
    assert renamed[-2:] == ["clips.json", "manifest.json"]
    assert manifest["format"] == FORMAT_VERSION and manifest["complete"] and manifest["num_clips"] == 3
    assert [s["clips"] for s in manifest["shards"]] == [2, 1]
    assert verify_cache(out).ok


def test_writer_refuses_incomplete_settings(tmp_path):
    from conilium.cache.writer import CacheWriter

    w = CacheWriter(tmp_path / "c").begin()
    settings = _writer_settings()
    del settings["corpus_fingerprint"]
    with pytest.raises(ValueError, match="missing \\['corpus_fingerprint'\\]"):
        w.write_settings(dict(settings, colour="blue"))
    with pytest.raises(RuntimeError, match="no settings"):
        w.write_shard(0, _items(1))


def test_synthetic_and_extracted_caches_record_the_same_fields(small_cache, tmp_path):
    from conilium.cache.writer import SETTINGS_ONLY
    from conilium.testing import write_synthetic_cache

    syn = write_synthetic_cache(tmp_path / "syn", clips=12, dim=4, clips_per_shard=5)
    extracted = FeatureCache(small_cache)
    assert list(syn.manifest) == list(extracted.manifest)  # the same keys, in the same order
    assert syn.manifest["format"] == extracted.manifest["format"] == FORMAT_VERSION
    settings = [json.loads((p / "extraction.json").read_text()) for p in (syn.path, extracted.path)]
    assert [k for k in settings[0] if k not in SETTINGS_ONLY] == [k for k in settings[1] if k not in SETTINGS_ONLY]
    sidecars = [json.loads((p / "shards" / "shard-00000.json").read_text()) for p in (syn.path, extracted.path)]
    assert list(sidecars[0]) == list(sidecars[1])
    assert verify_cache(syn.path).ok and len(syn) == 12 and len(syn.manifest["shards"]) == 3

"""Cache format 2: each layer's frames contiguous with a per-clip index, read with plain positional
reads (a clip, a run of neighbours, a whole shard); the values as written; format-1 caches refused
with the way out, and upgraded in place; what a directory is; a disk that fills up."""

import contextlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from conilium.cache import FeatureCache, load_manifest, upgrade_cache
from conilium.cache.shards import FORMAT_VERSION, file_sha256, read_shard_index, to_float16
from conilium.cache.writer import CacheWriter
from conilium.errors import CacheError, OutputError
from conilium.extract import verify_cache
from conilium.heads.data import ClipDataset, select_input
from conilium.testing import write_synthetic_cache

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    """33 clips (3 noisy copies) in 5 shards, layers 1 and 3 of 4, dim 8, float16, pooled statistics."""
    return write_synthetic_cache(tmp_path_factory.mktemp("fmt") / "cache", clips=30, dim=8, clips_per_shard=7,
                                 augmented_copies=3, seed=5)


def _files(root: Path):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- the layout


def test_a_shard_holds_each_layer_contiguously_with_an_index(syn):
    cache = FeatureCache(syn.path)
    name = cache.shard_names(1)[2]
    shard = syn.path / cache.manifest["shards"][1]["file"]
    with h5py.File(shard, "r") as f:
        assert f.attrs["format"] == FORMAT_VERSION == 2
        assert {"names", "offsets", "num_frames", "crc32", "frames", "pooled", "pooled_crc32"} <= set(f)
        frames = f["frames"]
        assert frames.chunks is None and frames.compression is None and frames.dtype == np.float16
        n_frames = f["num_frames"][()]
        assert frames.shape == (2, int(n_frames.sum()), 8)
        assert list(f["offsets"][()]) == [0] + list(np.cumsum(n_frames)[:-1])
        assert f["crc32"].shape == (len(n_frames), 2) and f["offsets"].fletcher32
    index = read_shard_index(shard)
    i, t = index.position[name], cache.num_frames(name)
    with open(shard, "rb") as f:  # layer 1 (upstream layer 3) of the clip: its own bytes, where the index says
        f.seek(index.layer_offset(1, int(index.offsets[i])))
        raw = np.frombuffer(f.read(t * 8 * 2), np.float16).reshape(t, 8)
    np.testing.assert_array_equal(raw, cache.frames(name, layer=1, dtype=None)[:, 0])
    np.testing.assert_array_equal(cache.frames(name)[:, 1], raw.astype(np.float32))


def test_values_read_back_exactly_as_written(tmp_path):
    from test_cache import _record, _writer_settings

    rng = np.random.default_rng(1)
    data = {f"c{i}.wav": rng.normal(scale=3.0, size=(4 + 3 * i, 3, 5)).astype(np.float32) for i in range(6)}
    pooled = {n: rng.normal(size=(4, 2, 5)).astype(np.float32) for n in data}
    for dtype in ("float16", "float32"):
        out = tmp_path / dtype
        with CacheWriter(out) as w:
            w.begin()
            w.write_settings(dict(_writer_settings(dim=5, layers=(0, 1, 2)), dtype=dtype, pooled_stats=True))
            w.write_shard(0, ((n, x, pooled[n]) for n, x in list(data.items())[:4]))
            w.write_shard(1, ((n, x, pooled[n]) for n, x in list(data.items())[4:]))
            w.finish([_record(n, int(i >= 4), x.shape[0]) for i, (n, x) in enumerate(data.items())])
        cache = FeatureCache(out)
        for n, x in data.items():
            stored = to_float16(x, n) if dtype == "float16" else x
            got = cache.frames(n, dtype=None)
            assert got.dtype == stored.dtype and got.shape == x.shape
            np.testing.assert_array_equal(got, stored)
            np.testing.assert_array_equal(cache.frames(n), stored.astype(np.float32))
            np.testing.assert_array_equal(cache.frames(n, layer=2, dtype=None)[:, 0], stored[:, 2])
            np.testing.assert_array_equal(cache.pooled(n), pooled[n])
        assert verify_cache(out).ok


def test_neighbours_and_whole_shards_are_read_with_one_read_per_layer(syn, monkeypatch):
    cache = FeatureCache(syn.path)
    names = cache.shard_names(0) + cache.shard_names(1)
    calls = []
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: (calls.append(off), real(fd, bufs, off))[1])
    got = dict(cache.iter_frames(names, dtype=None))  # two whole shards, both layers
    assert len(calls) == 2 * 2
    calls.clear()
    one = dict(cache.iter_frames(names[:5], layer=0))  # a run of neighbours, one layer
    assert len(calls) == 1
    calls.clear()
    shuffled = [names[3], names[1], names[2], names[9]]  # 1, 2 are neighbours: three runs
    list(cache.iter_frames(shuffled, layer=1))
    assert len(calls) == 3
    monkeypatch.setattr(os, "preadv", real)
    for n in names:
        np.testing.assert_array_equal(got[n], cache.frames(n, dtype=None))
    for n in names[:5]:
        np.testing.assert_array_equal(one[n], cache.frames(n, layer=0))


def test_the_dataset_preloads_with_shard_reads_and_the_reader_pickles(syn):
    cache = FeatureCache(syn.path)
    names = cache.split("Train")
    for layers in ("weighted", 3):
        sel = select_input(cache, layers)
        streamed = ClipDataset(cache, names, sel)
        preloaded = ClipDataset(cache, names, sel, preload=True)
        for i in range(len(names)):
            np.testing.assert_array_equal(preloaded[i][0].numpy(), streamed[i][0].numpy())
    clone = pickle.loads(pickle.dumps(cache))  # DataLoader workers started by spawn get a copy
    np.testing.assert_array_equal(clone.frames(names[0]), cache.frames(names[0]))


def test_an_empty_shard_and_clips_without_frames(tmp_path):
    from test_cache import _record, _writer_settings

    out = tmp_path / "c"
    with CacheWriter(out) as w:
        w.begin()
        w.write_settings(_writer_settings())
        w.write_shard(0, iter(()), skipped=[["gone.wav", "unreadable"]])  # every clip of the shard skipped
        w.write_shard(1, [("z.wav", np.zeros((0, 1, 4), np.float32), None), ("a.wav", np.ones((2, 1, 4)), None)])
        w.finish([_record("z.wav", 1, 0), _record("a.wav", 1, 2)], skipped={"gone.wav": "unreadable"})
    cache = FeatureCache(out)
    assert cache.frames("z.wav").shape == (0, 1, 4) and cache.frames("a.wav").sum() == 8
    assert verify_cache(out).ok


def test_a_truncated_shard_is_a_cache_error_naming_it(syn, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(syn.path, copy)
    shard = copy / "shards" / "shard-00002.h5"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    cache = FeatureCache(copy)
    with pytest.raises(CacheError, match=r"shard-00002\.h5: .*truncated"):
        cache.frames(cache.shard_names(2)[-1])
    assert any("shard-00002.h5" in p for p in verify_cache(copy).problems)


# ----------------------------------------------------------------------------- format 1


def _to_format1(src: Path, dst: Path) -> None:
    """``src`` as the former conilium wrote it: one dataset per clip, no manifest checksum."""
    shutil.copytree(src, dst)
    cache = FeatureCache(src)
    manifest = json.loads((dst / "manifest.json").read_text())
    for i, entry in enumerate(manifest["shards"]):
        path = dst / entry["file"]
        path.unlink()
        names = cache.shard_names(i)
        with h5py.File(path, "w", libver="latest") as f:
            f.attrs["format"] = 1
            f.attrs["shard_index"] = i
            g, gp = f.create_group("frames"), f.create_group("pooled")
            for n in names:
                x = np.ascontiguousarray(cache.frames(n, dtype=None))
                g.create_dataset(n, data=x, chunks=(x.shape[0], 1, x.shape[2]), track_times=False)
                gp.create_dataset(n, data=cache.pooled(n), track_times=False)
            f.create_dataset("names", data=np.array(names, dtype=object), dtype=h5py.string_dtype())
        entry.update(sha256=file_sha256(path), bytes=path.stat().st_size)
        side = path.with_suffix(".json")
        rec = json.loads(side.read_text())
        side.write_text(json.dumps(dict(rec, entry=entry, settings_key="format-1 key")))
    manifest["format"] = 1
    del manifest["manifest_sha256"]
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
    settings = json.loads((dst / "extraction.json").read_text())
    (dst / "extraction.json").write_text(json.dumps(dict(settings, format=1), indent=2))


def test_a_format_1_cache_is_refused_with_the_way_out_then_upgraded_in_place(syn, tmp_path):
    old = tmp_path / "old"
    _to_format1(syn.path, old)
    for call in (FeatureCache, load_manifest, verify_cache):
        with pytest.raises(CacheError, match=r"cache format 1, this conilium reads format 2; .*conilium extract upgrade.*"
                                             r"rerun extract-features with the same options and --overwrite"):
            call(old)
    manifest = upgrade_cache(old)
    assert manifest["format"] == 2 and verify_cache(old).ok
    # frames unchanged; the very files a fresh write of format 2 makes
    assert _files(old) == _files(syn.path)
    assert upgrade_cache(old) == manifest  # already format 2: nothing to do


def test_an_interrupted_upgrade_is_resumed(syn, tmp_path, monkeypatch):
    import conilium.cache.upgrade as upgrade_module

    old = tmp_path / "old"
    _to_format1(syn.path, old)
    real = upgrade_module._format1_items
    seen = []

    class Killed(Exception):
        pass

    def dies_at_the_third(path, pooled):
        seen.append(path.name)
        if seen == ["shard-00000.h5", "shard-00001.h5", "shard-00002.h5"]:  # the first run only
            raise Killed()
        yield from real(path, pooled)

    monkeypatch.setattr(upgrade_module, "_format1_items", dies_at_the_third)
    with pytest.raises(Killed):
        upgrade_cache(old)
    with pytest.raises(CacheError, match="cache format 1"):
        FeatureCache(old)
    seen.clear()
    upgrade_cache(old)
    assert len(seen) == 3  # the two shards already converted are kept
    assert _files(old) == _files(syn.path)


# ----------------------------------------------------------------------------- what a directory is


def test_loading_a_manifest_says_what_the_directory_is(syn, small_demo_corpus, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"cache": str(syn.path)}))
    (run / "metrics.json").write_text("{}")
    cases = [(small_demo_corpus, "is a corpus (Audios/, Labels/)"),
             (run, f"is a train-head run directory (config.json, metrics.json/model.pt), not a feature cache; "
                   f"this run was trained on --cache {syn.path}"),
             (syn.path.parent, "folder of caches"),
             (syn.path / "manifest.json", "pass its directory to --cache")]
    for path, what in cases:
        for call in (load_manifest, FeatureCache, verify_cache):
            with pytest.raises(CacheError) as e:
                call(path)
            assert what in str(e.value) and "extraction did not finish" not in str(e.value)


# ----------------------------------------------------------------------------- a full disk


@contextlib.contextmanager
def _tmpfs(where: Path, size: str):
    if not IS_ROOT:
        pytest.skip("mounting a small tmpfs needs root")
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _leftovers(root: Path):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".tmp" in p.name)


def test_a_shard_on_a_full_disk_is_an_output_error_naming_it(tmp_path):
    from test_cache import _writer_settings

    with _tmpfs(tmp_path / "small", "1m") as disk:
        out = disk / "cache"
        rng = np.random.default_rng(0)
        items = ((f"c{i}.wav", rng.normal(size=(200, 2, 64)).astype(np.float32), None) for i in range(40))
        with pytest.raises(OutputError, match=rf"cannot write {out}/shards/shard-00000\.h5: no space left on device"):
            with CacheWriter(out) as w:
                w.begin()
                w.write_settings(_writer_settings(dim=64, layers=(0, 1)))
                w.write_shard(0, items)
        assert _leftovers(out) == [] and not (out / "shards" / "shard-00000.h5").exists()
        assert not (out / "shards" / "shard-00000.json").exists()


def test_extraction_filling_the_disk_stops_cleanly(small_demo_corpus, tmp_path):
    """Formerly HDF5 printed errno-28 noise and the process died of a segmentation fault."""
    with _tmpfs(tmp_path / "small", "5m") as disk:
        out = disk / "cache"
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        r = subprocess.run([sys.executable, "-m", "conilium.cli.extract", "--corpus", str(small_demo_corpus),
                            "--upstream", "demo-wavlm", "--random-init", "--out", str(out), "--layers", "all",
                            "--pooled-stats", "--shard-size", "8", "--device", "cpu", "--threads", "1",
                            "--no-space-check", "-q"], env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
        assert f"Error: cannot write {out}/shards/shard-" in r.stderr and "no space left on device" in r.stderr
        assert "Traceback" not in r.stderr and "HDF5" not in r.stderr and "errno = 28" not in r.stderr
        assert _leftovers(out) == [] and not (out / "manifest.json").exists()


def test_threads_share_a_reader_that_keeps_few_files_open(syn):
    """A descriptor evicted (max_open) while another thread reads it stays open until that read ends."""
    from concurrent.futures import ThreadPoolExecutor

    want = {n: np.ascontiguousarray(x) for n, x in FeatureCache(syn.path).iter_frames(syn.names, dtype=None)}
    cache = FeatureCache(syn.path, max_open=1)
    names = [n for _ in range(20) for n in (syn.names[::3] + syn.names[1::3] + syn.names[2::3])]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda n: cache.frames(n, dtype=None), names))
    for n, x in zip(names, got):
        np.testing.assert_array_equal(x, want[n])
    assert len(cache._fds) <= 1 and not cache._busy and not cache._retired

"""No non-finite feature: extraction's writer refuses to store NaN or ±inf, and a cache that
holds them anyway (a foreign writer, checksums consistent) is refused by every reader, in
train-head and in scoring, naming the cache, the shard and the clip."""

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from conilium.cache import FeatureCache
from conilium.cache.shards import all_finite, crc32, file_sha256, write_shard
from conilium.cache.writer import write_manifest
from conilium.cli.heads import train_head_cmd
from conilium.dirs import CacheDir, Manifest
from conilium.errors import CacheError
from conilium.heads.train import TrainConfig, train_head
from conilium.testing import write_synthetic_cache


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    return write_synthetic_cache(tmp_path_factory.mktemp("finite") / "cache", clips=40, dim=8, clips_per_shard=10,
                                 seed=3, signal=0.5)


@pytest.fixture
def copy(syn, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(syn.path, dst)
    return dst


def _reseal(cache_dir: Path, shard: Path) -> None:
    """The manifest's SHA-256 and size of ``shard`` brought up to date, as its writer would."""
    cdir = CacheDir(cache_dir)
    manifest = dict(cdir.read_manifest())
    for entry in manifest["shards"]:
        if (cache_dir / entry["file"]) == shard:
            entry.update(sha256=file_sha256(shard), bytes=shard.stat().st_size)
    manifest.pop("manifest_sha256", None)
    write_manifest(cache_dir, Manifest(manifest).sealed())


def _poison(cache_dir: Path, name: str, layer: int, value: float) -> Path:
    """Put ``value`` into one of ``name``'s frames of stored layer ``layer`` and record the matching
    CRC-32 (and the shard's new SHA-256 in the manifest): a foreign writer's consistent cache."""
    cache = FeatureCache(cache_dir, verify=False)
    index = cache.shard_index(cache.shard_of(name))
    i = index.position[name]
    t = cache.num_frames(name)
    offset = index.layer_offset(layer, int(index.offsets[i]))
    data = bytearray(index.path.read_bytes())
    block = np.frombuffer(bytes(data), index.dtype, count=t * index.dim, offset=offset).copy()
    block[(t // 2) * index.dim + 3] = value
    data[offset: offset + block.nbytes] = block.tobytes()
    index.path.write_bytes(bytes(data))
    with h5py.File(index.path, "r+") as f:
        crc = f["crc32"][()]
        crc.reshape(len(index.names), -1)[i, layer] = crc32(block)
        f["crc32"][...] = crc
    cache.close()
    _reseal(cache_dir, index.path)
    return index.path


# ----------------------------------------------------------------------------- writing


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_the_writer_never_stores_a_non_finite_frame(tmp_path, dtype, value):
    good = np.ones((5, 2, 4), np.float32)
    bad = good.copy()
    bad[2, 1, 3] = value
    path = tmp_path / "shards" / "shard_00000.h5"
    path.parent.mkdir()
    with pytest.raises(CacheError, match="clip b.wav: the upstream's hidden states .*hold NaN or infinite values"):
        write_shard(path, [("a.wav", good, None), ("b.wav", bad, None)], dtype=dtype)
    pooled = np.ones((2, 2, 4), np.float32)
    pooled[1, 1, 0] = value
    with pytest.raises(CacheError, match="clip b.wav: the pooled statistics hold NaN or infinite values"):
        write_shard(path, [("a.wav", good, np.ones((2, 2, 4))), ("b.wav", good, pooled)], dtype=dtype)
    assert list(path.parent.iterdir()) == []  # nothing half-written


def test_all_finite_reads_the_bits():
    every_half = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    assert [all_finite(every_half[k:k + 1]) for k in range(1 << 16)] == list(np.isfinite(every_half))
    for dtype in (np.float16, np.float32, np.float64):
        x = np.linspace(-60000, 60000, 1001).astype(dtype)
        assert all_finite(x) and all_finite(x[:0])
        for v in (np.nan, -np.nan, np.inf, -np.inf):
            y = x.copy()
            y[500] = v
            assert not all_finite(y)
            assert not all_finite(y.reshape(7, 11, 13)[:, 4:7])  # a strided view holding it


# ----------------------------------------------------------------------------- reading


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_reader_refuses_non_finite_frames_naming_cache_shard_and_clip(copy, value):
    cache = FeatureCache(copy)
    name = cache.split("Development")[2]
    shard = _poison(copy, name, layer=1, value=value)
    refused = (rf"{shard}: clip {name}: frames of layer 3 hold NaN or infinite values .*cache {copy} cannot be "
               rf"trained or scored on")
    cache = FeatureCache(copy)
    with pytest.raises(CacheError, match=refused):
        cache.frames(name)
    with pytest.raises(CacheError, match=refused):
        list(cache.iter_frames(cache.names))
    cache.frames(name, layer=0)  # the other layer is sound
    FeatureCache(copy, verify="never").frames(name)  # unchecked on request (measurements)


def test_pooled_statistics_are_checked_too(copy):
    cache = FeatureCache(copy)
    name = cache.names[7]
    index = cache.shard_index(cache.shard_of(name))
    i = index.position[name]
    pooled = cache.pooled(name)
    pooled[0, 1, 2] = np.nan
    data = bytearray(index.path.read_bytes())
    at = index.pooled_offset + i * index.pooled_bytes
    data[at: at + pooled.nbytes] = pooled.tobytes()
    index.path.write_bytes(bytes(data))
    with h5py.File(index.path, "r+") as f:
        crc = f["pooled_crc32"][()]
        crc[i] = crc32(pooled)
        f["pooled_crc32"][...] = crc
    with pytest.raises(CacheError, match=rf"{index.path}: clip {name}: pooled statistics hold NaN"):
        FeatureCache(copy).pooled(name)


@pytest.mark.parametrize("split,preload", [("Train", "yes"), ("Development", "no"), ("Test3", "no")])
def test_train_head_refuses_a_non_finite_clip_of_any_split(copy, tmp_path, split, preload):
    """Training clips, the development clips that select the epoch and the clips only scored."""
    cache = FeatureCache(copy)
    name = [n for n in cache.split(split) if split == "Test3" or cache.clips[n].scoreable][1]
    shard = _poison(copy, name, layer=0, value=np.nan)
    with pytest.raises(CacheError, match=rf"{shard}: clip {name}: frames of layer 1 hold NaN"):
        train_head(TrainConfig(cache=str(copy), device="cpu", epochs=1, hidden=16, preload=preload, loss="wce",
                               labels="hard"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert not list((tmp_path / "run").glob("predictions*"))


def test_train_head_command_says_it_in_one_line(copy, tmp_path):
    name = FeatureCache(copy).split("Train")[4]
    shard = _poison(copy, name, layer=1, value=np.inf)
    r = CliRunner().invoke(train_head_cmd, ["--cache", str(copy), "--out", str(tmp_path / "run"), "--epochs", "1",
                                            "--hidden", "16", "--device", "cpu", "-q"])
    assert r.exit_code == 1
    line = r.output.strip().splitlines()[-1]
    assert line.startswith(f"Error: {shard}: clip {name}: frames of layer 3 hold NaN or infinite values")


def test_verify_cache_names_the_clips_holding_non_finite_values(copy):
    from conilium.cli.extract import verify_cache_cmd
    from conilium.extract.verify import verify_cache

    assert verify_cache(copy).problems == []
    name = FeatureCache(copy).names[5]
    shard = _poison(copy, name, 1, float("inf"))
    problems = verify_cache(copy).problems
    assert len(problems) == 1 and problems[0].startswith(f"{shard}: clip(s) holding NaN or infinite values")
    assert name in problems[0] and "extract-features --overwrite" in problems[0]
    r = CliRunner().invoke(verify_cache_cmd, [str(copy), "-q"])
    assert r.exit_code == 1 and name in r.output

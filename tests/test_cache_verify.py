"""``train-head --verify``: a clip is checked on the run's first read of it (the default), at
every read (``always``: a shard rewritten in place during the run is caught), or never."""

import os
import select
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from conilium.cache import FeatureCache
from conilium.cli.heads import train_head_cmd
from conilium.heads.config import TrainConfig
from conilium.testing import write_synthetic_cache


@pytest.fixture
def cache_dir(tmp_path):
    return write_synthetic_cache(tmp_path / "cache", clips=40, dim=8, clips_per_shard=10, seed=2, signal=0.5).path


def _flip_bit_in_place(cache_dir, name: str) -> str:
    """Flip one bit of ``name``'s frames of the first stored layer, writing that byte in place; the shard."""
    cache = FeatureCache(cache_dir)
    index = cache.shard_index(cache.shard_of(name))
    offset = index.layer_offset(0, int(index.offsets[index.position[name]])) + 5
    with open(index.path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x04]))
    return index.path


def _read_until(proc: subprocess.Popen, text: bytes, timeout: float) -> bytes:
    """The child's stderr until ``text`` appears in it (or it ends, or ``timeout`` passes)."""
    seen = b""
    end = time.monotonic() + timeout
    fd = proc.stderr.fileno()
    while text not in seen and time.monotonic() < end:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            seen += chunk
    return seen


def test_verify_always_catches_a_shard_rewritten_during_the_run(cache_dir, tmp_path):
    name = [n for n in FeatureCache(cache_dir).split("Train") if FeatureCache(cache_dir).clips[n].scoreable][2]
    argv = [sys.executable, "-m", "conilium.cli", "heads", "train", "--cache", str(cache_dir), "--out",
            str(tmp_path / "run"), "--epochs", "300", "--hidden", "16", "--device", "cpu", "--preload", "no",
            "--verify", "always"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    try:
        seen = _read_until(proc, b"epoch 3/300", timeout=120)  # every clip read (and checked) twice already
        assert b"epoch 3/300" in seen, seen[-2000:]
        shard = _flip_bit_in_place(cache_dir, name)
        _, rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1
    last = rest.decode().strip().splitlines()[-1]
    assert last.startswith(f"Error: {shard}: clip {name}: frames of layer 1 fail their CRC-32 check"), last
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_verify_option_values_and_help(cache_dir, tmp_path):
    assert TrainConfig(cache="c").verify == "first"
    r = CliRunner().invoke(train_head_cmd, ["--help"])
    assert "--verify [first|always|never]" in r.output and "on every read" not in r.output
    bad = CliRunner().invoke(train_head_cmd, ["--cache", str(cache_dir), "--out", str(tmp_path / "r"),
                                              "--verify", "sometimes"])
    assert bad.exit_code == 2 and "sometimes" in bad.output
    ok = CliRunner().invoke(train_head_cmd, ["--cache", str(cache_dir), "--out", str(tmp_path / "r"), "--epochs",
                                             "1", "--hidden", "16", "--device", "cpu", "--verify", "never", "-q"])
    assert ok.exit_code == 0, ok.output

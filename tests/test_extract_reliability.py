"""extract-features under failure and scale-out: SIGKILL then resume, torchrun with 2 ranks."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conilium.cache import FeatureCache
from conilium.demo import make_demo_corpus
from conilium.extract import ExtractConfig, extract_features

# small shards and one clip per batch, so that a run has many steps to be killed between
CONFIG = ExtractConfig("demo-wav2vec2-base", random_init=True, max_seconds=3.0, shard_size=3, layers="all",
                       pooled_stats=True)
RUNTIME = dict(batch_seconds=1.0, device="cpu", workers=1, verbose=False)


def _cli_args(corpus, out):
    return ["--corpus", str(corpus), "--upstream", CONFIG.upstream, "--random-init", "--out", str(out),
            "--max-seconds", "3", "--shard-size", "3", "--batch-seconds", "1", "--layers", "all", "--pooled-stats",
            "--device", "cpu", "--threads", "1", "--workers", "1", "-q"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p])
    return env


def _files(root: Path):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_demo_corpus(tmp_path_factory.mktemp("rel") / "corpus", clips=24, seed=11)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """An uninterrupted single-process run, with one torch thread."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return extract_features(CONFIG, corpus, tmp_path_factory.mktemp("ref") / "cache", **RUNTIME)
    finally:
        torch.set_num_threads(old)


def test_sigkill_then_rerun_equals_uninterrupted(corpus, reference, tmp_path):
    out = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-m", "conilium.cli.extract"] + _cli_args(corpus, out),
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if len(list((out / "shards").glob("shard-*.json"))) >= 2:
                break
            time.sleep(0.005)
        assert proc.poll() is None, "extraction ended before it could be killed: " + proc.stderr.read().decode()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists()
    with pytest.raises(Exception, match="incomplete"):
        FeatureCache(out)
    done_before = {p.name for p in (out / "shards").glob("shard-*.json")}
    assert 2 <= len(done_before) < 8

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from conilium.extract import ExtractStats

        st = ExtractStats()
        extract_features(CONFIG, corpus, out, stats=st, **RUNTIME)
    finally:
        torch.set_num_threads(old)
    assert st.shards_kept == len(done_before) and st.shards_written == 8 - len(done_before)
    got, want = _files(out), _files(reference)
    assert sorted(got) == sorted(want)  # no temporary file left behind
    for name in want:
        assert got[name] == want[name], f"{name} differs from the uninterrupted run"


def test_torchrun_two_ranks_equals_one_process(corpus, reference, tmp_path):
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "conilium.cli.extract"] + _cli_args(corpus, out)
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = FeatureCache(out), FeatureCache(reference)
    assert a.names == b.names and a.clips == b.clips
    ma, mb = dict(a.manifest), dict(b.manifest)
    assert ma == mb  # same settings, statistics, shards and checksums
    for n in a.names:
        np.testing.assert_array_equal(a.frames(n), b.frames(n))
    got, want = _files(out), _files(reference)
    assert sorted(got) == sorted(want)
    assert all(got[k] == want[k] for k in want)

"""Commands stopped by a signal: SIGTERM and SIGINT release the lock, leave no temporary file and
end with one line; a rerun then completes. Real processes, real signals."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conilium.cache import FeatureCache
from conilium.demo import make_demo_corpus
from conilium.extract import ExtractConfig, extract_features
from conilium.heads.train import TrainConfig, train_head
from conilium.locking import LOCK_FILE
from conilium.testing import write_synthetic_cache

TRAIN_HEAD = "import sys; from conilium.cli.heads import train_head_cmd; sys.argv[0] = 'train-head'; train_head_cmd()"


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    e["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p])
    return e


def start(args):
    return subprocess.Popen([sys.executable] + args, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for(proc, ready, what: str, timeout: float = 120.0) -> None:
    """Wait until ``ready()`` while ``proc`` runs; fail naming ``what`` when it ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ready():
            return
        time.sleep(0.02)
    out, err = proc.communicate(timeout=30) if proc.poll() is not None else ("", "")
    proc.kill()
    pytest.fail(f"the process ended (or took too long) before {what}: {err[-2000:]}")


def stop(proc, signum):
    os.kill(proc.pid, signum)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out, err


def leftovers(root: Path):
    """Lock files and temporary files under ``root``."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.name == LOCK_FILE or p.name.endswith(".tmp") or ".tmp." in p.name)


def assert_one_line(err: str, signum) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"Error: stopped by {signal.Signals(signum).name}"), err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def syn_cache(tmp_path_factory):
    return write_synthetic_cache(tmp_path_factory.mktemp("syn") / "cache", clips=60, dim=8, seed=2, signal=0.4)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_train_head_cleanly(syn_cache, tmp_path, signum):
    run = tmp_path / "run"
    proc = start(["-c", TRAIN_HEAD, "--cache", str(syn_cache.path), "--out", str(run), "--epochs", "100000",
                  "--hidden", "16", "--device", "cpu", "-q"])
    wait_for(proc, lambda: (run / LOCK_FILE).exists(), "it took its lock")
    time.sleep(0.5)  # into the training
    rc, _, err = stop(proc, signum)
    assert rc == 128 + signum
    assert_one_line(err, signum)
    assert not run.exists() or leftovers(run) == []
    m = train_head(TrainConfig(cache=str(syn_cache.path), device="cpu", epochs=2, hidden=16), run, progress=False)
    assert m["best_epoch"] >= 1 and (run / "metrics.json").is_file() and leftovers(run) == []


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_demo_corpus(tmp_path_factory.mktemp("sig") / "corpus", clips=24, seed=11)


EXTRACT = ExtractConfig("demo-wav2vec2-base", random_init=True, max_seconds=3.0, shard_size=3)


def extract_args(corpus, out):
    return ["-m", "conilium.cli.extract", "--corpus", str(corpus), "--upstream", EXTRACT.upstream, "--random-init",
            "--out", str(out), "--max-seconds", "3", "--shard-size", "3", "--batch-seconds", "1", "--device", "cpu",
            "--threads", "1", "--workers", "1", "-q"]


def test_sigterm_stops_extraction_cleanly_and_a_rerun_resumes(corpus, tmp_path):
    out = tmp_path / "cache"
    proc = start(extract_args(corpus, out))
    wait_for(proc, lambda: len(list((out / "shards").glob("shard-*.json"))) >= 1, "it wrote a shard")
    rc, _, err = stop(proc, signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM
    assert_one_line(err, signal.SIGTERM)
    assert leftovers(out) == []
    assert not (out / "manifest.json").exists()
    extract_features(EXTRACT, corpus, out, batch_seconds=1.0, device="cpu", workers=1, verbose=False)
    assert len(FeatureCache(out).names) == 24 and leftovers(out) == []

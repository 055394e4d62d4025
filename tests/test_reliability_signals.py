"""Commands stopped by a signal: SIGTERM and SIGINT release the lock, leave no temporary file and
end with one line; a rerun then completes. Real processes, real signals."""

import json
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
from conilium.heads.grid import expand_spec, run_grid
from conilium.heads.train import TrainConfig, train_head
from conilium.locking import LOCK_FILE, read_holder
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


TRAIN_GRID = "import sys; from conilium.cli.heads import train_grid_cmd; sys.argv[0] = 'train-grid'; train_grid_cmd()"


def start_grid(syn_cache, tmp_path):
    """train-grid --n-jobs 2 (loky) of two runs that are two passes, training until stopped; and its workers' pids
    (the holders of the two run directories' locks)."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"common": {"epochs": 100000, "hidden": 16, "device": "cpu"},
                                "runs": [{"name": "a", "seed": 0}, {"name": "b", "seed": 1}]}))
    grid = tmp_path / "grid"
    proc = start(["-c", TRAIN_GRID, "--spec", str(spec), "--cache", str(syn_cache.path), "--out", str(grid),
                  "--n-jobs", "2", "--threads-per-job", "1", "-q"])
    locks = [grid / name / LOCK_FILE for name in ("a", "b")]
    wait_for(proc, lambda: all(read_holder(p) is not None for p in locks), "both runs took their locks")
    workers = [read_holder(p).pid for p in locks]
    assert proc.pid not in workers
    return proc, grid, workers


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def rerun_grid(syn_cache, grid):
    runs = expand_spec({"common": {"epochs": 2, "hidden": 16, "device": "cpu"},
                        "runs": [{"name": "a", "seed": 0}, {"name": "b", "seed": 1}]}, cache=syn_cache.path)
    rows = run_grid(runs, grid, n_jobs=2, threads_per_job=1, progress=False)
    assert [r["status"] for r in rows] == ["trained", "trained"], rows
    assert leftovers(grid) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_grid_workers_die_with_a_killed_grid_and_a_rerun_completes(syn_cache, tmp_path):
    proc, grid, workers = start_grid(syn_cache, tmp_path)
    rc, _, _ = stop(proc, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    deadline = time.time() + 15
    while time.time() < deadline and any(alive(p) for p in workers):
        time.sleep(0.1)
    assert not any(alive(p) for p in workers), "grid workers outlived their grid"
    assert leftovers(grid) == []  # they stopped cleanly: locks released
    rerun_grid(syn_cache, grid)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_stops_a_grid_and_its_workers_cleanly(syn_cache, tmp_path):
    proc, grid, workers = start_grid(syn_cache, tmp_path)
    rc, _, err = stop(proc, signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM
    assert_one_line(err, signal.SIGTERM)
    assert leftovers(grid) == []
    deadline = time.time() + 15
    while time.time() < deadline and any(alive(p) for p in workers):
        time.sleep(0.1)
    assert not any(alive(p) for p in workers)
    rerun_grid(syn_cache, grid)


def test_a_grid_rerun_trains_again_a_run_whose_metrics_or_config_is_damaged(syn_cache, tmp_path):
    spec = {"common": {"epochs": 2, "hidden": 16, "device": "cpu"},
            "runs": [{"name": "a", "seed": 0}, {"name": "b", "seed": 1}, {"name": "c", "seed": 2}]}
    runs = expand_spec(spec, cache=syn_cache.path)
    grid = tmp_path / "grid"
    run_grid(runs, grid, n_jobs=1, backend="threading", progress=False)
    kept = (grid / "c" / "metrics.json").read_bytes()
    for name, damaged in (("a", "metrics.json"), ("b", "config.json")):
        path = grid / name / damaged
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # cut short
    rows = run_grid(runs, grid, n_jobs=1, backend="threading", progress=False)
    assert [r["status"] for r in rows] == ["trained", "trained", "skipped (complete)"], rows
    for name in ("a", "b"):
        for f in ("metrics.json", "config.json"):
            json.loads((grid / name / f).read_text())  # whole again
    assert (grid / "c" / "metrics.json").read_bytes() == kept


def test_extract_features_names_an_unfinished_finetune_directory_given_as_upstream(corpus, tmp_path):
    from click.testing import CliRunner

    from conilium.cli.extract import extract_features_cmd

    model = tmp_path / "models" / "best"
    (model / "checkpoints").mkdir(parents=True)
    (model / "checkpoints" / "last.pt").write_bytes(b"a checkpoint")
    (model / "config.json").write_text(json.dumps({"kind": "finetune", "lr": 5e-5}))  # finetune-best's run config
    out = tmp_path / "cache"
    r = CliRunner().invoke(extract_features_cmd, ["--corpus", str(corpus), "--upstream", str(model), "--out", str(out),
                                                  "-q"])
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    assert f"{model} is a finetune-best model directory whose training did not finish" in lines[0]
    assert f"--resume --out {model}" in lines[0]
    assert not out.exists()


def test_a_signal_swallowed_by_a_garbage_collection_callback_is_delivered_again(capfd):
    # the handler's Stopped raised inside a weakref callback is one Python only prints ("Exception
    # ignored in ...") and forgets: a grid stopped that way reported a traceback and ran on
    import weakref

    from conilium.locking import Stopped, stop_on_signals

    class Thing:
        pass

    def callback(_ref):
        signal.raise_signal(signal.SIGTERM)  # the handler runs at the loop's next jump, inside the callback
        for _ in range(1000):
            pass

    before, hook = [], sys.unraisablehook
    thing = Thing()
    ref = weakref.ref(thing, callback)
    with pytest.raises(Stopped) as stopped:
        with stop_on_signals(before=before.append):
            del thing  # the callback runs here and its Stopped is swallowed
            deadline = time.time() + 5
            while time.time() < deadline:
                time.sleep(0.01)
    assert stopped.value.signum == signal.SIGTERM and before == [signal.SIGTERM]
    assert ref() is None
    assert "Exception ignored" not in capfd.readouterr().err
    assert sys.unraisablehook is hook


def test_a_swallowed_signal_stops_a_block_that_ends_before_it_is_delivered_again():
    import weakref

    from conilium.locking import Stopped, stop_on_signals

    class Thing:
        pass

    def callback(_ref):
        signal.raise_signal(signal.SIGTERM)
        for _ in range(1000):
            pass

    thing = Thing()
    ref = weakref.ref(thing, callback)  # noqa: F841 - kept for its callback
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Stopped) as stopped:
        with stop_on_signals():
            del thing  # swallowed; the block ends at once, well before the redelivery
    assert stopped.value.signum == signal.SIGTERM
    time.sleep(0.1)  # no late redelivery reaches the handler restored after the block (pytest's own)
    assert signal.getsignal(signal.SIGTERM) is handler


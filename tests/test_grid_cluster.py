"""train-grid on a cluster: a real dask.distributed LocalCluster and a local ray.

Optional: these run where the ``cluster`` extra is installed (``pip install -e .[test,cluster]``)
and are skipped otherwise. Each grid is started from a folder other than the one the
cluster's workers were started in, with a relative ``--cache`` and ``--out``: the workers
must get the grid's paths, not resolve them against their own working directory. The
runs must equal the same grid trained by local processes (loky), byte for byte.
"""

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from conilium.cli.heads import train_grid_cmd

SPEC = {
    "common": {"epochs": 2, "hidden": 32, "device": "cpu", "layers": -1, "seed": 3},
    # two passes: the sampler changes the clip order
    "runs": [{"name": "wbce-S", "loss": "wbce", "labels": "S"},
             {"name": "kld-S-balanced", "loss": "kld", "labels": "S", "sampler": "balanced"}],
}


@pytest.fixture(scope="module")
def local_grid(demo_cache, tmp_path_factory):
    """The reference: SPEC trained with the default loky backend."""
    base = tmp_path_factory.mktemp("grid_loky")
    spec = base / "spec.json"
    spec.write_text(json.dumps(SPEC))
    out = base / "grid"
    r = CliRunner().invoke(train_grid_cmd, ["--spec", str(spec), "--cache", str(demo_cache), "--out", str(out),
                                            "--n-jobs", "2", "--threads-per-job", "1", "--quiet"])
    assert r.exit_code == 0, r.output
    return out


def _relative_layout(demo_cache, tmp_path) -> Path:
    """A work folder holding spec.json and a link ``cache`` to the demo cache; returns it."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "spec.json").write_text(json.dumps(SPEC))
    os.symlink(demo_cache, work / "cache")
    return work


def _same_as_local(out: Path, local: Path) -> None:
    with open(out / "results.csv", newline="") as f:
        rows = {row["name"]: row for row in csv.DictReader(f)}
    assert {name: row["status"] for name, row in rows.items()} == {"wbce-S": "trained", "kld-S-balanced": "trained"}
    for name in rows:
        for split in ("Train", "Development"):
            assert (out / name / "predictions" / f"{split}.csv").read_bytes() == \
                (local / name / "predictions" / f"{split}.csv").read_bytes(), (name, split)
        config = json.loads((out / name / "config.json").read_text())
        assert Path(config["cache"]).is_absolute()
    assert json.loads((out / "grid.json").read_text())["passes"] == [["wbce-S"], ["kld-S-balanced"]]


def _rerun_skips(args) -> None:
    """Started again from the same folder (relative paths): every run is recognised as complete."""
    r = CliRunner().invoke(train_grid_cmd, args)
    assert r.exit_code == 0, r.output
    assert r.output.count("skipped (complete)") == 2, r.output


def test_dask_local_cluster_with_relative_paths(demo_cache, local_grid, tmp_path, monkeypatch):
    distributed = pytest.importorskip("dask.distributed")
    work = _relative_layout(demo_cache, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the workers start here: relative paths would point to nothing
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    try:
        monkeypatch.chdir(work)
        args = ["--spec", "spec.json", "--cache", "cache", "--out", "grid", "--backend", "dask",
                "--address", cluster.scheduler_address, "--n-jobs", "2", "--threads-per-job", "1", "--quiet"]
        r = CliRunner().invoke(train_grid_cmd, args)
        assert r.exit_code == 0, r.output
        _same_as_local(work / "grid", local_grid)
        _rerun_skips(args)
    finally:
        cluster.close()


def test_dask_without_an_address_starts_its_own_cluster(demo_cache, local_grid, tmp_path, monkeypatch):
    pytest.importorskip("dask.distributed")
    work = _relative_layout(demo_cache, tmp_path)
    monkeypatch.chdir(work)
    r = CliRunner().invoke(train_grid_cmd, ["--spec", "spec.json", "--cache", "cache", "--out", "grid",
                                            "--backend", "dask", "--n-jobs", "2", "--threads-per-job", "1", "--quiet"])
    assert r.exit_code == 0, r.output
    _same_as_local(work / "grid", local_grid)


def test_local_ray_with_relative_paths(demo_cache, local_grid, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free < 200 * 2**20:
        pytest.skip("too little shared memory for ray's object store")
    work = _relative_layout(demo_cache, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 2**20)
    try:
        monkeypatch.chdir(work)
        args = ["--spec", "spec.json", "--cache", "cache", "--out", "grid", "--backend", "ray",
                "--n-jobs", "2", "--threads-per-job", "1", "--quiet"]
        r = CliRunner().invoke(train_grid_cmd, args)
        assert r.exit_code == 0, r.output
        _same_as_local(work / "grid", local_grid)
        _rerun_skips(args)
    finally:
        ray.shutdown()


def test_a_failing_run_on_dask_is_reported_and_the_others_train(demo_cache, tmp_path, monkeypatch):
    """A run that fails in a worker is a 'failed' row naming its error, not a lost grid."""
    pytest.importorskip("dask.distributed")
    bad = dict(SPEC, runs=SPEC["runs"] + [{"name": "bad-layer", "loss": "wbce", "labels": "S", "layers": 40}])
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(bad))
    r = CliRunner().invoke(train_grid_cmd, ["--spec", str(spec), "--cache", str(demo_cache), "--out",
                                            str(tmp_path / "grid"), "--backend", "dask", "--n-jobs", "2",
                                            "--threads-per-job", "1", "--quiet"])
    assert r.exit_code == 1 and "1 run(s) failed: bad-layer" in r.output, r.output
    with open(tmp_path / "grid" / "results.csv", newline="") as f:
        rows = {row["name"]: row for row in csv.DictReader(f)}
    assert rows["bad-layer"]["status"] == "failed" and "40" in rows["bad-layer"]["error"]
    assert rows["wbce-S"]["status"] == "trained" and rows["kld-S-balanced"]["status"] == "trained"

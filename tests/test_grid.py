"""train-grid: specs, presets, and a grid on the demo cache producing the results table."""

import csv
import json

import pytest
from click.testing import CliRunner

from conilium.errors import ConfigError
from conilium.runs import read_predictions
from conilium.cli.heads import train_grid_cmd
from conilium.heads.grid import expand_spec, load_spec, presets, run_grid


def test_presets_cover_the_papers_tables():
    assert {"table2", "sampler", "table3"} <= set(presets())
    t2 = expand_spec(load_spec(preset="table2"), cache="c")
    assert [(c.loss, c.labels, c.sampler) for _, c, _ in t2] == [
        ("wce", "hard", None), ("wbce", "P", None), ("wbce", "S", None), ("kld", "P", None), ("kld", "S", None)]
    assert [p["f1_macro"] for _, _, p in t2] == [0.302, 0.340, 0.350, 0.322, 0.337]
    sampler = expand_spec(load_spec(preset="sampler"), cache="c")
    assert sum(c.sampler == "balanced" for _, c, _ in sampler) >= 4
    t3 = expand_spec(load_spec(preset="table3"), cache="c")
    assert sorted(c.labels for _, c, _ in t3) == ["P*", "P*", "S*", "S*"]
    assert all(c.cache == "c" for _, c, _ in t2 + sampler + t3)


def test_product_specs_name_runs_after_their_values_and_overrides_apply():
    spec = {"common": {"cache": "x", "epochs": 7}, "product": {"loss": ["wbce", "kld"], "labels": ["P", "S*"]}}
    runs = expand_spec(spec, overrides={"seed": 3})
    assert [n for n, _, _ in runs] == ["wbce-P", "wbce-Sstar", "kld-P", "kld-Sstar"]
    assert all(c.epochs == 7 and c.seed == 3 and c.cache == "x" for _, c, _ in runs)


@pytest.mark.parametrize("spec, message", [
    ({"common": {"cache": "x"}}, "no run"),
    ({"runs": [{"name": "a", "loss": "wbce"}]}, "no cache"),
    ({"common": {"cache": "x"}, "runs": [{"name": "a"}, {"name": "a"}]}, "appears twice"),
    ({"common": {"cache": "x"}, "runs": [{"name": "a/b"}]}, "names a folder"),
    ({"common": {"cache": "x"}, "runs": [{"name": "a", "lossy": "wbce"}]}, "unknown training option"),
    ({"common": {"cache": "x"}, "runs": [{"name": "a", "loss": "wce", "labels": "S"}]},
     "run a: --loss wce needs --labels hard"),
    ({"common": {"cache": "x"}, "grid": {}}, "unknown key"),
])
def test_bad_specs_are_clear_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        expand_spec(spec)


@pytest.mark.parametrize("backend, module, message", [
    ("dask", "dask.distributed", "--backend dask needs dask.distributed"),
    ("ray", "ray", "--backend ray needs ray"),
])
def test_missing_cluster_backend_is_a_clear_error_before_anything_is_written(tmp_path, monkeypatch, backend, module,
                                                                             message):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    runs = expand_spec({"common": {"cache": str(tmp_path)}, "runs": [{"name": "a"}]})
    with pytest.raises(ConfigError, match=message):
        run_grid(runs, tmp_path / "grid", backend=backend, progress=False)
    assert not (tmp_path / "grid").exists()


def test_grid_on_the_demo_cache_writes_the_results_table_and_resumes(demo_cache, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({
        "common": {"epochs": 2, "hidden": 64, "device": "cpu", "layers": -1},
        "runs": [{"name": "wce-hard", "loss": "wce", "labels": "hard", "paper": {"f1_macro": 0.302}},
                 {"name": "kld-S-balanced", "loss": "kld", "labels": "S", "sampler": "balanced"},
                 {"name": "wbce-Pstar", "loss": "wbce", "labels": "P*"}]}))
    out = tmp_path / "grid"
    args = ["--spec", str(spec), "--cache", str(demo_cache), "--out", str(out), "--n-jobs", "2", "--quiet"]
    r = CliRunner().invoke(train_grid_cmd, args)
    assert r.exit_code == 0, r.output
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["name"] for row in rows] == ["wce-hard", "kld-S-balanced", "wbce-Pstar"]
    # the sampler changes the clip order, P* keeps fewer clips: three data passes
    passes = json.loads((out / "grid.json").read_text())["passes"]
    assert passes == [["wce-hard"], ["kld-S-balanced"], ["wbce-Pstar"]]
    assert all(row["status"] == "trained" for row in rows)
    for row in rows:
        metrics = json.loads((out / row["name"] / "metrics.json").read_text())
        assert float(row["f1_macro"]) == pytest.approx(metrics["f1_macro"])
        assert int(row["best_epoch"]) == metrics["best_epoch"]
        assert read_predictions(out / row["name"] / "predictions" / "Development.csv").names
    assert rows[0]["paper_f1_macro"] == "0.302" and rows[1]["sampler"] == "balanced"
    # P* trains on fewer clips than the full set
    assert int(rows[2]["train_clips"]) < int(rows[0]["train_clips"])
    md = (out / "results.md").read_text()
    assert md.startswith("| run | loss | labels | sampler | dev F1-macro") and "| kld-S-balanced | kld | S | balanced |" in md
    assert "| wce-hard |" in r.output
    # a second call trains nothing: every run directory is complete with the same configuration
    before = (out / "wce-hard" / "model.pt").stat().st_mtime_ns
    r = CliRunner().invoke(train_grid_cmd, args + ["--set", "num_workers=0"])
    assert r.exit_code == 0, r.output
    with open(out / "results.csv", newline="") as f:
        assert {row["status"] for row in csv.DictReader(f)} == {"skipped (complete)"}
    assert (out / "wce-hard" / "model.pt").stat().st_mtime_ns == before
    # another configuration in the same folder is refused
    r = CliRunner().invoke(train_grid_cmd, args + ["--set", "epochs=3"])
    assert r.exit_code == 1 and "another configuration" in r.output


def test_seeds_train_each_configuration_per_seed_and_report_mean_and_sd(tmp_path):
    """train-grid --seeds 0,1,2: one run per configuration and seed (<name>-seed<S>, that seed in
    its config), results.csv's seed column, and seeds.csv / results.md with each configuration's
    mean and sample standard deviation over its seeds, equal to the rows' own scores."""
    import statistics

    from conilium.testing import write_synthetic_cache

    cache = write_synthetic_cache(tmp_path / "cache", clips=80, dim=8, seed=1, signal=0.6)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"runs": [{"name": "wbce-S", "loss": "wbce", "labels": "S"},
                                         {"name": "kld-P", "loss": "kld", "labels": "P"}]}))
    args = ["--spec", str(spec), "--cache", str(cache.path), "--out", str(tmp_path / "grid"), "--seeds", "0,1,2",
            "--set", "epochs=2", "--set", "hidden=16", "--set", "device=cpu", "--set", "threads=1", "-q"]
    r = CliRunner().invoke(train_grid_cmd, args)
    assert r.exit_code == 0, r.output
    with open(tmp_path / "grid" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(row["name"], row["seed"]) for row in rows] == [
        (f"{n}-seed{s}", str(s)) for n in ("wbce-S", "kld-P") for s in (0, 1, 2)]
    for row in rows:
        assert json.loads((tmp_path / "grid" / row["name"] / "config.json").read_text())["seed"] == int(row["seed"])
    macro = {n: [float(row["f1_macro"]) for row in rows if row["name"].startswith(n + "-")] for n in ("wbce-S", "kld-P")}
    assert len(set(macro["wbce-S"])) > 1  # the seeds differ
    with open(tmp_path / "grid" / "seeds.csv", newline="") as f:
        summary = {row["name"]: row for row in csv.DictReader(f)}
    assert set(summary) == {"wbce-S", "kld-P"}
    for n, values in macro.items():
        assert summary[n]["seeds"] == "0 1 2" and summary[n]["trained"] == "3"
        assert float(summary[n]["f1_macro_mean"]) == pytest.approx(statistics.fmean(values), abs=1e-6)
        assert float(summary[n]["f1_macro_sd"]) == pytest.approx(statistics.stdev(values), abs=1e-6)
    md = (tmp_path / "grid" / "results.md").read_text()
    mean, sd = statistics.fmean(macro["wbce-S"]), statistics.stdev(macro["wbce-S"])
    assert "Mean ± sample standard deviation over seeds" in md and f"| wbce-S | 3 of 3 (0, 1, 2) | {mean:.3f} ± {sd:.3f}" in md
    # resumed: nothing retrained, the same table
    r = CliRunner().invoke(train_grid_cmd, args)
    assert r.exit_code == 0 and "skipped (complete)" in (tmp_path / "grid" / "results.csv").read_text()
    # --seeds and --set seed= both name the seed; bad seed lists are named
    for extra, message in ((["--set", "seed=4"], "give one of them"), ([], "is not a seed"), ([], "given twice")):
        bad = list(args)
        if message == "is not a seed":
            bad[bad.index("0,1,2")] = "0,x"
        if message == "given twice":
            bad[bad.index("0,1,2")] = "1,1"
        r = CliRunner().invoke(train_grid_cmd, bad + extra)
        assert r.exit_code != 0 and message in r.output

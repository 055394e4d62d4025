"""One data pass per grid group: every head of a pass writes exactly what its own train-head
run writes (bitwise equal predictions, equal metrics apart from timings), and train-grid
groups the paper's presets into the passes their clip lists and samplers allow."""

import filecmp
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conilium.heads.batches import BatchReader
from conilium.heads.data import ClipDataset, collate, select_input
from conilium.heads.grid import expand_spec, load_spec, run_grid
from conilium.heads.train import TrainConfig, TrainingError, load_head, plan_passes, train_head, train_heads
from conilium.testing import write_synthetic_cache

TIMING_HISTORY = ("seconds", "train_seconds")
TIMING_TRAINING = ("seconds", "clips_per_second")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_synthetic_cache(tmp_path_factory.mktemp("pass") / "cache", clips=90, dim=8, seed=3, signal=0.5)


def _config(cache, **kw):
    kw.setdefault("epochs", 3)
    kw.setdefault("hidden", 16)
    kw.setdefault("batch_size", 8)
    return TrainConfig(cache=str(cache.path), device="cpu", threads=1, **kw)


def _untimed(metrics):
    m = dict(metrics)
    m["history"] = [{k: v for k, v in h.items() if k not in TIMING_HISTORY} for h in m["history"]]
    m["training"] = {k: v for k, v in m["training"].items() if k not in TIMING_TRAINING}
    return m


def assert_same_run(a, b):
    """Two run directories: bitwise equal predictions, equal metrics apart from timings, equal configs,
    equal weights (a fusion run's too)."""
    preds = sorted(p.name for p in (a / "predictions").iterdir())
    assert preds == sorted(p.name for p in (b / "predictions").iterdir()) and preds
    for name in preds:
        assert filecmp.cmp(a / "predictions" / name, b / "predictions" / name, shallow=False), name
    assert _untimed(json.loads((a / "metrics.json").read_text())) == _untimed(json.loads((b / "metrics.json").read_text()))
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    sa, sb = load_head(a, fusion=True)[1].state_dict, load_head(b, fusion=True)[1].state_dict
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_every_head_of_a_pass_equals_its_own_train_head_run(cache, tmp_path):
    configs = {
        "wce-hard": _config(cache, loss="wce", labels="hard"),
        "wbce-P": _config(cache, loss="wbce", labels="P"),
        "kld-S": _config(cache, loss="kld", labels="S", pooling="mean", epochs=5, hidden=24),
        # stops early: the others go on
        "bce-S-patience": _config(cache, loss="bce", labels="S", epochs=6, patience=1, lr=1e-6),
        "focal-P": _config(cache, loss="focal", labels="P", dropout=0.0, lr=3e-3, weight_decay=0.0),
    }
    shared = configs
    assert len(plan_passes(list(shared.values()))) == 1
    # the input selection is part of what a pass shares
    other = [_config(cache, loss="wbce", labels="P", layers=3), _config(cache, loss="wbce", labels="P", layers=-1)]
    assert plan_passes(list(shared.values()) + other) == [[0, 1, 2, 3, 4], [5, 6]]
    results = train_heads([(c, tmp_path / "pass" / k) for k, c in shared.items()], progress=False)
    assert all(isinstance(r, dict) for r in results)
    patience = results[list(shared).index("bce-S-patience")]
    assert len(patience["history"]) < 6 and len(results[list(shared).index("kld-S")]["history"]) == 5
    for name, config in shared.items():
        solo = train_head(config, tmp_path / "solo" / name, progress=False)
        assert _untimed(solo) == _untimed(results[list(shared).index(name)])
        assert_same_run(tmp_path / "pass" / name, tmp_path / "solo" / name)


def test_a_head_whose_loss_diverges_fails_alone(cache, tmp_path):
    good = _config(cache, loss="wbce", labels="S", epochs=2)
    bad = _config(cache, loss="wce", labels="hard", epochs=2, lr=1e30)
    results = train_heads([(bad, tmp_path / "bad"), (good, tmp_path / "good")], progress=False)
    assert isinstance(results[0], TrainingError) and "lower --lr" in str(results[0])
    assert not (tmp_path / "bad" / "metrics.json").exists()
    train_head(good, tmp_path / "good-solo", progress=False)
    assert_same_run(tmp_path / "good", tmp_path / "good-solo")
    with pytest.raises(TrainingError):
        train_head(bad, tmp_path / "bad-solo", progress=False)


def test_runs_that_cannot_share_a_pass_are_refused(cache, tmp_path):
    from conilium.errors import ConfigError

    a, b = _config(cache, loss="wbce", labels="S"), _config(cache, loss="wbce", labels="S", seed=1)
    with pytest.raises(ConfigError, match="do not share one data pass"):
        train_heads([(a, tmp_path / "a"), (b, tmp_path / "b")], progress=False)
    assert not (tmp_path / "a" / "metrics.json").exists()


def test_table2_is_one_pass_and_every_run_equals_train_head(cache, tmp_path):
    runs = expand_spec(load_spec(preset="table2"), cache=cache.path,
                       overrides={"epochs": 2, "hidden": 16, "batch_size": 8, "device": "cpu", "threads": 1})
    rows = run_grid(runs, tmp_path / "grid", progress=False)
    assert [r["status"] for r in rows] == ["trained"] * 5
    grid = json.loads((tmp_path / "grid" / "grid.json").read_text())
    assert grid["passes"] == [["wce-hard", "wbce-P", "wbce-S", "kld-P", "kld-S"]]
    for name, config, _ in runs:
        train_head(config, tmp_path / "solo" / name, progress=False)
        assert_same_run(tmp_path / "grid" / name, tmp_path / "solo" / name)
    # resuming trains nothing
    again = run_grid(runs, tmp_path / "grid", progress=False)
    assert {r["status"] for r in again} == {"skipped (complete)"}


def test_the_presets_group_into_the_passes_their_clips_and_samplers_allow(cache):
    def passes(preset):
        runs = expand_spec(load_spec(preset=preset), cache=cache.path)
        return [[runs[i][0] for i in group] for group in plan_passes([c for _, c, _ in runs])]

    # hard, P and S keep the same clips (P/S fall back to the consensus one-hot where no
    # annotation names a target class)
    assert passes("table2") == [["wce-hard", "wbce-P", "wbce-S", "kld-P", "kld-S"]]
    # the balanced sampler's draws depend on the consensus classes only: the same for P and S
    assert passes("sampler") == [["bce-P", "bce-S"],
                                 ["bce-P-balanced", "bce-S-balanced", "kld-P-balanced", "kld-S-balanced"]]
    # P* and S* keep different clips, and the sampler changes the order
    assert passes("table3") == [["wbce-Pstar"], ["wbce-Sstar"], ["kld-Pstar-balanced"], ["kld-Sstar-balanced"]]


def test_buffered_batches_equal_collate(cache):
    names = cache.split("Train")
    for layers, pooled in (("weighted", False), (3, False), ("weighted", True)):
        sel = select_input(cache, layers, pooled)
        ds = ClipDataset(cache, names, sel, None)
        reader = BatchReader(ds, torch.device("cpu"), max_batch=7)
        order = np.random.default_rng(0).permutation(len(names)).tolist()
        for idx in (order[:7], order[7:10], order[10:17]):
            x, lengths, got = reader.read(idx)
            cx, clengths, _, cidx = collate([ds[i] for i in idx])
            assert got == cidx.tolist()
            assert x.dtype == torch.float32 and x.is_contiguous() and torch.equal(x, cx.float())
            assert (lengths is None and clengths is None) or torch.equal(lengths, clengths)


def test_resident_batches_equal_buffered_ones(cache, monkeypatch):
    """Features kept on the device (as on a GPU, here on the CPU) give the batches the host buffers
    give, bitwise (+0.0 padding), in a few chunks of clips."""
    from conilium.heads import batches

    monkeypatch.setattr(batches, "RESIDENT_CHUNK", 5)
    names = cache.split("Train")
    for layers, pooled in (("weighted", False), (3, False), ("weighted", True)):
        sel = select_input(cache, layers, pooled)
        ds = ClipDataset(cache, names, sel, None, preload=True)
        buffered, kept = BatchReader(ds, torch.device("cpu"), max_batch=7), batches.ResidentReader(ds, torch.device("cpu"))
        order = np.random.default_rng(1).permutation(len(names)).tolist()
        for idx in (order[:7], order[7:10], order[-7:]):
            x, lengths, got = kept.read(idx)
            bx, blengths, bidx = buffered.read(idx)
            assert got == bidx and x.dtype == torch.float32
            assert torch.equal(x, bx) and not torch.signbit(x).logical_and(x == 0).any()
            assert (lengths is None and blengths is None) or torch.equal(lengths, blengths)


def test_a_run_on_resident_features_equals_one_on_host_buffers(cache, tmp_path, monkeypatch):
    from conilium.heads import batches

    config = _config(cache, loss="wbce", labels="S", epochs=2, preload="yes")
    train_head(config, tmp_path / "host", progress=False)
    used = []
    monkeypatch.setattr(batches, "resident", lambda ds, device: used.append(1) or ds.preloaded)
    train_head(config, tmp_path / "kept", progress=False)
    assert used
    assert_same_run(tmp_path / "host", tmp_path / "kept")


def test_a_one_layer_weighted_mix_is_frozen_without_changing_the_run(tmp_path, monkeypatch):
    from conilium.heads import recipe as head_recipe

    one = write_synthetic_cache(tmp_path / "one", clips=60, dim=8, stored_layers=(3,), seed=4, signal=0.5)
    config = _config(one, loss="wbce", labels="S", epochs=2)
    train_head(config, tmp_path / "frozen", progress=False)
    monkeypatch.setattr(head_recipe, "_freeze_constant_mix", lambda model: None)
    train_head(config, tmp_path / "trained", progress=False)
    assert_same_run(tmp_path / "frozen", tmp_path / "trained")
    assert load_head(tmp_path / "frozen")[1].state_dict["layer_mix.weights"].tolist() == [0.0]


def test_a_grid_pass_reports_its_epochs_as_they_end(cache, tmp_path, capsys):
    """train-grid's bar moves within a pass: each pass's worker writes its epochs done to a
    progress file as they end, the grid's bar sums them (a pass that stops early counts whole
    when it ends), and the files are gone afterwards."""
    from conilium.heads.grid import _PassProgress, _train_pass

    seen = []
    runs = [(_config(cache, loss="wbce", labels="S", epochs=4), tmp_path / "a"),
            (_config(cache, loss="bce", labels="S", epochs=6, patience=1, lr=1e-6), tmp_path / "b")]
    train_heads(runs, progress=False, on_epoch=lambda epoch, last: seen.append((epoch, last)))
    stopped = json.loads((tmp_path / "b" / "metrics.json").read_text())["history"][-1]["epoch"]
    assert stopped < 6 and seen == [(e, 6) for e in range(1, max(4, stopped) + 1)]

    group = [("c", _config(cache, epochs=3), {}, str(tmp_path / "c")),
             ("d", _config(cache, epochs=3, loss="wce", labels="hard"), {}, str(tmp_path / "d"))]
    late = [("e", _config(cache, epochs=5), {}, str(tmp_path / "e"))]
    bar = _PassProgress([group, late], enabled=True, local=True)
    try:
        assert bar.bar.total == 8 and all(f is not None for f in bar.files)
        rows = _train_pass(group, 1, None, bar.files[0])
        assert [r["status"] for r in rows] == ["trained", "trained"]
        with open(bar.files[0]) as f:
            assert f.read() == "3 3\n"
        bar.refresh()
        assert bar.bar.n == 3  # the second pass has not started
        with open(bar.files[1], "w") as f:
            f.write("2 5\n")
        bar.refresh()
        assert bar.bar.n == 5
        bar.pass_done(["e"])  # ended early: counted whole
        assert bar.bar.n == 8 and bar.runs_done == 1
    finally:
        bar.close()
    assert not Path(bar.folder).exists()
    assert "grid" in capsys.readouterr().err


def test_results_csv_shares_a_pass_time_among_its_heads(cache, tmp_path):
    import csv

    runs = [("wce-hard", _config(cache, loss="wce", labels="hard"), {}),
            ("wbce-P", _config(cache, loss="wbce", labels="P"), {}),
            ("kld-S", _config(cache, loss="kld", labels="S"), {}),
            ("wce-balanced", _config(cache, loss="wce", labels="hard", sampler="balanced"), {})]
    run_grid(runs, tmp_path / "grid", backend="threading", progress=False)
    passes = json.loads((tmp_path / "grid" / "grid.json").read_text())["passes"]
    assert passes == [["wce-hard", "wbce-P", "kld-S"], ["wce-balanced"]]
    with open(tmp_path / "grid" / "results.csv", newline="") as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    for number, names in enumerate(passes, 1):
        shared = {rows[n]["pass_seconds"] for n in names}
        assert len(shared) == 1 and float(shared.pop()) > 0
        for n in names:
            assert int(rows[n]["pass"]) == number
            # each run's seconds: its share, so that the column adds up to the grid's training time
            assert float(rows[n]["seconds"]) == pytest.approx(float(rows[n]["pass_seconds"]) / len(names), abs=0.001)
    total = sum(float(r["seconds"]) for r in rows.values())
    passes_total = sum(float(rows[names[0]]["pass_seconds"]) for names in passes)
    assert total == pytest.approx(passes_total, abs=0.0005 * len(rows))  # each share rounded to 1 ms

"""The report's intervals: every scored row's 95 % bootstrap interval, and a finding of the
paper judged *not resolved* when the paired interval of its difference contains 0.

Runs are written on disk with chosen predictions: two Table 2 rows that differ on one
clip (a difference the clips cannot resolve) or on many (one they can)."""

import json

import numpy as np
import pytest

from conilium import CLASSES
from conilium.errors import ConfigError
from conilium.evaluate.bootstrap import compare_runs, split_intervals
from conilium.evaluate.report import build_report
from conilium.runs import prediction_path, write_predictions
from conilium.util import read_json, write_json

N = 120
S_BEATS_P = "S targets beat P targets (WBCE)"


def _refs():
    return [CLASSES[i % len(CLASSES)] for i in range(N)]


def _predicted(right):
    return [r if i in right else CLASSES[(CLASSES.index(r) + 1) % len(CLASSES)] for i, r in enumerate(_refs())]


def _run(path, right, *, seed=0, attributes=False):
    """A WBCE run whose Development prediction is the reference on the clips ``right`` and a
    wrong class (the next one) elsewhere."""
    refs, pred = _refs(), _predicted(right)
    probs = np.full((N, len(CLASSES)), 0.02)
    probs[np.arange(N), [CLASSES.index(p) for p in pred]] = 1 - 0.02 * (len(CLASSES) - 1)
    extra = {}
    if attributes:
        rng = np.random.default_rng(seed)
        ref = rng.uniform(1, 7, size=(N, 3))
        extra = {"attributes": ref + rng.normal(0, 1, size=ref.shape), "attribute_refs": ref}
    write_json(path / "config.json", {"loss": "wbce", "labels": "S", "cache": str(path / "no-cache")})
    write_predictions(prediction_path(path, "Development"), [f"clip{i:03d}.wav" for i in range(N)], probs, pred,
                      refs, **extra)
    return path


def _build(tmp_path, gained, **spec_keys):
    """WBCE(P) right on half of the clips, WBCE(S) on those and ``gained`` more: the report of both."""
    half = set(range(0, N, 2))
    p = _run(tmp_path / "runs" / "wbce-P", half)
    s = _run(tmp_path / "runs" / "wbce-S", half | set(range(1, 2 * gained, 2)))
    spec = {"tables": {"table2": {"WBCE(P)": str(p), "WBCE(S)": str(s)}}, **spec_keys}
    out = tmp_path / "report"
    build_report(spec, out)
    js = read_json(out / "report.json")
    finding = next(f for f in js["findings"] if f["text"] == S_BEATS_P)
    return finding, (out / "REPORT.md").read_text(encoding="utf-8"), js, p, s


def _finding_line(md, text):
    return next(ln for ln in md.splitlines() if ln.startswith(f"| {text} ("))


def test_a_difference_whose_interval_contains_zero_is_not_resolved(tmp_path):
    finding, md, _, p, s = _build(tmp_path, gained=1)  # WBCE(S) right on one clip more: above WBCE(P)
    d = finding["interval"]
    assert d["difference"] > 0 and d["low"] <= 0 <= d["high"]
    assert finding["verdict"] == "not resolved"
    # the paired bootstrap of `conilium-eval compare` (WBCE(S) − WBCE(P), B − A)
    c = compare_runs(p, s)["splits"]["Development"]["scores"]["f1_macro"]
    assert (d["low"], d["high"], d["p_value"], d["draws"]) == (c["low"], c["high"], c["p_value"], 2000)
    line = _finding_line(md, S_BEATS_P)
    assert line.endswith("| *not resolved* |")
    assert f"[{d['low']:+.3f}, {d['high']:+.3f}]".replace("-", "−") in line
    assert "**Not resolved.**" in md and "2,000 draws" in md


def test_a_difference_beyond_the_noise_agrees_or_disagrees(tmp_path):
    finding, md, _, _, _ = _build(tmp_path / "up", gained=30)  # 30 clips more right: resolved
    assert finding["interval"]["low"] > 0 and finding["verdict"] == "agrees"
    assert _finding_line(md, S_BEATS_P).endswith("| agrees |")
    # the same runs the other way round: WBCE(P) better → the paper's finding disagrees
    half = set(range(0, N, 2))
    p = _run(tmp_path / "down" / "wbce-P", half | set(range(1, 60, 2)))
    s = _run(tmp_path / "down" / "wbce-S", half)
    build_report({"tables": {"table2": {"WBCE(P)": str(p), "WBCE(S)": str(s)}}}, tmp_path / "down" / "rep")
    f = next(f for f in read_json(tmp_path / "down" / "rep" / "report.json")["findings"] if f["text"] == S_BEATS_P)
    assert f["interval"]["high"] < 0 and f["verdict"] == "disagrees"


def test_identical_rows_are_not_resolved_not_a_tie(tmp_path):
    finding, _, _, _, _ = _build(tmp_path, gained=0)
    assert finding["interval"]["difference"] == 0 and (finding["interval"]["low"], finding["interval"]["high"]) == (0, 0)
    assert finding["verdict"] == "not resolved"


def test_every_scored_row_has_its_interval_in_report_json_and_report_md(tmp_path):
    _, md, js, p, s = _build(tmp_path, gained=5)
    assert js["bootstrap"]["draws"] == 2000 and js["bootstrap"]["seed"] == 0 and js["bootstrap"]["level"] == 0.95
    rows = {r["label"]: r for r in js["tables"]["table2"] if r.get("run")}
    assert set(rows) == {"WBCE(P)", "WBCE(S)"}
    for label, run in (("WBCE(P)", p), ("WBCE(S)", s)):
        got = rows[label]["score"]["intervals"]
        want = split_intervals(run, "Development")["scores"]  # conilium-eval metrics --draws 2000 --seed 0
        assert set(got) == {"f1_macro", "f1_micro"}
        for key in got:
            assert got[key] == want[key]
            assert got[key]["low"] <= got[key]["value"] <= got[key]["high"]
        line = next(ln for ln in md.splitlines() if ln.startswith(f"| {label} |"))
        for key in ("f1_macro", "f1_micro"):
            iv = got[key]
            assert f"| {iv['value']:.3f} [{iv['low']:.3f}, {iv['high']:.3f}] |" in line
    assert "**Intervals.**" in md and "2,000 times (seed 0)" in md


def test_the_spec_sets_draws_and_seed_and_a_bad_value_writes_nothing(tmp_path):
    _, _, js, p, _ = _build(tmp_path / "a", gained=5, bootstrap_draws=1000, bootstrap_seed=3)
    assert (js["bootstrap"]["draws"], js["bootstrap"]["seed"]) == (1000, 3)
    row = next(r for r in js["tables"]["table2"] if r["label"] == "WBCE(P)")
    assert row["score"]["intervals"]["f1_macro"] == split_intervals(p, "Development", draws=1000,
                                                                     seed=3)["scores"]["f1_macro"]
    f = next(f for f in js["findings"] if f["text"] == S_BEATS_P)
    assert (f["interval"]["draws"], f["interval"]["seed"]) == (1000, 3)
    for bad in ({"bootstrap_draws": 999}, {"bootstrap_draws": "2000"}, {"bootstrap_draws": True},
                {"bootstrap_seed": -1}, {"bootstrap_seed": 1.5}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            build_report({"tables": {"table2": {"WBCE(P)": str(p)}}, **bad}, tmp_path / "bad")
        assert not (tmp_path / "bad").exists()


def test_attribute_rows_carry_ccc_intervals(tmp_path):
    run = _run(tmp_path / "runs" / "joint", set(range(N // 2)), attributes=True)
    m = {"attributes": {"Development": {"n": N, "ccc_mean": 0.5,
                                        **{c: {"ccc": 0.5} for c in ("EmoAct", "EmoVal", "EmoDom")}}}}
    write_json(run / "metrics.json", m)
    build_report({"tables": {"attributes": {"Joint": str(run)}}}, tmp_path / "rep")
    row = read_json(tmp_path / "rep" / "report.json")["attributes"][0]
    want = split_intervals(run, "Development")["scores"]
    assert set(row["intervals"]) == {"ccc_EmoAct", "ccc_EmoVal", "ccc_EmoDom"}
    for key, iv in row["intervals"].items():
        assert iv == want[key]
    md = (tmp_path / "rep" / "REPORT.md").read_text(encoding="utf-8")
    iv = row["intervals"]["ccc_EmoAct"]
    assert f"0.500 [{iv['low']:.3f}, {iv['high']:.3f}]" in md


def test_findings_across_splits_are_judged_on_the_numbers_and_say_so(tmp_path):
    half = set(range(0, N, 2))
    run = _run(tmp_path / "runs" / "tuned", half)
    refs = _refs()
    probs = np.full((N, len(CLASSES)), 1 / len(CLASSES))
    write_predictions(prediction_path(run, "Test1"), [f"t{i}.wav" for i in range(N)], probs,
                      [CLASSES[0]] * N, refs)
    spec = {"tables": {"table4": {"dev": str(run), "test": {"run": str(run), "split": "Test1"}}}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    build_report(tmp_path / "spec.json", tmp_path / "rep")
    f = next(f for f in read_json(tmp_path / "rep" / "report.json")["findings"] if "test score is below" in f["text"])
    assert "interval" not in f and "different splits" in f["unpaired"]
    assert f["verdict"] == "agrees"  # 0.5 of the clips right on Development, one class on Test1


def test_rows_trained_with_several_seeds_show_their_mean_and_sd(tmp_path):
    from statistics import fmean, stdev

    from sklearn.metrics import f1_score

    half = set(range(0, N, 2))
    runs, right = {}, {}
    for name, extra in (("wbce-P", 0), ("wbce-S", 10)):
        right[name] = [half | set(range(1, 2 * (extra + 3 * s) + 1, 2)) for s in range(3)]
        runs[name] = [_run(tmp_path / "runs" / f"{name}-seed{s}", r) for s, r in enumerate(right[name])]
    spec = {"tables": {"table2": {label: {"run": str(rs[0]), "seeds": [str(r) for r in rs]}
                                  for label, rs in (("WBCE(P)", runs["wbce-P"]), ("WBCE(S)", runs["wbce-S"]))}}}
    build_report(spec, tmp_path / "rep")
    js = read_json(tmp_path / "rep" / "report.json")
    md = (tmp_path / "rep" / "REPORT.md").read_text(encoding="utf-8")
    t2 = md.split("## Table 2: loss functions", 1)[1].split("\n## ", 1)[0]
    header = next(ln for ln in t2.splitlines() if ln.startswith("| Row |"))
    assert "Macro-F1 over seeds, mean ± sd (ours)" in header and "Micro-F1 over seeds, mean ± sd (ours)" in header
    for label, name in (("WBCE(P)", "wbce-P"), ("WBCE(S)", "wbce-S")):
        row = next(r for r in js["tables"]["table2"] if r["label"] == label)
        assert row["run"] == str(runs[name][0])  # the row's own scores are the first seed's
        by_hand = [f1_score(_refs(), _predicted(r), labels=list(CLASSES), average="macro", zero_division=0)
                   for r in right[name]]
        got = row["seeds"]["f1_macro"]
        assert got["values"] == pytest.approx(by_hand) and len(set(by_hand)) == 3  # the seeds' runs differ
        assert got["mean"] == pytest.approx(fmean(by_hand)) and got["sd"] == pytest.approx(stdev(by_hand))
        line = next(ln for ln in md.splitlines() if ln.startswith(f"| {label} |"))
        assert line.endswith(f"| {fmean(by_hand):.3f} ± {stdev(by_hand):.3f} (3 seeds) | "
                             f"{row['seeds']['f1_micro']['mean']:.3f} ± {row['seeds']['f1_micro']['sd']:.3f} (3 seeds) |")
    bad = {"tables": {"table2": {"WBCE(P)": {"run": str(runs["wbce-P"][0]), "seeds": str(runs["wbce-P"][1])}}}}
    with pytest.raises(ConfigError, match="'seeds' must be a non-empty list"):
        build_report(bad, tmp_path / "bad")
    missing = {"tables": {"table2": {"WBCE(P)": {"run": str(runs["wbce-P"][0]), "seeds": [str(tmp_path / "nope")]}}}}
    with pytest.raises(Exception, match="row 'WBCE\\(P\\)', seeds: .*nope"):
        build_report(missing, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()

"""Bootstrap intervals (conilium-eval metrics) and paired bootstrap comparisons (conilium-eval compare)."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.metrics import f1_score

from conilium import CLASSES
from conilium.cli.evaluate import eval_group as main
from conilium.evaluate.bootstrap import bootstrap_indices, compare_runs, intervals, paired, paired_p_value
from conilium.metrics import ccc_parts, score
from conilium.runs import RunError, prediction_path, read_predictions, write_predictions
from conilium.util import write_json

ATTRS = ("EmoAct", "EmoVal", "EmoDom")


def _references(rng, n):
    """Class references with some O, X and unknown ones among them (left out of the F1 scores)."""
    return list(rng.choice(list(CLASSES) + ["O", "X", None], size=n, p=[0.11] * 8 + [0.06, 0.03, 0.03]))


def _predictions(rng, refs, right):
    """Predicted letters: the reference on a share ``right`` of the scoreable clips, random otherwise."""
    guess = rng.choice(list(CLASSES), size=len(refs))
    hit = rng.random(len(refs)) < right
    return [r if (h and r in CLASSES) else g for r, g, h in zip(refs, guess, hit)]


def _run(path, names, refs, preds, *, attributes=None, attribute_refs=None, split="Development"):
    """A run directory holding one split's predictions (probabilities one-hot on the prediction)."""
    write_json(path / "config.json", {"loss": "wbce", "labels": "S"})
    probs = np.array([[float(c == p) for c in CLASSES] for p in preds])
    write_predictions(prediction_path(path, split), names, probs, preds, refs,
                      attributes=attributes, attribute_refs=attribute_refs)
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Runs A (right on 25 % of the clips) and B (right on 75 %) over the same 300 clips, both
    predicting the attributes too (B closer to the references than A)."""
    base = tmp_path_factory.mktemp("boot")
    rng = np.random.default_rng(7)
    n = 300
    names = [f"clip_{i:04d}.wav" for i in range(n)]
    refs = _references(rng, n)
    attr_refs = rng.uniform(1, 7, size=(n, 3))
    attr_refs[rng.random((n, 3)) < 0.1] = np.nan
    noise = rng.normal(0, 1, size=(n, 3))
    a = _run(base / "a", names, refs, _predictions(rng, refs, 0.25),
             attributes=0.3 * np.nan_to_num(attr_refs, nan=4) + 2.5 + 1.5 * noise, attribute_refs=attr_refs)
    b = _run(base / "b", names, refs, _predictions(rng, refs, 0.75),
             attributes=0.9 * np.nan_to_num(attr_refs, nan=4) + 0.4 + 0.5 * noise, attribute_refs=attr_refs)
    return a, b


def _preds(run):
    return read_predictions(prediction_path(run, "Development"))


# --------------------------------------------------------------------------- the library

def test_intervals_contain_the_observed_scores_of_metrics(pair):
    p = _preds(pair[1])
    s = score(p.reference, p.prediction)
    iv = intervals(p, draws=1000, seed=0)
    assert set(iv) == {"f1_macro", "f1_micro", *(f"ccc_{a}" for a in ATTRS)}
    # the observed values are exactly metrics' (scikit-learn's), over the scoreable clips only
    assert iv["f1_macro"]["value"] == s["f1_macro"] and iv["f1_micro"]["value"] == s["f1_micro"]
    assert iv["f1_macro"]["n"] == s["n"] < len(p)
    for k, a in enumerate(ATTRS):
        parts = ccc_parts(p.attributes[:, k], p.attribute_refs[:, k])
        assert iv[f"ccc_{a}"]["value"] == parts["ccc"] and iv[f"ccc_{a}"]["n"] == parts["n"] < len(p)
    for v in iv.values():
        assert v["low"] < v["value"] < v["high"]
        assert v["high"] - v["low"] < 0.3  # an interval, not [0, 1]


def test_percentile_interval_agrees_with_a_plain_loop(pair):
    """The vectorised draws give what a loop of scikit-learn's f1_score (and ccc_parts) over the
    same index matrix gives."""
    a, b = _preds(pair[0]), _preds(pair[1])
    keep = np.array([r in CLASSES for r in a.reference])
    refs = np.array(a.reference, dtype=object)[keep].astype(str)
    pa = np.array(a.prediction)[keep]
    pb = np.array(b.prediction)[keep]
    draws, seed = 300, 11
    idx = bootstrap_indices(len(refs), draws, seed)
    assert idx.shape == (draws, len(refs))

    def f1(pred, i, average):
        return f1_score(refs[i], pred[i], labels=list(CLASSES), average=average, zero_division=0)

    one = intervals(b, draws=draws, seed=seed)
    two = paired(a, b, draws=draws, seed=seed)
    for average in ("macro", "micro"):
        loop_b = np.array([f1(pb, i, average) for i in idx])
        assert [one[f"f1_{average}"]["low"], one[f"f1_{average}"]["high"]] == \
            pytest.approx(np.percentile(loop_b, [2.5, 97.5]), abs=1e-12)
        diff = loop_b - np.array([f1(pa, i, average) for i in idx])
        assert [two[f"f1_{average}"]["low"], two[f"f1_{average}"]["high"]] == \
            pytest.approx(np.percentile(diff, [2.5, 97.5]), abs=1e-12)
        p = min(1.0, 2 * (1 + min((diff <= 0).sum(), (diff >= 0).sum())) / (draws + 1))
        assert two[f"f1_{average}"]["p_value"] == pytest.approx(p)
    known = ~np.isnan(b.attribute_refs[:, 1])
    idx = bootstrap_indices(int(known.sum()), draws, seed)
    pred, ref = b.attributes[known, 1], b.attribute_refs[known, 1]
    loop = [ccc_parts(pred[i], ref[i])["ccc"] for i in idx]
    assert [one["ccc_EmoVal"]["low"], one["ccc_EmoVal"]["high"]] == \
        pytest.approx(np.percentile(loop, [2.5, 97.5]), abs=1e-12)


def test_seeded_draws_are_identical_and_the_seed_matters(pair):
    a, b = _preds(pair[0]), _preds(pair[1])
    assert paired(a, b, draws=1000, seed=3) == paired(a, b, draws=1000, seed=3)
    assert intervals(b, draws=1000, seed=3) == intervals(b, draws=1000, seed=3)
    assert paired(a, b, draws=1000, seed=3)["f1_macro"]["low"] != paired(a, b, draws=1000, seed=4)["f1_macro"]["low"]
    # large splits are drawn block by block: the same matrix as one draw of the whole
    big = bootstrap_indices(5000, 1000, 2)
    assert np.array_equal(big, np.random.default_rng(2).integers(0, 5000, size=(1000, 5000)))


def test_p_value_is_twice_the_smaller_side_with_the_add_one_correction():
    assert paired_p_value(np.zeros(1999)) == 1.0
    assert paired_p_value(np.ones(1999)) == pytest.approx(2 / 2000)
    d = np.r_[-np.ones(30), np.ones(1969)]
    assert paired_p_value(d) == pytest.approx(2 * 31 / 2000)


# --------------------------------------------------------------------------- conilium-eval compare

def test_a_run_compared_with_itself_differs_by_nothing(pair, tmp_path):
    r = CliRunner().invoke(main, ["compare", str(pair[1]), str(pair[1]), "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "compare.json").read_text())
    scores = result["splits"]["Development"]["scores"]
    assert set(scores) == {"f1_macro", "f1_micro", *(f"ccc_{a}" for a in ATTRS)}
    for v in scores.values():
        assert v["a"] == v["b"] and v["difference"] == 0 and v["low"] == 0 and v["high"] == 0
        assert v["p_value"] == 1
    assert result["draws"] == 2000 and result["seed"] == 0 and "percentile" in result["p_value"]
    assert "macro-F1" in r.output and "[+0.0000, +0.0000]" in r.output


def test_clearly_different_runs_differ_significantly(pair, tmp_path):
    a, b = pair
    r = CliRunner().invoke(main, ["compare", str(a), str(b), "--draws", "1000", "--seed", "5",
                                  "--out", str(tmp_path / "ab.json")])
    assert r.exit_code == 0, r.output
    scores = json.loads((tmp_path / "ab.json").read_text())["splits"]["Development"]["scores"]
    pa, pb = _preds(a), _preds(b)
    sa, sb = score(pa.reference, pa.prediction), score(pb.reference, pb.prediction)
    assert scores["f1_macro"]["a"] == sa["f1_macro"] and scores["f1_macro"]["b"] == sb["f1_macro"]
    for key, v in scores.items():
        assert v["difference"] == pytest.approx(v["b"] - v["a"])
        assert v["p_value"] < 0.05 and 0 < v["low"] < v["difference"] < v["high"], key
    # the other way round: the interval below zero, the same p-values
    back = compare_runs(b, a, draws=1000, seed=5)["splits"]["Development"]["scores"]
    for key, v in back.items():
        assert v["high"] < 0 and v["p_value"] == scores[key]["p_value"]
        assert v["low"] == pytest.approx(-scores[key]["high"]) and v["high"] == pytest.approx(-scores[key]["low"])


def test_clips_in_another_order_are_paired_by_name(pair, tmp_path):
    b = _preds(pair[1])
    order = np.random.default_rng(0).permutation(len(b))
    shuffled = _run(tmp_path / "shuffled", [b.names[i] for i in order], [b.reference[i] for i in order],
                    [b.prediction[i] for i in order], attributes=b.attributes[order],
                    attribute_refs=b.attribute_refs[order])
    same = compare_runs(pair[0], pair[1], draws=1000)["splits"]["Development"]["scores"]
    assert compare_runs(pair[0], shuffled, draws=1000)["splits"]["Development"]["scores"] == same
    itself = compare_runs(pair[1], shuffled, draws=1000)["splits"]["Development"]["scores"]
    assert all(v["low"] == v["high"] == 0 for v in itself.values())


def test_clips_in_one_run_only_are_named(pair, tmp_path):
    b = _preds(pair[1])
    names = b.names[5:] + ["extra_1.wav"]
    short = _run(tmp_path / "short", names, b.reference[5:] + ["A"], b.prediction[5:] + ["A"],
                 attributes=np.r_[b.attributes[5:], [[1, 2, 3]]],
                 attribute_refs=np.r_[b.attribute_refs[5:], [[1, 2, 3]]])
    with pytest.raises(RunError, match=r"5 clip\(s\) only in the first, e\.g\. \['clip_0000.wav', 'clip_0001.wav', "
                                       r"'clip_0002.wav'\]; 1 only in the second, e\.g\. \['extra_1.wav'\]"):
        compare_runs(pair[0], short)
    out = tmp_path / "c.json"
    r = CliRunner().invoke(main, ["compare", str(pair[0]), str(short), "--out", str(out)])
    assert r.exit_code == 1 and "5 clip(s) only in the first" in r.output and "clip_0000.wav" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not out.exists()


def test_compare_options_are_checked(pair, tmp_path):
    r = CliRunner().invoke(main, ["compare", str(pair[0]), str(pair[1]), "--draws", "200"])
    assert r.exit_code == 2 and "--draws" in r.output
    r = CliRunner().invoke(main, ["compare", str(pair[0]), str(pair[1]), "--split", "Test1",
                                  "--out", str(tmp_path / "x.json")])
    assert r.exit_code == 1 and "Test1" in r.output and "available: Development" in r.output


# --------------------------------------------------------------------------- conilium-eval metrics

def test_metrics_adds_intervals_and_changes_no_existing_value(pair, tmp_path):
    run = str(pair[1])
    plain = CliRunner().invoke(main, ["metrics", run, "--draws", "0", "--out", str(tmp_path / "plain")])
    boot = CliRunner().invoke(main, ["metrics", run, "--out", str(tmp_path / "boot")])
    assert plain.exit_code == 0 and boot.exit_code == 0, boot.output
    before = json.loads((tmp_path / "plain" / "Development" / "metrics.json").read_text())
    after = json.loads((tmp_path / "boot" / "Development" / "metrics.json").read_text())
    assert "bootstrap" not in before and {k: v for k, v in after.items() if k != "bootstrap"} == before
    b = after["bootstrap"]
    assert b["draws"] == 2000 and b["seed"] == 0 and b["level"] == 0.95 and b["interval"] == "percentile"
    assert set(b["scores"]) == {"f1_macro", "f1_micro", *(f"ccc_{a}" for a in ATTRS)}
    assert b["scores"] == json.loads(json.dumps(intervals(_preds(pair[1]), draws=2000, seed=0)))
    assert b["scores"]["f1_macro"]["low"] <= after["f1_macro"] <= b["scores"]["f1_macro"]["high"]
    iv = b["scores"]["f1_macro"]
    assert f"[{iv['low']:.4f}, {iv['high']:.4f}]" in boot.output and "CCC EmoAct" in boot.output
    assert "[" not in plain.output.splitlines()[0] and "CCC" not in plain.output
    r = CliRunner().invoke(main, ["metrics", run, "--no-files", "--draws", "10"])
    assert r.exit_code == 2 and "at least 1000, or 0" in r.output


def test_runs_of_different_tasks_are_compared_on_the_scores_both_have(pair, tmp_path):
    a, b = _preds(pair[0]), _preds(pair[1])
    categories = _run(tmp_path / "categories", b.names, b.reference, b.prediction)
    write_json(tmp_path / "avd" / "config.json", {"task": "attributes"})
    write_predictions(prediction_path(tmp_path / "avd", "Development"), a.names, np.zeros((len(a), 0)),
                      [""] * len(a), [None] * len(a), (), attributes=a.attributes, attribute_refs=a.attribute_refs)
    full = compare_runs(pair[0], pair[1], draws=1000)["splits"]["Development"]["scores"]
    split = compare_runs(pair[0], categories, draws=1000)["splits"]["Development"]
    assert split["scores"] == {k: full[k] for k in ("f1_macro", "f1_micro")}
    assert split["left_out"] == ["CCC: only A predicts the attributes"]
    split = compare_runs(tmp_path / "avd", pair[1], draws=1000)["splits"]["Development"]
    assert split["scores"] == {k: v for k, v in full.items() if k.startswith("ccc_")}
    assert split["left_out"] == ["macro/micro-F1: only B predicts class scores"]
    r = CliRunner().invoke(main, ["compare", str(tmp_path / "avd"), str(categories), "--out", str(tmp_path)])
    assert r.exit_code == 1 and "no score in common (A predicts the attributes, B class scores)" in r.output

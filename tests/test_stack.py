"""conilium-eval stack: a meta-classifier over runs, its out-of-fold score, its run directory."""

import csv
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.metrics import f1_score
from sklearn.utils import resample

from conilium import CLASSES
from conilium.cli.evaluate import eval_group as main
from conilium.errors import ConfigError
from conilium.evaluate.ensemble import ensemble_runs
from conilium.evaluate.stack import fit_meta, stack_runs
from conilium.heads.audio import find_head_run
from conilium.heads.train import TrainConfig, train_head
from conilium.runs import RunError, prediction_path, read_predictions, write_predictions, write_run_outputs
from conilium.testing import write_synthetic_cache
from conilium.util import read_json, write_json


def _probs(rng, refs, strength):
    logits = rng.normal(size=(len(refs), len(CLASSES)))
    for i, r in enumerate(refs):
        if r in CLASSES:
            logits[i, CLASSES.index(r)] += strength
    e = np.exp(logits)
    return e / e.sum(1, keepdims=True)


def _run(path, splits):
    """A run directory from {split: (names, probs, references)}."""
    write_json(path / "config.json", {"loss": "wbce", "labels": "S"})
    for split, (names, probs, refs) in splits.items():
        write_predictions(prediction_path(path, split), names, probs, [CLASSES[i] for i in probs.argmax(1)], refs)
    return path


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Three runs over 300 Development clips (O and X among them) and 50 unlabelled Test3 clips:
    one informative, one weaker, one of random probabilities."""
    base = tmp_path_factory.mktemp("stack_runs")
    rng = np.random.default_rng(0)
    dev_refs = list(rng.choice(list(CLASSES) + ["O", "X"], 300, p=[.1, .1, .2, .05, .05, .05, .15, .2, .05, .05]))
    dev = [f"dev{i:03d}.wav" for i in range(300)]
    test = [f"test{i:03d}.wav" for i in range(50)]
    runs = []
    for k, strength in enumerate((2.0, 1.0, 0.0)):
        runs.append(_run(base / f"run{k}", {"Development": (dev, _probs(rng, dev_refs, strength), dev_refs),
                                            "Test3": (test, _probs(rng, [None] * 50, 0), [None] * 50)}))
    return runs


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two train-head runs on a synthetic feature cache (Train, Development, Test3)."""
    base = tmp_path_factory.mktemp("stack_trained")
    cache = write_synthetic_cache(base / "cache", clips=240, dim=8, seed=3, signal=0.5)
    runs = []
    for loss in ("wbce", "bce"):
        train_head(TrainConfig(cache=str(cache.path), device="cpu", loss=loss, labels="S", epochs=2, hidden=16),
                   base / loss, progress=False)
        runs.append(base / loss)
    return cache, runs


def _scoreable_f1(preds, average="macro"):
    keep = [i for i, r in enumerate(preds.reference) if r in CLASSES]
    return f1_score([preds.reference[i] for i in keep], [preds.prediction[i] for i in keep], labels=list(CLASSES),
                    average=average, zero_division=0)


def test_out_of_fold_score_is_sklearn_f1_of_the_written_development_predictions(made, tmp_path):
    m = stack_runs(made, tmp_path / "stack", folds=5, seed=1)
    dev = read_predictions(prediction_path(tmp_path / "stack", "Development"))
    cv = m["cross_fitting"]
    assert m["splits"]["Development"]["f1_macro"] == pytest.approx(_scoreable_f1(dev), abs=1e-12)
    assert cv["f1_macro_out_of_fold"] == m["splits"]["Development"]["f1_macro"]
    assert cv["f1_micro_out_of_fold"] == pytest.approx(_scoreable_f1(dev, "micro"), abs=1e-12)
    # The model fitted on every clip scores itself higher than the held-out folds do.
    assert cv["f1_macro_in_sample"] > cv["f1_macro_out_of_fold"]
    assert m["in_sample"]["Development"]["f1_macro"] == cv["f1_macro_in_sample"]
    metrics = read_json(tmp_path / "stack" / "metrics.json")
    assert metrics["split"] == "Development" and metrics["f1_macro"] == cv["f1_macro_out_of_fold"]
    # Every scoreable clip is held out exactly once; O and X clips in no fold.
    held = sorted(j for fold in cv["held_out"] for j in fold)
    assert held == [i for i, r in enumerate(dev.reference) if r in CLASSES]
    # The stack beats its best member on this constructed data, and the members' scores are recorded.
    best = max(v["Development"]["f1_macro"] for v in m["members"].values())
    assert cv["f1_macro_out_of_fold"] > best - 0.05
    config = read_json(tmp_path / "stack" / "config.json")
    assert config["kind"] == "stack" and config["members"] == [str(r.resolve()) for r in made]
    assert config["folds"] == 5 and config["seed"] == 1 and config["model"] == m["model"]
    assert len(m["model"]["features"]) == 3 * len(CLASSES) == len(m["model"]["coef"][0])
    assert config["f1_macro_out_of_fold"] == cv["f1_macro_out_of_fold"]
    assert config["f1_macro_in_sample"] == cv["f1_macro_in_sample"]
    # Test3 is unlabelled: predicted by the model fitted on all of Development, not scored.
    test = read_predictions(prediction_path(tmp_path / "stack", "Test3"))
    assert len(test) == 50 and "Test3" not in m["splits"]
    np.testing.assert_allclose(test.probs.sum(1), 1, atol=1e-5)


def _swap_labels(src, dst, a, b):
    """A copy of the runs in ``src`` with the references of Development rows ``a`` and ``b`` swapped."""
    out = []
    for r in src:
        shutil.copytree(r, dst / r.name)
        path = prediction_path(dst / r.name, "Development")
        p = read_predictions(path)
        ref = list(p.reference)
        ref[a], ref[b] = ref[b], ref[a]
        write_predictions(path, p.names, p.probs, p.prediction, ref)
        out.append(dst / r.name)
    return out


@pytest.mark.parametrize("options", [{}, {"weights_only": True}, {"soup": 3, "balanced": True}])
def test_a_clips_own_label_never_reaches_the_model_that_predicts_it(made, tmp_path, options):
    """Swap the labels of two neighbouring scoreable clips of one fold (neither the first of its
    class, so the stratified folds stay the same): their out-of-fold predictions do not move,
    while the model fitted on every clip, which saw the labels, does."""
    m = stack_runs(made, tmp_path / "before", folds=4, seed=0, **options)
    before = read_predictions(prediction_path(tmp_path / "before", "Development"))
    ref = before.reference
    fold_of = {j: f for f, held in enumerate(m["cross_fitting"]["held_out"]) for j in held}
    scoreable = [i for i, r in enumerate(ref) if r in CLASSES]
    firsts = {ref.index(c) for c in CLASSES}
    a, b = next((i, j) for i, j in zip(scoreable, scoreable[1:])
                if ref[i] != ref[j] and fold_of[i] == fold_of[j] and not {i, j} & firsts)
    changed = _swap_labels(made, tmp_path / "swapped", a, b)
    m2 = stack_runs(changed, tmp_path / "after", folds=4, seed=0, **options)
    after = read_predictions(prediction_path(tmp_path / "after", "Development"))
    assert after.reference[a] == ref[b] and after.reference[b] == ref[a]
    assert m2["cross_fitting"]["held_out"] == m["cross_fitting"]["held_out"]  # the same folds
    np.testing.assert_array_equal(after.probs[[a, b]], before.probs[[a, b]])
    assert [after.prediction[i] for i in (a, b)] == [before.prediction[i] for i in (a, b)]
    # The clips of the other folds are predicted by models that did see the swap ...
    other = [i for i in scoreable if fold_of[i] != fold_of[a]]
    assert not np.array_equal(after.probs[other], before.probs[other])
    # ... and so is the full model applied to Test3.
    assert m2["model"] != m["model"]


def test_weights_only_is_the_weighted_mean_ensemble_of_its_learned_weights(made, tmp_path):
    m = stack_runs(made, tmp_path / "w", weights_only=True)
    weights = [m["model"]["weights"][str(r.resolve())] for r in made]
    assert m["model"]["type"] == "weights" and m["meta"] == "weights"
    assert min(weights) >= 0 and sum(weights) == pytest.approx(1)
    assert weights[0] > weights[1] > weights[2]  # the informative run first, the random one last
    ensemble_runs(made, tmp_path / "e", weights=weights)
    for split in ("Test3",):
        got = read_predictions(prediction_path(tmp_path / "w", split))
        want = read_predictions(prediction_path(tmp_path / "e", split))
        np.testing.assert_allclose(got.probs, want.probs, atol=2e-6)
        assert got.prediction == want.prediction


def test_soup_averages_the_coefficients_of_bootstrap_fits():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 8, 200)
    x = np.hstack([_probs(rng, [CLASSES[i] for i in y], 1.5), _probs(rng, [CLASSES[i] for i in y], 0.5)])
    soup = fit_meta(x, y, n_runs=2, n_classes=8, soup=4, seed=[7, 0])
    draw = np.random.RandomState([7, 0])
    coefs, intercepts = [], []
    for _ in range(4):
        xs, ys = resample(x, y, replace=True, stratify=y, random_state=draw.randint(2 ** 31 - 1))
        one = fit_meta(xs, ys, n_runs=2, n_classes=8)
        coefs.append(one.logistic.coef_)
        intercepts.append(one.logistic.intercept_)
    np.testing.assert_allclose(soup.logistic.coef_, np.mean(coefs, axis=0))
    np.testing.assert_allclose(soup.logistic.intercept_, np.mean(intercepts, axis=0))
    single = fit_meta(x, y, n_runs=2, n_classes=8)
    assert not np.allclose(single.logistic.coef_, soup.logistic.coef_)
    w = fit_meta(x, y, n_runs=2, n_classes=8, weights_only=True, soup=3, seed=0).weights
    assert w.sum() == pytest.approx(1) and w[0] > w[1]


def test_seeded_runs_are_identical_and_the_seed_changes_the_folds(made, tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        stack_runs(made, tmp_path / name, folds=3, seed=seed, soup=2, balanced=True)
    for f in ("metrics.json", "predictions/Development.csv", "predictions/Test3.csv"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    held = [read_json(tmp_path / n / "metrics.json")["cross_fitting"]["held_out"] for n in "ac"]
    assert held[0] != held[1]


def test_stacked_trained_runs_are_read_by_the_other_commands(trained, tmp_path):
    cache, runs = trained
    runner = CliRunner()
    out = tmp_path / "stack"
    res = runner.invoke(main, ["stack", *map(str, runs), "--out", str(out), "--folds", "3", "--balanced"])
    assert res.exit_code == 0, res.output
    m = read_json(out / "metrics.json")
    assert f"Development: stacked macro-F1 {m['f1_macro']:.4f} out-of-fold" in res.output
    assert f"in-sample {m['cross_fitting']['f1_macro_in_sample']:.4f}" in res.output
    assert sorted(p.name for p in (out / "predictions").iterdir()) == ["Development.csv", "Test3.csv", "Train.csv"]
    assert set(m["splits"]) == {"Development", "Train"}  # Test3 is unlabelled: predicted, not scored
    assert "stack RUN1 RUN2 ... --out OUT" in runner.invoke(main, ["--help"]).output
    res = runner.invoke(main, ["metrics", str(out), "--split", "Development", "--draws", "0", "--no-files"])
    assert res.exit_code == 0 and f"macro-F1 {m['f1_macro']:.4f}" in res.output, res.output
    res = runner.invoke(main, ["tune-thresholds", str(out), str(tmp_path / "tuned"), "-k", "0"])
    assert res.exit_code == 0, res.output
    assert read_json(tmp_path / "tuned" / "metrics.json")["untuned"]["Development"]["f1_macro"] == m["f1_macro"]
    res = runner.invoke(main, ["submission", str(out), "--split", "Test3", "--out", str(tmp_path / "sub.csv"),
                               "--cache", str(cache.path)])
    assert res.exit_code == 0, res.output
    rows = list(csv.reader(open(tmp_path / "sub.csv")))
    assert rows[1:] == [[n, p] for n, p in zip(*(lambda p: (p.names, p.prediction))(
        read_predictions(prediction_path(out, "Test3"))))]
    # predict --run says what it is: no single head to apply.
    with pytest.raises(ConfigError, match="a stacking of runs, with no single head"):
        find_head_run(out)
    # The report places it in a table like any run, scored on its (out-of-fold) Development predictions.
    write_json(tmp_path / "spec.json", {"title": "Stacked", "tables": {"ensemble": {"Stack": str(out)}}})
    res = runner.invoke(main, ["report", str(tmp_path / "spec.json"), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    row = next(line for line in (tmp_path / "rep" / "REPORT.md").read_text().splitlines()
               if line.startswith("| Stack "))
    assert f"{m['f1_macro']:.3f}" in row
    # The members' configs lead easy-difficult to their cache.
    res = runner.invoke(main, ["easy-difficult", str(out), str(runs[0]), "--out", str(tmp_path / "ed")])
    assert res.exit_code == 0, res.output


def test_errors_are_named_and_leave_nothing_behind(made, tmp_path):
    with pytest.raises(RunError, match="at least two runs, got 1"):
        stack_runs(made[:1], tmp_path / "e1")
    p = read_predictions(prediction_path(made[0], "Development"))
    fewer = _run(tmp_path / "fewer", {"Development": (p.names[:-4], p.probs[:-4], p.reference[:-4]),
                                      "Test3": (["test000.wav"], p.probs[:1], [None])})
    with pytest.raises(RunError, match=r"fewer.*Development.*4 clip\(s\) only in the first, e\.g\. \['dev296"):
        stack_runs([made[0], fewer], tmp_path / "e2")
    no_test = _run(tmp_path / "no_test", {"Test1": (p.names, p.probs, p.reference)})
    with pytest.raises(RunError, match=r"no_test: no predictions for split Development; available: Test1"):
        stack_runs([made[0], no_test], tmp_path / "e3")
    dev_only = _run(tmp_path / "dev_only", {"Development": (p.names, p.probs, p.reference)})
    with pytest.raises(RunError, match=r"dev_only: no predictions for split Test3; available: Development"):
        stack_runs([made[0], dev_only], tmp_path / "e4", splits=["Test3"])
    # Unasked, a split that not every run has is left out and said so.
    m = stack_runs([made[0], dev_only], tmp_path / "s", folds=2)
    assert m["skipped_splits"] == ["Test3"] and not (tmp_path / "s" / "predictions" / "Test3.csv").exists()
    # An attributes-only run, as train-head --task attributes writes it (no class columns).
    avd = tmp_path / "avd"
    write_json(avd / "config.json", {"task": "attributes"})
    attrs = np.random.default_rng(0).uniform(1, 7, size=(len(p), 3))
    write_run_outputs(avd, {"Development": (p.names, np.zeros((len(p), 0)), p.reference, attrs, attrs)})
    with pytest.raises(RunError, match=r"avd: an attributes-only run"):
        stack_runs([made[0], avd], tmp_path / "e5")
    with pytest.raises(RunError, match=r"run0/predictions/Test3.csv: no labelled clip to fit"):
        stack_runs(made[:2], tmp_path / "e9", fit_split="Test3")
    with pytest.raises(ConfigError, match=r"give --folds \d+ or fewer"):
        stack_runs(made[:2], tmp_path / "e6", folds=200)
    res = CliRunner().invoke(main, ["stack", str(made[0]), str(fewer), "--out", str(tmp_path / "e7")])
    assert res.exit_code == 1 and res.output.startswith("Error:") and "different clip sets" in res.output
    res = CliRunner().invoke(main, ["stack", *map(str, made), "--out", str(tmp_path / "e8"), "--soup", "1"])
    assert res.exit_code == 2 and "--soup" in res.output
    assert not [q for q in tmp_path.iterdir() if q.name.startswith((".", "e"))]

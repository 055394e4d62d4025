"""conilium.evaluate: metrics, threshold adjustment, ensembles, Easy/Difficult, report, submission, CLI."""

import csv
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

from conilium import CLASSES
from conilium.corpus import Annotation, Clip, load_corpus
from conilium.evaluate import difficulty
from conilium.cli.evaluate import eval_group as main
from conilium.evaluate.ensemble import ensemble_runs
from conilium.metrics import macro_f1, score
from conilium.evaluate.report import split_metrics
from conilium.runs import RunError, prediction_path, read_predictions, write_predictions
from conilium.evaluate.submission import write_submission
from conilium.evaluate.thresholds import (apply_offsets, cross_validated_f1, fit_offsets, stratified_folds,
                                          tune_run)
from conilium.util import read_json, write_json

GRID = tuple(np.round(np.linspace(-0.3, 0.3, 31), 3))  # a coarser grid keeps the tests quick


def _noisy_probs(rng, refs, strength=1.2, bias=None):
    logits = rng.normal(size=(len(refs), len(CLASSES)))
    for i, r in enumerate(refs):
        if r in CLASSES:
            logits[i, CLASSES.index(r)] += strength
    if bias is not None:
        logits += bias
    e = np.exp(logits)
    return e / e.sum(1, keepdims=True)


def _make_run(path, splits, config=None):
    """A run directory from {split: (names, probs, references[, predictions])}."""
    write_json(path / "config.json", config or {"loss": "wbce", "labels": "S"})
    for split, item in splits.items():
        names, probs, refs = item[:3]
        pred = item[3] if len(item) > 3 else [CLASSES[i] for i in np.argmax(probs, 1)]
        write_predictions(prediction_path(path, split), names, probs, pred, refs)
    return path


@pytest.fixture(scope="module")
def corpus(demo_corpus):
    return load_corpus(demo_corpus)


@pytest.fixture(scope="module")
def demo_runs(corpus, tmp_path_factory):
    """Three constructed runs over the demo corpus's Development and Test3 clips."""
    base = tmp_path_factory.mktemp("eval_runs")
    runs = []
    for seed, name in enumerate(("wavlm", "w2v", "hubert")):
        rng = np.random.default_rng(seed)
        splits = {}
        for split in ("Development", "Test3"):
            clips = corpus.split(split)
            refs = [c.emo_class for c in clips]
            splits[split] = ([c.name for c in clips], _noisy_probs(rng, refs), refs)
        runs.append(_make_run(base / name, splits, {"loss": "wbce", "labels": "S", "cache": str(base / "none")}))
    return runs


# --------------------------------------------------------------------------- metrics

def test_score_matches_scikit_learn_on_scoreable_clips(tmp_path):
    rng = np.random.default_rng(3)
    refs = list(rng.choice(list(CLASSES) + ["O", "X", None], size=400))
    preds = list(rng.choice(list(CLASSES), size=400))
    s = score(refs, preds)
    keep = [i for i, r in enumerate(refs) if r in CLASSES]
    r = [refs[i] for i in keep]
    p = [preds[i] for i in keep]
    assert s["n"] == len(keep) < 400
    assert s["f1_macro"] == pytest.approx(f1_score(r, p, labels=list(CLASSES), average="macro"))
    assert s["f1_micro"] == pytest.approx(f1_score(r, p, labels=list(CLASSES), average="micro"))
    prec, rec, f1, sup = precision_recall_fscore_support(r, p, labels=list(CLASSES), zero_division=0)
    for i, c in enumerate(CLASSES):
        assert s["per_class"][c]["precision"] == pytest.approx(prec[i])
        assert s["per_class"][c]["recall"] == pytest.approx(rec[i])
        assert s["per_class"][c]["f1"] == pytest.approx(f1[i])
        assert s["per_class"][c]["support"] == sup[i]
    cm = confusion_matrix(r, p, labels=list(CLASSES))
    np.testing.assert_allclose(s["confusion_percent"], 100 * cm / cm.sum(1, keepdims=True), atol=0.01)

    # The run-level command writes the same numbers as CSV (percent of reference class) and a PNG.
    names = [f"c{i}.wav" for i in range(400)]
    run = _make_run(tmp_path / "run", {"Development": (names, np.eye(8)[[CLASSES.index(x) for x in preds]], refs)})
    out = split_metrics(run, "Development", tmp_path / "m")
    assert out["f1_macro"] == pytest.approx(s["f1_macro"])
    with open(tmp_path / "m" / "confusion_percent.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["Reference", *CLASSES]
    np.testing.assert_allclose(np.array([row[1:] for row in rows[1:]], dtype=float),
                               100 * cm / cm.sum(1, keepdims=True), atol=0.006)
    assert (tmp_path / "m" / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- thresholds

def test_fit_offsets_never_lowers_macro_f1_and_is_deterministic():
    for seed in range(4):
        rng = np.random.default_rng(seed)
        refs = list(rng.choice(list(CLASSES) + ["X"], size=300, p=[.1, .1, .25, .05, .03, .03, .1, .3, .04]))
        bias = np.array([0, 0, 0.5, 0, 0, 0, 0, 1.0])  # favours H and N, as an imbalanced model does
        probs = _noisy_probs(rng, refs, strength=0.8 * seed, bias=bias)
        offsets = fit_offsets(probs, refs, grid=GRID, rounds=2)
        before = macro_f1(refs, apply_offsets(probs, np.zeros(8)))
        after = macro_f1(refs, apply_offsets(probs, offsets))
        assert after >= before
        if seed:
            assert after > before  # the bias leaves room for improvement
        np.testing.assert_array_equal(offsets, fit_offsets(probs, refs, grid=GRID, rounds=2))
    assert apply_offsets(np.array([[0.2, 0.3] + [0.0] * 6]), [0.2] + [0.0] * 7) == ["A"]


def test_fit_offsets_keeps_zero_when_nothing_helps():
    refs = list(CLASSES) * 3
    probs = np.eye(8)[[CLASSES.index(r) for r in refs]]  # already perfect
    np.testing.assert_array_equal(fit_offsets(probs, refs, grid=GRID), np.zeros(8))


def test_cross_validated_estimate_uses_only_held_out_folds():
    rng = np.random.default_rng(7)
    refs = list(rng.choice(list(CLASSES) + ["O"], size=240))
    probs = _noisy_probs(rng, refs, strength=0.7, bias=np.r_[np.zeros(7), 0.8])
    cv = cross_validated_f1(probs, refs, k=4, seed=1, grid=GRID, rounds=1)
    scoreable = {i for i, r in enumerate(refs) if r in CLASSES}
    held = [set(f["held_out"]) for f in cv["folds"]]
    assert len(held) == 4 and set().union(*held) == scoreable and sum(map(len, held)) == len(scoreable)
    assert [sorted(h) for h in held] == [sorted(f) for f in stratified_folds(refs, 4, 1)]
    pooled = [None] * len(refs)
    for f, h in zip(cv["folds"], held):
        fit = sorted(scoreable - h)
        # The fold's offsets are exactly those fitted without its clips ...
        np.testing.assert_array_equal(f["offsets"], fit_offsets(probs[fit], [refs[i] for i in fit],
                                                                grid=GRID, rounds=1))
        for i, p in zip(sorted(h), apply_offsets(probs[sorted(h)], f["offsets"])):
            pooled[i] = p
    # ... and the pooled estimate scores each clip with the offsets of the fold that held it out.
    keep = sorted(scoreable)
    assert cv["f1_macro_pooled"] == pytest.approx(macro_f1([refs[i] for i in keep], [pooled[i] for i in keep]))
    assert cv["f1_macro_untuned"] == pytest.approx(macro_f1(refs, apply_offsets(probs, np.zeros(8))))
    # Scrambling the held-out clips' probabilities cannot change that fold's offsets.
    h0 = sorted(held[0])
    scrambled = probs.copy()
    scrambled[h0] = rng.dirichlet(np.ones(8), size=len(h0))
    cv2 = cross_validated_f1(scrambled, refs, k=4, seed=1, grid=GRID, rounds=1)
    assert cv2["folds"][0]["offsets"] == cv["folds"][0]["offsets"]
    assert cv2["folds"][0]["held_out"] == cv["folds"][0]["held_out"]


def test_tune_run_writes_a_new_run_with_the_same_offsets_on_every_split(demo_runs, tmp_path):
    src = demo_runs[0]
    before = {s: (src / "predictions" / f"{s}.csv").read_bytes() for s in ("Development", "Test3")}
    m = tune_run(src, tmp_path / "tuned", k=3, grid=GRID, rounds=2)
    out = tmp_path / "tuned"
    assert {p.name for p in out.iterdir()} == {"config.json", "thresholds.json", "metrics.json", "predictions"}
    offsets = np.array([m["offsets"][c] for c in CLASSES])
    for split in ("Development", "Test3"):
        old, new = read_predictions(prediction_path(src, split)), read_predictions(prediction_path(out, split))
        assert new.names == old.names and new.reference == old.reference
        np.testing.assert_array_equal(new.probs, old.probs)
        assert new.prediction == apply_offsets(old.probs, offsets)
        assert (src / "predictions" / f"{split}.csv").read_bytes() == before[split]  # source untouched
    assert m["splits"]["Development"]["f1_macro"] >= m["untuned"]["Development"]["f1_macro"]
    assert "Test3" not in m["splits"]  # unlabelled: predicted, not scored
    config = read_json(out / "config.json")
    assert config["source_run"] == str(src.resolve()) and config["offsets"] == m["offsets"]
    assert config["cache"] == read_json(src / "config.json")["cache"]
    assert read_json(out / "metrics.json")["cross_validation"]["k"] == 3
    with pytest.raises(RunError, match="already exists"):
        tune_run(src, out, k=0, grid=GRID)
    with pytest.raises(RunError, match="Test1"):
        tune_run(src, tmp_path / "t2", tune_split="Test1", grid=GRID)
    with pytest.raises(RunError, match="no labelled clip"):
        tune_run(src, tmp_path / "t3", tune_split="Test3", grid=GRID)
    assert not (tmp_path / "t2").exists() and not (tmp_path / "t3").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


# --------------------------------------------------------------------------- ensembles

def test_ensemble_of_identical_runs_reproduces_the_run(demo_runs, tmp_path):
    src = demo_runs[0]
    # The copy lists its clips in another order: ensembles align by FileName.
    twin = tmp_path / "twin"
    shutil.copytree(src, twin)
    for split in ("Development", "Test3"):
        p = read_predictions(prediction_path(src, split))
        order = np.random.default_rng(0).permutation(len(p))
        write_predictions(prediction_path(twin, split), [p.names[i] for i in order], p.probs[order],
                          [p.prediction[i] for i in order], [p.reference[i] for i in order])
    for method in ("mean", "vote"):
        m = ensemble_runs([src, twin], tmp_path / method, method=method, weights=[2, 1])
        for split in ("Development", "Test3"):
            a, b = read_predictions(prediction_path(src, split)), read_predictions(prediction_path(tmp_path / method, split))
            assert b.names == a.names and b.prediction == a.prediction and b.reference == a.reference
            np.testing.assert_allclose(b.probs, a.probs, atol=1e-6)
        assert m["splits"]["Development"]["f1_macro"] == pytest.approx(split_metrics(src, "Development")["f1_macro"])


def test_vote_breaks_ties_by_mean_probability(tmp_path):
    names = ["a.wav", "b.wav"]
    p1 = np.array([[0.6, 0.4] + [0] * 6, [0.5, 0.5] + [0] * 6])
    p2 = np.array([[0.05, 0.95] + [0] * 6, [0.45, 0.55] + [0] * 6])
    r1 = _make_run(tmp_path / "r1", {"Development": (names, p1, ["A", "S"], ["A", "A"])})
    r2 = _make_run(tmp_path / "r2", {"Development": (names, p2, ["A", "S"], ["S", "S"])})
    ensemble_runs([r1, r2], tmp_path / "vote", method="vote")
    got = read_predictions(prediction_path(tmp_path / "vote", "Development"))
    # Clip a: one vote each, mean probabilities A 0.325 < S 0.675 -> S; clip b: A 0.475 < S 0.525 -> S.
    assert got.prediction == ["S", "S"]
    ensemble_runs([r1, r2], tmp_path / "vote-w", method="vote", weights=[2, 1])
    assert read_predictions(prediction_path(tmp_path / "vote-w", "Development")).prediction == ["A", "A"]


def test_ensemble_errors_name_runs_and_split(demo_runs, tmp_path):
    src = demo_runs[0]
    p = read_predictions(prediction_path(src, "Development"))
    fewer = _make_run(tmp_path / "fewer", {"Development": (p.names[:-1], p.probs[:-1], p.reference[:-1])})
    with pytest.raises(RunError, match=r"fewer.*Development.*different clip sets"):
        ensemble_runs([src, fewer], tmp_path / "e1", splits=["Development"])
    seven = tmp_path / "seven"
    write_json(seven / "config.json", {})
    write_predictions(prediction_path(seven, "Development"), p.names, p.probs[:, :7], p.prediction, p.reference,
                      classes=CLASSES[:7])
    with pytest.raises(RunError, match=r"seven.*Development.*different class columns"):
        ensemble_runs([src, seven], tmp_path / "e2", splits=["Development"])
    with pytest.raises(RunError, match="Test3"):
        ensemble_runs([src, fewer], tmp_path / "e3", splits=["Test3"])
    with pytest.raises(RunError, match="not found"):
        ensemble_runs([src, tmp_path / "missing"], tmp_path / "e4")
    assert not any((tmp_path / f"e{i}").exists() for i in range(1, 5))


# --------------------------------------------------------------------------- Easy / Difficult

def _clip(name, primaries, **kw):
    anns = tuple(Annotation(worker=f"w{i}", primary=p) for i, p in enumerate(primaries))
    return Clip(name=name, split="Development", emo_class=kw.pop("emo", "N"), speaker=kw.pop("speaker", "1"),
                gender=kw.pop("gender", "Female"), duration=kw.pop("duration", 5.0), annotations=anns)


def test_krippendorff_alpha_matches_hand_computed_coincidences():
    clips = [_clip("u1", ["Angry", "Angry", "Neutral"]), _clip("u2", ["Neutral", "Neutral"]),
             _clip("u3", ["Angry", "Neutral", "Other", "Other-bored"]), _clip("u4", ["Angry"])]
    # Coincidence matrix o_ck = sum_u (n_uc n_uk - [c=k] n_uc) / (m_u - 1) over categories A, N, O;
    # u4 has a single value and is not pairable.
    #   u1 (A2 N1, m=3): o_AA = (4-2)/2 = 1, o_AN = o_NA = 2/2 = 1
    #   u2 (N2, m=2):    o_NN = (4-2)/1 = 2
    #   u3 (A1 N1 O2, m=4): o_OO = (4-2)/3 = 2/3, o_AN = 1/3, o_AO = o_NO = 2/3
    o = np.array([[1, 1 + 1 / 3, 2 / 3],
                  [1 + 1 / 3, 2, 2 / 3],
                  [2 / 3, 2 / 3, 2 / 3]])
    n_c = o.sum(1)  # 3, 4, 2
    n = n_c.sum()  # 9 pairable values
    d_o = o.sum() - np.trace(o)  # 16/3
    d_e = (n_c.sum() ** 2 - (n_c ** 2).sum()) / (n - 1)  # 2 (3*4 + 3*2 + 4*2) / 8 = 6.5
    assert n == pytest.approx(9) and d_o == pytest.approx(16 / 3) and d_e == pytest.approx(6.5)
    assert difficulty.primary_alpha(clips) == pytest.approx(1 - d_o / d_e) == pytest.approx(7 / 39)
    # Excluding Other: u1 as before, u2 as before, u3 becomes A1 N1 (m=2): o_AN = o_NA = 1.
    # o = [[1, 2], [2, 2]], n_c = (3, 4), n = 7: D_o = 4, D_e = 2*3*4/6 = 4 -> alpha 0.
    assert difficulty.primary_alpha(clips, other="exclude") == pytest.approx(0.0, abs=1e-12)
    assert difficulty.primary_alpha(clips[:2] * 0) is None


def test_easy_difficult_counts_on_constructed_runs(corpus, tmp_path):
    dev = corpus.split("Development")
    names = [c.name for c in dev]
    refs = [c.emo_class for c in dev]
    scoreable = [i for i, r in enumerate(refs) if r in CLASSES]
    wrong = {r: CLASSES[(CLASSES.index(r) + 1) % 8] if r in CLASSES else "N" for r in set(refs)}
    # Clip k-th scoreable: k % 3 == 0 both right, == 1 both wrong, == 2 only the first run right.
    pattern = {i: k % 3 for k, i in enumerate(scoreable)}
    pa = [r if pattern.get(i) in (0, 2) else wrong[r] for i, r in enumerate(refs)]
    pb = [r if pattern.get(i) == 0 else wrong[r] for i, r in enumerate(refs)]
    probs = np.full((len(names), 8), 1 / 8)
    ra = _make_run(tmp_path / "a", {"Development": (names, probs, refs, pa)})
    rb = _make_run(tmp_path / "b", {"Development": (names, probs, refs, pb)})
    res = difficulty.easy_difficult([ra, rb], corpus.clips)
    g = res["groups"]
    easy = [dev[i] for i in scoreable if pattern[i] == 0]
    hard = [dev[i] for i in scoreable if pattern[i] == 1]
    assert res["n"] == len(scoreable)
    assert (g["easy"]["clips"], g["difficult"]["clips"], g["mixed"]["clips"]) == (
        len(easy), len(hard), len(scoreable) - len(easy) - len(hard))
    assert g["easy"]["duration"]["mean"] == pytest.approx(np.mean([c.duration for c in easy]))
    assert g["difficult"]["duration"]["sd"] == pytest.approx(np.std([c.duration for c in hard], ddof=1))
    assert g["easy"]["gender"]["Female"] == sum(c.gender == "Female" for c in easy)
    assert g["easy"]["alpha"] == pytest.approx(difficulty.primary_alpha(easy))
    spk = {}
    for i in scoreable:
        if dev[i].speaker is not None:
            spk.setdefault(dev[i].speaker, []).append(pattern[i])
    n_easy = sum(sum(p == 0 for p in v) > len(v) / 2 for v in spk.values())
    n_hard = sum(sum(p == 1 for p in v) > len(v) / 2 for v in spk.values())
    assert res["speakers"]["easy"]["speakers"] == n_easy
    assert res["speakers"]["difficult"]["speakers"] == n_hard
    assert res["speakers"]["neither"]["speakers"] == len(spk) - n_easy - n_hard
    files = difficulty.write_outputs(res, tmp_path / "ed")
    assert "| Easy | %d |" % len(easy) in files["markdown"].read_text()
    # The clip metadata must cover the runs' clips.
    partial = {n: c for n, c in corpus.clips.items() if n != names[scoreable[0]]}
    with pytest.raises(RunError, match=names[scoreable[0]]):
        difficulty.easy_difficult([ra, rb], partial)
    with pytest.raises(RunError, match="at least two runs"):
        difficulty.easy_difficult([ra], corpus.clips)


# --------------------------------------------------------------------------- report, submission, CLI

def test_report_from_demo_runs(demo_runs, corpus, tmp_path):
    figs = tmp_path / "corpus-figs"
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    for name in ("durations.png", "cooccurrence.png"):
        fig = plt.figure(figsize=(2, 2))
        fig.savefig(figs.mkdir(exist_ok=True) or figs / name)
        plt.close(fig)
    ens = tmp_path / "ens"
    ensemble_runs(demo_runs, ens)
    ed = difficulty.write_outputs(difficulty.easy_difficult(demo_runs, corpus.clips), tmp_path / "ed")["json"]
    spec = {"title": "Demo report", "corpus_figures": "corpus-figs",
            "tables": {"table1": {"WavLM-large": str(demo_runs[0]), "Hubert-large": str(demo_runs[2])},
                       "table2": {"Focal(S)": {"run": str(demo_runs[1]), "split": "Development"}},
                       "ensemble": {"Ensemble": "ens"},
                       "table4": {"dev": str(demo_runs[0]), "test": str(demo_runs[0])}},
            "easy_difficult": str(ed.parent)}
    write_json(tmp_path / "spec.json", spec)
    (tmp_path / "rep").mkdir()
    (tmp_path / "rep" / "report.md").write_text("# an earlier version's report\n")
    res = CliRunner().invoke(main, ["report", str(tmp_path / "spec.json"), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    assert f"report written to {tmp_path / 'rep' / 'REPORT.md'}" in res.output
    # one name: REPORT.md, as run_all.sh writes it; the out-of-date report.md is gone
    assert sorted(p.name for p in (tmp_path / "rep").glob("*.md")) == ["REPORT.md"]
    md = (tmp_path / "rep" / "REPORT.md").read_text()
    ours = split_metrics(demo_runs[0], "Development")
    assert "# Demo report" in md
    assert f"| WavLM-large | `../{demo_runs[0].name}`" not in md  # run links are relative to the report
    row = next(line for line in md.splitlines() if line.startswith("| WavLM-large |"))
    assert f"{ours['f1_macro']:.3f}" in row and "0.302" in row and "0.402" in row
    assert next(line for line in md.splitlines() if line.startswith("| Wav2vec2-base |")).count("—") >= 5
    assert "Focal(S) *(not in paper)*" in md and "| Ensemble |" in md and "0.338" in md
    assert "no labelled test split" in md and "not comparable" in md and "Test3" in md
    assert "## Easy and Difficult clips" in md
    assert "7,619 / 7,421" in md  # the paper's development gender totals beside ours (All row)
    assert "*Clip durations per split, with the 8 s mark" in md  # a caption under each corpus figure
    for link in ("figures/corpus/durations.png", "figures/corpus/cooccurrence.png",
                 "figures/table1/wavlm-large-development.png", "figures/ensemble/ensemble-development.png"):
        assert f"]({link})" in md and (tmp_path / "rep" / link).is_file()
    # A broken row is an error naming table and row; nothing is written.
    spec["tables"]["table3"] = {"KLD(S*)": "nowhere"}
    write_json(tmp_path / "bad.json", spec)
    res = CliRunner().invoke(main, ["report", str(tmp_path / "bad.json"), "--out", str(tmp_path / "rep2")])
    assert res.exit_code == 1 and "table3" in res.output and "KLD(S*)" in res.output
    assert not (tmp_path / "rep2").exists()


def test_submission_csv(demo_runs, corpus, tmp_path):
    out = tmp_path / "sub.csv"
    n = write_submission(demo_runs[0], out, split="Test3", clips=corpus.clips)
    rows = list(csv.reader(open(out)))
    p = read_predictions(prediction_path(demo_runs[0], "Test3"))
    assert rows[0] == ["FileName", "EmoClass"] and n == len(rows) - 1 == len(corpus.split("Test3"))
    assert [r[0] for r in rows[1:]] == p.names and [r[1] for r in rows[1:]] == p.prediction
    short = _make_run(tmp_path / "short", {"Test3": (p.names[1:], p.probs[1:], p.reference[1:])})
    with pytest.raises(RunError, match=r"1 clip\(s\) missing"):
        write_submission(short, tmp_path / "s2.csv", clips=corpus.clips)
    assert not (tmp_path / "s2.csv").exists()


def test_cli_errors_are_one_line(demo_runs, tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["metrics", str(tmp_path / "missing")])
    assert res.exit_code == 1 and res.output.strip().startswith("Error:") and "not found" in res.output
    res = runner.invoke(main, ["metrics", str(demo_runs[0]), "--split", "Test1", "--no-files"])
    assert res.exit_code == 1 and "Test1" in res.output and "available: Development, Test3" in res.output
    bad = tmp_path / "bad"
    shutil.copytree(demo_runs[0], bad)
    path = prediction_path(bad, "Development")
    lines = path.read_text().splitlines()
    lines[3] = lines[3].replace(",", ";", 2)
    path.write_text("\n".join(lines) + "\n")
    res = runner.invoke(main, ["tune-thresholds", str(bad), str(tmp_path / "t")])
    assert res.exit_code == 1 and f"{path}:4:" in res.output and len(res.output.strip().splitlines()) == 1
    res = runner.invoke(main, ["ensemble", str(demo_runs[0]), "--out", str(tmp_path / "e")])
    assert res.exit_code == 1 and "at least two runs" in res.output
    res = runner.invoke(main, ["easy-difficult", *map(str, demo_runs[:2]), "--out", str(tmp_path / "ed")])
    assert res.exit_code == 1 and "none" in res.output and "cache" in res.output  # recorded cache is missing
    res = runner.invoke(main, ["metrics", str(demo_runs[1]), "--out", str(tmp_path / "m")])
    assert res.exit_code == 0 and "macro-F1" in res.output
    assert json.loads((tmp_path / "m" / "Development" / "metrics.json").read_text())["split"] == "Development"


def test_folds_beyond_the_largest_class_and_a_damaged_config_are_clear_errors(tmp_path):
    """3 development clips of 3 classes cannot make 3 stratified folds: a ConfigError, not sklearn's
    ValueError; a damaged config.json is a RunError naming it."""
    from conilium.errors import ConfigError
    from conilium.runs import load_run_config

    with pytest.raises(ConfigError, match="largest has 1|every class has one"):
        stratified_folds(["A", "S", "H"], k=3)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(RunError, match="damaged run configuration"):
        load_run_config(tmp_path)

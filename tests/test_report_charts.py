"""The report's charts beside its tables: learning curves, per-class F1 beside the paper's,
threshold tuning before/after, learned layer weights, attribute scatters, the class legend and
Table 4's figures named by run and tuning. Each is written, embedded in REPORT.md with its
caption, and skipped with a one-line note when its data is not on disk.

Built from a real head (train-head --task joint on the demo cache's four layers, so it learns
a layer mix and predicts arousal, valence and dominance) and its thresholds tuned for real.
"""

import re
import shutil

import numpy as np
import pytest
import torch

from conilium import CLASS_NAMES, CLASSES
from conilium.evaluate import paper
from conilium.evaluate.plots import confusion_figure
from conilium.evaluate.report import build_report
from conilium.evaluate.report_figures import confusion_name
from conilium.evaluate.thresholds import tune_run
from conilium.runs import prediction_path, read_predictions, write_predictions
from conilium.util import read_json, write_json

GRID = tuple(np.round(np.linspace(-0.3, 0.3, 7), 3))
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(demo_cache, tmp_path_factory, two_torch_threads):
    from conilium.heads.train import TrainConfig, train_head

    base = tmp_path_factory.mktemp("charts")
    joint = base / "runs" / "wbce-S-avd"
    cfg = TrainConfig(cache=str(demo_cache), task="joint", loss="wbce", labels="S", pooled_stats=True, epochs=4,
                      seed=0, hidden=64, dropout=0.1, device="cpu")
    train_head(cfg, joint, progress=False)
    tuned = base / "runs" / "best-tuned"
    tune_run(joint, tuned, k=3, grid=GRID, rounds=1)
    return {"base": base, "joint": joint, "tuned": tuned}


def _spec(joint, tuned):
    return {"title": "Charts", "tables": {"table1": {"WavLM-large": str(joint)},
                                          "table4": {"dev": str(tuned), "Baseline (Development)": str(joint)},
                                          "attributes": {"WBCE(S) + attributes": str(joint)}}}


def _embedded(md, out, link):
    """The figure at ``link`` is a PNG in the report folder, embedded, and its caption follows."""
    assert (out / link).read_bytes()[:8] == PNG, link
    i = md.index(f"]({link})")
    assert md[i:].split("\n\n", 2)[1].startswith("*"), link  # its caption
    return md[i:].split("\n\n", 2)[1]


def test_every_chart_is_written_embedded_and_drawn_from_the_runs(runs, tmp_path):
    joint, tuned = runs["joint"], runs["tuned"]
    out = tmp_path / "rep"
    build_report(_spec(joint, tuned), out)
    md, charts = (out / "REPORT.md").read_text(), read_json(out / "report.json")["charts"]
    m = read_json(joint / "metrics.json")

    # learning curves: one figure per table, from each run's history, the best epoch marked
    lc = charts["learning_curves"]
    for key in ("table1", "table4", "attributes"):
        caption = _embedded(md, out, lc[key]["figure"])
        assert "★ marks the best epoch" in caption
    assert lc["table1"]["runs"] == 1 and "No per-epoch history: Development" in lc["table4"]["caption"]
    assert "CCC mean" in lc["attributes"]["caption"] and "macro-F1" in lc["table1"]["caption"]
    assert len(m["history"]) == 4 and m["best_epoch"] in range(1, 5)

    # per-class F1 of the best system (Table 4's Development row), the paper's absence said
    pc = charts["per_class"]
    assert pc["table"] == "table4" and pc["row"] == "Development" and pc["paper"] is False
    caption = _embedded(md, out, pc["figure"])
    assert "publishes no per-class F1" in caption and not paper.PER_CLASS_F1
    assert md.index(pc["figure"]) > md.index("## Table 4")

    # threshold tuning before/after of the tuned row
    (th,) = charts["thresholds"]["table4"]
    assert th["label"] == "Development" and th["figure"].endswith("--runs-best-tuned--thresholds.png")
    assert "before" in _embedded(md, out, th["figure"])

    # learned layer weights: the softmax of the head's own mix, a chart for its upstream
    (lw,) = charts["layer_weights"]["figures"]
    ckpt = torch.load(joint / "model.pt", map_location="cpu", weights_only=False)
    want = torch.softmax(ckpt["state_dict"]["layer_mix.weights"].float(), 0).tolist()
    assert lw["weights"] == pytest.approx(want) and len(want) == 4 and sum(lw["weights"]) == pytest.approx(1)
    assert lw["upstream"] == "demo-wavlm" and lw["layers"] == ckpt["input"]["upstream_layers"]
    assert "## Learned layer weights" in md and "demo-wavlm" in _embedded(md, out, lw["figure"])

    # predicted vs reference arousal, valence, dominance of the attribute row
    (av,) = charts["attributes"]
    assert "predicted against reference arousal" in _embedded(md, out, av["figure"])
    assert md.index(av["figure"]) > md.index("## Arousal, valence, dominance")

    # Table 4's confusion figures say their run and whether thresholds were tuned
    figs = sorted(p.name for p in (out / "figures" / "table4").glob("*.png")
                  if p.name.endswith(("--tuned.png", "--untuned.png")))
    assert figs == ["baseline-development--runs-wbce-s-avd--untuned.png", "development--runs-best-tuned--tuned.png"]
    for name in figs:
        assert f"](figures/table4/{name})" in md

    # the class letters, spelled out once in the report
    assert "**Class letters.** " + ", ".join(f"{c} = {CLASS_NAMES[c]}" for c in CLASSES) in md


def test_table4_figure_titles_name_the_run_and_its_tuning(runs, tmp_path):
    build_report(_spec(runs["joint"], runs["tuned"]), tmp_path / "rep")
    rows = {r["label"]: r for r in read_json(tmp_path / "rep" / "report.json")["tables"]["table4"]}
    name, title = confusion_name("table4", rows["Development"])
    assert name == "development--runs-best-tuned--tuned"
    assert "run runs/best-tuned, thresholds tuned on Development" in title.replace("\n", " ")
    name, title = confusion_name("table4", rows["Baseline (Development)"])
    assert name.endswith("--untuned") and "thresholds not tuned" in title.replace("\n", " ")
    name, _ = confusion_name("table1", rows["Development"])  # other tables keep their names
    assert name == "development"


def test_confusion_figures_spell_out_the_class_letters():
    import matplotlib.pyplot as plt

    cm = np.diag([9, 9, 18, 8, 5, 5, 7, 30])
    fig = confusion_figure(100.0 * cm / cm.sum(1, keepdims=True), CLASSES, support=cm.sum(1).tolist())
    try:
        texts = " ".join(t.get_text() for t in fig.axes[0].texts)
        for c in CLASSES:
            assert f"{c} {CLASS_NAMES[c]}" in texts
    finally:
        plt.close(fig)


def test_each_chart_is_skipped_with_a_note_when_its_data_is_absent(runs, tmp_path):
    joint, tuned = tmp_path / "runs" / "wbce-S-avd", tmp_path / "runs" / "best-tuned"
    shutil.copytree(runs["joint"], joint)
    shutil.copytree(runs["tuned"], tuned)
    before = build_report(_spec(joint, tuned), tmp_path / "full")
    # no history, no model.pt, no untuned scores, no attribute columns in the predictions
    m = read_json(joint / "metrics.json")
    write_json(joint / "metrics.json", dict(m, history=[]))
    (joint / "model.pt").unlink()
    t = read_json(tuned / "metrics.json")
    write_json(tuned / "metrics.json", {k: v for k, v in t.items() if k != "untuned"})
    p = read_predictions(prediction_path(joint, "Development"))
    write_predictions(prediction_path(joint, "Development"), p.names, p.probs, p.prediction, p.reference)

    out = tmp_path / "rep"
    build_report(_spec(joint, tuned), out)
    md, js = (out / "REPORT.md").read_text(), read_json(out / "report.json")
    notes = [ln for ln in md.splitlines() if ln.startswith("*") and ("not drawn" in ln or "none drawn" in ln)]
    assert any(ln.startswith("*Learning curves: none drawn") for ln in notes)
    assert any(ln.startswith("*Threshold tuning of Development: not drawn") and "untuned" in ln for ln in notes)
    assert any(ln.startswith("*Learned layer weights: none drawn") for ln in notes)
    assert any(ln.startswith("*Attributes of WBCE(S) + attributes: not drawn") for ln in notes)
    assert all(ln.count("\n") == 0 for ln in notes)
    assert not list((out / "figures").glob("**/learning-curves.png"))
    assert not (out / "figures" / "layer-weights").exists() and not (out / "figures" / "attributes").exists()
    # the rows' scores are those of the report with every chart
    full = read_json(before.parent / "report.json")
    scores = {k: [r.get("score") for r in rows] for k, rows in js["tables"].items()}
    assert scores == {k: [r.get("score") for r in rows] for k, rows in full["tables"].items()}
    assert js["attributes"][0]["scores"] == full["attributes"][0]["scores"]

    # a damaged model.pt is named, not a crash
    (joint / "model.pt").write_bytes(b"not a checkpoint")
    build_report(_spec(joint, tuned), out)
    md = (out / "REPORT.md").read_text()
    assert re.search(r"\*Not read: WavLM-large: .*model\.pt: cannot read the head checkpoint", md)


def test_no_development_row_leaves_a_note_for_the_per_class_chart(tmp_path):
    build_report({"tables": {}}, tmp_path / "rep")
    md = (tmp_path / "rep" / "REPORT.md").read_text()
    assert "*Per-class F1 of our best system: not drawn — no row was scored on Development.*" in md
    assert "*Learned layer weights: none drawn" in md


def test_per_class_charts_draw_a_corpus_with_its_own_classes(tmp_path, monkeypatch):
    # a run over a corpus's own class set (codes outside MSP-Podcast's letters) gets its bars, in
    # the order its run recorded them; MSP-Podcast's letters keep the paper's order
    from conilium.evaluate import report_figures

    drawn = []
    monkeypatch.setattr(report_figures.charts, "per_class_bars",
                        lambda path, labels, series, **kw: drawn.append((list(labels), series)))
    per = {c: {"f1": f, "support": 3} for c, f in (("neu", 0.5), ("ang", 0.25), ("sad", 0.0))}
    row = {"label": "WBCE (S)", "split": "Development", "run": str(tmp_path / "run"),
           "score": {"f1_macro": 0.25, "f1_micro": 0.4, "per_class": per}}
    report_figures.per_class_figure({"table2": [row]}, tmp_path / "fig", tmp_path)
    assert drawn[-1][0] == ["neu", "ang", "sad"] and drawn[-1][1][0]["f1"] == {"neu": 0.5, "ang": 0.25, "sad": 0.0}
    assert report_figures.class_order({"N": 1, "A": 1, "ang": 1}) == ["A", "N", "ang"]

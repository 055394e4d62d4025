"""The report's figures: the corpus figures copied beside it, each scored row's confusion
matrix (with its clip counts, a legend of the class letters, and a warning on runs of a
random-weight upstream; Table 4's named by run and tuning), and the charts beside the tables
(:func:`plot_extras`), each drawn from what is on disk or skipped with a one-line note."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

from conilium import CLASSES
from conilium.dirs import RunDir
from conilium.errors import ConiliumError
from conilium.util import atomic_path

from . import charts, paper
from .plots import figure_title, plot_confusion
from .report_data import ATTRIBUTES_TABLE
from .report_markdown import ATTRIBUTE_NAMES

#: describe-corpus's figures, shown first and in this order.
CORPUS_FIGURES = ("durations.png", "cooccurrence.png")


def _slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", text.replace("*", "star")).strip("-").lower()
    return s or "row"


def copy_corpus_figures(corpus_dir: Optional[Path], fig_dir: Path) -> List[Path]:
    """describe-corpus's figures copied to ``fig_dir/corpus`` (known ones first); their new paths."""
    if corpus_dir is None:
        return []
    names = [n for n in CORPUS_FIGURES if (corpus_dir / n).is_file()]
    names += sorted(p.name for p in corpus_dir.glob("*.png") if p.name not in names)
    copied = []
    for n in names:
        dst = fig_dir / "corpus" / n
        with atomic_path(dst, suffix=".png.tmp") as tmp:
            shutil.copyfile(corpus_dir / n, tmp)
        copied.append(dst)
    return copied


def plot_rows(scored: Dict[str, List[Dict]], out_dir: Path, fig_dir: Path) -> None:
    """A confusion matrix per scored row, in ``fig_dir/<table>/``; each row gets its
    ``"figure"`` (relative to ``out_dir``)."""
    for key, rows in scored.items():
        for r in rows:
            if not r.get("score"):
                continue
            name, title = confusion_name(key, r)
            png = fig_dir / key / f"{name}.png"
            s = r["score"]
            setting = r.get("setting") or {}
            warn = (f"RANDOM-WEIGHT UPSTREAM ({setting['random_init']}): a pipeline check, not a trained model"
                    if setting.get("random_init") else None)
            plot_confusion(png, s["confusion_percent"], s["confusion_labels"],
                           title=title,
                           support=[sum(row) for row in s["confusion"]], warning=warn)
            r["figure"] = str(png.relative_to(out_dir))


# --------------------------------------------------------------------------- charts beside the tables
#
# Each chart is an entry {"figure": path relative to the report, "caption": ...}, or, when its
# data is not on disk, {"note": one line saying what is missing}: the report is still written.

#: The per-epoch development metric a table's learning curves show, by table.
ATTRIBUTE_CURVE = ("dev_ccc_mean", "development CCC mean (arousal, valence, dominance)")
CATEGORY_CURVE = ("dev_f1_macro", "development macro-F1")
#: What a figure's data failing to read looks like (the figure is skipped with a note).
_READ_ERRORS = (ConiliumError, OSError, ValueError, KeyError, TypeError)


def _rel(path: Path, out_dir: Path) -> str:
    return path.relative_to(out_dir).as_posix()


def _run_name(run: str) -> str:
    """A run directory named by its last two path components (``runs/best-tuned``)."""
    parts = Path(run).parts
    return "/".join(parts[-2:]) if len(parts) >= 2 else str(run)


def _curve(run: str, metric: str) -> Optional[Dict]:
    """A run's per-epoch training loss and ``metric`` from its metrics.json; None without them."""
    m = RunDir(run).metrics_or_none() or {}
    hist = [h for h in m.get("history") or [] if isinstance(h, dict)
            and isinstance(h.get("train_loss"), (int, float)) and isinstance(h.get(metric), (int, float))]
    if not hist:
        return None
    return {"epochs": [int(h["epoch"]) for h in hist], "train_loss": [float(h["train_loss"]) for h in hist],
            "dev": [float(h[metric]) for h in hist], "best_epoch": m.get("best_epoch")}


def learning_curve_figure(title: str, rows: List[Dict], png: Path, out_dir: Path, *,
                          curve=CATEGORY_CURVE) -> Optional[Dict]:
    """One figure of the learning curves of ``rows`` (each a run); a note when none has a
    history; None when no row has a run."""
    metric, metric_label = curve
    if not any(r.get("run") for r in rows):
        return None
    curves, without = [], []
    seen = set()
    for r in rows:
        if not r.get("run") or r["run"] in seen:
            continue
        seen.add(r["run"])
        c = _curve(r["run"], metric)
        if c is None:
            without.append(r["label"])
        else:
            curves.append({"label": r["label"], **c})
    if not curves:
        return {"note": f"Learning curves: none drawn — no run of this table has a per-epoch history with training loss "
                        f"and {metric_label} in its metrics.json (ensembles and threshold-tuned runs train nothing)."}
    charts.learning_curves(png, curves, metric_label=metric_label, title=f"{title}: learning curves")
    caption = (f"Learning curves of {len(curves)} run(s): training loss (left; each run's own loss, so compare "
               f"shapes, not levels) and {metric_label} (right) per epoch; ★ marks the best epoch, whose weights "
               f"the run kept.")
    if without:
        caption += f" No per-epoch history: {', '.join(without)}."
    return {"figure": _rel(png, out_dir), "caption": caption, "runs": len(curves)}


def _tuned_name(r: Dict) -> Tuple[str, str]:
    """(file-name part, title part) saying whether a row's thresholds were tuned."""
    t = r.get("tuning")
    if (r.get("setting") or {}).get("tuned") or t:
        where = t["tune_split"] if t else "Development"
        return "tuned", f"thresholds tuned on {where}"
    return "untuned", "thresholds not tuned (argmax)"


def _row_name(r: Dict) -> str:
    """A row's label and split as a file-name part (the split once)."""
    name = _slug(r["label"])
    return name if name.endswith(_slug(r["split"])) else f"{name}-{_slug(r['split'])}"


def _row_text(r: Dict) -> str:
    """A row's label with its split, unless the label names it."""
    return r["label"] if r["split"].lower() in r["label"].lower() else f"{r['label']}, {r['split']}"


def confusion_name(key: str, r: Dict) -> Tuple[str, str]:
    """A scored row's confusion figure: (file stem, title). Table 4's say which run and whether
    its thresholds were tuned."""
    name = _row_name(r)
    table = paper.TABLES[key].title.split(":")[0]
    if key != "table4":
        return name, figure_title(table, r["label"], split=r["split"])
    tuned, tuned_text = _tuned_name(r)
    run = _run_name(r["run"])
    return (f"{name}--{_slug(run)}--{tuned}",
            figure_title(table, r["label"], f"run {run}, {tuned_text}", split=r["split"]))


def class_order(per_class: Mapping) -> List[str]:
    """The classes of a run's per-class scores in chart order: MSP-Podcast's letters in the
    paper's order, then a corpus's own classes in the order its run recorded them."""
    return [c for c in CLASSES if c in per_class] + [c for c in per_class if c not in CLASSES]


def threshold_figure(key: str, r: Dict, fig_dir: Path, out_dir: Path) -> Dict:
    """Per-class F1 of a tuned row before and after tuning, from the tuned run's metrics.json."""
    m = RunDir(r["run"]).metrics_or_none() or {}
    split = r["split"]
    before = ((m.get("untuned") or {}).get(split) or {}).get("per_class")
    after = ((m.get("splits") or {}).get(split) or {}).get("per_class")
    if not before or not after:
        return {"label": r["label"], "note": f"Threshold tuning of {r['label']}: not drawn — "
                f"{RunDir(r['run']).metrics_path} has no untuned and tuned per-class scores of {split}."}
    labels = class_order(after)
    t = r["tuning"]
    where = "in-sample" if t["in_sample"] else f"thresholds from {t['tune_split']}"
    series = [{"label": f"before: argmax (macro-F1 {_f(m['untuned'][split].get('f1_macro'))})",
               "f1": {c: before[c]["f1"] for c in labels if c in before}},
              {"label": f"after: tuned thresholds (macro-F1 {_f(m['splits'][split].get('f1_macro'))}, {where})",
               "f1": {c: after[c]["f1"] for c in labels}}]
    run = _run_name(r["run"])
    png = fig_dir / key / f"{_row_name(r)}--{_slug(run)}--thresholds.png"
    charts.per_class_bars(png, labels, series, support=charts.support_of(after),
                          title=figure_title(paper.TABLES[key].title.split(":")[0], r["label"],
                                             f"run {run}: per-class F1 before and after threshold tuning",
                                             split=split, width=70))
    return {"label": r["label"], "figure": _rel(png, out_dir),
            "caption": f"Per-class F1 of {_row_text(r)} (run `{run}`) with the argmax decision (before) and "
                       f"with the decision thresholds tuned on {t['tune_split']} (after; {where}): which classes "
                       f"the tuning moves, and at which classes' expense."}


def _f(x) -> str:
    return "—" if x is None else f"{x:.3f}"


def best_row(scored: Dict[str, List[Dict]]) -> Optional[Tuple[str, Dict]]:
    """The row standing for our best system: Table 4's Development row when scored, else the
    scored Development row with the highest macro-F1; (table, row)."""
    for r in scored.get("table4", []):
        if r["label"] == "Development" and r.get("score"):
            return "table4", r
    cands = [(k, r) for k, rows in scored.items() for r in rows if r.get("score") and r["split"] == "Development"]
    return max(cands, key=lambda kr: kr[1]["score"]["f1_macro"]) if cands else None


def per_class_figure(scored: Dict[str, List[Dict]], fig_dir: Path, out_dir: Path) -> Dict:
    """Per-class F1 of our best row beside the paper's per-class figures where it gives any."""
    found = best_row(scored)
    if found is None:
        return {"note": "Per-class F1 of our best system: not drawn — no row was scored on Development."}
    key, r = found
    per = r["score"]["per_class"]
    labels = class_order(per)
    ref = f"{key}:{r['label']}"
    theirs = paper.PER_CLASS_F1.get(ref)
    run = _run_name(r["run"])
    series = [{"label": f"ours: {r['label']}, run {run} (macro-F1 {_f(r['score']['f1_macro'])})",
               "f1": {c: per[c]["f1"] for c in labels}}]
    if theirs:
        series.append({"label": "paper", "f1": dict(theirs)})
    png = fig_dir / key / f"per-class-f1--{_slug(r['label'])}--{_slug(run)}.png"
    charts.per_class_bars(png, labels, series, support=charts.support_of(per),
                          title=figure_title(paper.TABLES[key].title.split(":")[0], r["label"],
                                             f"run {run}: per-class F1", split=r["split"], width=70),
                          note=None if theirs else f"Paper: none drawn — {paper.PER_CLASS_SOURCE}.")
    paper_text = ("beside the paper's" if theirs else
                  f"ours only: {paper.PER_CLASS_SOURCE} (section 3.7 says in words that the threshold adjustment "
                  f"helps the less frequent classes)")
    return {"figure": _rel(png, out_dir), "row": r["label"], "table": key, "paper": bool(theirs),
            "caption": f"Per-class F1 of our best system ({_row_text(r)}, run `{run}`), with each "
                       f"class's clip count; {paper_text}."}


def _layer_mix(run: str) -> Optional[Dict]:
    """The learned layer weights of a train-head run's model.pt (softmax), its layers and upstream;
    None when the run has no model.pt or its head does not learn a mix of several layers."""
    path = RunDir(run).checkpoint_path
    if not path.is_file():
        return None
    import torch

    from conilium.heads.outputs import HeadCheckpoint

    ckpt = HeadCheckpoint.load(path)
    w = ckpt.state_dict.get("layer_mix.weights")
    if w is None or w.numel() < 2:
        return None
    layers = ckpt.upstream_layers
    if len(layers) != w.numel():
        layers = list(range(w.numel()))
    up = ckpt.cache_manifest.upstream or {}
    return {"weights": torch.softmax(w.float(), dim=0).tolist(), "layers": layers,
            "upstream": str(up.get("name") or ckpt.cache or "unknown upstream")}


def layer_weight_figures(rows: List[Dict], fig_dir: Path, out_dir: Path) -> Dict:
    """A bar chart per upstream of the layer weights its heads learned (the first head in the
    report's order drawn as bars, the others as dots)."""
    by_up: Dict[str, List[Dict]] = {}
    notes, seen = [], set()
    for r in rows:
        if not r.get("run") or r["run"] in seen:
            continue
        seen.add(r["run"])
        try:
            mix = _layer_mix(r["run"])
        except _READ_ERRORS as e:
            notes.append(f"{r['label']}: {e}")
            continue
        if mix is not None:
            by_up.setdefault(mix["upstream"], []).append({**mix, "label": r["label"], "run": r["run"]})
    figures = []
    for up, mixes in by_up.items():
        first = mixes[0]
        same = [m["weights"] for m in mixes[1:] if m["layers"] == first["layers"]]
        png = fig_dir / "layer-weights" / f"{_slug(Path(up).name)}.png"
        charts.layer_weight_bars(png, first["layers"], first["weights"], others=same,
                                 title=figure_title(f"Layer weights learned on {Path(up).name}",
                                                    f"bars: {first['label']} ({_run_name(first['run'])})", width=60))
        top = first["layers"][int(np.argmax(first["weights"]))]
        figures.append({"upstream": up, "figure": _rel(png, out_dir), "runs": [m["run"] for m in mixes],
                        "layers": first["layers"], "weights": first["weights"],
                        "caption": f"Softmax weights of the layers of {up} learned by the head of {first['label']} "
                                   f"(bars; highest: layer {top})"
                                   + (f" and by {len(same)} other head(s) on the same layers (dots)" if same else "")
                                   + "; the dashed line is the uniform mix."})
    out: Dict = {"figures": figures}
    if not figures:
        out["note"] = ("Learned layer weights: none drawn — no head here learns a mix of several layers (its cache "
                       "holds one layer, e.g. extract-features --layers last, or its run has no model.pt).")
    if notes:
        out["unreadable"] = notes
    return out


def attribute_figure(r: Dict, fig_dir: Path, out_dir: Path) -> Dict:
    """Predicted against reference arousal, valence, dominance of an attribute row."""
    from conilium.runs import prediction_path, read_predictions

    path = prediction_path(r["run"], r["split"])
    try:
        p = read_predictions(path)
    except _READ_ERRORS as e:
        return {"label": r["label"], "note": f"Attributes of {r['label']}: not drawn — {e}."}
    if p.attributes is None or p.attribute_refs is None or not (
            np.isfinite(p.attributes) & np.isfinite(p.attribute_refs)).any():
        return {"label": r["label"], "note": f"Attributes of {r['label']}: not drawn — {path} holds no predicted "
                                             f"attribute with a reference value."}
    names = [c for c, _ in ATTRIBUTE_NAMES]
    ccc = [(r.get("scores") or {}).get(c, {}).get("ccc") for c in names]
    run = _run_name(r["run"])
    png = fig_dir / "attributes" / f"{_row_name(r)}--{_slug(run)}.png"
    charts.attribute_scatter(png, p.attributes, p.attribute_refs,
                             [f"{c} ({n})" for c, n in ATTRIBUTE_NAMES], ccc,
                             title=figure_title(r["label"], f"run {run}: predicted vs reference",
                                                split=r["split"], width=90))
    return {"label": r["label"], "figure": _rel(png, out_dir),
            "caption": f"{_row_text(r)} (run `{run}`): predicted against reference arousal, valence and "
                       f"dominance (1–7) per clip with both; the dashed line is a perfect prediction."}


def plot_extras(scored: Dict[str, List[Dict]], attribute_rows: List[Dict], out_dir: Path, fig_dir: Path) -> Dict:
    """Every chart beside the tables: learning curves per table, threshold tuning before/after of
    each tuned row, per-class F1 of the best row, learned layer weights, attribute scatters."""
    out: Dict = {"learning_curves": {}, "thresholds": {}}
    for key, rows in scored.items():
        title = paper.TABLES[key].title.split(":")[0]
        out["learning_curves"][key] = learning_curve_figure(
            title, [r for r in rows if r.get("score")], fig_dir / key / "learning-curves.png", out_dir)
        tuned = [threshold_figure(key, r, fig_dir, out_dir) for r in rows if r.get("score") and r.get("tuning")]
        if tuned:
            out["thresholds"][key] = tuned
    if attribute_rows:
        out["learning_curves"][ATTRIBUTES_TABLE] = learning_curve_figure(
            "Arousal, valence, dominance", attribute_rows, fig_dir / "attributes" / "learning-curves.png", out_dir,
            curve=ATTRIBUTE_CURVE)
    out["per_class"] = per_class_figure(scored, fig_dir, out_dir)
    out["layer_weights"] = layer_weight_figures(
        [r for rows in scored.values() for r in rows] + list(attribute_rows), fig_dir, out_dir)
    out["attributes"] = [attribute_figure(r, fig_dir, out_dir) for r in attribute_rows]
    return out

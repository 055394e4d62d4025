"""Scores of one run and split, and the paper-vs-ours report.

:func:`split_metrics` scores one split of a run and writes its per-class table and
confusion matrix (CSV and PNG). :func:`build_report` collects run directories into the
paper's tables (Tables 1 to 4, the sampler results of section 3.4, the ensemble of
section 3.6 and Table 2 on the fine-tuned upstream's features), with the seed paper's
published numbers beside ours, and writes a Markdown report (``report.md``) with its
figures copied next to it, plus ``report.json``.

What the report never lets the paper say for us:

* every row states **how it was trained** (its *setting*: a head on a frozen feature
  cache, a head on the features of the fine-tuned upstream, or end to end), read from
  the run's own ``config.json`` and its cache's manifest, and whether its upstream had
  random weights; the seed's numbers are all end to end (:data:`paper.PAPER_SETTING`);
* a threshold-tuned row shows three numbers side by side: untuned, tuned on the split it
  is scored on (in-sample, as the seed did), and the K-fold estimate whose thresholds
  never saw the clips they score;
* the "paper" columns hold the seed's numbers only; the challenge baseline and winner
  are listed with their own papers (:data:`paper.EXTERNAL`);
* each of the seed's conclusions (:data:`paper.FINDINGS`) is given as the seed's, with
  whether our numbers agree, computed from them.

A report spec is JSON::

    {
      "title": "CONILIUM on MSP-Podcast 1.11",
      "corpus_figures": "figures/corpus",          # describe-corpus output (optional)
      "tables": {
        "table1":   {"WavLM-large": "runs/t1/wavlm", "Hubert-large": "runs/t1/hubert"},
        "table2":   {"WBCE(S)": "runs/t2/wbce-S"},
        "sampler":  {"BCE(P) + sampler": "runs/t34/bce-P-sampler"},
        "table3":   {"KLD(S*)": "runs/t3/kld-Sstar"},
        "ensemble": {"Ensemble": "runs/ens", "Ensemble (weighted)": "runs/ens-weighted"},
        "table4":   {"dev": "runs/best-tuned", "test": {"run": "runs/best-tuned", "split": "Test1"}},
        "table2_finetuned": {"WBCE(S)": "runs/t2-finetuned/wbce-S"},
        "attributes": {"Attributes": "runs/avd", "WBCE(S) + attributes": "runs/wbce-S-avd"}
      },
      "easy_difficult": "analysis/easy-difficult"  # easy-difficult output (optional)
    }

A row is a run directory or ``{"run": DIR, "split": SPLIT}``; relative paths are taken
from the spec file's folder. Rows are scored on the Development split unless told
otherwise; Table 4's test rows on the first labelled split of the run other than Train
and Development. Row labels are matched to the paper's rows (see
:mod:`conilium.evaluate.paper`); the paper's rows missing from the spec show "—".

``attributes`` (not a table of the paper, which predicts categories only) lists runs
trained with ``train-head --task attributes`` or ``joint``: their Development CCC of
arousal, valence and dominance, read from their metrics.json; the report says so when
there is none. A row of any table trained with ``--train-on-xo`` is followed by how many
X and O clips it trained on.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from conilium import CLASSES
from conilium.errors import ConfigError
from conilium.util import atomic_path, read_json, read_json_object, write_json

from . import paper
from conilium.metrics import score
from conilium.runs import RunError, has_references, load_run_config, prediction_path, read_predictions, run_splits
from .plots import figure_title, plot_confusion, write_split_metrics

REPORT_FILE = "report.md"
CORPUS_FIGURES = ("durations.png", "cooccurrence.png")
TEST_ROWS = ("test", "baseline (test)", "baseline_test", "baseline test")
DEV_SPLIT = "Development"
#: The report spec's table of attribute runs (not one of the paper's).
ATTRIBUTES_TABLE = "attributes"
ATTRIBUTE_NAMES = (("EmoAct", "arousal"), ("EmoVal", "valence"), ("EmoDom", "dominance"))
#: Differences below this are ties: the report shows three decimals.
TIE = 0.0005
FINETUNED_MARKER = "conilium_model.json"  # a model directory written by finetune-best
#: Settings of a row (see :func:`run_setting`).
FROZEN, FINETUNED_FEATURES, END_TO_END = "frozen cache", "fine-tuned features", "end to end"
READING_TEXT = {"all": "share of all annotators' labels, Other included (the paper's wording)",
                "targets": "share of target-class labels only (the P/S vector's maximum)",
                None: "share of target-class labels only (run recorded before the option existed)"}
CORPUS_CAPTIONS = {
    "durations.png": "Clip durations per split, with the 8 s mark: the paper truncates every clip to its first "
                     "8 s (its Figure 1); the challenge baseline used up to 12 s.",
    "cooccurrence.png": "For the clips of each consensus class (rows, with their clip counts), the mean S target "
                        "over the eight classes: how often the other emotions are perceived alongside (cf. the "
                        "paper's Figure 3).",
}


# --------------------------------------------------------------------------- one run, one split

def split_metrics(run_dir, split: str = DEV_SPLIT, out_dir=None, *, title: Optional[str] = None) -> Dict:
    """Score ``split`` of a run; with ``out_dir``, also write ``metrics.json``,
    ``per_class.csv``, ``confusion_percent.csv``, ``confusion_counts.csv`` and ``confusion.png``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: run directory not found")
    load_run_config(run_dir)
    available = run_splits(run_dir)
    if split not in available:
        raise RunError(f"{run_dir}: no predictions for split {split}; available: "
                       f"{', '.join(available) or 'none'}")
    preds = read_predictions(prediction_path(run_dir, split))
    if not has_references(preds):
        raise RunError(f"{prediction_path(run_dir, split)}: split {split} has no labelled clip to score "
                       f"(an unlabelled split can only be exported with `conilium-eval submission`)")
    result = score(preds.reference, preds.prediction)
    result["run"] = str(run_dir)
    result["split"] = split
    if out_dir is not None:
        out_dir = Path(out_dir)
        files = write_split_metrics(out_dir, result, title=title or figure_title(run_dir.name, split=split))
        write_json(out_dir / "metrics.json", result)
        result["files"] = {k: str(v) for k, v in files.items()}
    return result


# --------------------------------------------------------------------------- how a run was trained

def _lr(x) -> str:
    try:
        m, e = f"{float(x):e}".split("e")
    except (TypeError, ValueError):
        return str(x)
    return f"{float(m):g}e{int(e)}"


def _read_json_or_none(path: Path) -> Optional[dict]:
    try:
        got = read_json(path)
    except (OSError, ValueError):
        return None
    return got if isinstance(got, dict) else None


def _finetuned_model_of(identity: dict) -> Optional[Path]:
    """The finetune-best model directory a cache's upstream came from, or None."""
    if identity.get("source") != "local":
        return None
    for cand in (identity.get("name"), identity.get("path") and str(Path(identity["path"]).parent)):
        if cand and (Path(cand) / FINETUNED_MARKER).is_file():
            return Path(cand)
    return None


def _setting_of(cfg: dict) -> Dict:
    """See :func:`run_setting`."""
    if not isinstance(cfg, dict):
        return {"kind": "unknown", "text": "unknown (no config)", "random_init": None, "tuned": False}
    kind = cfg.get("kind")
    if kind == "thresholds":
        base = _setting_of(cfg.get("source_config") or {})
        return dict(base, text=f"{base['text']} + thresholds tuned on {cfg.get('tune_split', DEV_SPLIT)}",
                    tuned=True)
    if kind == "ensemble":
        members = [_setting_of(m) for m in cfg.get("member_configs") or []]
        kinds = sorted({m["kind"] for m in members}) or ["unknown"]
        w = cfg.get("weights") or []
        weighted = len({round(float(x), 9) for x in w}) > 1
        random = sorted({m["random_init"] for m in members if m["random_init"]})
        what = kinds[0] if len(kinds) == 1 else "mixed"
        text = (f"{'weighted ' if weighted else ''}{cfg.get('method', 'mean')} of {len(members)} {what} runs"
                + (f" (weights {', '.join(f'{float(x):.3g}' for x in w)})" if weighted else ""))
        return {"kind": what, "text": text, "random_init": ", ".join(random) or None, "tuned": False,
                "weighted": weighted}
    if kind == "finetune":
        up = cfg.get("upstream_identity") or {}
        random = up.get("name") or cfg.get("upstream") if (up.get("source") == "random-init"
                                                             or cfg.get("random_init")) else None
        bits = [str(cfg.get("upstream")), f"lr {_lr(cfg.get('lr'))}", f"{cfg.get('epochs')} epochs"]
        if cfg.get("lora_rank"):
            bits.insert(1, f"LoRA rank {cfg['lora_rank']} adapters, upstream frozen")
        if cfg.get("max_train_clips"):
            bits.append(f"{cfg['max_train_clips']} training clips")
        return {"kind": END_TO_END, "text": f"{END_TO_END} ({', '.join(bits)})", "random_init": random,
                "tuned": False}
    if cfg.get("cache"):  # a head trained on a feature cache
        manifest = _read_json_or_none(Path(cfg["cache"]) / "manifest.json") or {}
        up = manifest.get("upstream") if isinstance(manifest.get("upstream"), dict) else {}
        model = _finetuned_model_of(up)
        random = None
        if model is not None:
            what = FINETUNED_FEATURES
            info = _read_json_or_none(model / FINETUNED_MARKER) or {}
            mup = info.get("upstream") if isinstance(info.get("upstream"), dict) else {}
            if mup.get("source") == "random-init":
                random = f"{mup.get('name')}, then fine-tuned"
            origin = f"upstream fine-tuned by finetune-best, model {model.name}"
        else:
            what = FROZEN
            if up.get("source") == "random-init":
                random = str(up.get("name"))
            origin = str(up.get("name") or Path(cfg["cache"]).name)
        bits = [origin, f"head lr {_lr(cfg.get('lr'))}", f"{cfg.get('epochs')} epochs"]
        if cfg.get("sampler"):
            bits.append(f"{cfg['sampler']} sampler")
        if cfg.get("labels") in ("P*", "S*"):
            bits.append(f"{cfg['labels']} over {cfg.get('agreement_over') or 'targets'}")
        return {"kind": what, "text": f"{what} ({', '.join(bits)})", "random_init": random, "tuned": False}
    return {"kind": "unknown", "text": "unknown", "random_init": None, "tuned": False}


def run_setting(run_dir) -> Dict:
    """How a run was trained, from its ``config.json`` (and its cache's manifest).

    ``kind``: ``"frozen cache"`` (a head on features of a frozen upstream),
    ``"fine-tuned features"`` (a head on features of an upstream written by
    finetune-best), ``"end to end"`` (finetune-best itself) or ``"mixed"`` (an ensemble of
    runs of different kinds); ``text``: that, with upstream, learning rate and epochs;
    ``random_init``: the upstream's name when it started from random weights, else None;
    ``tuned``: decision thresholds were adjusted.
    """
    try:
        cfg = load_run_config(run_dir)
    except (RunError, ValueError):
        cfg = None
    return _setting_of(cfg)


def threshold_scores(run_dir, split: str) -> Optional[Dict]:
    """For a threshold-tuned run: macro-F1 of ``split`` untuned and tuned, and (on the
    split the thresholds were tuned on) the K-fold estimate; None for other runs."""
    try:
        cfg = load_run_config(run_dir)
    except (RunError, ValueError):
        return None
    if cfg.get("kind") != "thresholds":
        return None
    m = _read_json_or_none(Path(run_dir) / "metrics.json") or {}
    tune_split = m.get("tune_split") or cfg.get("tune_split") or DEV_SPLIT
    untuned = (m.get("untuned") or {}).get(split) or {}
    tuned = (m.get("splits") or {}).get(split) or {}
    cv = m.get("cross_validation") if split == tune_split else None
    return {"tune_split": tune_split, "in_sample": split == tune_split,
            "untuned": untuned.get("f1_macro"), "untuned_micro": untuned.get("f1_micro"),
            "tuned": tuned.get("f1_macro"),
            "kfold": cv.get("f1_macro_pooled") if cv else None, "kfold_k": cv.get("k") if cv else None,
            "kfold_folds_sd": cv.get("f1_macro_folds_sd") if cv else None}


# --------------------------------------------------------------------------- report spec

def _resolve(path, base: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else base / p


def load_spec(spec) -> Tuple[Dict, Path]:
    """A report spec (dict or JSON file) and the folder its relative paths start from."""
    if isinstance(spec, dict):
        return spec, Path.cwd()
    path = Path(spec)
    return read_json_object(path, "report spec (a JSON object with 'tables')"), path.parent


def _row_entry(table: str, label: str, value, base: Path) -> Tuple[Path, Optional[str]]:
    if isinstance(value, str):
        return _resolve(value, base), None
    if isinstance(value, dict) and "run" in value:
        return _resolve(value["run"], base), value.get("split")
    raise ConfigError(f"report spec, table {table}, row {label!r}: expected a run directory or "
                      f"{{\"run\": DIR, \"split\": SPLIT}}, got {value!r}")


def _test_split(run_dir: Path) -> Optional[str]:
    """The first labelled split of a run other than Train and Development."""
    for s in run_splits(run_dir):
        if s in ("Train", DEV_SPLIT):
            continue
        if has_references(read_predictions(prediction_path(run_dir, s))):
            return s
    return None


def _slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", text.replace("*", "star")).strip("-").lower()
    return s or "row"


def _fmt(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:.3f}"


# --------------------------------------------------------------------------- findings

def _row(scored: Dict[str, List[Dict]], ref: str) -> Optional[Dict]:
    table, label = paper.row_ref(ref)
    prow = paper.match_row(table, label)
    name = prow.label if prow else label
    for r in scored.get(table, []):
        if r["label"] == name and r.get("score"):
            return r
    return None


def our_value(scored: Dict[str, List[Dict]], ref: str, metric: str = "macro") -> Optional[float]:
    """Our number for a row reference: ``macro``/``micro`` as scored (a tuned row: tuned on
    the split it is scored on), ``macro_kfold`` a tuned row's K-fold estimate (an untuned
    row's macro-F1)."""
    r = _row(scored, ref)
    if r is None:
        return None
    if metric == "micro":
        return r["score"]["f1_micro"]
    if metric == "macro_kfold" and r.get("tuning"):
        return r["tuning"].get("kfold")
    return r["score"]["f1_macro"]


def all_findings() -> List[paper.Finding]:
    """The seed's findings, plus Table 2's again for the table on fine-tuned features."""
    import dataclasses

    out = list(paper.FINDINGS)
    for f in paper.FINDINGS:
        if f.table == "table2" and all(r.startswith("table2:") for r in f.rows):
            out.append(dataclasses.replace(f, table="table2_finetuned", text=f"{f.text} — on fine-tuned features",
                                           rows=tuple("table2_finetuned:" + r.split(":", 1)[1] for r in f.rows)))
    return out


def check_finding(f: paper.Finding, scored: Dict[str, List[Dict]]) -> Dict:
    """The seed's finding ``f`` against our numbers: a JSON-ready dict with ``verdict``
    ``"agrees"``, ``"disagrees"``, ``"tie"`` or ``"not run"``, and both sides' numbers."""
    metric_name = {"macro": "macro-F1", "micro": "micro-F1", "macro_kfold": "macro-F1"}[f.metric]
    out = {"table": f.table, "where": f.where, "text": f.text, "metric": f.metric, "rows": list(f.rows)}

    def label(ref):
        return paper.row_ref(ref)[1]

    if f.kind == "best":
        pv = {label(r): paper.paper_value(r, f.metric) for r in f.rows}
        ov = {label(r): our_value(scored, r, f.metric) for r in f.rows}
        mine = {k: v for k, v in ov.items() if v is not None}
        paper_best = label(f.rows[0])
        out["paper"] = f"{paper_best} best ({_fmt(pv[paper_best])} {metric_name})"
        if label(f.rows[0]) not in mine or len(mine) < 2:
            out.update(verdict="not run", ours="—")
            return out
        top = max(mine.values())
        winners = [k for k, v in mine.items() if top - v < TIE]
        out["ours"] = (f"{' = '.join(winners)} best ({top:.3f}; {paper_best}: {mine[paper_best]:.3f})"
                       + (f", {len(mine)} of {len(ov)} rows run" if len(mine) < len(ov) else ""))
        out["verdict"] = ("agrees" if winners == [paper_best] else "tie" if paper_best in winners else "disagrees")
        return out

    a, b = f.rows
    pa, pb = paper.paper_value(a, f.metric), paper.paper_value(b, f.metric)
    if f.paper_delta is not None and (pa is None or pb is None):
        out["paper"] = f"{label(a)} − {label(b)} = +{f.paper_delta:.2f} {metric_name} (stated)"
    elif pa is not None and pb is not None:
        out["paper"] = f"{label(a)} {pa:.3f} vs {label(b)} {pb:.3f} ({pa - pb:+.3f})"
    else:
        out["paper"] = f"{label(a)} above {label(b)} (no numbers given for both)"
    oa, ob = our_value(scored, a, f.metric), our_value(scored, b, f.metric)
    if oa is None or ob is None:
        out.update(verdict="not run", ours="—")
        return out
    kfold = " (K-fold)" if f.metric == "macro_kfold" and _row(scored, a) and _row(scored, a).get("tuning") else ""
    out["ours"] = f"{label(a)}{kfold} {oa:.3f} vs {label(b)} {ob:.3f} ({oa - ob:+.3f})"
    out["verdict"] = "tie" if abs(oa - ob) < TIE else "agrees" if oa > ob else "disagrees"
    return out


# --------------------------------------------------------------------------- other numbers beside the seed's

def _config_or_none(run_dir) -> Optional[dict]:
    try:
        return load_run_config(run_dir)
    except (RunError, ValueError):
        return None


def training_set_sizes(scored: Dict[str, List[Dict]]) -> List[Dict]:
    """Training clips of P, S, P*, S* (the seed's section 3.5) from our head runs, with
    the P*/S* reading that ran and the count the other reading would give."""
    found: Dict[str, Dict] = {}
    for key in ("table2", "table3", "sampler", "table1", "table2_finetuned"):
        for r in scored.get(key, []):
            if not r.get("run"):
                continue
            cfg = _config_or_none(r["run"])
            if not cfg or cfg.get("kind") or cfg.get("labels") not in paper.TRAINING_SET_SIZES or not cfg.get("cache"):
                continue
            if cfg.get("train_on_xo") or cfg.get("task", "categories") != "categories":
                continue  # not the paper's training set
            lab = cfg["labels"]
            if lab in found:
                continue
            m = _read_json_or_none(Path(r["run"]) / "metrics.json") or {}
            found[lab] = {"labels": lab, "run": r["run"], "clips": (m.get("training") or {}).get("clips"),
                          "reading": cfg.get("agreement_over") if lab.endswith("*") else None,
                          "cfg": cfg}
    out = []
    for lab, n_paper in paper.TRAINING_SET_SIZES.items():
        row = {"labels": lab, "paper": n_paper, "ours": None, "run": None, "reading": None,
               "other_reading": None, "other_count": None}
        got = found.get(lab)
        if got:
            row.update(ours=got["clips"], run=got["run"], reading=got["reading"])
            if lab.endswith("*"):
                ran = got["reading"] or "targets"
                other = "targets" if ran == "all" else "all"
                row["other_reading"] = other
                row["other_count"] = _count_under(got["cfg"], lab, other)
        out.append(row)
    return out


def _count_under(cfg: dict, kind: str, reading: str) -> Optional[int]:
    """Training clips of ``kind`` in the run's cache under another P*/S* reading."""
    try:
        from conilium.cache.reader import FeatureCache
        from conilium.targets import training_set

        cache = FeatureCache(cfg["cache"])
        clips = [cache.clips[n] for n in cache.split(cfg.get("train_split", "Train"))]
        th = {"P*": cfg.get("p_threshold", 0.6), "S*": cfg.get("s_threshold", 0.5)}
        return len(training_set(clips, kind, thresholds=th, reading=reading)[0])
    except Exception:  # a missing or moved cache: the other count is simply not shown
        return None


def corpus_rows(corpus_dir: Optional[Path]) -> Optional[List[Dict]]:
    """Clips and durations per split from describe-corpus's summary.json, beside section 2."""
    if corpus_dir is None:
        return None
    summary = _read_json_or_none(corpus_dir / "summary.json")
    if not summary:
        return None
    rows = []
    for split, n in (summary.get("clips_per_split") or {}).items():
        d = (summary.get("durations") or {}).get(split) or {}
        labelled = sum(v for k, v in (summary.get("consensus") or {}).get(split, {}).items() if k != "unlabelled")
        pkey = split if split in paper.CORPUS else ("Test" if not labelled else None)
        p = paper.CORPUS.get(pkey) if pkey else None
        rows.append({"split": split, "clips": n, "mean": d.get("mean"), "sd": d.get("sd"),
                     "longer_than_8s": d.get("longer_than_8s"), "paper_split": pkey,
                     "paper_clips": p and p["clips"], "paper_mean": p and p["mean"], "paper_sd": p and p["sd"]})
        if split == DEV_SPLIT:
            scoreable = sum((summary.get("consensus") or {}).get(split, {}).get(c, 0) for c in CLASSES)
            rows.append({"split": f"{split}, scoreable (consensus among the eight classes)", "clips": scoreable,
                         "mean": None, "sd": None, "longer_than_8s": None, "paper_split": "section 4",
                         "paper_clips": paper.DEV_SCOREABLE, "paper_mean": None, "paper_sd": None})
    return rows


def attribute_table(rows_spec: Dict, base: Path) -> List[Dict]:
    """The attribute runs of a report spec: each row's Development (or given split) CCC per
    attribute and its parts, from the run's metrics.json; an error naming the row when the
    run predicts no attributes."""
    if not isinstance(rows_spec, dict):
        raise ConfigError(f"report spec, table {ATTRIBUTES_TABLE}: expected {{row label: run directory}}")
    rows = []
    for label, value in rows_spec.items():
        run_dir, split = _row_entry(ATTRIBUTES_TABLE, label, value, base)
        where = f"report spec, table {ATTRIBUTES_TABLE}, row {label!r}"
        if not run_dir.is_dir():
            raise RunError(f"{where}: run directory {run_dir} not found")
        m = _read_json_or_none(run_dir / "metrics.json")
        if m is None:
            raise RunError(f"{where}: {run_dir} has no metrics.json (not a complete run)")
        if "attributes" not in m:
            raise RunError(f"{where}: {run_dir} predicts no attributes (train it with train-head --task "
                           f"attributes or joint)")
        split = split or DEV_SPLIT
        a = (m.get("attributes") or {}).get(split)
        if a is None:
            raise RunError(f"{where}: {run_dir} has no attribute scores on split {split} "
                           f"(scored: {', '.join(m['attributes']) or 'none'})")
        cfg = _config_or_none(run_dir) or {}
        rows.append({"label": label, "run": str(run_dir), "split": split, "task": cfg.get("task"),
                     "setting": run_setting(run_dir), "scores": a,
                     "f1_macro": (m.get("splits") or {}).get(split, {}).get("f1_macro"),
                     "train_clips": (m.get("training") or {}).get("attribute_clips")})
    return rows


def xo_rows(scored: Dict[str, List[Dict]]) -> List[Dict]:
    """Rows of the paper's tables trained with ``--train-on-xo``, with their X/O counts."""
    out = []
    for key, rows in scored.items():
        for r in rows:
            if not r.get("run"):
                continue
            m = _read_json_or_none(Path(r["run"]) / "metrics.json") or {}
            xo = (m.get("training") or {}).get("xo")
            if xo:
                out.append({"table": key, "label": r["label"], "run": r["run"], **xo,
                            "clips": (m.get("training") or {}).get("clips")})
    return out


def _disagreement(scored: Dict[str, List[Dict]]) -> Optional[Dict]:
    """Prediction disagreement of the (first, unweighted) ensemble's members."""
    from .ensemble import prediction_disagreement

    for r in scored.get("ensemble", []):
        if not r.get("run") or not r.get("score"):
            continue
        cfg = _config_or_none(r["run"]) or {}
        members = cfg.get("members") or []
        if len(members) >= 2 and all(Path(m).is_dir() for m in members):
            try:
                return prediction_disagreement(members, r["split"])
            except (RunError, ValueError):
                return None
    return None


# --------------------------------------------------------------------------- report

def build_report(spec, out_dir, *, title: Optional[str] = None) -> Path:
    """Write ``out_dir/report.md`` (+ ``report.json`` and ``figures/``) from a report spec.

    A row whose run directory or split is missing is an error naming the table and row
    (the report is only written when every row given can be scored).
    """
    spec, base = load_spec(spec)
    out_dir = Path(out_dir)
    tables_spec = spec.get("tables", {})
    if not isinstance(tables_spec, dict):
        raise ConfigError("report spec: 'tables' must map table names to {row label: run directory}")
    unknown = sorted(set(tables_spec) - set(paper.TABLES) - {ATTRIBUTES_TABLE})
    if unknown:
        raise ConfigError(f"report spec: unknown table(s) {', '.join(unknown)}; known: "
                          f"{', '.join([*paper.TABLES, ATTRIBUTES_TABLE])}")

    # Score every row first: nothing is written when a row is broken.
    scored: Dict[str, List[Dict]] = {}
    random_init: Dict[str, str] = {}
    for key, table in paper.TABLES.items():
        rows_spec = tables_spec.get(key) or {}
        if not isinstance(rows_spec, dict):
            raise ConfigError(f"report spec, table {key}: expected {{row label: run directory}}")
        if key == "table2_finetuned" and not rows_spec:
            continue  # an optional table: only shown when run
        rows: List[Dict] = []
        for label, value in rows_spec.items():
            run_dir, split = _row_entry(key, label, value, base)
            prow = paper.match_row(key, label)
            is_test = key == "table4" and ((prow is not None and prow.label == "Test")
                                           or label.strip().lower() in TEST_ROWS)
            if not run_dir.is_dir():
                raise RunError(f"report spec, table {key}, row {label!r}: run directory {run_dir} not found")
            if split is None:
                split = _test_split(run_dir) if is_test else DEV_SPLIT
            setting = run_setting(run_dir)
            entry = {"label": prow.label if prow else label, "run": str(run_dir), "split": split,
                     "paper_macro": prow.macro if prow else None, "paper_micro": prow.micro if prow else None,
                     "paper_note": prow.note if prow else "", "in_paper": prow is not None, "setting": setting}
            if split is None:
                entry.update(score=None, note="no labelled test split in this run")
            else:
                try:
                    s = split_metrics(run_dir, split)
                except RunError as e:
                    raise RunError(f"report spec, table {key}, row {label!r}: {e}") from None
                entry["score"] = {k: s[k] for k in ("n", "f1_macro", "f1_micro", "per_class", "confusion",
                                                    "confusion_percent", "confusion_labels")}
                entry["tuning"] = threshold_scores(run_dir, split)
            if setting.get("random_init"):
                random_init[str(run_dir)] = setting["random_init"]
            rows.append(entry)
        # The paper's rows that the spec does not give, in the paper's order, then ours.
        ordered: List[Dict] = []
        for prow in table.rows:
            mine = [r for r in rows if r["in_paper"] and r["label"] == prow.label]
            if mine:
                ordered.extend(mine)
            else:
                ordered.append({"label": prow.label, "run": None, "split": None, "score": None,
                                "paper_macro": prow.macro, "paper_micro": prow.micro, "paper_note": prow.note,
                                "in_paper": True, "setting": None})
        ordered.extend(r for r in rows if not r["in_paper"])
        scored[key] = ordered

    attribute_rows = attribute_table(tables_spec.get(ATTRIBUTES_TABLE) or {}, base)

    easy = None
    if spec.get("easy_difficult"):
        from .difficulty import easy_difficult, load_clips, read_result

        ed = spec["easy_difficult"]
        if isinstance(ed, dict) and "runs" in ed:
            runs = [_resolve(r, base) for r in ed["runs"]]
            clips = load_clips(cache=_resolve(ed["cache"], base) if ed.get("cache") else None,
                               corpus=_resolve(ed["corpus"], base) if ed.get("corpus") else None)
            easy = easy_difficult(runs, clips, split=ed.get("split", DEV_SPLIT), other=ed.get("other", "category"))
        else:
            easy = read_result(_resolve(ed, base))

    corpus_dir = _resolve(spec["corpus_figures"], base) if spec.get("corpus_figures") else None
    if corpus_dir is not None and not corpus_dir.is_dir():
        raise ConfigError(f"report spec: corpus_figures directory {corpus_dir} not found "
                          f"(write it with describe-corpus)")

    findings = [check_finding(f, scored) for f in all_findings() if f.table in scored]
    extras = {"training_sets": training_set_sizes(scored), "corpus": corpus_rows(corpus_dir),
              "disagreement": _disagreement(scored), "attributes": attribute_rows, "xo": xo_rows(scored)}

    # ---- write
    out_dir.mkdir(parents=True, exist_ok=True)
    fig_dir = out_dir / "figures"
    corpus_figs: List[Path] = []
    if corpus_dir is not None:
        names = [n for n in CORPUS_FIGURES if (corpus_dir / n).is_file()]
        names += sorted(p.name for p in corpus_dir.glob("*.png") if p.name not in names)
        for n in names:
            dst = fig_dir / "corpus" / n
            with atomic_path(dst, suffix=".png.tmp") as tmp:
                shutil.copyfile(corpus_dir / n, tmp)
            corpus_figs.append(dst)
    for key, rows in scored.items():
        for r in rows:
            if r.get("score"):
                name = _slug(r["label"])
                if not name.endswith(_slug(r["split"])):
                    name += f"-{_slug(r['split'])}"
                png = fig_dir / key / f"{name}.png"
                s = r["score"]
                setting = r.get("setting") or {}
                warn = (f"RANDOM-WEIGHT UPSTREAM ({setting['random_init']}): a pipeline check, not a trained model"
                        if setting.get("random_init") else None)
                plot_confusion(png, s["confusion_percent"], s["confusion_labels"],
                               title=figure_title(paper.TABLES[key].title.split(":")[0], r["label"], split=r["split"]),
                               support=[sum(row) for row in s["confusion"]], warning=warn)
                r["figure"] = str(png.relative_to(out_dir))

    title = title or spec.get("title") or "CONILIUM: our results beside the paper's"
    md = _markdown(title, scored, out_dir, corpus_figs, easy, random_init, spec, findings, extras)
    with atomic_path(out_dir / REPORT_FILE, suffix=".md.tmp") as tmp:
        tmp.write_text(md, encoding="utf-8")
    write_json(out_dir / "report.json", {
        "title": title, "paper_setting": paper.PAPER_SETTING, "tables": scored, "random_init_runs": random_init,
        "findings": findings, "external": [vars(p) for p in paper.EXTERNAL], **extras,
        "easy_difficult": easy and {k: v for k, v in easy.items() if k not in ("clip_groups", "correct_runs")}})
    return out_dir / REPORT_FILE


def _rel(path: Optional[str], out_dir: Path) -> str:
    if not path:
        return "—"
    try:
        return os.path.relpath(path, out_dir)
    except ValueError:  # other drive (Windows)
        return str(path)


def _setting_cell(setting: Optional[Dict]) -> str:
    if not setting:
        return "—"
    text = setting["text"]
    up = setting.get("random_init")
    if up:
        text += " · ⚠ **random weights**" + ("" if up.split(",")[0] in text else f" ({up})")
    return text


def _tuned_cells(r: Dict) -> List[str]:
    """Untuned, tuned and K-fold macro-F1 cells of a row."""
    s, t = r.get("score"), r.get("tuning")
    if not s:
        return ["—", "—", "—"]
    if not t:
        return [_fmt(s["f1_macro"]), "not tuned", "not tuned"]
    where = "in-sample" if t["in_sample"] else f"thresholds from {t['tune_split']}"
    kfold = "—"
    if t.get("kfold") is not None:
        kfold = f"{t['kfold']:.3f} ({t['kfold_k']}-fold)"
    elif not t["in_sample"]:
        kfold = "n/a (held-out split)"
    return [_fmt(t.get("untuned")), f"{_fmt(s['f1_macro'])} ({where})", kfold]


_VERDICT = {"agrees": "agrees", "disagrees": "**disagrees**", "tie": "tie", "not run": "not run here"}


def _findings_lines(findings: List[Dict]) -> List[str]:
    if not findings:
        return []
    lines = ["", "The paper's findings, and whether ours agree (computed from the numbers above):", "",
             "| Paper's finding | Paper | Here | Here vs paper |", "|---|---|---|---|"]
    for f in findings:
        lines.append(f"| {f['text']} ({f['where']}) | {f['paper']} | {f['ours']} | {_VERDICT[f['verdict']]} |")
    return lines


def _markdown(title: str, scored: Dict[str, List[Dict]], out_dir: Path, corpus_figs: List[Path],
              easy: Optional[Dict], random_init: Dict[str, str], spec: Dict, findings: List[Dict],
              extras: Dict) -> str:
    lines = [f"# {title}", ""]
    test_rows = [r for r in scored.get("table4", []) if r["label"] == "Test" and r["run"]]
    kinds = sorted({r["setting"]["kind"] for rows in scored.values() for r in rows if r.get("setting")})
    lines += [
        "Our F1 scores (computed from each run's `predictions/<Split>.csv` with scikit-learn, over clips whose "
        "consensus label is one of the eight classes A S H U F D C N) beside the numbers published in "
        f"{paper.CITATION} (\"the paper\"). \"—\" marks a row we did not run or a number the paper does not give. "
        "The \"paper\" columns hold that paper's numbers only; numbers from other papers are listed with their "
        "source under Table 4.",
        "",
        f"**Settings.** Every number of the paper comes from training {paper.PAPER_SETTING}. Ours are not all "
        "trained that way: each row's *Setting* column says how it was — **frozen cache**: a pooling head trained "
        "on features of an upstream that was run once and never updated (the paper's lr 1e-5 applies to "
        "fine-tuning, a head alone uses its own, larger one); **fine-tuned features**: the same head on features "
        "of the upstream after finetune-best; **end to end**: finetune-best itself. "
        f"Settings present here: {', '.join(kinds) or 'none'}.",
        "",
        "**Splits.** Unless a row says otherwise, scores are on the **Development** split. The paper's *test* "
        "numbers are the challenge leaderboard on its unlabelled test set (Test3), scored by the organisers. "
        + ("Our *test* rows are scored on " + ", ".join(sorted({f"**{r['split']}**" for r in test_rows if r['split']}))
           + " — a labelled split of our corpus, not the challenge's test set."
           if any(r["split"] for r in test_rows) else
           "We have no labelled test split here, so our test rows are empty; an unlabelled split can only be "
           "exported for submission (`conilium-eval submission`)."),
        "",
        "**Comparability.** Numbers from the synthetic demo corpus (`make-demo-corpus`) or from demo-* / "
        "randomly initialised upstreams check that the pipeline runs end to end; they are **not comparable** "
        "with the paper's, which come from MSP-Podcast 1.11 with pretrained upstreams.",
    ]
    if random_init:
        n_runs = len({r["run"] for rows in scored.values() for r in rows if r.get("run")})
        ups = sorted({u.strip() for v in random_init.values() for u in v.split(",")})
        lines += ["", f"**Random weights.** {len(random_init)} of the {n_runs} runs here use features of (or "
                  f"fine-tune) an upstream with **randomly initialised** weights ({', '.join(ups)}): they are "
                  f"marked ⚠ in the Setting column and in red on their figures "
                  f"(the list is in report.json, `random_init_runs`)."]
    if findings:
        n = {v: sum(f["verdict"] == v for f in findings) for v in _VERDICT}
        lines += ["", f"**The paper's findings on our numbers.** Of {len(findings)} conclusions of the paper checked "
                  f"here: {n['agrees']} agree, {n['disagrees']} disagree, {n['tie']} tie, {n['not run']} not run "
                  "(each table lists its own)."]
    lines.append("")
    if spec.get("notes"):
        lines += [str(spec["notes"]), ""]

    corpus = extras.get("corpus")
    if corpus_figs or corpus:
        lines += ["## Corpus", ""]
    if corpus:
        lines += ["Clips and durations per split (ours: `describe-corpus`; paper: section 2, durations before "
                  "truncation to 8 s; the paper's test set is the challenge's unlabelled one).", "",
                  "| Split | Clips (ours) | Clips (paper) | Duration mean ± sd, s (ours) | (paper) | > 8 s (ours) |",
                  "|---|---:|---:|---:|---:|---:|"]
        for c in corpus:
            ours_d = "—" if c["mean"] is None else f"{c['mean']:.2f} ± {c['sd']:.2f}"
            paper_d = "—" if c["paper_mean"] is None else f"{c['paper_mean']:g} ± {c['paper_sd']:g}"
            paper_n = "—" if c["paper_clips"] is None else f"{c['paper_clips']:,} ({c['paper_split']})"
            long8 = "—" if c["longer_than_8s"] is None else f"{100 * c['longer_than_8s']:.0f} %"
            lines.append(f"| {c['split']} | {c['clips']:,} | {paper_n} | {ours_d} | {paper_d} | {long8} |")
        lines.append("")
    for p in corpus_figs:
        lines += [f"![{p.stem}]({p.relative_to(out_dir).as_posix()})", "",
                  f"*{CORPUS_CAPTIONS.get(p.name, p.stem)}*", ""]

    for key, table in paper.TABLES.items():
        if key not in scored:
            continue
        rows = scored[key]
        tuned_table = any(r.get("tuning") for r in rows)
        lines += [f"## {table.title}", "", table.caption, ""]
        head = ["Row", "Setting (ours)", "Run", "Split", "Clips"]
        if tuned_table:
            head += ["Macro-F1 untuned (ours)", "Macro-F1 tuned (ours)", "Macro-F1 tuned, K-fold estimate (ours)"]
        else:
            head += ["Macro-F1 (ours)"]
        head += ["Macro-F1 (paper, end to end)", "Micro-F1 (ours)", "Micro-F1 (paper, end to end)"]
        lines += ["| " + " | ".join(head) + " |",
                  "|" + "|".join("---" if i < 4 else "---:" for i in range(len(head))) + "|"]
        for r in rows:
            s = r.get("score")
            run = f"`{_rel(r['run'], out_dir)}`" if r["run"] else "—"
            label = r["label"] + ("" if r["in_paper"] else " *(not in paper)*")
            note = r.get("note")
            macro = _tuned_cells(r) if tuned_table else [_fmt(s["f1_macro"]) if s else "—"]
            pm = _fmt(r["paper_macro"])
            if r["paper_macro"] is None and r.get("paper_note"):
                pm = f"— ({r['paper_note']})"
            cells = [label, _setting_cell(r.get("setting")), run, r["split"] or (f"— ({note})" if note else "—"),
                     str(s["n"]) if s else "—", *macro, pm,
                     _fmt(s["f1_micro"]) if s else "—", _fmt(r["paper_micro"])]
            lines.append("| " + " | ".join(cells) + " |")
        if tuned_table:
            lines += ["", "Tuned rows: *untuned* is the same model's argmax; *tuned* applies the decision thresholds "
                      "fitted on the development set — on the development set itself that is an **in-sample** "
                      "score (what the paper reports); the *K-fold estimate* fits the thresholds on K−1 folds of "
                      "the development clips and scores each clip only with thresholds that never saw it, the "
                      "honest estimate of what tuning buys."]
        if key == "table3":
            lines += _reading_lines(rows)
            lines += _training_size_lines(extras.get("training_sets") or [])
        if key == "ensemble":
            lines += _disagreement_lines(extras.get("disagreement"))
        if key == "table2_finetuned":
            lines += _frozen_vs_finetuned_lines(scored)
        lines += _xo_lines([x for x in extras.get("xo") or [] if x["table"] == key])
        lines += _findings_lines([f for f in findings if f["table"] == key])
        if key == "table4":
            lines += _external_lines()
        figs = [r for r in rows if r.get("figure")]
        if figs:
            lines += ["", "<details><summary>Confusion matrices (% of each reference class, as in the paper's "
                      "Figure 4; each row's clip count beside its class — on a row of 5 clips one clip moves a "
                      "cell by 20 points)</summary>", ""]
            for r in figs:
                lines += [f"**{r['label']}** ({r['split']})", "",
                          f"![{r['label']}]({Path(r['figure']).as_posix()})", ""]
            lines += ["</details>"]
        lines.append("")

    lines += _attribute_lines(extras.get("attributes") or [], out_dir)

    if easy is not None:
        from .difficulty import to_markdown

        lines += [to_markdown(easy, heading_level=2), ""]
    return "\n".join(lines).rstrip() + "\n"


def _reading_lines(rows: List[Dict]) -> List[str]:
    readings = {}
    for r in rows:
        if not r.get("run"):
            continue
        cfg = _config_or_none(r["run"]) or {}
        src = cfg.get("source_config") if cfg.get("kind") == "thresholds" else cfg
        if isinstance(src, dict) and src.get("labels") in ("P*", "S*"):
            readings.setdefault(src.get("agreement_over"), []).append(r["label"])
    if not readings:
        return []
    text = "; ".join(f"{', '.join(v)}: {READING_TEXT.get(k, k)}" for k, v in readings.items())
    return ["", f"**P*/S* reading that ran.** Agreement share read as — {text}. The paper: P* keeps clips whose "
            "\"same primary labels [are] agreed upon by at least 60% of annotators\", S* those where \"at least "
            "50% of the labels list are the same\" (`agreement_over`: `all` follows that wording, `targets` "
            "counts target-class labels only)."]


def _training_size_lines(sizes: List[Dict]) -> List[str]:
    if not sizes or not any(s["ours"] is not None for s in sizes):
        return []
    lines = ["", "Training clips of each target set (the paper: section 3.5; ours: the runs' `metrics.json`):", "",
             "| Targets | Clips (ours) | Clips (paper) | Reading that ran | Clips under the other reading |",
             "|---|---:|---:|---|---:|"]
    base = {s["labels"]: s for s in sizes}
    for s in sizes:
        share = ""
        b = base.get(s["labels"].rstrip("*")) if s["labels"].endswith("*") else None
        if b and b["ours"] and s["ours"] is not None:
            share = f" ({100 * s['ours'] / b['ours']:.0f} % of {s['labels'].rstrip('*')})"
        pshare = ""
        if b:
            pshare = f" ({100 * s['paper'] / b['paper']:.0f} %)"
        ran = ("—" if not s["labels"].endswith("*") or s["ours"] is None
               else s["reading"] or "targets (before the option)")
        other = "—" if s["other_count"] is None else f"{s['other_count']:,} ({s['other_reading']})"
        ours = "—" if s["ours"] is None else f"{s['ours']:,}{share}"
        lines.append(f"| {s['labels']} | {ours} | {s['paper']:,}{pshare} | {ran} | {other} |")
    return lines


def _xo_lines(rows: List[Dict]) -> List[str]:
    if not rows:
        return []
    each = "; ".join(f"{r['label']}: {r['added_X']} X and {r['added_O']} O clips added to the training clips "
                     f"({r['clips']} in all), {r['left_out_no_target_label']} left out for lacking a target-class label"
                     for r in rows)
    return ["", f"**Trained on X and O clips too** (`train-head --train-on-xo`, not in the paper, which leaves them "
            f"out): {each}. They train on their annotators' target-class labels (their soft targets) and are "
            f"never scored: the scores above keep the eight consensus classes only."]


def _attribute_lines(rows: List[Dict], out_dir: Path) -> List[str]:
    lines = ["## Arousal, valence, dominance (not in the paper)", ""]
    if not rows:
        return lines + ["No attribute run in this report: the paper predicts categories only; `train-head --task "
                        "attributes` (or `joint`) trains a head on them.", ""]
    lines += ["Concordance correlation coefficient (CCC) of each attribute on the 1–7 scale, computed from each "
              "run's predictions over the clips with attribute values (consensus, else the annotators' mean). "
              "*attributes*: CCC loss only, on every training clip with attribute values (X and O included), "
              "best epoch by mean CCC; *joint*: the categories loss plus the weighted CCC loss, best epoch by "
              "macro-F1. The paper reports no attribute numbers.", "",
              "| Row | Task | Setting (ours) | Run | Split | Clips | "
              + " | ".join(f"CCC {n} ({c})" for c, n in ATTRIBUTE_NAMES) + " | CCC mean | Macro-F1 (ours) |",
              "|---|---|---|---|---|---:|" + "---:|" * (len(ATTRIBUTE_NAMES) + 2)]
    for r in rows:
        a = r["scores"]
        cells = [r["label"], r.get("task") or "—", _setting_cell(r.get("setting")), f"`{_rel(r['run'], out_dir)}`",
                 r["split"], str(a.get("n", "—")), *(_fmt(a[c]["ccc"]) for c, _ in ATTRIBUTE_NAMES),
                 _fmt(a["ccc_mean"]), _fmt(r.get("f1_macro"))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _disagreement_lines(d: Optional[Dict]) -> List[str]:
    if not d:
        return []
    p = paper.UPSTREAM_DISAGREEMENT
    pair = ", ".join(f"{k}: {100 * v:.0f} %" for k, v in d["pairwise"].items())
    verdict = "agrees" if d["not_unanimous"] > p else "**disagrees**"
    return ["", f"Prediction disagreement of the {len(d['runs'])} members on {d['clips']} {d['split']} clips: not all "
            f"the same class on **{100 * d['not_unanimous']:.0f} %** of clips (pairwise: {pair}). The paper (section "
            f"4): the three upstreams' predictions \"differ more than 30% of the time\" (it does not say whether "
            f"pairwise or not all equal); here, not all equal > 30 %: {verdict}."]


def _frozen_vs_finetuned_lines(scored: Dict[str, List[Dict]]) -> List[str]:
    pairs = []
    for r in scored.get("table2_finetuned", []):
        a = our_value(scored, f"table2_finetuned:{r['label']}") if r.get("score") else None
        b = our_value(scored, f"table2:{r['label']}") if paper.match_row("table2", r["label"]) else None
        if a is not None and b is not None:
            pairs.append(f"{r['label']} {b:.3f} → {a:.3f} ({a - b:+.3f})")
    if not pairs:
        return []
    return ["", "Macro-F1, heads on the frozen cache (Table 2) → the same heads on the fine-tuned upstream's "
            "features: " + "; ".join(pairs) + "."]


def _external_lines() -> List[str]:
    lines = ["", "Published numbers that are **not** in the paper, with their own sources (development set unless "
             "said; the test set is the challenge's, scored by the organisers):", "",
             "| Number | Split | Macro-F1 | Micro-F1 | Source | Where | Note |", "|---|---|---:|---:|---|---|---|"]
    for e in paper.EXTERNAL:
        lines.append(f"| {e.label} | {e.split} | {_fmt(e.macro)} | {_fmt(e.micro)} | {paper.SOURCES[e.source].short} "
                     f"| {e.where} | {e.note} |")
    lines += ["", "Sources: " + "; ".join(f"{s.short.split(' (')[0]}: {s.citation}" for s in paper.SOURCES.values()
                                         if s.key != "seed") + "."]
    return lines

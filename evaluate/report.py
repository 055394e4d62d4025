"""Scores of one run and split, and the paper-vs-ours report.

:func:`split_metrics` scores one split of a run and writes its per-class table and
confusion matrix (CSV and PNG). :func:`build_report` collects run directories into the
paper's tables (Tables 1 to 4, the sampler results of section 3.4 and the ensemble of
section 3.6), with the paper's published numbers beside ours, and writes a Markdown
report (``report.md``) with its figures copied next to it, plus ``report.json``.

A report spec is JSON::

    {
      "title": "CONILIUM on MSP-Podcast 1.11",
      "corpus_figures": "figures/corpus",          # describe-corpus output (optional)
      "tables": {
        "table1":   {"WavLM-large": "runs/t1/wavlm", "Hubert-large": "runs/t1/hubert"},
        "table2":   {"WBCE(S)": "runs/t2/wbce-S"},
        "sampler":  {"BCE(P) + sampler": "runs/t34/bce-P-sampler"},
        "table3":   {"KLD(S*)": "runs/t3/kld-Sstar"},
        "ensemble": {"Ensemble": "runs/ens"},
        "table4":   {"dev": "runs/best-tuned", "test": {"run": "runs/best-tuned", "split": "Test1"}}
      },
      "easy_difficult": "analysis/easy-difficult"  # easy-difficult output (optional)
    }

A row is a run directory or ``{"run": DIR, "split": SPLIT}``; relative paths are taken
from the spec file's folder. Rows are scored on the Development split unless told
otherwise; Table 4's test rows on the first labelled split of the run other than Train
and Development. Row labels are matched to the paper's rows (see
:mod:`conilium.evaluate.paper`); the paper's rows missing from the spec show "—".
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from conilium.errors import ConfigError
from conilium.util import atomic_path, read_json, read_json_object, write_json

from . import paper
from conilium.metrics import score
from conilium.runs import RunError, has_references, load_run_config, prediction_path, read_predictions, run_splits
from .plots import plot_confusion, write_split_metrics

REPORT_FILE = "report.md"
CORPUS_FIGURES = ("durations.png", "cooccurrence.png")
TEST_ROWS = ("test", "baseline (test)", "baseline_test", "baseline test")
DEV_SPLIT = "Development"


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
        files = write_split_metrics(out_dir, result, title=title or f"{run_dir.name} — {split}")
        write_json(out_dir / "metrics.json", result)
        result["files"] = {k: str(v) for k, v in files.items()}
    return result


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
    s = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return s or "row"


def _random_init_upstream(run_dir: Path) -> Optional[str]:
    """Name of the upstream when the run's cache was extracted from randomly initialised weights."""
    try:
        from .difficulty import default_cache

        cache = default_cache([run_dir])
        if not cache:
            return None
        manifest = read_json(Path(cache) / "manifest.json")
    except (OSError, ValueError, RunError):
        return None
    up = manifest.get("upstream") if isinstance(manifest, dict) else None
    if isinstance(up, dict) and up.get("source") == "random-init":
        return str(up.get("name"))
    return None


def _fmt(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:.3f}"


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
    unknown = sorted(set(tables_spec) - set(paper.TABLES))
    if unknown:
        raise ConfigError(f"report spec: unknown table(s) {', '.join(unknown)}; known: {', '.join(paper.TABLES)}")

    # Score every row first: nothing is written when a row is broken.
    scored: Dict[str, List[Dict]] = {}
    random_init: Dict[str, str] = {}
    for key, table in paper.TABLES.items():
        rows_spec = tables_spec.get(key) or {}
        if not isinstance(rows_spec, dict):
            raise ConfigError(f"report spec, table {key}: expected {{row label: run directory}}")
        rows: List[Dict] = []
        used = set()
        for label, value in rows_spec.items():
            run_dir, split = _row_entry(key, label, value, base)
            prow = paper.match_row(key, label)
            is_test = key == "table4" and ((prow is not None and prow.label in ("Test", "Baseline (Test)"))
                                           or label.strip().lower() in TEST_ROWS)
            if not run_dir.is_dir():
                raise RunError(f"report spec, table {key}, row {label!r}: run directory {run_dir} not found")
            if split is None:
                split = _test_split(run_dir) if is_test else DEV_SPLIT
            entry = {"label": prow.label if prow else label, "run": str(run_dir), "split": split,
                     "paper_macro": prow.macro if prow else None, "paper_micro": prow.micro if prow else None,
                     "paper_note": prow.note if prow else "", "in_paper": prow is not None}
            if prow:
                used.add(prow.label)
            if split is None:
                entry.update(score=None, note="no labelled test split in this run")
            else:
                try:
                    s = split_metrics(run_dir, split)
                except RunError as e:
                    raise RunError(f"report spec, table {key}, row {label!r}: {e}") from None
                entry["score"] = {k: s[k] for k in ("n", "f1_macro", "f1_micro", "per_class", "confusion",
                                                    "confusion_percent", "confusion_labels")}
            up = _random_init_upstream(run_dir)
            if up:
                random_init[str(run_dir)] = up
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
                                "in_paper": True})
        ordered.extend(r for r in rows if not r["in_paper"])
        scored[key] = ordered

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
                png = fig_dir / key / f"{_slug(r['label'])}-{_slug(r['split'])}.png"
                plot_confusion(png, r["score"]["confusion_percent"], r["score"]["confusion_labels"],
                               title=f"{paper.TABLES[key].title.split(':')[0]} — {r['label']} ({r['split']})")
                r["figure"] = str(png.relative_to(out_dir))

    title = title or spec.get("title") or "CONILIUM: our results beside the paper's"
    md = _markdown(title, scored, out_dir, corpus_figs, easy, random_init, spec)
    with atomic_path(out_dir / REPORT_FILE, suffix=".md.tmp") as tmp:
        tmp.write_text(md, encoding="utf-8")
    write_json(out_dir / "report.json", {"title": title, "tables": scored, "random_init_runs": random_init,
                                         "easy_difficult": easy and {k: v for k, v in easy.items()
                                                                     if k not in ("clip_groups", "correct_runs")}})
    return out_dir / REPORT_FILE


def _rel(path: Optional[str], out_dir: Path) -> str:
    if not path:
        return "—"
    import os

    try:
        return os.path.relpath(path, out_dir)
    except ValueError:  # other drive (Windows)
        return str(path)


def _markdown(title: str, scored: Dict[str, List[Dict]], out_dir: Path, corpus_figs: List[Path],
              easy: Optional[Dict], random_init: Dict[str, str], spec: Dict) -> str:
    lines = [f"# {title}", ""]
    test_rows = [r for r in scored.get("table4", []) if r["label"] in ("Test", "Baseline (Test)") and r["run"]]
    lines += [
        "Our F1 scores (computed from each run's `predictions/<Split>.csv` with scikit-learn, over clips whose "
        "consensus label is one of the eight classes A S H U F D C N) beside the numbers published in "
        f"{paper.CITATION}. \"—\" marks a row we did not run or a number the paper does not give.",
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
        lines += ["", "Runs on features of **randomly initialised** upstreams: " +
                  ", ".join(f"`{_rel(r, out_dir)}` ({u})" for r, u in sorted(random_init.items())) + "."]
    lines.append("")
    if spec.get("notes"):
        lines += [str(spec["notes"]), ""]

    if corpus_figs:
        lines += ["## Corpus", ""]
        for p in corpus_figs:
            lines += [f"![{p.stem}]({p.relative_to(out_dir).as_posix()})", ""]

    for key, table in paper.TABLES.items():
        rows = scored.get(key, [])
        lines += [f"## {table.title}", "", table.caption, "",
                  "| Row | Run | Split | Clips | Macro-F1 (ours) | Macro-F1 (paper) | Micro-F1 (ours) | Micro-F1 (paper) |",
                  "|---|---|---|---:|---:|---:|---:|---:|"]
        for r in rows:
            s = r.get("score")
            run = f"`{_rel(r['run'], out_dir)}`" if r["run"] else "—"
            label = r["label"] + ("" if r["in_paper"] else " *(not in paper)*")
            note = r.get("note")
            lines.append(" | ".join([
                f"| {label}", run, r["split"] or (f"— ({note})" if note else "—"), str(s["n"]) if s else "—",
                _fmt(s["f1_macro"]) if s else "—", _fmt(r["paper_macro"]),
                _fmt(s["f1_micro"]) if s else "—", f"{_fmt(r['paper_micro'])} |"]))
        figs = [r for r in rows if r.get("figure")]
        if figs:
            lines += ["", "<details><summary>Confusion matrices (% of each reference class, as in the paper's "
                      "Figure 4)</summary>", ""]
            for r in figs:
                lines += [f"**{r['label']}** ({r['split']})", "", f"![{r['label']}]({Path(r['figure']).as_posix()})", ""]
            lines += ["</details>"]
        lines.append("")

    if easy is not None:
        from .difficulty import to_markdown

        lines += [to_markdown(easy, heading_level=2), ""]
    return "\n".join(lines).rstrip() + "\n"

"""Statistics and figures that describe a corpus before any model is trained.

:func:`describe_corpus` reads a corpus in the MSP-Podcast layout (or takes a loaded
:class:`~conilium.corpus.Corpus`) and writes into one folder:

* ``summary.json`` / ``summary.md``: clips per split, consensus labels per split
  (including O and X), annotators per clip, agreement (mean top share of the P and S
  targets, share of clips passing the P* and S* thresholds, Krippendorff's alpha on
  the primary labels), the words that map to no target class, clip durations, and
  how many clips have a transcript (``Transcripts/``, :mod:`conilium.transcripts`);
* ``durations.png``: the duration distribution per split with the 8 s mark (the
  paper's Figure 1);
* ``cooccurrence.png``: for the clips of each consensus class, the mean S target over
  the eight classes (the paper's Figure 3).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import krippendorff
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from . import CLASS_NAMES, CLASSES, NON_TARGET_CONSENSUS
from .classes import MSP_PODCAST, ClassSet
from .corpus import SPLITS, Clip, Corpus, ignored_word_counts, load_corpus
from .targets import DEFAULT_READING, DEFAULT_THRESHOLDS, agreement, passes_agreement, secondary_target
from .util import atomic_path, check_writable, write_json

#: Files :func:`describe_corpus` writes, in order.
OUTPUT_FILES = ("summary.json", "summary.md", "durations.png", "cooccurrence.png")
LONG_CLIP_SECONDS = 8.0
#: Categories of the primary labels for Krippendorff's alpha: the eight classes and
#: "Other" (Other, ``Other-…`` and non-target words).
ALPHA_CATEGORIES = CLASSES + ("Other",)  # MSP-Podcast's; primary_alpha takes a class set
UNLABELLED = "unlabelled"
_READING_TEXT = {"all": "all annotators' labels, Other included", "targets": "target-class labels only"}


def describe_corpus(corpus: Union[Corpus, str, Path], out_dir, *, skip_bad: bool = False,
                    allow_symlinks: bool = False) -> dict:
    """Write the summary files and figures of ``corpus`` into ``out_dir``; return the summary.

    ``corpus`` is a corpus root or a loaded :class:`Corpus`; a root is read with
    durations, and ``skip_bad`` leaves out (and lists) clips whose audio is missing or
    unreadable instead of failing; ``allow_symlinks`` reads audio through symbolic links in
    ``Audios/`` that point outside it. ``out_dir`` is checked for being writable before the
    corpus is read; a failure to write (full disk, read-only) is an
    :class:`~conilium.errors.OutputError` naming the file, and leaves none of the four files.
    """
    out_dir = Path(out_dir)
    check_writable(out_dir, what="describe-corpus output directory")  # before reading the corpus
    if not isinstance(corpus, Corpus):
        corpus = load_corpus(corpus, skip_bad=skip_bad, allow_symlinks=allow_symlinks)
    summary = summarize(corpus)
    try:
        write_json(out_dir / "summary.json", summary)
        with atomic_path(out_dir / "summary.md") as tmp:
            tmp.write_text(render_markdown(summary), encoding="utf-8")
        _save(plot_durations(corpus), out_dir / "durations.png")
        _save(plot_cooccurrence(summary["cooccurrence"]), out_dir / "cooccurrence.png")
    except BaseException:
        # no report of mixed pieces: a summary.md whose figures are missing, or older ones
        for name in OUTPUT_FILES:
            with contextlib.suppress(OSError):
                (out_dir / name).unlink(missing_ok=True)
        raise
    return summary


# ----------------------------------------------------------------------------- statistics


def summarize(corpus: Corpus) -> dict:
    """Every figure of the summary as a JSON-serialisable dict (see the module docstring)."""
    splits = [s for s in SPLITS if s in corpus.splits]
    by_split = {s: corpus.split(s) for s in splits}
    groups = dict(by_split, all=list(corpus))
    classes = corpus.classes
    extra = {} if classes.is_default else {"classes": classes.to_json()}
    return {
        "corpus": str(corpus.root),
        "clips": len(corpus),
        "clips_per_split": {s: len(c) for s, c in by_split.items()},
        "skipped": [{"clip": name, "reason": reason} for name, reason in corpus.skipped],
        "orphan_annotations": corpus.orphan_annotations,
        "detailed_layout": corpus.detailed_layout,
        "consensus": {s: consensus_counts(c, classes) for s, c in groups.items()},
        "annotators_per_clip": {s: annotator_counts(c) for s, c in groups.items()},
        "agreement": {s: agreement_stats(c, classes) for s, c in groups.items()},
        "ignored_words": dict(ignored_word_counts(corpus).most_common()),
        "durations": {s: duration_stats(c) for s, c in groups.items()},
        "cooccurrence": cooccurrence(corpus, classes),
        "transcripts": corpus.transcripts().coverage(),
        **extra,
    }


def consensus_counts(clips: Sequence[Clip], classes: ClassSet = MSP_PODCAST) -> Dict[str, int]:
    """Clips per consensus letter (A..N or the corpus's codes, O, X), plus ``unlabelled`` where there is none."""
    counts = Counter(c.emo_class if c.emo_class is not None else UNLABELLED for c in clips)
    keys = tuple(classes.codes) + NON_TARGET_CONSENSUS + (UNLABELLED,)
    return {k: counts.get(k, 0) for k in keys}


def annotator_counts(clips: Sequence[Clip]) -> dict:
    """Distribution of the number of annotations per clip, over clips that have any."""
    n = np.array([len(c.annotations) for c in clips if c.annotations])
    if n.size == 0:
        return {"clips": 0, "without_annotations": len(clips), "min": None, "mean": None, "max": None,
                "histogram": {}}
    values, counts = np.unique(n, return_counts=True)
    return {"clips": int(n.size), "without_annotations": len(clips) - int(n.size),
            "min": int(n.min()), "mean": round(float(n.mean()), 3), "max": int(n.max()),
            "histogram": {str(v): int(k) for v, k in zip(values, counts)}}


def agreement_stats(clips: Sequence[Clip], classes: ClassSet = MSP_PODCAST) -> dict:
    """Mean top P / S share, P* / S* pass rates and Krippendorff's alpha over annotated clips."""
    annotated = [c for c in clips if c.annotations]
    top_p = [a for a in (agreement(c, "P", "targets") for c in annotated) if a is not None]
    top_s = [a for a in (agreement(c, "S", "targets") for c in annotated) if a is not None]
    n = len(annotated)
    return {
        "clips": n,
        "mean_top_p": round(float(np.mean(top_p)), 4) if top_p else None,
        "mean_top_s": round(float(np.mean(top_s)), 4) if top_s else None,
        "p_star_share": round(sum(passes_agreement(c, "P*") for c in annotated) / n, 4) if n else None,
        "s_star_share": round(sum(passes_agreement(c, "S*") for c in annotated) / n, 4) if n else None,
        "krippendorff_alpha": primary_alpha(annotated, classes),
    }


def primary_alpha(clips: Sequence[Clip], classes: ClassSet = MSP_PODCAST) -> Optional[float]:
    """Krippendorff's alpha (nominal) of the primary labels; None when it is undefined.

    Each clip is a unit and each annotator's primary a value among the eight classes and
    Other; clips with a single annotation carry no pair and are left out.
    """
    categories = tuple(classes.codes) + ("Other",)
    col = {c: i for i, c in enumerate(categories)}
    rows = []
    for clip in clips:
        if len(clip.annotations) < 2:
            continue
        row = np.zeros(len(categories), dtype=np.int64)
        for a in clip.annotations:
            row[col[a.primary_class or "Other"]] += 1
        rows.append(row)
    if not rows:
        return None
    value_counts = np.stack(rows)
    if np.count_nonzero(value_counts.sum(axis=0)) < 2:
        return None  # a single category: agreement is perfect but alpha is 0/0
    with np.errstate(invalid="ignore", divide="ignore"):
        alpha = krippendorff.alpha(value_counts=value_counts, level_of_measurement="nominal")
    return round(float(alpha), 4) if np.isfinite(alpha) else None


def duration_stats(clips: Sequence[Clip]) -> dict:
    """Mean, sd, min, max of the clip durations (seconds) and the share longer than 8 s."""
    d = np.array([c.duration for c in clips if c.duration is not None], dtype=np.float64)
    if d.size == 0:
        return {"clips": 0, "mean": None, "sd": None, "min": None, "max": None, "longer_than_8s": None}
    return {"clips": int(d.size), "mean": round(float(d.mean()), 3),
            "sd": round(float(d.std(ddof=1)) if d.size > 1 else 0.0, 3),
            "min": round(float(d.min()), 3), "max": round(float(d.max()), 3),
            "longer_than_8s": round(float(np.mean(d > LONG_CLIP_SECONDS)), 4)}


def cooccurrence(clips, classes: ClassSet = MSP_PODCAST) -> dict:
    """Mean S target (columns) of the clips of each consensus class (rows).

    A row is None where no clip with that consensus has a target-class annotation.
    """
    codes = tuple(classes.codes)
    sums = {c: np.zeros(len(codes)) for c in codes}
    counts = dict.fromkeys(codes, 0)
    for clip in clips:
        if not clip.scoreable:
            continue
        s = secondary_target(clip.annotations)
        if s is not None:
            sums[clip.emo_class] += s
            counts[clip.emo_class] += 1
    matrix = [[round(float(v), 4) for v in sums[c] / counts[c]] if counts[c] else None for c in codes]
    out = {"rows": list(codes), "columns": list(codes), "clips": [counts[c] for c in codes], "matrix": matrix}
    if not classes.is_default:
        out["names"] = list(classes.names)
    return out


# ----------------------------------------------------------------------------- report


def _fmt(value, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines + [""]


def render_markdown(summary: dict) -> str:
    """The summary as a Markdown report (tables and the two figures)."""
    groups = list(summary["consensus"])
    th_p, th_s = DEFAULT_THRESHOLDS["P*"], DEFAULT_THRESHOLDS["S*"]
    out = [f"# Corpus summary: {summary['corpus']}", ""]
    out.append(f"{summary['clips']} clips: " + ", ".join(f"{s} {n}" for s, n in summary["clips_per_split"].items())
               + f". Detailed label layout: {summary['detailed_layout'] or 'none (no labels_detailed.csv)'}.")
    if summary["orphan_annotations"]:
        out.append(f"{summary['orphan_annotations']} annotation rows name clips missing from the consensus file.")
    if summary["skipped"]:
        out.append(f"{len(summary['skipped'])} clips were skipped:")
        out += [f"- {s['clip']}: {s['reason']}" for s in summary["skipped"]]
    out.append("")

    out += ["## Consensus labels", "",
            "O: Other won the vote; X: no agreement (a tie). Both are left out of training and scoring.", ""]
    keys = list(summary["consensus"]["all"])
    out += _table(["Split"] + keys + ["total"],
                  [[g] + [str(summary["consensus"][g][k]) for k in keys]
                   + [str(sum(summary["consensus"][g].values()))] for g in groups])

    out += ["## Annotators per clip", ""]
    rows = []
    for g in groups:
        a = summary["annotators_per_clip"][g]
        hist = ", ".join(f"{k}: {v}" for k, v in a["histogram"].items()) or "–"
        rows.append([g, str(a["clips"]), str(a["without_annotations"]), _fmt(a["min"], "d"),
                     _fmt(a["mean"], ".2f"), _fmt(a["max"], "d"), hist])
    out += _table(["Split", "annotated clips", "without annotations", "min", "mean", "max",
                   "histogram (annotators: clips)"], rows)

    out += ["## Agreement", "",
            f"Over annotated clips: mean largest share of the P and S targets, share of clips that "
            f"pass the P* ({th_p}) and S* ({th_s}) thresholds (agreement share read over "
            f"{_READING_TEXT[DEFAULT_READING]}, see conilium.targets), and Krippendorff's alpha "
            f"(nominal) of the primary labels ({_classes_text(summary)} and Other).", ""]
    rows = []
    for g in groups:
        a = summary["agreement"][g]
        rows.append([g, str(a["clips"]), _fmt(a["mean_top_p"]), _fmt(a["mean_top_s"]),
                     _fmt(a["p_star_share"]), _fmt(a["s_star_share"]), _fmt(a["krippendorff_alpha"])])
    out += _table(["Split", "clips", "mean top P", "mean top S", f"P* (≥{th_p})", f"S* (≥{th_s})",
                   "Krippendorff α"], rows)

    out += ["## Durations (seconds)", ""]
    rows = []
    for g in groups:
        d = summary["durations"][g]
        long_share = "–" if d["longer_than_8s"] is None else f"{100 * d['longer_than_8s']:.1f} %"
        rows.append([g, str(d["clips"]), _fmt(d["mean"], ".2f"), _fmt(d["sd"], ".2f"), _fmt(d["min"], ".2f"),
                     _fmt(d["max"], ".2f"), long_share])
    out += _table(["Split", "clips", "mean", "sd", "min", "max", f"> {LONG_CLIP_SECONDS:g} s"], rows)

    out += ["## Ignored words", "",
            "Words that map to no target class (Other, `Other-…`, non-target emotions); the P and S "
            "targets leave them out.", ""]
    words = summary["ignored_words"]
    out += _table(["word", "count"], [[w, str(n)] for w, n in words.items()]) if words else ["None.", ""]

    out += ["## Transcripts", ""]
    out += _transcript_lines(summary.get("transcripts"))

    out += ["## Figures", "", "![Clip durations per split](durations.png)", "",
            f"*Clip durations per split, with the {LONG_CLIP_SECONDS:g} s mark (the paper's Figure 1): every clip "
            f"is truncated to its first {LONG_CLIP_SECONDS:g} s before the upstream sees it.*", "",
            "![Mean S target per consensus class](cooccurrence.png)", "",
            "*For the clips of each consensus class (rows, with their clip counts), the mean S target over the "
            f"{_classes_text(summary)}: which other emotions annotators perceive alongside (cf. the paper's "
            f"Figure 3).*", ""]
    return "\n".join(out)


def _classes_text(summary: dict) -> str:
    """How the summary names its classes: "eight classes" for MSP-Podcast's, else their codes."""
    own = summary.get("classes")
    if not own:
        return "eight classes"
    return f"{len(own['classes'])} classes ({', '.join(c['code'] for c in own['classes'])})"


# ----------------------------------------------------------------------------- figures


def _transcript_lines(t: Optional[dict]) -> List[str]:
    """The coverage of ``Transcripts/<clip stem>.txt`` (conilium.transcripts)."""
    if not t or not t["folder"]:
        return ["No Transcripts/ folder: no clip has a transcript (conilium corpus transcribe makes them).", ""]
    out = [f"{t['with_transcript']} of {t['clips']} clips have a transcript"
           + (f" (made by the ASR model {t['asr']})" if t.get("asr") else "") + "."]
    if t["missing"]:
        more = t["missing"] - len(t["missing_first"])
        out.append(f"{t['missing']} have none: " + ", ".join(t["missing_first"])
                   + (f", … and {more} more" if more > 0 else "")
                   + (f" ({t['no_text']} of them: the ASR heard no words)" if t.get("no_text") else "") + ".")
    return out + [""]


def _save(fig: Figure, path: Path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        FigureCanvasAgg(fig).print_png(str(tmp))


def plot_durations(clips) -> Figure:
    """Overlaid histograms of the clip durations per split, with a line at 8 s (Figure 1).

    The legend sits below the axes, so that neither it nor the 8 s label hides the other
    or the histograms.
    """
    per_split: Dict[str, List[float]] = {}
    for c in clips:
        if c.duration is not None:
            per_split.setdefault(c.split, []).append(c.duration)
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    if not per_split:
        ax.text(0.5, 0.5, "no clip durations", ha="center", va="center", transform=ax.transAxes)
    else:
        longest = max(max(v) for v in per_split.values())
        bins = np.arange(0.0, np.ceil(longest * 2) / 2 + 0.5, 0.5)
        for split in [s for s in SPLITS if s in per_split]:
            d = np.asarray(per_split[split])
            share = 100 * np.mean(d > LONG_CLIP_SECONDS)
            ax.hist(d, bins=bins, histtype="step", linewidth=1.6,
                    label=f"{split} (n={d.size}, mean {d.mean():.1f} s, {share:.0f} % > {LONG_CLIP_SECONDS:g} s)")
        ax.axvline(LONG_CLIP_SECONDS, color="0.3", linestyle="--", linewidth=1)
        ax.margins(y=0.12)  # head room for the label above the tallest bar
        ax.text(LONG_CLIP_SECONDS, 0.98, f"truncated at {LONG_CLIP_SECONDS:g} s ", transform=ax.get_xaxis_transform(),
                va="top", ha="right", color="0.2", fontsize=8,
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.85, "pad": 1.5})
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1, fontsize=8, frameon=False)
    ax.set_xlabel("clip duration (s)")
    ax.set_ylabel("clips")
    ax.set_title("Clip durations per split")
    return fig


def plot_cooccurrence(cooc: dict) -> Figure:
    """8×8 heatmap: rows are consensus classes, columns their clips' mean S target (Figure 3)."""
    codes = cooc["rows"]
    names = cooc.get("names") or [CLASS_NAMES.get(c, c) for c in codes]
    matrix = np.array([row if row is not None else [np.nan] * len(codes) for row in cooc["matrix"]])
    fig = Figure(figsize=(7.0, 6.2), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            v = matrix[i, j]
            text, colour = ("–", "0.5") if np.isnan(v) else (f"{v:.2f}", "white" if v > 0.55 else "black")
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color=colour)
    ax.set_xticks(range(len(codes)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(codes)), [f"{name} (n={n})" for name, n in zip(names, cooc["clips"])])
    ax.set_xlabel("mean S target (share of perceived labels)")
    ax.set_ylabel("consensus class")
    ax.set_title("Perceived emotions of the clips of each consensus class")
    fig.colorbar(image, ax=ax, shrink=0.8)
    return fig

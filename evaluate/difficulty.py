"""Easy and Difficult clips (paper, section 4).

Given two or more runs' predictions on one split (the development set): a clip is
**Easy** when every run predicts its consensus label, **Difficult** when every run gets
it wrong, **Mixed** otherwise. Only scoreable clips (consensus among the eight classes)
are considered. For each group the analysis gives the number of clips, the duration
mean and standard deviation, Krippendorff's alpha of the annotators' primary labels and
the gender breakdown; for speakers, an **Easy speaker** has more than half of their clips
Easy, a **Difficult speaker** more than half Difficult, and the analysis gives how many
there are and how many clips each has on average.

Krippendorff's alpha is nominal, over the annotators' primary labels, computed from
per-clip value counts (units × categories), so the number of distinct annotators does
not matter. By default a primary that is not one of the eight classes (Other and its
variants) is a ninth category ``O`` — choosing Other is a disagreement with choosing
Neutral — ``other="exclude"`` drops those annotations instead. Clips with fewer than two
usable annotations carry no pairable values and do not count.

Clip metadata (annotations, duration, speaker, gender) comes from a feature cache
(``clips.json``) or a corpus directory.
"""

from __future__ import annotations

import csv
import math
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from conilium import CLASSES
from conilium.corpus import Clip
from conilium.errors import ConfigError
from conilium.util import atomic_path, read_json, write_json

from conilium.runs import RunError, load_run_config, read_run

from .options import OTHER_MODES

GROUPS = ("easy", "difficult", "mixed")
OTHER = "O"


# --------------------------------------------------------------------------- clip metadata

def load_clips(*, cache=None, corpus=None) -> Dict[str, Clip]:
    """Clip metadata from a cache directory (its ``clips.json``) or a corpus root."""
    if (cache is None) == (corpus is None):
        raise ConfigError("give exactly one of a cache directory or a corpus directory for clip metadata")
    if cache is not None:
        from conilium.cache.reader import FeatureCache

        return dict(FeatureCache(cache).clips)
    from conilium.corpus import load_corpus

    return dict(load_corpus(corpus).clips)


def default_cache(run_dirs: Sequence) -> Optional[str]:
    """The ``cache`` recorded in the first run config that has one (tuned and ensemble runs
    look into their source runs' configs too), or None."""
    def find(cfg) -> Optional[str]:
        if not isinstance(cfg, dict):
            return None
        if cfg.get("cache"):
            return str(cfg["cache"])
        for key in ("source_config",):
            got = find(cfg.get(key))
            if got:
                return got
        for sub in cfg.get("member_configs", []) or []:
            got = find(sub)
            if got:
                return got
        return None

    for r in run_dirs:
        try:
            got = find(load_run_config(r))
        except RunError:
            continue
        if got:
            return got
    return None


# --------------------------------------------------------------------------- agreement

def primary_value_counts(clips: Sequence[Clip], *, other: str = "category") -> Tuple[np.ndarray, List[str]]:
    """Units × categories counts of the annotators' primary labels, and the categories.

    Categories are the eight classes, plus ``O`` for any other primary when
    ``other="category"``; with ``other="exclude"`` such annotations are dropped.
    """
    if other not in OTHER_MODES:
        raise ConfigError(f"other must be one of {', '.join(OTHER_MODES)}, got {other!r}")
    codes = clips[0].class_set.codes if len(clips) else CLASSES
    cats = list(codes) + ([OTHER] if other == "category" else [])
    pos = {c: i for i, c in enumerate(cats)}
    counts = np.zeros((len(clips), len(cats)), dtype=np.int64)
    for u, clip in enumerate(clips):
        for a in clip.annotations:
            c = a.primary_class
            if c is None:
                if other == "exclude":
                    continue
                c = OTHER
            counts[u, pos[c]] += 1
    return counts, cats


def alpha_nominal(value_counts: np.ndarray) -> Optional[float]:
    """Krippendorff's nominal alpha from a units × categories count matrix (krippendorff
    package); None when it is undefined (fewer than two pairable values or one category)."""
    import krippendorff

    vc = np.asarray(value_counts, dtype=np.int64)
    vc = vc[vc.sum(1) >= 2]  # units with a single value are not pairable
    if vc.size == 0 or vc.sum() < 2 or np.count_nonzero(vc.sum(0)) < 2:
        return None
    a = krippendorff.alpha(value_counts=vc, level_of_measurement="nominal")
    return None if a is None or not math.isfinite(a) else float(a)


def primary_alpha(clips: Sequence[Clip], *, other: str = "category") -> Optional[float]:
    return alpha_nominal(primary_value_counts(clips, other=other)[0])


# --------------------------------------------------------------------------- analysis

def _mean_sd(values: Sequence[float]) -> Dict:
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    return {"n": int(len(x)), "mean": float(x.mean()) if len(x) else None,
            "sd": float(x.std(ddof=1)) if len(x) > 1 else None}


def _genders(clips: Sequence[Clip]) -> Dict[str, int]:
    c = Counter(clip.gender or "Unknown" for clip in clips)
    return {g: int(c.get(g, 0)) for g in ("Female", "Male", "Unknown")}


def easy_difficult(run_dirs: Sequence, clips: Mapping[str, Clip], *, split: str = "Development",
                   other: str = "category") -> Dict:
    """The Easy/Difficult analysis of ``run_dirs`` on ``split``; a JSON-ready dict.

    Every run must cover the same scoreable clips of the split, and every such clip
    must be in ``clips`` (errors name the runs and clips).
    """
    run_dirs = [Path(r) for r in run_dirs]
    if len(run_dirs) < 2:
        raise RunError("the Easy/Difficult analysis needs at least two runs")
    if other not in OTHER_MODES:
        raise ConfigError(f"other must be one of {', '.join(OTHER_MODES)}, got {other!r}")
    ref, correct, classes = _correct_runs(run_dirs, split)
    missing = [n for n in ref if n not in clips]
    if missing:
        raise RunError(f"{len(missing)} clip(s) of split {split} are not in the clip metadata "
                       f"(wrong cache or corpus?), e.g. {missing[:3]}")
    theirs = clips[next(iter(ref))].class_set.codes
    if tuple(theirs) != tuple(classes):
        raise RunError(f"run {run_dirs[0]} scores the classes {','.join(classes)} but the clip metadata (cache or "
                       f"corpus) has the class set {','.join(theirs)}: give the cache or corpus the runs were "
                       f"trained on")
    k = len(run_dirs)
    group_of = {n: ("easy" if c == k else "difficult" if c == 0 else "mixed") for n, c in correct.items()}
    return {
        "split": split,
        "runs": [str(r) for r in run_dirs],
        "other": other,
        "n": len(ref),
        "groups": _groups(ref, clips, group_of, other, classes),
        "speakers": _speakers(ref, clips, group_of),
        "clip_groups": {n: group_of[n] for n in ref},
        "correct_runs": {n: correct[n] for n in ref},
    }


def _correct_runs(run_dirs: Sequence[Path], split: str) -> Tuple[Dict[str, str], Dict[str, int], Tuple[str, ...]]:
    """The scoreable clips of ``split`` with their reference (the first run's order), how many
    runs predict each correctly and the runs' classes; the runs must agree on the clips and
    their references."""
    preds = {str(r): read_run(r, [split])[split] for r in run_dirs}
    first_run = str(run_dirs[0])
    first = preds[first_run]
    classes = tuple(first.classes)
    ref = OrderedDict((n, r) for n, r in zip(first.names, first.reference) if r in classes)
    if not ref:
        raise RunError(f"{first_run}: split {split} has no labelled clip (no reference among the classes "
                       f"{','.join(classes)})")
    correct = {n: 0 for n in ref}
    for run, p in preds.items():
        if tuple(p.classes) != classes:
            raise RunError(f"runs {first_run} and {run}: different class columns ({','.join(classes)} vs "
                           f"{','.join(p.classes)})")
        mine = {n: (r, y) for n, r, y in zip(p.names, p.reference, p.prediction) if r in classes}
        if set(mine) != set(ref):
            a, b = sorted(set(ref) - set(mine)), sorted(set(mine) - set(ref))
            raise RunError(f"runs {first_run} and {run}, split {split}: different labelled clips "
                           f"({len(a)} only in the first, e.g. {a[:3]}; {len(b)} only in the second, e.g. {b[:3]})")
        for n, (r, y) in mine.items():
            if r != ref[n]:
                raise RunError(f"runs {first_run} and {run}, split {split}: clip {n} has reference {ref[n]} "
                               f"in one and {r} in the other")
            correct[n] += int(y == r)
    return ref, correct, classes


def _groups(ref: Mapping[str, str], clips: Mapping[str, Clip], group_of: Mapping[str, str], other: str,
            classes: Sequence[str] = CLASSES) -> Dict:
    """Size, duration, agreement, genders and classes of each group and of all clips together."""
    members = {g: [clips[n] for n in ref if group_of[n] == g] for g in GROUPS}
    all_clips = [clips[n] for n in ref]
    groups = {}
    for g in GROUPS + ("all",):
        cl = all_clips if g == "all" else members[g]
        groups[g] = {
            "clips": len(cl),
            "share": len(cl) / len(all_clips),
            "duration": _mean_sd([c.duration for c in cl]),
            "alpha": primary_alpha(cl, other=other),
            "annotations_per_clip": float(np.mean([len(c.annotations) for c in cl])) if cl else None,
            "gender": _genders(cl),
            "classes": {c: int(v) for c, v in sorted(Counter(ref[x.name] for x in cl).items(),
                                                     key=lambda kv: list(classes).index(kv[0]))},
        }
    return groups


def _speakers(ref: Mapping[str, str], clips: Mapping[str, Clip], group_of: Mapping[str, str]) -> Dict:
    """Easy, Difficult and other speakers (known speakers only): how many, their clips, genders."""
    by_speaker: Dict[str, List[str]] = OrderedDict()
    for n in ref:
        spk = clips[n].speaker
        if spk is not None:
            by_speaker.setdefault(spk, []).append(n)
    kinds = {}
    for spk, names in by_speaker.items():
        e = sum(group_of[n] == "easy" for n in names)
        d = sum(group_of[n] == "difficult" for n in names)
        kinds[spk] = "easy" if e > len(names) / 2 else "difficult" if d > len(names) / 2 else "neither"
    speakers = {}
    for kind in ("easy", "difficult", "neither"):
        spks = [s for s, v in kinds.items() if v == kind]
        sizes = [len(by_speaker[s]) for s in spks]
        own = "easy" if kind == "easy" else "difficult" if kind == "difficult" else None
        own_clips = [clips[n] for s in spks for n in by_speaker[s] if own and group_of[n] == own]
        speakers[kind] = {
            "speakers": len(spks),
            "clips": int(sum(sizes)),
            "mean_clips_per_speaker": float(np.mean(sizes)) if sizes else None,
            "speaker_gender": dict(Counter(clips[by_speaker[s][0]].gender or "Unknown" for s in spks)),
            "clips_gender": _genders([clips[n] for s in spks for n in by_speaker[s]]),
            **({f"{own}_clips_gender": _genders(own_clips)} if own else {}),
        }
    speakers["unknown_speaker_clips"] = int(sum(1 for n in ref if clips[n].speaker is None))
    return speakers


# --------------------------------------------------------------------------- output

def _fmt(x, digits=3) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def to_markdown(result: Dict, *, heading_level: int = 2, paper: bool = True) -> str:
    """A Markdown summary of :func:`easy_difficult`'s result (paper figures beside ours)."""
    from .paper import EASY_DIFFICULT as P

    h = "#" * heading_level
    g = result["groups"]
    s = result["speakers"]
    runs = ", ".join(f"`{Path(r).name}`" for r in result["runs"])
    other = ("Other (and any non-target primary) counted as a ninth category" if result["other"] == "category"
             else "Other primaries left out")
    lines = [f"{h} Easy and Difficult clips ({result['split']})", "",
             f"{len(result['runs'])} runs ({runs}); {result['n']} scoreable clips. "
             f"Easy: every run right; Difficult: every run wrong; Mixed: the rest. "
             f"Krippendorff's alpha: nominal, annotators' primary labels, {other}.", ""]
    cols = ["Group", "Clips", "Share", "Duration mean (s)", "Duration sd (s)", "Krippendorff α", "Female", "Male",
            "Unknown gender"]
    if paper:
        cols += ["Paper: clips", "Paper: duration", "Paper: α", "Paper: Female / Male"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for key, label in (("easy", "Easy"), ("difficult", "Difficult"), ("mixed", "Mixed"), ("all", "All")):
        x = g[key]
        row = [label, str(x["clips"]), f"{100 * x['share']:.1f}%", _fmt(x["duration"]["mean"], 2),
               _fmt(x["duration"]["sd"], 2), _fmt(x["alpha"]), str(x["gender"]["Female"]), str(x["gender"]["Male"]),
               str(x["gender"]["Unknown"])]
        if paper:
            if key in ("easy", "difficult"):
                row += [f"{P[key]:,} of {P['n']:,}", f"{P['duration_mean'][key]:.2f} ± {P['duration_sd'][key]:.2f}",
                        f"{P['alpha'][key]:.2f}", "—"]
            elif key == "all":
                row += [f"{P['n']:,}", "—", "—",
                        f"{P['gender_clips']['Female']:,} / {P['gender_clips']['Male']:,}"]
            else:
                row += ["—", "—", "—", "—"]
        lines.append("| " + " | ".join(row) + " |")
    if paper:
        lines += ["", f"The paper's development set is balanced between genders (section 4.3: "
                  f"{P['gender_clips']['Female']:,} female and {P['gender_clips']['Male']:,} male clips, of "
                  f"{P['n']:,}); ours: {g['all']['gender']['Female']} female, {g['all']['gender']['Male']} male, "
                  f"{g['all']['gender']['Unknown']} unknown, of {g['all']['clips']}."]
    lines += ["", f"Speakers (known speakers only; {s['unknown_speaker_clips']} clips of unknown speakers left out). "
              "An Easy speaker has more than half of their clips Easy, a Difficult speaker more than half "
              "Difficult.", ""]
    cols = ["Speaker kind", "Speakers", "Their clips", "Mean clips per speaker", "Speakers F / M",
            "Own-kind clips F / M"]
    if paper:
        cols += ["Paper: mean clips per speaker", "Paper: own-kind clips F / M"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for key, label in (("easy", "Easy"), ("difficult", "Difficult"), ("neither", "Neither")):
        x = s[key]
        own = x.get(f"{key}_clips_gender")
        row = [label, str(x["speakers"]), str(x["clips"]), _fmt(x["mean_clips_per_speaker"], 1),
               f"{x['speaker_gender'].get('Female', 0)} / {x['speaker_gender'].get('Male', 0)}",
               f"{own['Female']} / {own['Male']}" if own else "—"]
        if paper:
            if key in ("easy", "difficult"):
                pk = P[f"{key}_clips_of_{key}_speakers"]
                row += [f"≈{P['mean_clips_per_speaker'][key]}", f"{pk['Female']:,} / {pk['Male']:,}"]
            else:
                row += ["—", "—"]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    return "\n".join(lines)


def write_outputs(result: Dict, out_dir) -> Dict[str, Path]:
    """``easy_difficult.json``, ``easy_difficult.md`` and ``clips.csv`` (FileName, Group,
    CorrectRuns) in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": out_dir / "easy_difficult.json", "markdown": out_dir / "easy_difficult.md",
             "clips": out_dir / "clips.csv"}
    write_json(files["json"], result)
    with atomic_path(files["markdown"], suffix=".md.tmp") as tmp:
        tmp.write_text(to_markdown(result), encoding="utf-8")
    with atomic_path(files["clips"], suffix=".csv.tmp") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["FileName", "Group", "CorrectRuns"])
            for n, grp in result["clip_groups"].items():
                w.writerow([n, grp, result["correct_runs"][n]])
    return files


def read_result(path) -> Dict:
    """A saved analysis: ``easy_difficult.json`` or the directory holding it."""
    p = Path(path)
    if p.is_dir():
        p = p / "easy_difficult.json"
    if not p.is_file():
        raise RunError(f"{path}: no Easy/Difficult analysis (expected easy_difficult.json; run "
                       f"conilium-eval easy-difficult)")
    return read_json(p)

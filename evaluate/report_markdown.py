"""The report in Markdown: the tables of :mod:`.report_data` rendered, with the notes that
say how each number was obtained beside the paper's."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional

from conilium import CLASS_NAMES, CLASSES

from . import paper
from .report_data import NOT_RESOLVED, _fmt, _signed, our_value, run_config

ATTRIBUTE_NAMES = (("EmoAct", "arousal"), ("EmoVal", "valence"), ("EmoDom", "dominance"))
READING_TEXT = {"all": "share of all annotators' labels, Other included (the paper's wording)",
                "targets": "share of target-class labels only (the P/S vector's maximum)"}
CORPUS_CAPTIONS = {
    "durations.png": "Clip durations per split, with the 8 s mark: the paper truncates every clip to its first "
                     "8 s (its Figure 1); the challenge baseline used up to 12 s.",
    "cooccurrence.png": "For the clips of each consensus class (rows, with their clip counts), the mean S target "
                        "over the eight classes: how often the other emotions are perceived alongside (cf. the "
                        "paper's Figure 3).",
}


def markdown(title: str, scored: Dict[str, List[Dict]], out_dir: Path, corpus_figs: List[Path],
             easy: Optional[Dict], random_init: Dict[str, str], spec: Dict, findings: List[Dict],
             extras: Dict, charts: Optional[Dict] = None, boot: Optional[Dict] = None) -> str:
    """The whole REPORT.md: the introduction, the corpus, each of the paper's tables with its
    notes and charts, the attribute runs, the learned layer weights and the Easy/Difficult
    analysis. ``charts``: :func:`.report_figures.plot_extras`'s entries; ``boot``: how the
    intervals were drawn (:meth:`.report_data.Bootstrap.describe`)."""
    charts = charts or {}
    lines = [f"# {title}", ""]
    lines += _intro_lines(scored, random_init, findings, boot)
    lines.append("")
    if spec.get("notes"):
        lines += [str(spec["notes"]), ""]
    lines += _corpus_lines(extras.get("corpus"), corpus_figs, out_dir)
    for key, table in paper.TABLES.items():
        if key in scored:
            lines += _table_lines(key, table, scored, out_dir, findings, extras, charts)
    lines += _attribute_lines(extras.get("attributes") or [], out_dir, charts)
    if "layer_weights" in charts:
        lines += _layer_weight_lines(charts["layer_weights"])
    if easy is not None:
        from .difficulty import to_markdown

        lines += [to_markdown(easy, heading_level=2), ""]
    return "\n".join(lines).rstrip() + "\n"


def _intro_lines(scored: Dict[str, List[Dict]], random_init: Dict[str, str], findings: List[Dict],
                 boot: Optional[Dict] = None) -> List[str]:
    test_rows = [r for r in scored.get("table4", []) if r["label"] == "Test" and r["run"]]
    kinds = sorted({r["setting"]["kind"] for rows in scored.values() for r in rows if r.get("setting")})
    lines = [
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
        "",
        "**Class letters.** " + ", ".join(f"{c} = {CLASS_NAMES[c]}" for c in CLASSES) + ".",
    ]
    if random_init:
        n_runs = len({r["run"] for rows in scored.values() for r in rows if r.get("run")})
        ups = sorted({u.strip() for v in random_init.values() for u in v.split(",")})
        lines += ["", f"**Random weights.** {len(random_init)} of the {n_runs} runs here use features of (or "
                  f"fine-tune) an upstream with **randomly initialised** weights ({', '.join(ups)}): they are "
                  f"marked ⚠ in the Setting column and in red on their figures "
                  f"(the list is in report.json, `random_init_runs`)."]
    if boot:
        lines += ["", f"**Intervals.** A score shown as `0.312 [0.270, 0.351]` is followed by its "
                  f"{100 * boot['level']:.0f} % bootstrap interval: the row's scored clips resampled with replacement "
                  f"{boot['draws']:,} times (seed {boot['seed']}), the score recomputed on each resample, and the "
                  f"{100 * (1 - boot['level']) / 2:g}th and {100 - 100 * (1 - boot['level']) / 2:g}th percentiles of "
                  "those scores. On a few hundred clips one clip moves a rare class's F1 by several points, and "
                  "the interval says by how much the score could move with other clips."]
    if findings:
        n = {v: sum(f["verdict"] == v for f in findings) for v in _VERDICT}
        lines += ["", f"**The paper's findings on our numbers.** Of {len(findings)} conclusions of the paper checked "
                  f"here: {n['agrees']} agree, {n['disagrees']} disagree, {n[NOT_RESOLVED]} not resolved, "
                  f"{n['tie']} tie, {n['not run']} not run (each table lists its own)."]
        if boot:
            lines += ["", _NOT_RESOLVED_TEXT.format(draws=boot["draws"], seed=boot["seed"],
                                                    level=100 * boot["level"])]
    return lines


_NOT_RESOLVED_TEXT = (
    "**Not resolved.** A finding that compares two of our rows scored on the same clips is judged on the "
    "paired bootstrap of their difference ({draws:,} draws, seed {seed}): each draw resamples the clips once "
    "and scores both rows on the same resample, and the {level:.0f} % percentile interval of the differences "
    "is shown after the difference. When that interval contains 0 the finding is **not resolved**: our clips "
    "cannot tell which row is higher, whatever the sign of the observed difference; otherwise it agrees or "
    "disagrees by the interval's sign. \"X is the best\" agrees when X is above every other row with an "
    "interval above 0, disagrees when some row is above X with an interval leaving 0 out. The K-fold "
    "finding pairs each clip's K-fold decision (thresholds fitted without its fold) with the untuned row. A "
    "finding whose rows cannot be paired (different splits) is judged on the numbers alone and says so; "
    "`conilium-eval compare A B` gives the same paired interval and its p-value for any two runs.")


def _corpus_lines(corpus: Optional[List[Dict]], corpus_figs: List[Path], out_dir: Path) -> List[str]:
    lines: List[str] = []
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
    return lines


def _seed_cells(r: Dict) -> List[str]:
    """Macro- and micro-F1 of a row over its seeds: ``mean ± sd (n seeds)``."""
    sd = r.get("seeds")
    if not sd:
        return ["—", "—"]
    n = len(sd["runs"])
    return [f"{sd[k]['mean']:.3f}" + ("" if sd[k]["sd"] is None else f" ± {sd[k]['sd']:.3f}")
            + f" ({n} seed{'s' if n > 1 else ''})" for k in ("f1_macro", "f1_micro")]


def _row_cells(r: Dict, tuned_table: bool, out_dir: Path) -> List[str]:
    s = r.get("score")
    run = f"`{_rel(r['run'], out_dir)}`" if r["run"] else "—"
    label = r["label"] + ("" if r["in_paper"] else " *(not in paper)*")
    note = r.get("note")
    macro = _tuned_cells(r) if tuned_table else [_with_interval(s, "f1_macro") if s else "—"]
    pm = _fmt(r["paper_macro"])
    if r["paper_macro"] is None and r.get("paper_note"):
        pm = f"— ({r['paper_note']})"
    return [label, _setting_cell(r.get("setting")), run, r["split"] or (f"— ({note})" if note else "—"),
            str(s["n"]) if s else "—", *macro, pm,
            _with_interval(s, "f1_micro") if s else "—", _fmt(r["paper_micro"])]


def _interval(iv: Optional[Dict]) -> str:
    return "" if not iv else f" [{iv['low']:.3f}, {iv['high']:.3f}]"


def _with_interval(score: Dict, key: str) -> str:
    """A score and its bootstrap interval: ``0.312 [0.270, 0.351]``."""
    return _fmt(score[key]) + _interval((score.get("intervals") or {}).get(key))


def _table_lines(key: str, table, scored: Dict[str, List[Dict]], out_dir: Path, findings: List[Dict],
                 extras: Dict, charts: Dict) -> List[str]:
    rows = scored[key]
    tuned_table = any(r.get("tuning") for r in rows)
    seeded = any(r.get("seeds") for r in rows)
    lines = [f"## {table.title}", "", table.caption, ""]
    head = ["Row", "Setting (ours)", "Run", "Split", "Clips"]
    if tuned_table:
        head += ["Macro-F1 untuned (ours)", "Macro-F1 tuned (ours)", "Macro-F1 tuned, K-fold estimate (ours)"]
    else:
        head += ["Macro-F1 (ours)"]
    head += ["Macro-F1 (paper, end to end)", "Micro-F1 (ours)", "Micro-F1 (paper, end to end)"]
    if seeded:
        head += ["Macro-F1 over seeds, mean ± sd (ours)", "Micro-F1 over seeds, mean ± sd (ours)"]
    lines += ["| " + " | ".join(head) + " |",
              "|" + "|".join("---" if i < 4 else "---:" for i in range(len(head))) + "|"]
    lines += ["| " + " | ".join(_row_cells(r, tuned_table, out_dir) + (_seed_cells(r) if seeded else [])) + " |"
              for r in rows]
    if seeded:
        lines += ["", "Rows trained with several seeds: their scores, intervals, figures and findings are the "
                  "first seed's run (the *Run* column); the last columns give the mean ± sample standard deviation "
                  "of each seed's run on the same split — how much training alone moves the score, beside the "
                  "interval's resampling of the clips."]
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
    if key == "table2":
        lines += _modality_lines(extras.get("modalities") or [])
    lines += _findings_lines([f for f in findings if f["table"] == key])
    if key == "table4":
        lines += _external_lines()
    lines += _table_chart_lines(key, charts)
    lines += _figure_lines([r for r in rows if r.get("figure")], key)
    lines.append("")
    return lines


def chart_lines(entry: Optional[Dict], alt: str) -> List[str]:
    """A chart embedded with its caption below it, or its one-line note when it was not drawn."""
    if not entry:
        return []
    if entry.get("figure"):
        return [f"![{alt}]({entry['figure']})", "", f"*{entry['caption']}*", ""]
    return [f"*{entry['note']}*", ""] if entry.get("note") else []


def _table_chart_lines(key: str, charts: Dict) -> List[str]:
    lines: List[str] = []
    per_class = charts.get("per_class") or {}
    if per_class.get("table", "table4") == key and per_class:
        lines += chart_lines(per_class, "per-class F1 of our best system")
    for entry in (charts.get("thresholds") or {}).get(key, []):
        lines += chart_lines(entry, f"threshold tuning of {entry['label']}")
    lines += chart_lines((charts.get("learning_curves") or {}).get(key), "learning curves")
    return [""] + lines if lines else []


def _layer_weight_lines(entry: Dict) -> List[str]:
    lines = ["## Learned layer weights (not in the paper)", "",
             "Heads trained on a cache of several upstream layers learn a softmax-weighted mix of them "
             "(`train-head --set layers=weighted`, the default): which layers each upstream's heads rely on.", ""]
    for f in entry.get("figures") or []:
        lines += chart_lines(f, f"layer weights of {f['upstream']}")
    if entry.get("note"):
        lines += [f"*{entry['note']}*", ""]
    for n in entry.get("unreadable") or []:
        lines += [f"*Not read: {n}*", ""]
    return lines


def _figure_lines(figs: List[Dict], key: str = "") -> List[str]:
    if not figs:
        return []
    named = (" Each title and file name gives the row's run and whether its thresholds were tuned."
             if key == "table4" else "")
    lines = ["", "<details><summary>Confusion matrices (% of each reference class, as in the paper's "
             "Figure 4; each row's clip count beside its class — on a row of 5 clips one clip moves a "
             f"cell by 20 points; the class letters are spelled out under each matrix).{named}</summary>", ""]
    for r in figs:
        lines += [f"**{r['label']}** ({r['split']})", "",
                  f"![{r['label']}]({Path(r['figure']).as_posix()})", ""]
    return lines + ["</details>"]


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
        return [_with_interval(s, "f1_macro"), "not tuned", "not tuned"]
    where = "in-sample" if t["in_sample"] else f"thresholds from {t['tune_split']}"
    kfold = "—"
    if t.get("kfold") is not None:
        kfold = f"{t['kfold']:.3f}{_interval(t.get('kfold_interval'))} ({t['kfold_k']}-fold)"
    elif not t["in_sample"]:
        kfold = "n/a (held-out split)"
    return [_fmt(t.get("untuned")), f"{_with_interval(s, 'f1_macro')} ({where})", kfold]


_VERDICT = {"agrees": "agrees", "disagrees": "**disagrees**", NOT_RESOLVED: "*not resolved*", "tie": "tie",
            "not run": "not run here"}


def _findings_lines(findings: List[Dict]) -> List[str]:
    if not findings:
        return []
    lines = ["", "The paper's findings, and whether ours agree (computed from the numbers above; a difference "
             "between two of our rows is followed by the 95 % paired bootstrap interval, and *not resolved* "
             "means that interval contains 0):", "",
             "| Paper's finding | Paper | Here | Here vs paper |", "|---|---|---|---|"]
    for f in findings:
        verdict = _VERDICT[f["verdict"]]
        if f.get("unpaired"):
            verdict += f" (on the numbers alone: {f['unpaired']})"
        lines.append(f"| {f['text']} ({f['where']}) | {f['paper']} | {f['ours']} | {verdict} |")
    return lines




def _reading_lines(rows: List[Dict]) -> List[str]:
    readings = {}
    for r in rows:
        if not r.get("run"):
            continue
        cfg = run_config(r["run"]) or {}
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
               else s["reading"])
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


def _modality_lines(rows: List[Dict]) -> List[str]:
    """What the transcripts' text adds to the audio, from the text and audio + text rows."""
    if not rows:
        return []
    said = []
    for r in rows:
        d = r.get("difference")
        if d is None:
            said.append(f"{r['label']}: {_fmt(r['f1_macro'])} ({r['why']})")
            continue
        verdict = ("above" if d["low"] > 0 else "below" if d["high"] < 0 else "not resolved from")
        said.append(f"{r['label']} ({r['modality']}): {_fmt(r['f1_macro'])}, {_signed(d['difference'])} against "
                    f"{r['against']} on audio alone ({100 * r['level']:g} % paired interval {_signed(d['low'])} "
                    f"to {_signed(d['high'])}: {verdict} it)")
    return ["", "**Audio and text** (not in the paper, which hears the audio only): the transcripts' words through a "
            "text upstream, alone and fused with the audio upstream's frames (`train-head --cache AUDIO --cache "
            "TEXT`). Macro-F1 on the same clips — " + "; ".join(said) + ". On the demo corpus the transcripts are "
            "synthetic (filler words and emotion cue words drawn from the simulated annotators' labels, see "
            "`make-demo-corpus`), and the text upstream has random weights: these rows show the pipeline at work "
            "and say nothing of what the words add on MSP-Podcast, where the Interspeech 2025 challenge's best "
            "systems fused audio and text (0.43 macro-F1, against the paper's 0.361 with audio alone)."]


def _attribute_lines(rows: List[Dict], out_dir: Path, charts: Optional[Dict] = None) -> List[str]:
    lines = ["## Arousal, valence, dominance (not in the paper)", ""]
    if not rows:
        return lines + ["No attribute run in this report: the paper predicts categories only; `train-head --task "
                        "attributes` (or `joint`) trains a head on them.", ""]
    seeded = any(r.get("seeds") for r in rows)
    lines += ["Concordance correlation coefficient (CCC) of each attribute on the 1–7 scale, computed from each "
              "run's predictions over the clips with attribute values (consensus, else the annotators' mean). "
              "*attributes*: CCC loss only, on every training clip with attribute values (X and O included), "
              "best epoch by mean CCC; *joint*: the categories loss plus the weighted CCC loss, best epoch by "
              "macro-F1. The paper reports no attribute numbers.", "",
              "| Row | Task | Setting (ours) | Run | Split | Clips | "
              + " | ".join(f"CCC {n} ({c})" for c, n in ATTRIBUTE_NAMES) + " | CCC mean | Macro-F1 (ours) |"
              + (" CCC mean over seeds, mean ± sd |" if seeded else ""),
              "|---|---|---|---|---|---:|" + "---:|" * (len(ATTRIBUTE_NAMES) + 2 + seeded)]
    for r in rows:
        a, iv = r["scores"], r.get("intervals") or {}
        cells = [r["label"], r.get("task") or "—", _setting_cell(r.get("setting")), f"`{_rel(r['run'], out_dir)}`",
                 r["split"], str(a.get("n", "—")),
                 *(_fmt(a[c]["ccc"]) + _interval(iv.get(f"ccc_{c}")) for c, _ in ATTRIBUTE_NAMES),
                 _fmt(a["ccc_mean"]), _fmt(r.get("f1_macro"))]
        if seeded:
            sd = (r.get("seeds") or {}).get("ccc_mean")
            cells.append("—" if not sd else f"{sd['mean']:.3f}" + ("" if sd["sd"] is None else f" ± {sd['sd']:.3f}")
                         + f" ({len(sd['values'])} seeds)")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    charts = charts or {}
    for entry in charts.get("attributes") or []:
        lines += chart_lines(entry, f"attributes of {entry['label']}")
    lines += chart_lines((charts.get("learning_curves") or {}).get("attributes"), "learning curves of the attribute runs")
    return lines


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

"""Scores of one run and split, and the paper-vs-ours report.

What the report says is worked out in :mod:`.report_data` (each run's setting, scores,
findings), its figures drawn by :mod:`.report_figures` and its Markdown written by
:mod:`.report_markdown`; :func:`build_report` puts them together.

:func:`split_metrics` scores one split of a run and writes its per-class table and
confusion matrix (CSV and PNG). :func:`build_report` collects run directories into the
paper's tables (Tables 1 to 4, the sampler results of section 3.4, the ensemble of
section 3.6 and Table 2 on the fine-tuned upstream's features), with the seed paper's
published numbers beside ours, and writes a Markdown report (``REPORT.md``) with its
figures next to it, plus ``report.json``.

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
* every score carries its 95 % bootstrap interval over the clips it scores (``score.intervals``
  in report.json), and each of the seed's conclusions (:data:`paper.FINDINGS`) is given as
  the seed's, with whether our numbers agree: a comparison of two of our rows on the same
  clips is *not resolved* when the paired bootstrap interval of their difference contains
  0 (the spec's ``bootstrap_draws`` and ``bootstrap_seed`` say how it is drawn).

The report spec (JSON: ``title``, ``notes``, ``corpus_figures``, ``tables``,
``easy_difficult``) is documented, key by key with a minimal example, in
``docs/REPORT_SPEC.md``. A row is a run directory or ``{"run": DIR, "split": SPLIT}``;
relative paths are taken from the spec file's folder; rows are scored on the Development
split unless told otherwise, Table 4's test rows on the first labelled split of the run
other than Train and Development; row labels are matched to the paper's rows (see
:mod:`conilium.evaluate.paper`) and the paper's rows missing from the spec show "—".
``attributes`` (not a table of the paper) lists runs trained with ``train-head --task
attributes`` or ``joint``: their CCC of arousal, valence and dominance. A row of any table
trained with ``--train-on-xo`` is followed by how many X and O clips it trained on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from conilium.dirs import ReportDir
from conilium.util import atomic_path, write_json

from . import paper
from .report_data import (ATTRIBUTES_TABLE, DEV_SPLIT, END_TO_END, FINETUNED_FEATURES, FROZEN, NOT_RESOLVED,  # noqa: F401
                          TIE, Bootstrap, all_findings, as_trained, attribute_table, check_finding, check_tables, corpus_figures_dir,
                          corpus_rows, easy_difficult_result, extras, load_spec, our_value, run_config, run_setting,
                          score_tables, split_metrics, threshold_scores, training_set_sizes, xo_rows)
from .report_figures import copy_corpus_figures, plot_extras, plot_rows
from .report_markdown import markdown

REPORT_FILE = ReportDir.MARKDOWN


def _remove_legacy_markdown(report: ReportDir) -> None:
    """An earlier version's ``report.md`` in the folder is out of date once ``REPORT.md`` is
    written: removed (unless it is the same file, on a case-insensitive file system)."""
    old, new = report.legacy_markdown_path, report.markdown_path
    try:
        if old.is_file() and not os.path.samefile(old, new):
            old.unlink()
    except OSError:
        pass


def build_report(spec, out_dir, *, title: Optional[str] = None) -> Path:
    """Write ``out_dir/REPORT.md`` (+ ``report.json`` and ``figures/``) from a report spec.

    A row whose run directory or split is missing is an error naming the table and row
    (the report is only written when every row given can be scored).
    """
    spec, base = load_spec(spec)
    report = ReportDir(out_dir)
    out_dir = report.path
    tables_spec = check_tables(spec)
    boot = Bootstrap.from_spec(spec)
    # Score every row first: nothing is written when a row is broken.
    scored, random_init = score_tables(tables_spec, base, boot)
    attribute_rows = attribute_table(tables_spec.get(ATTRIBUTES_TABLE) or {}, base, boot)
    easy = easy_difficult_result(spec, base)
    corpus_dir = corpus_figures_dir(spec, base)
    findings = [check_finding(f, scored, boot) for f in all_findings() if f.table in scored]
    more = extras(scored, attribute_rows, corpus_dir, boot)

    out_dir.mkdir(parents=True, exist_ok=True)
    corpus_figs = copy_corpus_figures(corpus_dir, report.figures)
    plot_rows(scored, out_dir, report.figures)
    charts = plot_extras(scored, attribute_rows, out_dir, report.figures)
    title = title or spec.get("title") or "CONILIUM: our results beside the paper's"
    md = markdown(title, scored, out_dir, corpus_figs, easy, random_init, spec, findings, more, charts,
                  boot.describe())
    with atomic_path(report.markdown_path, suffix=".md.tmp") as tmp:
        tmp.write_text(md, encoding="utf-8")
    _remove_legacy_markdown(report)
    write_json(report.data_path, {
        "title": title, "paper_setting": paper.PAPER_SETTING, "bootstrap": boot.describe(), "tables": scored, "random_init_runs": random_init,
        "findings": findings, "external": [vars(p) for p in paper.EXTERNAL], **more, "charts": charts,
        "easy_difficult": easy and {k: v for k, v in easy.items() if k not in ("clip_groups", "correct_runs")}})
    return report.markdown_path

"""``conilium eval`` (alias ``conilium-eval``): scores, threshold adjustment, ensembles, stacking,
Easy/Difficult analysis, reports, submissions — all read run directories (``config.json`` +
``predictions/<Split>.csv``), thin layers over :mod:`conilium.evaluate`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click

from conilium.dirs import RUN_KINDS as _RUN_KINDS
from conilium.dirs import RunDir
from conilium.errors import ConiliumError
from conilium.evaluate.options import DEFAULT_DRAWS, DEFAULT_ROUNDS, LEVEL, METHODS, MIN_DRAWS, OTHER_MODES

from .common import (CONTEXT, GROUP_QUIET, POSITIVE_INT, SEED, Count, Group, check_corpus_arg,
                     describe_dir, dir_kind, fail, quiet_option, version_option)

_RUN = click.Path(file_okay=False, path_type=Path)


def _run_hint(run, kind: str) -> str:
    if kind.startswith("cache"):
        return f"train a head on it first (train-head --cache {run} --out RUN_DIR) and pass RUN_DIR"
    if kind == "corpus":
        return (f"train on it first (finetune-best --corpus {run} --out MODEL_DIR, or extract-features and "
                f"train-head) and pass that directory")
    if kind.endswith("unfinished"):
        return "finish its training first (finetune-best --resume for a model directory), then pass it again"
    if kind in ("grid", "runs"):
        return "pass the run directories inside it"
    return "pass a run directory written by train-head, finetune-best, tune-thresholds or ensemble"


def _check_runs(runs) -> None:
    """One line saying what a RUN argument is when it is another kind of directory (a cache, a
    corpus, a grid folder, an unfinished run), or when its config.json is damaged; before
    the library reads anything."""
    for run in runs:
        kind = dir_kind(run)
        if kind is not None and kind not in _RUN_KINDS:
            unlike = "" if kind.endswith("unfinished") else (", not a run directory (config.json and "
                                                              "predictions/<Split>.csv)")
            raise click.ClickException(f"{run} is {describe_dir(run)}{unlike}; {_run_hint(run, kind)}")
        config = RunDir(run).config_path
        if config.is_file():
            try:
                json.loads(config.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise click.ClickException(f"{config}: unreadable ({e}); the run directory {run} is damaged: "
                                           f"train it again, or restore config.json") from None


def _folds(ctx, param, k: int) -> int:
    if k == 1:
        raise click.BadParameter("1 fold is no cross-validation: give 0 to skip it, or at least 2", ctx, param)
    return k


def _weights(ctx, param, text):
    """``--weights`` as a list of finite, non-negative numbers with a positive sum (None: equal)."""
    if not text:
        return None
    try:
        w = [float(x) for x in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}", ctx, param) from None
    if not all(math.isfinite(x) and x >= 0 for x in w) or sum(w) <= 0:
        raise click.BadParameter(f"weights must be finite and non-negative with a positive sum, got {text!r}",
                                 ctx, param)
    return w


def _draws(ctx, param, n: int) -> int:
    """``--draws``: 0 (``metrics`` only: no intervals) or at least :data:`MIN_DRAWS`."""
    if 0 < n < MIN_DRAWS:
        raise click.BadParameter(f"{n} draws are too few for a 95 % percentile interval: give at least "
                                 f"{MIN_DRAWS}" + (", or 0 for none" if param.type.min == 0 else ""), ctx, param)
    return n


def _interval(v) -> str:
    return f"[{v['low']:.4f}, {v['high']:.4f}]"


def _clips(cache, corpus, runs, quiet=False):
    from conilium.evaluate.difficulty import default_cache, load_clips

    if cache is None and corpus is None:
        cache = default_cache(runs)
        if cache is None:
            raise click.UsageError("clip metadata needed: give --cache or --corpus (no run config records a cache)")
        if not quiet:
            click.echo(f"clip metadata from the runs' cache {cache}", err=True)
    return load_clips(cache=cache, corpus=corpus)


@click.group("eval", cls=Group, context_settings=CONTEXT,
             short_help="Run directories -> scores, thresholds, ensembles, reports.")
@quiet_option(GROUP_QUIET)
@version_option
def eval_group(quiet):
    """Evaluate run directories of train-head / finetune-best / predict (also installed as conilium-eval).

    \b
    metrics RUN                          scores, 95 % intervals, confusion matrix (CSV, PNG)
    compare A B                          paired bootstrap of B - A: interval, p-value
    tune-thresholds RUN OUT              offsets for macro-F1 (paper 3.7)
    ensemble RUN1 RUN2 ... --out OUT     mean probability or vote (3.6)
    stack RUN1 RUN2 ... --out OUT        learned meta-classifier, out-of-fold score
    easy-difficult RUN1 RUN2 ... --out DIR      Easy/Difficult (section 4)
    report SPEC.json --out DIR           our tables beside the paper's
    submission RUN --split Test3 --out submission.csv
    """


_QUIET = "Print nothing but errors."


def _echo(quiet: bool):
    """``click.echo``, or nothing under ``-q``."""
    return (lambda *args, **kwargs: None) if quiet else click.echo


@eval_group.command("metrics", context_settings=CONTEXT)
@click.argument("run", type=_RUN)
@click.option("--split", "splits", multiple=True,
              help="Split to score (repeatable). Default: every labelled split of the run.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write metrics.json, per_class.csv, confusion_percent.csv, confusion_counts.csv and "
                   "confusion.png per split into OUT/<Split>/ (default: RUN/evaluation/<Split>/).")
@click.option("--no-files", is_flag=True, help="Only print the scores.")
@click.option("--draws", type=Count(0), default=DEFAULT_DRAWS, show_default=True, callback=_draws,
              help="Bootstrap draws of the 95 % intervals (at least 1000); 0: no intervals.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the bootstrap draws.")
@quiet_option(_QUIET)
@version_option
def metrics_cmd(run, splits, out, no_files, draws, seed, quiet):
    """Macro/micro F1, per-class precision/recall/F1 and the confusion matrix (percent of each
    reference class, the paper's Figure 4) of a run's splits, with a 95 % bootstrap interval of
    each score (and of each attribute's CCC, for a run that predicts the attributes).

    Each interval (metrics.json: "bootstrap") is the 2.5th to 97.5th percentile of the score over
    --draws resamplings, with replacement, of the clips it counts (macro/micro-F1: clips whose
    reference is one of the eight classes; CCC: clips with a known reference of that attribute).
    """
    from conilium.evaluate.report import split_metrics
    from conilium.runs import has_references, read_run

    echo = _echo(quiet)
    _check_runs([run])
    try:
        if not splits:
            data = read_run(run)
            splits = [s for s, p in data.items() if has_references(p)]
            if not splits:
                raise click.ClickException(f"{run}: no labelled split to score (splits: {', '.join(data)})")
        for split in splits:
            target = None if no_files else (out or run / "evaluation") / split
            s = split_metrics(run, split, target)
            boot = None
            if draws:
                from conilium.evaluate.bootstrap import split_intervals

                boot = split_intervals(run, split, draws=draws, seed=seed, level=LEVEL)
                if target is not None:
                    RunDir(target).write_metrics({**RunDir(target).metrics(), "bootstrap": boot})
            ci = boot["scores"] if boot else {}
            macro = f"  {_interval(ci['f1_macro'])}" if "f1_macro" in ci else ""
            micro = f"  {_interval(ci['f1_micro'])}" if "f1_micro" in ci else ""
            echo(f"{split}: {s['n']} clips  macro-F1 {s['f1_macro']:.4f}{macro}  micro-F1 {s['f1_micro']:.4f}{micro}")
            for key, v in ci.items():
                if key.startswith("ccc_"):
                    echo(f"  CCC {key[4:]} {v['value']:.4f}  {_interval(v)}  ({v['n']} clips)")
            if boot:
                echo(f"  [95 % bootstrap intervals: {draws} draws, seed {seed}]")
            echo("  class  precision  recall     F1  support")
            for c, v in s["per_class"].items():
                echo(f"  {c:>5}  {v['precision']:9.3f}  {v['recall']:6.3f}  {v['f1']:5.3f}  {v['support']:7d}")
            if target is not None:
                echo(f"  written to {target}/")
    except ConiliumError as e:
        fail(e)


@eval_group.command("compare", context_settings=CONTEXT)
@click.argument("run_a", metavar="A", type=_RUN)
@click.argument("run_b", metavar="B", type=_RUN)
@click.option("--split", "splits", multiple=True,
              help="Split to compare (repeatable). Default: every labelled split both runs have.")
@click.option("--draws", type=Count(MIN_DRAWS), default=DEFAULT_DRAWS, show_default=True, callback=_draws,
              help="Paired bootstrap draws.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the bootstrap draws.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("compare.json"), show_default=True,
              help="JSON file to write (a name ending in .json), or a folder to write compare.json into.")
@quiet_option(_QUIET)
@version_option
def compare_cmd(run_a, run_b, splits, draws, seed, out, quiet):
    """Paired bootstrap of run B against run A over the same clips: macro-F1, micro-F1 and each
    attribute's CCC (those that both runs predict) of A and B, the difference B - A, its 95 %
    interval and a two-sided p-value.

    Both runs must have predicted the same clips of each split (the error says how many clips
    are in one run only, and names a few). Each draw resamples the clips once and scores both
    runs on the same resampled clips (macro/micro-F1: clips whose reference is one of the eight
    classes; CCC: clips with a known reference of that attribute). The interval is the 2.5th to
    97.5th percentile of the draws' differences. The p-value is the two-sided percentile-bootstrap
    one, p = min(1, 2 (1 + min(#{d <= 0}, #{d >= 0})) / (draws + 1)) over the draws' differences
    d: below 0.05 when the 95 % interval leaves 0 out; at least 2 / (draws + 1).

    \b
    Example:
      conilium-eval compare runs/bce-P runs/wbce-S --split Development --out results/compare.json
    """
    from conilium.evaluate.bootstrap import compare_runs
    from conilium.util import write_json

    _check_runs([run_a, run_b])
    target = out if out.suffix.lower() == ".json" and not out.is_dir() else out / "compare.json"
    try:
        result = compare_runs(run_a, run_b, splits=splits or None, draws=draws, seed=seed, level=LEVEL)
        write_json(target, result)
    except ConiliumError as e:
        fail(e)
    echo = _echo(quiet)
    echo(f"A: {run_a}\nB: {run_b}\n{draws} paired draws, seed {seed}; 95 % percentile intervals")
    for split, entry in result["splits"].items():
        echo(f"{split}: {entry['clips']} clips")
        echo(f"  {'score':<11} {'clips':>6} {'A':>7} {'B':>7} {'B - A':>8}  {'95 % interval':<18}  {'p':>6}")
        for key, v in entry["scores"].items():
            name = {"f1_macro": "macro-F1", "f1_micro": "micro-F1"}.get(key, key.replace("ccc_", "CCC "))
            echo(f"  {name:<11} {v['n']:6d} {v['a']:7.4f} {v['b']:7.4f} {v['difference']:+8.4f}  "
                 f"[{v['low']:+.4f}, {v['high']:+.4f}]  {v['p_value']:6.3f}")
        for line in entry["left_out"]:
            echo(f"  left out: {line}")
    if result["skipped_splits"]:
        echo(f"left out (not labelled in both runs): {', '.join(result['skipped_splits'])}")
    echo(f"written to {target}")


@eval_group.command("tune-thresholds", context_settings=CONTEXT)
@click.argument("run", type=_RUN)
@click.argument("out", type=_RUN)
@click.option("--tune-split", default="Development", show_default=True,
              help="Split whose macro-F1 the offsets maximise; they are applied unchanged to every split.")
@click.option("-k", "--folds", "k", type=Count(0), default=5, show_default=True, callback=_folds,
              help="Folds of the honest estimate (offsets fitted on K-1 folds of the tuning split, scored on "
                   "the held-out fold); 0 skips it.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the stratified folds.")
@click.option("--rounds", type=POSITIVE_INT, default=DEFAULT_ROUNDS, show_default=True,
              help="Coordinate-ascent rounds over the classes.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@quiet_option(_QUIET)
@version_option
def tune_thresholds_cmd(run, out, tune_split, k, seed, rounds, overwrite, quiet):
    """Adjust per-class decision offsets of RUN for macro-F1 (paper 3.7); write the tuned run to OUT.

    Prediction = argmax(probabilities + offsets). Offsets are chosen on --tune-split by
    coordinate ascent over -0.5..0.5 (step 0.01), never lowering its macro-F1. The tuning
    split's own score is optimistic; the K-fold figure is the one to trust.
    """
    from conilium.evaluate.thresholds import tune_run  # scikit-learn: only when run

    _check_runs([run])
    try:
        m = tune_run(run, out, tune_split=tune_split, k=k, seed=seed, rounds=rounds, overwrite=overwrite)
    except ConiliumError as e:
        fail(e)
    echo = _echo(quiet)
    echo("offsets: " + "  ".join(f"{c} {o:+.2f}" for c, o in m["offsets"].items()))
    for split, s in m["splits"].items():
        before = m["untuned"][split]
        echo(f"{split}: macro-F1 {before['f1_macro']:.4f} -> {s['f1_macro']:.4f}   "
             f"micro-F1 {before['f1_micro']:.4f} -> {s['f1_micro']:.4f}")
    cv = m.get("cross_validation")
    if cv:
        echo(f"{tune_split}, {cv['k']}-fold held-out estimate: macro-F1 {cv['f1_macro_untuned']:.4f} -> "
             f"{cv['f1_macro_pooled']:.4f} (per fold {cv['f1_macro_folds_mean']:.4f} ± "
             f"{cv['f1_macro_folds_sd']:.4f})")
    echo(f"tuned run written to {out}")


@eval_group.command("ensemble", context_settings=CONTEXT)
@click.argument("runs", nargs=-1, required=True, type=_RUN)
@click.option("--out", required=True, type=_RUN, help="Run directory to write.")
@click.option("--method", type=click.Choice(METHODS), default="mean", show_default=True,
              help="mean: argmax of the (weighted) mean probability; vote: majority vote of the runs' "
                   "predictions, ties broken by the mean probability.")
@click.option("--weights", default=None, callback=_weights,
              help="Comma-separated non-negative weights, one per run (default: equal).")
@click.option("--split", "splits", multiple=True,
              help="Split to combine (repeatable). Default: every split all runs have.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@quiet_option(_QUIET)
@version_option
def ensemble_cmd(runs, out, method, weights, splits, overwrite, quiet):
    """Combine two or more runs over the same clips into a new run directory (paper 3.6)."""
    from conilium.evaluate.ensemble import ensemble_runs

    _check_runs(runs)
    try:
        m = ensemble_runs(runs, out, method=method, weights=weights, splits=splits or None, overwrite=overwrite)
    except ConiliumError as e:
        fail(e)
    echo = _echo(quiet)
    for split, s in m["splits"].items():
        members = "  ".join(f"{Path(r).name} {v[split]['f1_macro']:.4f}" for r, v in m["members"].items())
        echo(f"{split}: ensemble macro-F1 {s['f1_macro']:.4f} micro-F1 {s['f1_micro']:.4f}  (members: {members})")
    if m["skipped_splits"]:
        echo(f"left out (not in every run): {', '.join(m['skipped_splits'])}")
    echo(f"ensemble written to {out}")


def _soup(ctx, param, n: int) -> int:
    if n == 1:
        raise click.BadParameter("1 fit is no soup: give 0 for a single fit, or at least 2", ctx, param)
    return n


@eval_group.command("stack", context_settings=CONTEXT)
@click.argument("runs", nargs=-1, required=True, type=_RUN)
@click.option("--out", required=True, type=_RUN, help="Run directory to write.")
@click.option("--fit-split", default="Development", show_default=True,
              help="Split the meta-classifier is fitted on (its labelled clips).")
@click.option("--folds", type=Count(2), default=5, show_default=True,
              help="Stratified folds of the out-of-fold estimate on --fit-split.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the folds and the soup's resamples.")
@click.option("--weights-only", is_flag=True,
              help="Learn one non-negative weight per run (non-negative least squares of the one-hot reference "
                   "on the runs' probabilities) instead of a logistic regression over all their columns.")
@click.option("--balanced", is_flag=True, help="Weigh the fit's clips by inverse class frequency (for macro-F1).")
@click.option("--soup", type=Count(0), default=0, show_default=True, callback=_soup,
              help="Average the coefficients of N fits on stratified bootstrap resamples (0: one fit).")
@click.option("--split", "splits", multiple=True,
              help="Split to predict (repeatable). Default: every split all runs have.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@quiet_option(_QUIET)
@version_option
def stack_cmd(runs, out, fit_split, folds, seed, weights_only, balanced, soup, splits, overwrite, quiet):
    """Stack two or more runs over the same clips: a meta-classifier (scikit-learn logistic
    regression) on their concatenated class probabilities, fitted on --fit-split's labelled
    clips and applied to every split, written as a new run directory.

    The --fit-split predictions written (and scored) are out-of-fold: each clip is predicted
    by a model fitted on the other folds only. The in-sample score of the model fitted on all
    of --fit-split, the one applied to the other splits, is printed beside it.

    \b
    Example:
      conilium-eval stack runs/a runs/b runs/c --out runs/stack --balanced --soup 10
    """
    from conilium.evaluate.stack import stack_runs  # scikit-learn: only when run

    _check_runs(runs)
    try:
        m = stack_runs(runs, out, fit_split=fit_split, folds=folds, seed=seed, weights_only=weights_only,
                       balanced=balanced, soup=soup, splits=splits or None, overwrite=overwrite)
    except ConiliumError as e:
        fail(e)
    echo = _echo(quiet)
    cv = m["cross_fitting"]
    for split, s in m["splits"].items():
        members = "  ".join(f"{Path(r).name} {v[split]['f1_macro']:.4f}" for r, v in m["members"].items())
        honest = (f" out-of-fold ({cv['folds']} folds; in-sample {cv['f1_macro_in_sample']:.4f})"
                  if split == fit_split else "")
        echo(f"{split}: stacked macro-F1 {s['f1_macro']:.4f}{honest} micro-F1 {s['f1_micro']:.4f}  "
             f"(members: {members})")
    model = m["model"]
    if model["type"] == "weights":
        echo("run weights: " + "  ".join(f"{Path(r).name} {w:.3f}" for r, w in model["weights"].items()))
    else:
        echo(f"logistic regression over {len(model['features'])} columns, {len(model['classes'])} classes"
             + (f", coefficients averaged over {soup} fits" if soup else ""))
    if m["skipped_splits"]:
        echo(f"left out (not in every run): {', '.join(m['skipped_splits'])}")
    echo(f"stacked run written to {out}")


@eval_group.command("easy-difficult", context_settings=CONTEXT)
@click.argument("runs", nargs=-1, required=True, type=_RUN)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for easy_difficult.json, easy_difficult.md and clips.csv.")
@click.option("--split", default="Development", show_default=True)
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Feature cache whose clips.json gives annotations, durations, speakers and genders "
                   "(default: the cache recorded in the runs' config.json).")
@click.option("--corpus", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Corpus root to read the same metadata from instead of a cache.")
@click.option("--other", type=click.Choice(OTHER_MODES), default="category", show_default=True,
              help="Primaries outside the eight classes (Other) in Krippendorff's alpha: a ninth category, "
                   "or excluded.")
@quiet_option(_QUIET)
@version_option
def easy_difficult_cmd(runs, out, split, cache, corpus, other, quiet):
    """Easy (all runs right) and Difficult (all wrong) clips of two or more runs (paper section 4):
    counts, durations, Krippendorff's alpha, Easy/Difficult speakers and genders."""
    from conilium.evaluate.difficulty import easy_difficult, write_outputs

    if cache is not None and corpus is not None:
        raise click.UsageError("give --cache or --corpus, not both")
    _check_runs(runs)
    if corpus is not None:
        check_corpus_arg(corpus)
    try:
        clips = _clips(cache, corpus, runs, quiet)
        result = easy_difficult(runs, clips, split=split, other=other)
        files = write_outputs(result, out)
    except ConiliumError as e:
        fail(e)
    if quiet:
        return
    g = result["groups"]
    for key in ("easy", "difficult", "mixed"):
        x = g[key]
        alpha = "—" if x["alpha"] is None else f"{x['alpha']:.3f}"
        dur = "—" if x["duration"]["mean"] is None else f"{x['duration']['mean']:.2f} s"
        click.echo(f"{key:>9}: {x['clips']:6d} clips ({100 * x['share']:.1f}%)  duration {dur}  alpha {alpha}")
    click.echo(f"written to {files['markdown']} and {files['json']}")


@eval_group.command("report", context_settings=CONTEXT)
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Report folder: REPORT.md, report.json and figures/.")
@click.option("--title", default=None, help="Title (default: the spec's 'title').")
@quiet_option(_QUIET)
@version_option
def report_cmd(spec, out, title, quiet):
    """Our tables beside the paper's (Tables 1-4, sections 3.4 and 3.6) from a JSON SPEC mapping
    each table's rows to run directories, and an "attributes" table of train-head --task
    attributes/joint runs (Development CCC of arousal, valence, dominance), written to
    OUT/REPORT.md with its figures. Every score comes with its 95 % bootstrap interval, and
    each of the paper's findings that compares two of our rows is "not resolved" when the
    paired bootstrap interval of their difference contains 0 (SPEC keys "bootstrap_draws",
    default 2000, and "bootstrap_seed", default 0). Every key of the SPEC:
    docs/REPORT_SPEC.md. Example:

    \b
    {"title": "...", "corpus_figures": "describe-out",
     "tables": {"table1": {"WavLM-large": "runs/wavlm"},
                "table4": {"dev": "runs/best-tuned", "test": {"run": "runs/best-tuned", "split": "Test1"}}},
     "easy_difficult": "easy-out"}
    """
    from conilium.evaluate.report import build_report  # matplotlib: only when run

    try:
        path = build_report(spec, out, title=title)
    except ConiliumError as e:
        fail(e)
    _echo(quiet)(f"report written to {path}")


@eval_group.command("submission", context_settings=CONTEXT)
@click.argument("run", type=_RUN)
@click.option("--split", default="Test3", show_default=True, help="Split to export.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="CSV to write (FileName,EmoClass).")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Check that the predictions cover exactly this cache's clips of the split.")
@click.option("--corpus", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Check that the predictions cover exactly this corpus's clips of the split.")
@quiet_option(_QUIET)
@version_option
def submission_cmd(run, split, out, cache, corpus, quiet):
    """Write a challenge-style CSV (FileName,EmoClass) of RUN's predictions for a split."""
    from conilium.evaluate.difficulty import load_clips
    from conilium.evaluate.submission import write_submission

    if cache is not None and corpus is not None:
        raise click.UsageError("give --cache or --corpus, not both")
    _check_runs([run])
    if corpus is not None:
        check_corpus_arg(corpus)
    try:
        clips = None if cache is None and corpus is None else load_clips(cache=cache, corpus=corpus)
        n = write_submission(run, out, split=split, clips=clips)
    except ConiliumError as e:
        fail(e)
    _echo(quiet)(f"{n} predictions of {split} written to {out}")


if __name__ == "__main__":  # pragma: no cover
    eval_group()

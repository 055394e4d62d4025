"""``conilium heads``: ``train`` (alias ``train-head``) and ``grid`` (alias ``train-grid``), thin
layers over :mod:`conilium.heads`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from conilium.errors import ConfigError, ConiliumError
from conilium.heads.config import BACKENDS, STACK_MODES, TrainConfig, presets

from .common import (CONTEXT, GROUP_QUIET, POSITIVE_INT, Command, Group, fail, lock_wait, quiet_option,
                     refuse_dir, version_option, wait_for_lock_option)
from .options import config_from_command, config_options, parse_sets


@click.command(cls=Command, context_settings=CONTEXT)
@click.option("--cache", "cache", type=click.Path(file_okay=False, path_type=Path), multiple=True,
              help="Feature cache directory written by extract-features (required, unless --config names one). "
                   "Repeated (an audio cache, then a text cache of the same clips): a fusion head, one pooling "
                   "branch per cache (its own layer weights; --layers selects the first cache's), their pooled "
                   "vectors concatenated into the classifier; the first cache is the primary (its splits and "
                   "labels).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run directory to write (config.json, model.pt, metrics.json, predictions/<Split>.csv).")
@config_options(TrainConfig)
@click.option("--overwrite", is_flag=True, help="Replace a complete run already in --out.")
@wait_for_lock_option("the run directory")
@quiet_option("No progress bars.")
@version_option
def train_head_cmd(cache, out, overwrite, wait_for_lock, quiet, **options):
    """Train a pooling head on a feature cache and write a run directory.

    \b
    Examples:
      train-head --cache cache/wavlm-large --loss wbce --labels S --out runs/wbce-S
      train-head --cache cache/wavlm-large --task attributes --out runs/avd
      train-head --cache cache/wavlm-large --task joint --attribute-weight 0.5 --out runs/wbce-S-avd
      train-head --cache cache/wavlm-large --labels S --train-on-xo --out runs/wbce-S-xo
      train-head --cache cache/wavlm-large --cache cache/roberta-large --out runs/wbce-S-fusion
      train-head --config runs/wbce-S/config.json --set seed=1 --out runs/wbce-S-seed1

    The best epoch is kept: by development macro-F1 (--task categories, joint) or by
    development mean CCC of arousal, valence and dominance (--task attributes).
    metrics.json holds its scores on every labelled split, predictions/<Split>.csv its
    class scores (and EmoAct, EmoVal, EmoDom on the 1-7 scale) on every split.
    """
    from conilium.heads.train import finished_run, train_head  # torch, h5py: only when run

    refuse_dir(out, "a train-head run directory", "choose a new or empty directory for --out (runs/<name>, say)",
               accept=("run", "run-unfinished", "empty"))
    try:
        given = {"cache": cache[0], "more_caches": list(cache[1:])} if cache else {}
        config = config_from_command(TrainConfig, options, given=given, required=("cache",))
        done = None if overwrite else finished_run(config, out)
        m = done if done is not None else train_head(config, out, overwrite=overwrite, progress=not quiet,
                                                     wait_for_lock=lock_wait(wait_for_lock))
    except ConiliumError as e:
        fail(e)
    click.echo(summary_line(m, out) + ("" if done is None else " (complete already with these options: nothing "
                                                                "trained; --overwrite trains it again)"))


def summary_line(m: dict, out) -> str:
    """train-head's one-line summary of a run's metrics."""
    parts = []
    if "f1_macro" in m:
        parts.append(f"{m['split']} macro-F1 {m['f1_macro']:.4f}, micro-F1 {m['f1_micro']:.4f}")
    attrs = (m.get("attributes") or {}).get(m.get("attributes_split") or "")
    if attrs:
        each = ", ".join(f"{k} {attrs[k]['ccc']:.3f}" for k in ("EmoAct", "EmoVal", "EmoDom")
                         if attrs[k]["ccc"] is not None)
        parts.append(f"{m['attributes_split']} CCC mean {attrs['ccc_mean']:.4f} ({each})")
    line = "; ".join(parts) + f" at epoch {m['best_epoch']} of {len(m['history'])}"
    xo = (m.get("training") or {}).get("xo")
    if xo:
        line += (f"; trained on {xo['added_X']} X and {xo['added_O']} O clip(s) too "
                 f"({xo['left_out_no_target_label']} left out: no target-class label)")
    return line + f"; run written to {out}"


@click.command(cls=Command, context_settings=CONTEXT)
@click.option("--spec", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Grid spec JSON: {'common': {...}, 'runs': [{'name': ..., ...}], 'product': {...}}.")
@click.option("--preset", type=click.Choice(presets() or ["table2"]),
              help="A ready spec from heads/specs/: table2 (losses x targets), sampler (section 3.4), "
                   "table3 (P*/S* subsets).")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path),
              help="Feature cache for every run (replaces the spec's 'cache').")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder of the grid: one run directory per run, results.csv, results.md. In results.csv, "
                   "pass_seconds is the wall time of the data pass that trained a run (shared by the runs of "
                   "pass number 'pass'), seconds the run's equal share of it.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a training option for every run, e.g. --set epochs=10 --set device=cpu (repeatable).")
@click.option("--n-jobs", type=POSITIVE_INT, default=1, show_default=True, help="Runs trained at the same time.")
@click.option("--seeds", default=None, metavar="S1,S2,...",
              help="Train every configuration once per seed (runs <name>-seed<S>); results.md and seeds.csv "
                   "add each configuration's mean and standard deviation over its seeds. Replaces the spec's "
                   "'seeds'; not with --set seed=.")
@click.option("--backend", type=click.Choice(BACKENDS), default="loky", show_default=True,
              help="Where the runs train: loky (local processes), threading, dask or ray (a cluster, or a "
                   "local one; pip install conilium[cluster]). Cluster workers must see --cache and --out "
                   "at the same absolute paths.")
@click.option("--address", default=None,
              help="dask scheduler (tcp://host:8786) or ray cluster (host:6379, or auto) address "
                   "(default: start a local one for the grid).")
@click.option("--stack-heads", type=click.Choice(STACK_MODES), default=None,
              help="Compute the heads of a data pass as one stacked module (their weights stacked, one kernel "
                   "per layer for all of them, one optimiser step) when they share an architecture, learning "
                   "rate and weight decay and use neither --mixup nor --aux. auto (the default): on CUDA, "
                   "where it removes most of the per-head overhead of a step. Each head then matches its "
                   "own train-head run to float32 rounding, not bitwise; metrics.json records it.")
@click.option("--threads-per-job", type=POSITIVE_INT, default=None,
              help="torch CPU threads of each run (default: CPU cores / --n-jobs).")
@click.option("--dry-run", is_flag=True, help="List the runs and exit.")
@quiet_option("No progress bar.")
@version_option
def train_grid_cmd(spec, preset, cache, out, sets, n_jobs, seeds, backend, address, stack_heads, threads_per_job,
                   dry_run, quiet):
    """Train many heads from one spec, in parallel, and write a results table.

    \b
    Examples:
      train-grid --preset table2 --cache cache/wavlm-large --out runs/table2 --n-jobs 4
      train-grid --spec my-grid.json --out runs/grid --set epochs=10
      train-grid --preset table2 --cache cache/wavlm-large --out runs/table2-seeds --seeds 0,1,2
      train-grid --preset table2 --cache /shared/cache/wavlm-large --out /shared/runs/table2 \
          --backend dask --address tcp://scheduler:8786 --n-jobs 8

    Runs whose directory is already complete (same configuration) are not trained again,
    so an interrupted grid resumes (a run whose metrics.json or config.json is damaged is
    trained again). The command fails when any run failed; the table
    then names the error.
    """
    from conilium.dirs import check_cache_dir
    from conilium.heads.grid import expand_spec, load_spec, run_grid  # torch, h5py: only when run

    try:
        if cache is not None:  # another kind of directory: one error now, not one per run of the grid
            check_cache_dir(cache)
        overrides = parse_sets(sets)
        if stack_heads is not None:
            if "stack_heads" in overrides:
                raise ConfigError("--stack-heads and --set stack_heads=... both name it: give one of them")
            overrides["stack_heads"] = stack_heads
        runs = expand_spec(load_spec(spec, preset=preset), cache=cache, overrides=overrides, seeds=seeds)
        if dry_run:
            for name, config, _ in runs:
                click.echo(f"{name}: {json.dumps(config.to_json())}")
            return
        rows = run_grid(runs, out, n_jobs=n_jobs, backend=backend, address=address,
                        threads_per_job=threads_per_job, progress=not quiet)
    except ConiliumError as e:
        fail(e)
    click.echo((Path(out) / "results.md").read_text(encoding="utf-8"))
    failed = [r["name"] for r in rows if r["status"] == "failed"]
    if failed:
        raise click.ClickException(f"{len(failed)} run(s) failed: {', '.join(failed)} (see {Path(out) / 'results.csv'})")
    click.echo(f"results written to {Path(out) / 'results.csv'} and {Path(out) / 'results.md'}")


@click.group("heads", cls=Group, context_settings=CONTEXT,
             short_help="Feature cache -> head runs (stage 2), one or a grid.")
@quiet_option(GROUP_QUIET)
@version_option
def heads_group(quiet):
    """Stage 2: train pooling heads on a feature cache, one run or a grid of them.

    \b
      train   feature cache -> one run directory      (also installed as train-head)
      grid    feature cache -> many runs, a table     (also installed as train-grid)
    """


heads_group.add_command(train_head_cmd, "train")
heads_group.add_command(train_grid_cmd, "grid")

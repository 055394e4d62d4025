"""``conilium heads``: ``train`` (alias ``train-head``) and ``grid`` (alias ``train-grid``), thin
layers over :mod:`conilium.heads`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from conilium.errors import ConiliumError
from conilium.heads.config import BACKENDS, LOSS_PROPERTIES, TASKS, TrainConfig, presets

from .common import (CONTEXT, DROPOUT, GROUP_QUIET, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, SEED,
                     Group, Number, fail, lock_wait, quiet_option, refuse_dir, version_option, wait_for_lock_option)

_DEFAULTS = TrainConfig(cache="")


@click.command(context_settings=CONTEXT)
@click.option("--cache", "cache", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Feature cache directory written by extract-features.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run directory to write (config.json, model.pt, metrics.json, predictions/<Split>.csv).")
@click.option("--loss", type=click.Choice(list(LOSS_PROPERTIES)), default=_DEFAULTS.loss, show_default=True,
              help="wce: weighted cross-entropy (hard labels only); bce/wbce: (weighted) binary cross-entropy; "
                   "kld: Kullback-Leibler divergence; focal: class-weighted focal loss.")
@click.option("--labels", type=click.Choice(["hard", "P", "S", "P*", "S*"]), default=_DEFAULTS.labels,
              show_default=True,
              help="Training targets: hard (consensus one-hot), P (share of primaries), S (share of primary + "
                   "secondary labels), P*/S* (P/S on high-agreement training clips only).")
@click.option("--pooling", type=click.Choice(["attentive", "mean"]), default=_DEFAULTS.pooling, show_default=True,
              help="Frame pooling: attentive statistics (challenge baseline) or plain mean.")
@click.option("--layers", default="weighted", show_default=True,
              help="'weighted' (learnable softmax mix of the stored layers) or one upstream layer number "
                   "(0 = CNN output, -1 = last stored layer).")
@click.option("--pooled-stats", is_flag=True,
              help="Train on the cache's per-layer utterance mean+std instead of frames (fast layer probing; "
                   "needs a cache extracted with --pooled-stats; --pooling is then unused).")
@click.option("--sampler", type=click.Choice(["none", "balanced"]), default="none", show_default=True,
              help="balanced: draw each training clip with weight 1/f(its class), with replacement; the loss's "
                   "class weights are then off.")
@click.option("--lr", type=POSITIVE, default=_DEFAULTS.lr, show_default=True, help="AdamW learning rate.")
@click.option("--weight-decay", type=NON_NEGATIVE, default=_DEFAULTS.weight_decay, show_default=True)
@click.option("--batch-size", type=POSITIVE_INT, default=_DEFAULTS.batch_size, show_default=True)
@click.option("--epochs", type=POSITIVE_INT, default=_DEFAULTS.epochs, show_default=True,
              help="Maximum number of epochs; the best epoch by development macro-F1 is kept.")
@click.option("--patience", type=POSITIVE_INT, default=None,
              help="Stop after this many epochs without a better development macro-F1 (default: never).")
@click.option("--seed", type=SEED, default=_DEFAULTS.seed, show_default=True,
              help="Same seed, same cache, same options: the same metrics (on CPU).")
@click.option("--p-threshold", type=Number(0, 1, open_min=True), default=_DEFAULTS.p_threshold, show_default=True,
              help="--labels P*: keep training clips whose top primary share reaches this.")
@click.option("--s-threshold", type=Number(0, 1, open_min=True), default=_DEFAULTS.s_threshold, show_default=True,
              help="--labels S*: keep training clips whose top perceived-label share reaches this.")
@click.option("--agreement-over", type=click.Choice(["all", "targets"]), default=_DEFAULTS.agreement_over,
              show_default=True,
              help="--labels P*/S*: the agreement share over all annotators' labels, Other included (all: the "
                   "paper's wording), or over target-class labels only (targets).")
@click.option("--task", type=click.Choice(list(TASKS)), default=_DEFAULTS.task, show_default=True,
              help="categories: the eight classes (best epoch by development macro-F1); attributes: arousal, "
                   "valence, dominance only, CCC loss, on every Train clip with attribute values, X and O included "
                   "(best epoch by development mean CCC; --loss/--labels unused); joint: the categories loss + "
                   "--attribute-weight x the CCC loss (best epoch by development macro-F1).")
@click.option("--attribute-weight", type=NON_NEGATIVE, default=_DEFAULTS.attribute_weight, show_default=True,
              help="--task joint: weight of the CCC loss (1 - mean CCC) added to the categories loss.")
@click.option("--train-on-xo", is_flag=True,
              help="Soft targets (--labels P, S, P*, S*): train on X (no agreement) and O (other) clips too, on "
                   "their annotators' target-class labels; clips with none stay out; never scored.")
@click.option("--hidden", type=POSITIVE_INT, default=_DEFAULTS.hidden, show_default=True,
              help="Classifier hidden width.")
@click.option("--dropout", type=DROPOUT, default=_DEFAULTS.dropout, show_default=True)
@click.option("--train-split", default=_DEFAULTS.train_split, show_default=True)
@click.option("--dev-split", default=_DEFAULTS.dev_split, show_default=True,
              help="Split that selects the best epoch (all its scoreable clips are scored).")
@click.option("--device", default=_DEFAULTS.device, show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--num-workers", type=NON_NEGATIVE_INT, default=_DEFAULTS.num_workers, show_default=True,
              help="DataLoader worker processes reading the shards when streaming (not preloaded); "
                   "on a GPU, 4 workers about doubled the streaming rate in bench/bench_heads.py.")
@click.option("--preload", type=click.Choice(["auto", "yes", "no"]), default=_DEFAULTS.preload, show_default=True,
              help="Keep the selected Train/Development features in memory; auto: when they fit "
                   "--preload-budget-gb, else stream them from the shards (bounded memory).")
@click.option("--preload-budget-gb", type=NON_NEGATIVE, default=_DEFAULTS.preload_budget_gb, show_default=True)
@click.option("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads (default: torch's choice).")
@click.option("--overwrite", is_flag=True, help="Replace a complete run already in --out.")
@wait_for_lock_option("the run directory")
@quiet_option("No progress bars.")
@version_option
def train_head_cmd(cache, out, loss, labels, pooling, layers, pooled_stats, sampler, lr, weight_decay, batch_size,
                   epochs, patience, seed, p_threshold, s_threshold, agreement_over, task, attribute_weight,
                   train_on_xo, hidden, dropout, train_split, dev_split, device, num_workers, preload,
                   preload_budget_gb, threads, overwrite, wait_for_lock, quiet):
    """Train a pooling head on a feature cache and write a run directory.

    \b
    Examples:
      train-head --cache cache/wavlm-large --loss wbce --labels S --out runs/wbce-S
      train-head --cache cache/wavlm-large --task attributes --out runs/avd
      train-head --cache cache/wavlm-large --task joint --attribute-weight 0.5 --out runs/wbce-S-avd
      train-head --cache cache/wavlm-large --labels S --train-on-xo --out runs/wbce-S-xo

    The best epoch is kept: by development macro-F1 (--task categories, joint) or by
    development mean CCC of arousal, valence and dominance (--task attributes).
    metrics.json holds its scores on every labelled split, predictions/<Split>.csv its
    class scores (and EmoAct, EmoVal, EmoDom on the 1-7 scale) on every split.
    """
    from conilium.heads.data import parse_layers
    from conilium.heads.train import train_head  # torch, h5py: only when run

    refuse_dir(out, "a train-head run directory", "choose a new or empty directory for --out (runs/<name>, say)",
               accept=("run", "run-unfinished", "empty"))
    try:
        config = TrainConfig(cache=str(cache), loss=loss, labels=labels, pooling=pooling, layers=parse_layers(layers),
                             pooled_stats=pooled_stats, sampler=None if sampler == "none" else sampler, lr=lr,
                             weight_decay=weight_decay, batch_size=batch_size, epochs=epochs, patience=patience,
                             seed=seed, p_threshold=p_threshold, s_threshold=s_threshold,
                             agreement_over=agreement_over, task=task, attribute_weight=attribute_weight,
                             train_on_xo=train_on_xo, hidden=hidden,
                             dropout=dropout, train_split=train_split, dev_split=dev_split, num_workers=num_workers,
                             device=device, preload=preload, preload_budget_gb=preload_budget_gb, threads=threads)
        m = train_head(config, out, overwrite=overwrite, progress=not quiet, wait_for_lock=lock_wait(wait_for_lock))
    except ConiliumError as e:
        fail(e)
    click.echo(summary_line(m, out))


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


def _parse_set(values):
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--set")
        try:
            out[key.strip().replace("-", "_")] = json.loads(value)
        except ValueError:
            out[key.strip().replace("-", "_")] = value
    return out


@click.command(context_settings=CONTEXT)
@click.option("--spec", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Grid spec JSON: {'common': {...}, 'runs': [{'name': ..., ...}], 'product': {...}}.")
@click.option("--preset", type=click.Choice(presets() or ["table2"]),
              help="A ready spec from heads/specs/: table2 (losses x targets), sampler (section 3.4), "
                   "table3 (P*/S* subsets).")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path),
              help="Feature cache for every run (replaces the spec's 'cache').")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder of the grid: one run directory per run, results.csv, results.md.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a training option for every run, e.g. --set epochs=10 --set device=cpu (repeatable).")
@click.option("--n-jobs", type=POSITIVE_INT, default=1, show_default=True, help="Runs trained at the same time.")
@click.option("--backend", type=click.Choice(BACKENDS), default="loky", show_default=True,
              help="Where the runs train: loky (local processes), threading, dask or ray (a cluster, or a "
                   "local one; pip install conilium[cluster]). Cluster workers must see --cache and --out "
                   "at the same absolute paths.")
@click.option("--address", default=None,
              help="dask scheduler (tcp://host:8786) or ray cluster (host:6379, or auto) address "
                   "(default: start a local one for the grid).")
@click.option("--threads-per-job", type=POSITIVE_INT, default=None,
              help="torch CPU threads of each run (default: CPU cores / --n-jobs).")
@click.option("--dry-run", is_flag=True, help="List the runs and exit.")
@quiet_option("No progress bar.")
@version_option
def train_grid_cmd(spec, preset, cache, out, sets, n_jobs, backend, address, threads_per_job, dry_run, quiet):
    """Train many heads from one spec, in parallel, and write a results table.

    \b
    Examples:
      train-grid --preset table2 --cache cache/wavlm-large --out runs/table2 --n-jobs 4
      train-grid --spec my-grid.json --out runs/grid --set epochs=10
      train-grid --preset table2 --cache /shared/cache/wavlm-large --out /shared/runs/table2 \
          --backend dask --address tcp://scheduler:8786 --n-jobs 8

    Runs whose directory is already complete (same configuration) are not trained again,
    so an interrupted grid resumes. The command fails when any run failed; the table
    then names the error.
    """
    from conilium.cache.store import check_cache_dir
    from conilium.heads.grid import expand_spec, load_spec, run_grid  # torch, h5py: only when run

    try:
        if cache is not None:  # another kind of directory: one error now, not one per run of the grid
            check_cache_dir(cache)
        runs = expand_spec(load_spec(spec, preset=preset), cache=cache, overrides=_parse_set(sets))
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

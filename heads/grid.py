"""train-grid: many head configurations from one spec, in parallel, into one results table.

A spec is a JSON object::

    {
      "description": "the paper's Table 2",
      "common":  {"epochs": 40, "pooling": "attentive"},          # any TrainConfig field
      "runs":    [{"name": "wce", "loss": "wce", "labels": "hard",
                   "paper": {"f1_macro": 0.302, "f1_micro": 0.402}}, ...],
      "product": {"loss": ["wbce", "kld"], "labels": ["P", "S"]}  # optional: every combination
    }

``runs`` and ``product`` may be used alone or together; a product run is named after
its values (``wbce-P``); an optional ``paper`` entry of a run holds the published scores,
shown beside ours. ``cache`` may be given in ``common`` or on the command line (which
wins). Each run is trained into ``OUT/<name>``; a run whose directory is already
complete with the same configuration is not trained again, so an interrupted grid
resumes where it stopped (a run whose ``metrics.json`` or ``config.json`` is damaged is
trained again). ``OUT/results.csv`` and ``OUT/results.md`` list every run; in results.csv,
``pass`` is the data pass that trained the run (its number in grid.json's ``passes``, from
1), ``pass_seconds`` that pass's wall time, shared by the runs trained in it, and
``seconds`` the run's equal share of it (empty for a run complete before the grid ran).

Ready specs for the paper live in the repository's ``heads/specs/`` folder (read from
the source tree, not installed as package data): ``table2.json`` (losses × targets),
``sampler.json`` (the class-balanced sampler runs of section 3.4) and ``table3.json``
(the high-agreement subsets P*, S*); ``--preset NAME`` loads them.

Runs that read the same batches (same cache, input, training clips and clip order:
:func:`conilium.heads.train.pass_key`) are trained in **one data pass**: each batch is read
and collated once and fed to every head of the group, and the Development scoring and the
final predictions read each batch once for all of them; every run still gets exactly the
files its own ``train-head`` writes. On the paper's presets (every run on one cache, seed
and batch size): ``table2`` is one pass of 5 heads (hard, P and S keep the same clips, no
sampler); ``sampler`` two, the 2 runs without the sampler and the 4 with it (its draws
depend on the clips' consensus classes only, the same for P and S); ``table3`` four, as
P* and S* keep different clips and the sampler changes the order. ``grid.json`` lists the
passes.

The passes are the parallel jobs: ``loky`` (local processes, through joblib, the default)
or ``threading``; ``dask`` (a ``dask.distributed`` scheduler at ``address``, or a
``LocalCluster`` started for the grid) or ``ray`` (the ray cluster at ``address``, or a local
ray) when those packages are installed (``pip install conilium[cluster]``; they are not
dependencies of conilium). A cluster's workers must see the cache and the output folder
at the same paths (a shared file system); the grid sends them absolute paths, and every
run's ``config.json`` records its cache as an absolute path.

A local worker process dies with the grid: it watches its parent, and when the grid's
process is gone (killed, even with SIGKILL) it stops its runs as Ctrl-C would (their locks
released, their temporary files removed) and exits, so that a rerun finds the run
directories free.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import os
import re
import signal
import socket
import threading
import time
import traceback
from pathlib import Path
from dataclasses import replace
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from tqdm import tqdm

from conilium.dirs import GridDir, RunDir
from conilium.errors import ConfigError, ConiliumError
from conilium.locking import LOCK_FILE, STOP_SIGNALS, read_holder, stop_on_signals
from conilium.util import atomic_path, read_json_object

from .config import BACKENDS, SPEC_DIR, presets
from .train import TrainConfig, check_config, plan_passes, same_run, train_heads

_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$")
_SPEC_KEYS = {"description", "common", "runs", "product"}

RESULT_COLUMNS = ("name", "status", "loss", "labels", "task", "sampler", "pooling", "layers", "pooled_stats",
                  "train_clips", "f1_macro", "f1_micro", "ccc_mean", "best_epoch", "paper_f1_macro", "paper_f1_micro",
                  "seconds", "pass", "pass_seconds", "error")


def load_spec(path=None, *, preset: Optional[str] = None) -> dict:
    """Read a spec file, or the preset ``heads/specs/<preset>.json``."""
    if (path is None) == (preset is None):
        raise ConfigError("give a spec file (--spec) or a preset (--preset), not both or neither")
    if preset is not None:
        path = SPEC_DIR / f"{preset}.json"
        if not path.is_file():
            raise ConfigError(f"unknown preset {preset!r}; presets (in {SPEC_DIR}): {', '.join(presets()) or 'none'}")
    return read_json_object(path, "grid spec (a JSON object with 'common', 'runs' and/or 'product')")


def _product_name(values: Mapping) -> str:
    parts = []
    for k, v in values.items():
        text = str(v).replace("*", "star")
        parts.append(text if k in ("loss", "labels", "pooling", "sampler") else f"{k}={text}")
    return "-".join(parts)


def expand_spec(spec: Mapping, *, cache=None, overrides: Optional[Mapping] = None) -> List[Tuple[str, TrainConfig, dict]]:
    """The runs of a spec as ``(name, TrainConfig, paper scores)``, in order; every config is checked.

    ``cache`` replaces the spec's cache; ``overrides`` (e.g. ``{"epochs": 5}``) apply to
    every run, after the spec's own settings.
    """
    unknown = sorted(set(spec) - _SPEC_KEYS)
    if unknown:
        raise ConfigError(f"spec: unknown key(s) {', '.join(unknown)}; expected {', '.join(sorted(_SPEC_KEYS))}")
    common = dict(spec.get("common") or {})
    entries: List[dict] = []
    for i, run in enumerate(spec.get("runs") or []):
        if not isinstance(run, dict) or "name" not in run:
            raise ConfigError(f"spec: runs[{i}] must be an object with a 'name'")
        entries.append(dict(run))
    product = spec.get("product") or {}
    if product:
        keys = list(product)
        for k in keys:
            if not isinstance(product[k], list) or not product[k]:
                raise ConfigError(f"spec: product.{k} must be a non-empty list of values")
        for combo in itertools.product(*(product[k] for k in keys)):
            values = dict(zip(keys, combo))
            entries.append(dict(values, name=_product_name(values)))
    if not entries:
        raise ConfigError("spec: no run (give 'runs' and/or 'product')")
    out, seen = [], set()
    for e in entries:
        name = str(e.pop("name"))
        paper = e.pop("paper", None) or {}
        if not _NAME_OK.match(name):
            raise ConfigError(f"spec: run name {name!r} must be letters, digits and _ . + = - (it names a folder)")
        if name in seen:
            raise ConfigError(f"spec: run name {name!r} appears twice")
        seen.add(name)
        settings = dict(common)
        settings.update(e)
        settings.update(overrides or {})
        if cache is not None:
            settings["cache"] = str(cache)
        if "cache" not in settings:
            raise ConfigError("no cache: give --cache or 'cache' in the spec's 'common' settings")
        try:
            config = TrainConfig.from_dict(settings)
        except TypeError as err:
            raise ConfigError(f"spec: run {name}: {err}") from None
        except ConfigError as err:
            raise ConfigError(f"spec: run {name}: {err}") from None
        try:
            check_config(config)
        except ConfigError as err:
            raise ConfigError(f"spec: run {name}: {err}") from None
        out.append((name, config, dict(paper)))
    return out


def _row(name: str, config: TrainConfig, paper: Mapping, status: str, metrics: Optional[Mapping] = None,
         seconds: Optional[float] = None, error: str = "", heads: int = 1) -> dict:
    """A row of results.csv; ``seconds``: the wall time of the data pass that trained the run with
    ``heads`` runs in all (``pass_seconds``), of which the run's ``seconds`` is its equal share."""
    m = metrics or {}
    return {
        "name": name, "status": status, "loss": config.loss, "labels": config.labels, "task": config.task,
        "sampler": config.sampler or "", "pooling": "stats" if config.pooled_stats else config.pooling,
        "layers": config.layers, "pooled_stats": config.pooled_stats,
        "train_clips": (m.get("training") or {}).get("clips", ""),
        "f1_macro": m.get("f1_macro", ""), "f1_micro": m.get("f1_micro", ""), "ccc_mean": m.get("ccc_mean", ""),
        "best_epoch": m.get("best_epoch", ""),
        "paper_f1_macro": paper.get("f1_macro", ""), "paper_f1_micro": paper.get("f1_micro", ""),
        "seconds": "" if seconds is None else round(seconds / heads, 1), "pass": "",
        "pass_seconds": "" if seconds is None else round(seconds, 1), "error": error,
    }


#: Seconds between a grid worker's looks at its parent process.
PARENT_POLL_SECONDS = 0.25
#: Seconds a worker whose grid is gone has to stop its runs cleanly before it exits anyway.
ORPHAN_GRACE_SECONDS = 10.0
_watching = threading.Event()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_SECONDS)
    os.kill(os.getpid(), signal.SIGTERM)  # stop_on_signals: the runs release their locks, remove temporary files
    time.sleep(ORPHAN_GRACE_SECONDS)
    os._exit(1)


def _die_with(parent: int) -> None:
    """In a local worker process of the grid's process ``parent``: stop and exit when the grid is
    gone (see the module docstring). Nothing in the grid's own process (threading backend) or
    on a cluster worker, whose parent is not the grid."""
    if os.getpid() == parent or os.getppid() != parent or _watching.is_set():
        return
    _watching.set()
    threading.Thread(target=_watch_parent, args=(parent,), name="conilium-grid-parent", daemon=True).start()


def _train_pass(group: Sequence[Tuple[str, TrainConfig, Mapping, str]], threads: Optional[int],
                parent: Optional[int] = None) -> List[dict]:
    """One grid job (runs in a worker process): the runs of one data pass, trained together, or
    their failures reported; never raises. ``pass_seconds`` is the pass's wall time, shared by
    its runs; each run's ``seconds`` is its equal share of it.
    ``parent``: the grid's process id, whose end ends a local worker too."""
    import torch

    if parent is not None:
        _die_with(parent)
    if threads:
        torch.set_num_threads(threads)
    t0 = time.time()
    try:
        with stop_on_signals():
            results = train_heads([(config, run_dir) for _, config, _, run_dir in group], overwrite=True,
                                  progress=False)
    except KeyboardInterrupt:
        if parent is not None and os.getppid() != parent:
            os._exit(1)  # the grid is gone and the runs are cleaned up: nobody is left to report to
        raise
    except Exception as e:  # noqa: BLE001 - report it in the table and the log, keep the other passes going
        results = [e] * len(group)
    seconds = time.time() - t0
    rows = []
    for (name, config, paper, _), r in zip(group, results):
        if isinstance(r, dict):
            rows.append(_row(name, config, paper, "trained", r, seconds, heads=len(group)))
        elif isinstance(r, ConiliumError):
            rows.append(_row(name, config, paper, "failed", seconds=seconds, error=str(r), heads=len(group)))
        else:
            trace = "".join(traceback.format_exception(type(r), r, r.__traceback__))
            rows.append(_row(name, config, paper, "failed", seconds=seconds, error=f"{type(r).__name__}: {r}\n{trace}",
                             heads=len(group)))
    return rows


def _absolute(config: TrainConfig) -> TrainConfig:
    """``config`` with its cache as an absolute path (a cluster's workers do not share our working directory)."""
    return replace(config, cache=os.path.abspath(config.cache))


def _missing(backend: str, module: str, install: str) -> ConfigError:
    return ConfigError(f"--backend {backend} needs {module} (pip install '{install}'); "
                       f"it is not a dependency of conilium")


_CLUSTER = {"dask": ("dask.distributed", "dask[distributed]"), "ray": ("ray", "ray[default]")}


def _check_backend(backend: str) -> None:
    """A clear error, before anything is written, for an unknown backend or one whose package is missing."""
    import importlib.util

    if backend not in BACKENDS:
        raise ConfigError(f"unknown --backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend in _CLUSTER:
        module, install = _CLUSTER[backend]
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # dask itself missing
            found = False
        if not found:
            raise _missing(backend, module, install)


def _stop_workers(run_dirs: Sequence[str], signum: int) -> None:
    """Pass ``signum`` on to the worker processes (children of this process) that hold a lock in
    ``run_dirs``, and give them :data:`ORPHAN_GRACE_SECONDS` to release it, before joblib kills
    them: their runs then leave no lock and no temporary file behind."""
    me, held = os.getpid(), []
    for d in run_dirs:
        holder = read_holder(Path(d) / LOCK_FILE)
        if holder is not None and holder.pid != me and holder.host == socket.gethostname() \
                and _parent_of(holder.pid) == me:
            with contextlib.suppress(OSError):
                os.kill(holder.pid, signal.SIGTERM)
                held.append((Path(d) / LOCK_FILE, holder.token))
    deadline = time.monotonic() + ORPHAN_GRACE_SECONDS
    while held and time.monotonic() < deadline:
        held = [(p, token) for p, token in held if getattr(read_holder(p), "token", None) == token]
        time.sleep(0.05)


def _parent_of(pid: int) -> Optional[int]:
    """The parent process id of ``pid`` (Linux /proc), None when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _run_local(backend: str, jobs: int, passes, threads: int) -> Iterator[List[dict]]:
    """loky (processes) or threading, through joblib; each pass's rows as it finishes. A signal
    that stops the grid stops the workers' runs cleanly first (:func:`_stop_workers`)."""
    from joblib import Parallel, delayed, parallel_backend

    run_dirs = [run_dir for group in passes for _, _, _, run_dir in group]
    with stop_on_signals(STOP_SIGNALS + (signal.SIGINT,), before=lambda signum: _stop_workers(run_dirs, signum)), \
            parallel_backend(backend, n_jobs=jobs):
        yield from Parallel(return_as="generator_unordered")(delayed(_train_pass)(g, threads, os.getpid())
                                                             for g in passes)


def _run_dask(address: Optional[str], jobs: int, passes, threads: int) -> Iterator[List[dict]]:
    """On a dask.distributed scheduler at ``address``, or on a LocalCluster of ``jobs`` worker
    processes started (and closed) here; each pass one task (``pure=False``: never cached)."""
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise _missing("dask", *_CLUSTER["dask"]) from None
    cluster = None
    if address:
        client = Client(address)
    else:
        cluster = LocalCluster(n_workers=jobs, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
    try:
        futures = [client.submit(_train_pass, g, threads, pure=False) for g in passes]
        for future in as_completed(futures):
            yield future.result()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _run_ray(address: Optional[str], jobs: int, passes, threads: int) -> Iterator[List[dict]]:
    """On the ray cluster at ``address`` (or a local ray started, and shut down, here), each pass
    one task asking for ``threads`` CPUs; at most ``jobs`` tasks in flight."""
    try:
        import ray
    except ImportError:
        raise _missing("ray", *_CLUSTER["ray"]) from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, num_cpus=None if address else max(jobs * threads, 1),
                 include_dashboard=False, log_to_driver=False)
    try:
        task = ray.remote(num_cpus=threads, max_retries=0)(_train_pass)
        waiting = list(passes)
        running = []
        while waiting or running:
            while waiting and len(running) < jobs:
                running.append(task.remote(waiting.pop(0), threads))
            done, running = ray.wait(running, num_returns=1)
            yield ray.get(done[0])
    finally:
        if started:
            ray.shutdown()


def _run_state(run: RunDir, config: TrainConfig) -> Tuple[str, Optional[dict]]:
    """``("done", metrics)`` for a run directory complete with ``config``; ``("other", None)`` for
    one complete with another configuration; ``("todo", None)`` otherwise: nothing there, an
    unfinished run, or a run whose ``metrics.json`` or ``config.json`` is damaged (cut short,
    not JSON), which is trained again."""
    if not run.is_complete():
        return "todo", None
    metrics = run.metrics_or_none()
    if metrics is None:
        return "todo", None
    if not run.has_config():
        return "other", None
    old = run.config_or_none()
    if old is None:
        return "todo", None
    return ("done", metrics) if same_run(old, config.to_json()) else ("other", None)


def run_grid(runs: Sequence[Tuple[str, TrainConfig, dict]], out_dir, *, n_jobs: int = 1, backend: str = "loky",
             address: Optional[str] = None, threads_per_job: Optional[int] = None, progress: bool = True) -> List[dict]:
    """Train every run not already complete into ``out_dir/<name>``; write and return the results table.

    The runs to train are grouped into data passes (:func:`~conilium.heads.train.plan_passes`),
    each pass one job; ``n_jobs`` passes are trained at the same time.

    A complete run directory with another configuration is an error (nothing is
    trained): choose another ``out_dir`` or remove it. Failed runs are listed in the
    table with their error; the others still run.
    """
    out_dir = Path(os.path.abspath(out_dir))
    _check_backend(backend)
    if n_jobs < 1:
        raise ConfigError(f"--n-jobs must be at least 1, not {n_jobs}")
    rows: Dict[str, dict] = {}
    todo = []
    conflicts = []
    runs = [(name, _absolute(config), paper) for name, config, paper in runs]
    grid = GridDir(out_dir)
    for name, config, paper in runs:
        run = grid.run(name)
        state, metrics = _run_state(run, config)
        if state == "done":
            rows[name] = _row(name, config, paper, "skipped (complete)", metrics)
            continue
        if state == "other":
            conflicts.append(name)
        todo.append((name, config, paper, str(run.path)))
    if conflicts:
        raise ConfigError(f"{out_dir}: run(s) {', '.join(conflicts)} already hold a complete run with another "
                          f"configuration; use another --out or remove those directories")
    # runs reading the same batches share one data pass; the passes are the parallel jobs
    passes = [[todo[i] for i in group] for group in plan_passes([c for _, c, _, _ in todo])] if todo else []
    out_dir.mkdir(parents=True, exist_ok=True)
    grid.write_plan([{"name": n, "config": c.to_json(), "paper": p} for n, c, p in runs],
                    [[name for name, _, _, _ in group] for group in passes])
    if passes:
        jobs = min(n_jobs, len(passes))
        if threads_per_job is None:
            threads_per_job = max(1, (os.cpu_count() or 1) // jobs)
        if backend == "dask":
            results = _run_dask(address, jobs, passes, threads_per_job)
        elif backend == "ray":
            results = _run_ray(address, jobs, passes, threads_per_job)
        else:
            results = _run_local(backend, jobs, passes, threads_per_job)
        pass_of = {name: i for i, group in enumerate(passes, 1) for name, _, _, _ in group}
        with tqdm(total=len(todo), desc="grid runs", unit="run", disable=not progress) as bar:
            for group_rows in results:
                for row in group_rows:
                    row["pass"] = pass_of[row["name"]]  # its place in grid.json's passes, from 1
                    rows[row["name"]] = row
                    bar.update()
                    if progress:
                        tqdm.write(f"{row['name']}: {row['status']}"
                                   + (f", dev macro-F1 {row['f1_macro']:.3f}" if row["f1_macro"] != "" else "")
                                   + (f" — {row['error'].splitlines()[0]}" if row["error"] else ""))
    ordered = [rows[name] for name, _, _ in runs]
    write_results(out_dir, ordered)
    return ordered


def write_results(out_dir, rows: Sequence[Mapping]) -> None:
    """``results.csv`` (every column) and ``results.md`` (a readable table), atomically."""
    grid = GridDir(out_dir)
    with atomic_path(grid.results_path, suffix=".csv.tmp") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
            w.writeheader()
            for r in rows:
                w.writerow({k: r.get(k, "") for k in RESULT_COLUMNS})
    has_paper = any(r.get("paper_f1_macro") not in ("", None) for r in rows)

    def fmt(x):
        return f"{x:.3f}" if isinstance(x, float) else ("" if x is None else str(x))

    has_attributes = any(r.get("task") not in ("categories", "", None) for r in rows)
    head = ["run", "loss", "labels", "sampler", "dev F1-macro", "dev F1-micro", "best epoch"]
    if has_attributes:
        head[4:4] = ["task", "dev CCC mean"]
    if has_paper:
        head += ["paper F1-macro", "paper F1-micro"]
    head.append("status")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"], r["loss"], r["labels"], r["sampler"] or "—", fmt(r["f1_macro"]), fmt(r["f1_micro"]),
                 fmt(r["best_epoch"])]
        if has_attributes:
            cells[4:4] = [r.get("task") or "categories", fmt(r.get("ccc_mean"))]
        if has_paper:
            cells += [fmt(r.get("paper_f1_macro")), fmt(r.get("paper_f1_micro"))]
        status = r["status"] if not r.get("error") else f"{r['status']}: {r['error'].splitlines()[0]}"
        cells.append(status.replace("|", "/"))
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    text = "\n".join(lines) + "\n"
    with atomic_path(grid.results_table_path, suffix=".md.tmp") as tmp:
        tmp.write_text(text, encoding="utf-8")

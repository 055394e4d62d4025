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
passes. A run's numbers do not depend on its pass, on the passes trained at the same time
nor on the threads its job gets (``threads_per_job``, by default the cores shared among
the jobs): see :class:`conilium.runtime.ThreadInvariantLinear` and
:data:`conilium.training.state.GLOBAL_RNG_LOCK`.

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
import shutil
import signal
import socket
import statistics
import tempfile
import threading
import time
import traceback
from pathlib import Path
from dataclasses import replace
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from tqdm import tqdm

from conilium.dirs import GridDir, RunDir
from conilium.errors import ConfigError, ConiliumError
from conilium.locking import LOCK_FILE, STOP_SIGNALS, read_holder, stop_on_signals
from conilium.training.config import SEED_MAX
from conilium.util import atomic_path, read_json_object

from .config import BACKENDS, SPEC_DIR, presets
from .train import TrainConfig, check_config, plan_passes, same_run, train_heads

_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$")
_SPEC_KEYS = {"description", "common", "runs", "product", "seeds"}

RESULT_COLUMNS = ("name", "status", "loss", "labels", "task", "sampler", "pooling", "layers", "pooled_stats",
                  "train_clips", "seed", "f1_macro", "f1_micro", "ccc_mean", "best_epoch", "paper_f1_macro",
                  "paper_f1_micro", "seconds", "pass", "pass_seconds", "error")


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


def seed_names(seeds) -> List[int]:
    """``--seeds`` / a spec's ``seeds``: distinct integer seeds, in order ("0,1,2" or a list)."""
    items = [x.strip() for x in seeds.split(",")] if isinstance(seeds, str) else list(seeds)
    out: List[int] = []
    for x in items:
        try:
            v = int(x)
            if isinstance(x, float) or isinstance(x, bool) or not 0 <= v <= SEED_MAX:
                raise ValueError
        except (TypeError, ValueError):
            raise ConfigError(f"seeds: {x!r} is not a seed (an integer from 0 to {SEED_MAX})") from None
        if v in out:
            raise ConfigError(f"seeds: {v} is given twice")
        out.append(v)
    if not out:
        raise ConfigError("seeds: give at least one seed, e.g. 0,1,2")
    return out


#: A run of a configuration trained with several seeds: ``<name>-seed<seed>``.
SEED_SUFFIX = re.compile(r"^(?P<name>.+)-seed(?P<seed>\d+)$")


def expand_spec(spec: Mapping, *, cache=None, overrides: Optional[Mapping] = None,
                seeds=None) -> List[Tuple[str, TrainConfig, dict]]:
    """The runs of a spec as ``(name, TrainConfig, paper scores)``, in order; every config is checked.

    ``cache`` replaces the spec's cache; ``overrides`` (e.g. ``{"epochs": 5}``) apply to
    every run, after the spec's own settings. ``seeds`` (or the spec's ``seeds``; the
    argument wins) trains every configuration once per seed, as ``<name>-seed<seed>``
    (:func:`write_results` then adds each configuration's mean and standard deviation).
    """
    unknown = sorted(set(spec) - _SPEC_KEYS)
    if unknown:
        raise ConfigError(f"spec: unknown key(s) {', '.join(unknown)}; expected {', '.join(sorted(_SPEC_KEYS))}")
    if seeds is None and spec.get("seeds") is not None:
        seeds = spec["seeds"]
    if seeds is not None:
        seeds = seed_names(seeds)
        if "seed" in (overrides or {}):
            raise ConfigError("--seeds and --set seed=... both name the seed: give one of them")
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
        for seed in seeds if seeds is not None else [None]:
            each = settings if seed is None else dict(settings, seed=seed)
            run_name = name if seed is None else f"{name}-seed{seed}"
            try:
                config = TrainConfig.from_dict(each)
            except TypeError as err:
                raise ConfigError(f"spec: run {run_name}: {err}") from None
            except ConfigError as err:
                raise ConfigError(f"spec: run {run_name}: {err}") from None
            try:
                check_config(config)
            except ConfigError as err:
                raise ConfigError(f"spec: run {run_name}: {err}") from None
            out.append((run_name, config, dict(paper)))
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
        "train_clips": (m.get("training") or {}).get("clips", ""), "seed": config.seed,
        "f1_macro": m.get("f1_macro", ""), "f1_micro": m.get("f1_micro", ""), "ccc_mean": m.get("ccc_mean", ""),
        "best_epoch": m.get("best_epoch", ""),
        "paper_f1_macro": paper.get("f1_macro", ""), "paper_f1_micro": paper.get("f1_micro", ""),
        "seconds": "" if seconds is None else round(seconds / heads, 3), "pass": "",
        "pass_seconds": "" if seconds is None else round(seconds, 3), "error": error,
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
                parent: Optional[int] = None, progress_file: Optional[str] = None) -> List[dict]:
    """One grid job (runs in a worker process): the runs of one data pass, trained together, or
    their failures reported; never raises. ``pass_seconds`` is the pass's wall time, shared by
    its runs; each run's ``seconds`` is its equal share of it.
    ``parent``: the grid's process id, whose end ends a local worker too. ``progress_file``:
    where the pass's epochs done are written as they end (``EPOCH LAST``; see :class:`_PassProgress`)."""
    import torch

    if parent is not None:
        _die_with(parent)
    if threads:
        torch.set_num_threads(threads)
    t0 = time.time()
    try:
        with stop_on_signals():
            results = train_heads([(config, run_dir) for _, config, _, run_dir in group], overwrite=True,
                                  progress=False, on_epoch=_epoch_writer(progress_file))
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
    return replace(config, cache=os.path.abspath(config.cache),
                   more_caches=tuple(os.path.abspath(c) for c in config.more_caches))


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


def _epoch_writer(path: Optional[str]) -> Optional[Callable[[int, int], None]]:
    """``on_epoch`` for :func:`train_heads` that writes ``EPOCH LAST`` to ``path`` (replaced whole,
    so a reader never sees half a line); None without a path."""
    if not path:
        return None

    def write(epoch: int, last: int) -> None:
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                f.write(f"{epoch} {last}\n")
            os.replace(tmp, path)
        except OSError:  # progress is a courtesy: never the end of a pass
            pass

    return write


class _PassProgress:
    """The grid's bar in epochs: every pass's epochs done, read from the files its worker writes
    (:func:`_epoch_writer`) by a thread twice a second, so that the bar moves within a pass
    of minutes, not only when a pass ends. The files live in a temporary folder of this
    machine: workers on other machines (``--address``) report only when their pass ends."""

    def __init__(self, passes, *, enabled: bool, local: bool):
        self.epochs = [max(c.epochs for _, c, _, _ in group) for group in passes]
        self.names = [{name for name, _, _, _ in group} for group in passes]
        self.folder = tempfile.mkdtemp(prefix="conilium-grid-") if enabled and local else None
        self.files = [None if self.folder is None else os.path.join(self.folder, f"pass-{k}") for k in range(len(passes))]
        self.finished = [False] * len(passes)
        self.runs = sum(len(group) for group in passes)
        self.runs_done = 0
        self.bar = tqdm(total=sum(self.epochs), desc="grid", unit="epoch", disable=not enabled)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = None
        if self.folder is not None:
            self._thread = threading.Thread(target=self._watch, name="conilium-grid-progress", daemon=True)
            self._thread.start()

    def _done(self, k: int) -> int:
        if self.finished[k]:
            return self.epochs[k]
        try:
            with open(self.files[k]) as f:
                return min(int(f.read().split()[0]), self.epochs[k])
        except (OSError, ValueError, IndexError, TypeError):
            return 0

    def refresh(self) -> None:
        with self._lock:
            self.bar.n = sum(self._done(k) for k in range(len(self.epochs)))
            self.bar.set_postfix_str(f"runs {self.runs_done}/{self.runs}", refresh=False)
            self.bar.refresh()

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            self.refresh()

    def pass_done(self, names: Sequence[str]) -> None:
        """The pass holding runs ``names`` has ended (early stopping may end it before its epochs)."""
        for k, held in enumerate(self.names):
            if names and names[0] in held:
                self.finished[k] = True
        self.runs_done += len(names)
        self.refresh()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.bar.close()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


#: A warnings filter for multiprocessing's resource tracker, which loky starts with the grid's
#: environment: at a stop it reports the semaphores of the workers joblib kills, and removes them
#: (its job, not a problem of the run, and two lines of noise under the command's one-line error).
QUIET_RESOURCE_TRACKER = "ignore:resource_tracker:UserWarning"


def _quiet_resource_tracker() -> None:
    """Add :data:`QUIET_RESOURCE_TRACKER` to ``PYTHONWARNINGS`` (for the processes started from now)."""
    current = os.environ.get("PYTHONWARNINGS", "")
    if QUIET_RESOURCE_TRACKER not in current.split(","):
        os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [current, QUIET_RESOURCE_TRACKER]))


def _run_local(backend: str, jobs: int, passes, threads: int, files=None) -> Iterator[List[dict]]:
    """loky (processes) or threading, through joblib; each pass's rows as it finishes. A signal
    that stops the grid stops the workers' runs cleanly first (:func:`_stop_workers`).
    ``files``: each pass's progress file (or None)."""
    from joblib import Parallel, delayed, parallel_backend

    files = files or [None] * len(passes)
    run_dirs = [run_dir for group in passes for _, _, _, run_dir in group]
    if backend == "loky":
        _quiet_resource_tracker()
    with stop_on_signals(STOP_SIGNALS + (signal.SIGINT,), before=lambda signum: _stop_workers(run_dirs, signum)), \
            parallel_backend(backend, n_jobs=jobs):
        yield from Parallel(return_as="generator_unordered")(delayed(_train_pass)(g, threads, os.getpid(), f)
                                                             for g, f in zip(passes, files))


def _run_dask(address: Optional[str], jobs: int, passes, threads: int, files=None) -> Iterator[List[dict]]:
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
        files = files or [None] * len(passes)
        futures = [client.submit(_train_pass, g, threads, None, f, pure=False) for g, f in zip(passes, files)]
        for future in as_completed(futures):
            yield future.result()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _run_ray(address: Optional[str], jobs: int, passes, threads: int, files=None) -> Iterator[List[dict]]:
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
        waiting = list(zip(passes, files or [None] * len(passes)))
        running = []
        while waiting or running:
            while waiting and len(running) < jobs:
                group, f = waiting.pop(0)
                running.append(task.remote(group, threads, None, f))
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
        pass_of = {name: i for i, group in enumerate(passes, 1) for name, _, _, _ in group}
        bar = _PassProgress(passes, enabled=progress, local=not address)
        try:
            if backend == "dask":
                results = _run_dask(address, jobs, passes, threads_per_job, bar.files)
            elif backend == "ray":
                results = _run_ray(address, jobs, passes, threads_per_job, bar.files)
            else:
                results = _run_local(backend, jobs, passes, threads_per_job, bar.files)
            for group_rows in results:
                for row in group_rows:
                    row["pass"] = pass_of[row["name"]]  # its place in grid.json's passes, from 1
                    rows[row["name"]] = row
                    if progress:
                        tqdm.write(f"{row['name']}: {row['status']}"
                                   + (f", dev macro-F1 {row['f1_macro']:.3f}" if row["f1_macro"] != "" else "")
                                   + (f" — {row['error'].splitlines()[0]}" if row["error"] else ""))
                bar.pass_done([row["name"] for row in group_rows])
        finally:
            bar.close()
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
    summary = seed_summary(rows)
    if summary:
        text += "\n" + _seed_table(summary, has_attributes, has_paper)
    with atomic_path(grid.results_table_path, suffix=".md.tmp") as tmp:
        tmp.write_text(text, encoding="utf-8")
    if summary:
        with atomic_path(grid.seeds_path, suffix=".csv.tmp") as tmp:
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=SEED_COLUMNS)
                w.writeheader()
                for r in summary:
                    w.writerow({k: r.get(k, "") for k in SEED_COLUMNS})
    elif grid.seeds_path.exists():
        grid.seeds_path.unlink()


#: seeds.csv: a configuration trained with several seeds, its scores' mean and sample standard deviation.
SEED_COLUMNS = ("name", "seeds", "trained", "f1_macro_mean", "f1_macro_sd", "f1_micro_mean", "f1_micro_sd",
                "ccc_mean_mean", "ccc_mean_sd", "paper_f1_macro", "paper_f1_micro")


def seed_summary(rows: Sequence[Mapping]) -> List[dict]:
    """The configurations of ``rows`` run with two or more seeds (``<name>-seed<seed>``, the
    seed the run's own): for each, the seeds, how many of its runs have scores, and each score's
    mean and sample standard deviation (ddof 1) over them, in the rows' order."""
    groups: Dict[str, List[Mapping]] = {}
    for r in rows:
        m = SEED_SUFFIX.match(str(r.get("name", "")))
        if m and str(r.get("seed", "")) == m.group("seed"):
            groups.setdefault(m.group("name"), []).append(r)
    out = []
    for name, members in groups.items():
        if len(members) < 2:
            continue
        entry = {"name": name, "seeds": " ".join(str(r["seed"]) for r in members),
                 "paper_f1_macro": members[0].get("paper_f1_macro", ""),
                 "paper_f1_micro": members[0].get("paper_f1_micro", "")}
        trained = 0
        for key in ("f1_macro", "f1_micro", "ccc_mean"):
            values = [float(r[key]) for r in members if r.get(key) not in ("", None)]
            trained = max(trained, len(values))
            entry[f"{key}_mean"] = round(statistics.fmean(values), 6) if values else ""
            entry[f"{key}_sd"] = round(statistics.stdev(values), 6) if len(values) > 1 else ""
        entry["trained"] = trained
        out.append(entry)
    return out


def _seed_table(summary: Sequence[Mapping], has_attributes: bool, has_paper: bool) -> str:
    def pm(entry, key):
        mean, sd = entry[f"{key}_mean"], entry[f"{key}_sd"]
        if mean == "":
            return ""
        return f"{mean:.3f} ± {sd:.3f}" if sd != "" else f"{mean:.3f}"

    head = ["configuration", "seeds", "dev F1-macro", "dev F1-micro"]
    if has_attributes:
        head.append("dev CCC mean")
    if has_paper:
        head += ["paper F1-macro", "paper F1-micro"]
    lines = ["Mean ± sample standard deviation over seeds:", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in summary:
        cells = [e["name"], f"{e['trained']} of {len(e['seeds'].split())} ({e['seeds'].replace(' ', ', ')})",
                 pm(e, "f1_macro"), pm(e, "f1_micro")]
        if has_attributes:
            cells.append(pm(e, "ccc_mean"))
        if has_paper:
            cells += [f"{e['paper_f1_macro']:.3f}" if isinstance(e["paper_f1_macro"], float) else str(e["paper_f1_macro"]),
                      f"{e['paper_f1_micro']:.3f}" if isinstance(e["paper_f1_micro"], float) else str(e["paper_f1_micro"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

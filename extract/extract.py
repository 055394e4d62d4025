"""extract-features: run an upstream over a corpus once, into a versioned HDF5 feature cache.

:func:`extract_features` ties the stage together: the plan (:mod:`.plan`: which clips,
noisy copies included, in which shard), the cache directory (its
:class:`~conilium.cache.writer.CacheWriter`: settings, shards, sidecars, manifest) and
the loop (:mod:`.pipeline`: decode, forward, write, overlapped).

A shard is the unit of work, of resumption and of scale-out: it is written under a
temporary name, renamed when complete, and recorded in a small sidecar
(``shards/shard-NNNNN.json``) with the settings it was made with; a rerun keeps every
shard whose sidecar and checksum still match and redoes the rest. Under ``torchrun`` the
ranks take every K-th shard; rank 0 writes ``clips.json`` and, last, ``manifest.json``.

One writer per cache: rank 0 holds the lock of the cache directory (:mod:`conilium.locking`)
from before anything is read or written until the manifest is written, so that a second
extraction into the same directory stops with a message naming the first (or waits for
it, ``wait_for_lock``) instead of removing its temporary shard. The directory is checked
for being writable before the corpus is read and the model loaded; a failure to write
(read-only, no permission, full disk) is one :class:`~conilium.errors.OutputError`
naming the path. A complete cache that cannot be written (a shared read-only copy) is
checked against the request and reported complete with nothing written, not even the
lock file: no one can write it, so there is no writer to keep out.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

from tqdm import tqdm

import conilium
from conilium.audio import global_stats, list_noise_files
from conilium.cache.writer import CacheWriter, UPSTREAM_DIR, human_bytes, projected_bytes
from conilium.corpus import Corpus, load_corpus
from conilium.errors import CacheError, ConfigError, CorpusError, OutputError
from conilium.locking import DirectoryLock, lock_directory
from conilium.runtime import compute_dtype as pick_compute_dtype
from conilium.runtime import Dist, init_distributed
from conilium.util import check_writable, output_errors

from .encoder import UpstreamRunner, hidden_shape
from .pipeline import ExtractStats, JobLoader, run_shards
from .plan import (ExtractConfig, Job, NoiseAugmentation, assign_shards, noise_fingerprint, parse_layers, plan_jobs,
                   resolve_for_family)
from .upstreams import check_upstream, load_upstream, upstream_family

__all__ = ["ExtractConfig", "ExtractStats", "NoiseAugmentation", "extract_features", "parse_layers"]

#: Default bound on a batch's padded audio, in seconds: larger batches pay off on a GPU only.
#: On CPU one clip at a time (0): batching only adds padding there — 60-second batches measured
#: ≈ 10 % slower than single clips on a 2-core CPU (median ratio 1.107); on CUDA large
#: padding-minimising batches keep the GPU busy.
DEFAULT_BATCH_SECONDS = {"cpu": 0.0, "cuda": 300.0}


def extract_features(config: ExtractConfig, corpus, out, *, batch_seconds: Optional[float] = None,
                     device: str = "auto", workers: int = 2, skip_bad: bool = False, allow_symlinks: bool = False,
                     overwrite: bool = False, check_space: bool = True, verbose: bool = True, stats: Optional[ExtractStats] = None,
                     wait_for_lock: Union[bool, float] = False, length_buckets: Optional[bool] = None) -> Path:
    """Extract the hidden states ``config`` asks for over ``corpus`` (a root directory or a
    loaded :class:`~conilium.corpus.Corpus`) into the cache directory ``out``; returns ``out``.

    >>> extract_features(ExtractConfig("demo-wavlm", random_init=True, layers="all"), "demo", "cache/demo")

    A text upstream (``roberta-large``, ``demo-text``, … :mod:`.text`) runs over the corpus's
    transcripts instead, one frame per token (:func:`.text.extract_text_features`).

    The keyword arguments change how fast the cache is made, never its content:
    ``batch_seconds`` bounds a batch's padded audio (0: one clip at a time, the default on
    CPU; 300 on CUDA),
    ``device`` is auto/cpu/cuda, ``workers`` decoding threads; ``length_buckets`` pads each
    batch up to one of a few lengths (:func:`.plan.bucket_samples`, at most 1/8 more audio) so
    that the device sees few distinct shapes (None: on CUDA only; the valid frames are the same
    within float rounding); ``skip_bad`` leaves
    unreadable clips out (listed in the manifest) instead of stopping; ``allow_symlinks`` reads
    audio through symbolic links in ``Audios/`` that point outside it. A cache already
    complete with the same settings is returned untouched; one built with other settings
    is a :class:`CacheError` naming them (``overwrite=True`` rebuilds it); ``check_space``
    refuses to start when the projected size exceeds the free disk space. ``stats``, when
    given, receives the run's timing and padding figures. Another process writing ``out``
    is a :class:`~conilium.errors.LockError` naming it (``wait_for_lock``: True, or at most
    that many seconds, to wait for it instead); an ``out`` that cannot be written is an
    :class:`~conilium.errors.OutputError`, before the corpus is read.
    """
    if not isinstance(config, ExtractConfig):
        raise TypeError(f"extract_features() takes an ExtractConfig first, not {type(config).__name__}: "
                        f"extract_features(ExtractConfig(upstream, ...), corpus, out, <runtime options>)")
    if batch_seconds is not None and not batch_seconds >= 0:
        raise ConfigError(f"--batch-seconds must be 0 (one clip at a time) or positive, got {batch_seconds}")
    from .text import is_text_upstream

    if is_text_upstream(config.upstream):  # a text encoder over the transcripts (frames = tokens)
        from .text import extract_text_features

        return extract_text_features(config, corpus, out, device=device, skip_bad=skip_bad,
                                     allow_symlinks=allow_symlinks, overwrite=overwrite, verbose=verbose,
                                     wait_for_lock=wait_for_lock)
    t_start = time.perf_counter()
    stats = stats if stats is not None else ExtractStats()
    out = Path(out)
    dist, dev = init_distributed(device, backend="gloo", timeout_hours=6)  # rank 0 alone computes the statistics first
    clean = False
    lock: Optional[DirectoryLock] = None
    read_only = _complete_and_read_only(out, overwrite)

    def claim_out():  # rank 0 only: the ranks of one job share the directory
        nonlocal lock
        if read_only:  # nobody can write it: no lock to take, nothing to check
            return
        on_wait = (lambda m: _say(True, m)) if verbose else None
        lock = lock_directory(out, what="feature cache", wait=wait_for_lock, on_wait=on_wait).acquire()
        check_writable(out, what="feature cache")

    try:
        # an upstream that cannot be loaded here fails in seconds, before anything is written
        dist.on_main(lambda: check_upstream(config.upstream, random_init=config.random_init,
                                            revision=config.revision))
        # normalisation "auto" and Whisper's input length settled for the upstream's family (registry or
        # config.json, no weights); settings the family cannot take are refused now, before anything is written
        config = resolve_for_family(config, upstream_family(config.upstream, random_init=config.random_init,
                                                            revision=config.revision) == "whisper")
        dist.on_main(claim_out)
        with CacheWriter(out, read_only=read_only) as cache:
            _extract(config, corpus, cache, dist, dev, t_start, stats, batch_seconds=batch_seconds, workers=workers,
                     skip_bad=skip_bad, allow_symlinks=allow_symlinks, overwrite=overwrite,
                     check_space=check_space, verbose=verbose, length_buckets=length_buckets)
        clean = True
        return out
    finally:
        if lock is not None:
            lock.release()
        dist.close(clean)


def _complete_and_read_only(out: Path, overwrite: bool) -> bool:
    """True when ``out`` holds a complete cache (an intact manifest and clips.json) that this process
    cannot write (a read-only file system, no permission): extraction then checks it against the
    request and writes nothing, not even its lock file, so that a shared read-only cache stays
    usable. A read-only cache cannot be written by anyone, so there is no writer to lock out."""
    if overwrite or not out.is_dir() or os.access(out, os.W_OK):
        return False
    return CacheWriter(out).finish_problem() is None


def _say(verbose: bool, msg: str) -> None:
    if verbose:
        tqdm.write(msg, file=sys.stderr)


def _extract(config: ExtractConfig, corpus, cache: CacheWriter, dist: Dist, dev, t_start: float,
             stats: ExtractStats, *, batch_seconds, workers, skip_bad, allow_symlinks, overwrite, check_space,
             verbose, length_buckets: Optional[bool] = None) -> None:
    out = cache.out
    verbose_here = verbose and dist.rank == 0
    corpus = _select_clips(corpus, config, skip_bad, allow_symlinks)
    noise_files = list_noise_files(config.augmentation.noise_dir) if config.augmentation else []

    # -- the cache directory and the upstream (rank 0 prepares, the others follow) ------------
    dist.on_main(lambda: _claim(cache, config, overwrite, verbose))
    cdtype = pick_compute_dtype(config.compute_dtype, dev)
    if batch_seconds is None:
        batch_seconds = DEFAULT_BATCH_SECONDS[dev.type]
    runner, identity = _load_runner(config, cache, dev, cdtype, verbose)
    settings = _settings(config, identity, runner, corpus, noise_files)

    # -- compare with what is on disk, fix the normalisation statistics ----------------------
    settings, was_complete = dist.on_main(lambda: _settle_settings(cache, settings, corpus, config, skip_bad,
                                                                   workers, verbose_here), share=True)
    cache.use_settings(settings)
    stats_skipped = [tuple(x) for x in settings.get("skipped_in_stats", [])]

    # -- plan -----------------------------------------------------------------------------------
    jobs = plan_jobs(corpus, config, noise_files)
    shards = assign_shards(jobs, config.shard_size)
    mine, kept = _my_shards(cache, shards, dist)
    stats.shards_kept = kept
    stats.device = dev.type
    stats.compute_dtype = cdtype
    stats.batch_seconds = batch_seconds
    if (dev.type == "cuda" if length_buckets is None else length_buckets) and jobs:
        stats.length_buckets = runner.use_length_buckets(max(j.samples for j in jobs))
    todo_jobs = [j for v in mine.values() for j in v]
    todo_frames = sum(dist.gather(sum(runner.frames_for(j.samples) for j in todo_jobs)))
    todo_clips = sum(dist.gather(len(todo_jobs)))
    if was_complete and todo_clips == 0:
        runner.close()
        _say(verbose_here, f"{out}: cache already complete with these settings; nothing to do"
             + (" (it is read-only: nothing was written)" if cache.read_only else ""))
        stats.wall_seconds = time.perf_counter() - t_start
        return
    if cache.read_only:
        runner.close()
        raise OutputError(out, f"the feature cache is read-only, and {todo_clips} clip(s) of it are missing or "
                               f"damaged (run verify-cache to see which)",
                          "rebuild it where it can be written (--out), or make it writable")
    pooled_layers = runner.num_hidden_states if config.pooled_stats else 0
    total_bytes = projected_bytes(sum(runner.frames_for(j.samples) for j in jobs), len(jobs), len(runner.layers),
                                  settings["dim"], config.dtype, pooled_layers)
    todo_bytes = projected_bytes(todo_frames, todo_clips, len(runner.layers), settings["dim"], config.dtype,
                                 pooled_layers)

    def check_room():
        free = shutil.disk_usage(out).free
        _say(verbose_here, f"extracting {len(jobs)} clips ({len(corpus)} in the corpus"
             + (f", {len(jobs) - len(corpus)} noisy copies" if config.augmentation else "")
             + f") with {config.upstream} on {dev.type} ({cdtype}) into {len(shards)} shard(s); "
             f"layers {runner.layers}, {config.dtype}")
        _say(verbose_here, f"projected cache size: {human_bytes(total_bytes)}"
             + (f" ({human_bytes(todo_bytes)} still to write)" if todo_clips < len(jobs) else "")
             + f"; free disk: {human_bytes(free)}")
        if check_space and todo_bytes > free:
            raise CacheError(f"projected cache size {human_bytes(todo_bytes)} exceeds the free disk space at {out} "
                             f"({human_bytes(free)}); free some space, store fewer --layers or use --dtype float16, "
                             f"or pass --no-space-check to try anyway")

    dist.on_main(check_room)
    if kept:
        _say(verbose_here, f"resuming: {kept} complete shard(s) kept")

    # -- extract, then rank 0 gathers the sidecars, writes clips.json, then the manifest ---------
    _run(mine, JobLoader(corpus, config, settings.get("normalize_stats")), cache, runner, dist, stats,
         upstream=config.upstream, batch_seconds=batch_seconds, workers=workers, skip_bad=skip_bad, verbose=verbose)
    if dist.rank == 0:
        with output_errors(out):
            _finish(cache, jobs, shards, stats_skipped, list(corpus.skipped))
    dist.barrier()
    stats.wall_seconds = time.perf_counter() - t_start
    if verbose_here:
        _say(True, f"{out}: {stats.clips} clip(s) extracted, {stats.skipped} skipped, "
                   f"{stats.shards_kept} shard(s) kept; {stats.wall_seconds:.1f} s")


def _select_clips(corpus, config: ExtractConfig, skip_bad: bool, allow_symlinks: bool) -> Corpus:
    """The corpus (a root directory or a loaded :class:`Corpus`) restricted to ``config.splits``."""
    if not isinstance(corpus, Corpus):
        corpus = load_corpus(corpus, read_durations=True, skip_bad=skip_bad, splits=config.splits,
                             allow_symlinks=allow_symlinks)
    elif config.splits:
        corpus = corpus.restrict({n: c for n, c in corpus.clips.items() if c.split in config.splits})
    if len(corpus) == 0:
        raise CorpusError(f"{corpus.root}: no clips to extract"
                          + (f" in split(s) {', '.join(config.splits)}" if config.splits else ""))
    return corpus


def _claim(cache: CacheWriter, config: ExtractConfig, overwrite: bool, verbose: bool) -> None:
    """Rank 0: begin the cache directory and save seeded random weights once, before any
    other rank loads them."""
    with output_errors(cache.out), _hf_bars(verbose):
        cache.begin(overwrite=overwrite)
        if config.random_init:
            from .upstreams import build_random_upstream, random_init_dir

            build_random_upstream(config.upstream, random_init_dir(config.upstream, config.seed, cache.upstream_dir),
                                  seed=config.seed)


def _load_runner(config: ExtractConfig, cache: CacheWriter, dev, cdtype: str,
                 verbose: bool) -> Tuple[UpstreamRunner, dict]:
    """The upstream, ready to extract the layers ``config`` asks for, and its identity."""
    model, identity = _quiet_load(verbose, config.upstream, random_init=config.random_init, seed=config.seed,
                                  random_root=cache.upstream_dir, revision=config.revision)
    if config.random_init:  # where the weights are, relative to the cache, for later stages
        from .upstreams import random_init_dir

        identity["path"] = f"{UPSTREAM_DIR}/{random_init_dir(config.upstream, config.seed, '.').name}"
    num_hidden_states, _ = hidden_shape(model)
    runner = UpstreamRunner(model, device=dev, compute_dtype=cdtype,
                            layers=parse_layers(config.layers, num_hidden_states),
                            pooled_stats=config.pooled_stats, whisper_input=config.whisper_input or "30s",
                            compile=config.compile, stored_dtype=config.dtype)
    return runner, identity


def _settings(config: ExtractConfig, identity: dict, runner: UpstreamRunner, corpus: Corpus,
              noise_files: List) -> dict:
    """What a cache made with ``config`` from ``runner``'s upstream records (extraction.json)."""
    aug = config.augmentation
    classes = {} if corpus.classes.is_default else {"classes": corpus.classes.to_json()}
    return {
        "upstream": identity,
        "layers": runner.layers,
        "layers_spec": config.layers,
        "num_hidden_states": runner.num_hidden_states,
        "dim": runner.dim,
        "dtype": config.dtype,
        "compute_dtype": runner.compute_dtype,
        "frame_rate": runner.frame_rate,
        "max_seconds": config.max_seconds,
        "normalize": config.normalize,
        "pooled_stats": config.pooled_stats,
        "corpus_root": str(Path(corpus.root).resolve()),
        "corpus_fingerprint": corpus.fingerprint(),
        "splits": list(config.splits) if config.splits else None,
        "augmentation": None if aug is None else {
            "noise_dir": aug.noise_dir, "noise_files": len(noise_files),
            "noise_fingerprint": noise_fingerprint(aug.noise_dir, noise_files),
            "fraction": aug.fraction, "snr_db": list(aug.snr_db), "copies": aug.copies, "seed": config.seed},
        "shard_size": config.shard_size,
        "code_version": conilium.__version__,
        "config": config.to_json(),
        **classes,
        **({"compile": True} if config.compile else {}),
    }


def _my_shards(cache: CacheWriter, shards: List[List[Job]], dist: Dist) -> Tuple[Dict[int, List[Job]], int]:
    """This rank's shards still to write (every K-th of K ranks) and how many of its shards are
    already complete on disk."""
    mine: Dict[int, List[Job]] = {}
    kept = 0
    for index, shard_jobs in enumerate(shards):
        if index % dist.world != dist.rank:
            continue
        if cache.valid_shard(index, [j.name for j in shard_jobs]) is not None:
            kept += 1
            continue
        mine[index] = shard_jobs
    return mine, kept


def _run(mine: Dict[int, List[Job]], loader: JobLoader, cache: CacheWriter, runner: UpstreamRunner, dist: Dist,
         stats: ExtractStats, *, upstream: str, batch_seconds, workers, skip_bad, verbose) -> None:
    """Write this rank's shards (then release the upstream); a failure on any rank fails every
    rank with a CacheError naming the ranks."""
    todo = sum(len(v) for v in mine.values())
    progress = tqdm(total=todo, desc=f"extract {upstream}" + (f" [rank {dist.rank}]" if dist.world > 1 else ""),
                    unit="clip", disable=not verbose or todo == 0, file=sys.stderr, position=dist.rank,
                    dynamic_ncols=True, smoothing=0.1)
    error = None
    t_loop = time.perf_counter()
    try:
        run_shards(mine, cache=cache, loader=loader, runner=runner, batch_seconds=batch_seconds, workers=workers,
                   skip_bad=skip_bad, stats=stats, progress=progress)
    except BaseException as e:
        if dist.world == 1:
            raise
        error = f"rank {dist.rank}: {e}"
    finally:
        progress.close()
        runner.close()
        stats.loop_seconds = time.perf_counter() - t_loop
    stats.forward_seconds = runner.forward_seconds
    stats.computed_frames = runner.computed_frames
    stats.useful_frames = runner.useful_frames
    errors = dist.gather_errors(error)
    if errors:
        raise CacheError("; ".join(errors))


def _check_later_options(out: Path, found: dict, config: ExtractConfig) -> None:
    """A CacheError, as for the settings the writer compares, when the cache on disk was built
    with another ``rescale_loud`` or ``whisper_input`` (recorded in its ``"config"``; caches
    made before an option existed read as its default did then: ``rescale_loud=False``, a
    Whisper encoder's 30 s input). ``config`` is resolved (:func:`resolve_for_family`)."""
    recorded = found.get("config") or {}
    had = {"rescale_loud": bool(recorded.get("rescale_loud", False)),
           "whisper_input": recorded.get("whisper_input") or ("30s" if config.whisper_input else None)}
    diffs = [f"{k}: cache has {had[k]}, requested {getattr(config, k)}" for k in had if had[k] != getattr(config, k)]
    if diffs:
        raise CacheError(f"{out} was built with other settings than requested:\n  " + "\n  ".join(diffs)
                         + "\npass --overwrite to rebuild it, or choose another --out")


@contextlib.contextmanager
def _hf_bars(verbose: bool):
    """transformers' progress bars (loading, saving weights) only when ``verbose``."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not verbose:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _quiet_load(verbose: bool, name: str, **kw):
    """load_upstream, without transformers' progress bars unless ``verbose``."""
    with _hf_bars(verbose):
        return load_upstream(name, **kw)


def _settle_settings(cache: CacheWriter, settings: dict, corpus: Corpus, config: ExtractConfig, skip_bad: bool,
                     workers: int, verbose: bool) -> Tuple[dict, bool]:
    """The settings of the cache on disk when they agree with ``settings`` (and whether it is
    complete); for a new cache, ``settings`` with the normalisation statistics, written."""
    found = cache.existing_settings(settings)
    if found is not None:
        _check_later_options(cache.out, found[0], config)
        return found
    stats_skipped: List[Tuple[str, str]] = []
    if config.normalize == "global":
        ns, stats_skipped = global_stats(corpus, max_seconds=config.max_seconds, skip_bad=skip_bad, workers=workers,
                                         verbose=verbose, rescale_loud=config.rescale_loud)
        settings["normalize_stats"] = ns
    else:
        settings["normalize_stats"] = None
    settings["skipped_in_stats"] = [list(x) for x in stats_skipped]
    return cache.write_settings(settings), False


def _finish(cache: CacheWriter, jobs: List[Job], shards: List[List[Job]], stats_skipped, corpus_skipped) -> None:
    """Gather every shard's sidecar (whichever rank wrote it), then clips.json and the manifest."""
    entries = []
    num_frames: Dict[str, Tuple[int, int]] = {}
    skipped: Dict[str, str] = {n: r for n, r in corpus_skipped}
    skipped.update({n: r for n, r in stats_skipped})
    for index, shard_jobs in enumerate(shards):
        rec = cache.valid_shard(index, [j.name for j in shard_jobs], check_hash=False)
        if rec is None:
            raise CacheError(f"{cache.out}: shard {index} is missing or damaged after extraction; "
                             f"rerun extract-features")
        entries.append(rec["entry"])
        for n in rec["clips"]:
            num_frames[n] = (index, rec["num_frames"][n])
        for n, r in rec["skipped"]:
            skipped[n] = r
    records = []
    for j in jobs:  # corpus order, each clip's noisy copies after it
        if j.name not in num_frames:
            continue
        r = j.clip.to_json()
        r["shard"], r["num_frames"] = num_frames[j.name]
        if j.noise is not None:
            r["source"] = j.source
            r["augmentation"] = j.noise
        records.append(r)
    cache.finish(records, shards=entries, skipped=skipped)

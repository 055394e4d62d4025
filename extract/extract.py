"""extract-features: run an upstream over a corpus once, into a versioned HDF5 feature cache.

The work is planned before anything runs: every clip (and every noise-augmented copy of
a Train clip) gets a place in a shard, clips sorted by length so that batches of
similar lengths pad little. A shard is the unit of work, of resumption and of
scale-out: it is written under a temporary name, renamed when complete, and recorded
in a small sidecar (``shards/shard-NNNNN.json``) with the settings it was made with; a
rerun keeps every shard whose sidecar and checksum still match and redoes the rest.
Under ``torchrun`` the ranks take every K-th shard; rank 0 writes ``clips.json`` and,
last, ``manifest.json``.

Within a run, decoding (a thread pool) and HDF5 writing (a writer thread) overlap the
forward pass, so that the upstream is the bottleneck.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import queue
import shutil
import sys
import threading
import time
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import soundfile as sf
import soxr
from tqdm import tqdm

import conilium
from conilium import SAMPLE_RATE
from conilium.audio import AUDIO_EXTENSIONS, Noise, SignalPath, global_stats, list_noise_files, parse_snr
from conilium.corpus import Clip, Corpus, load_corpus
from conilium.errors import AudioError, CacheError, ConfigError, CorpusError
from conilium.util import read_json, write_json
from conilium.cache.store import (
    CLIPS, FORMAT_VERSION, MANIFEST, SHARD_DIR, file_sha256, shard_name, write_clips, write_manifest,
    write_shard,
)

from conilium.runtime import compute_dtype as pick_compute_dtype
from conilium.runtime import Dist, init_distributed

from .encoder import UpstreamRunner
from .upstreams import load_upstream

#: The settings file written when extraction starts (the manifest is written when it ends).
SETTINGS = "extraction.json"
#: Where random-init weights are saved, inside the cache directory.
UPSTREAM_DIR = "upstream"
#: Settings that must agree between a cache on disk and a request for it.
COMPARED = ("upstream", "layers", "num_hidden_states", "dim", "dtype", "compute_dtype", "max_seconds",
            "normalize", "pooled_stats", "corpus_fingerprint", "splits", "augmentation", "shard_size",
            "frame_rate", "code_version")
AUG_SEP = "#aug"
#: Default bound on a batch's padded audio, in seconds: larger batches pay off on a GPU only.
DEFAULT_BATCH_SECONDS = {"cpu": 60.0, "cuda": 300.0}


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class NoiseAugmentation:
    """Noise copies of Train clips (paper 3.2), stored as ``<FileName>#aug<k>``."""

    noise_dir: str
    fraction: float = 0.8
    snr_db: Tuple[float, float] = (5.0, 20.0)
    copies: int = 1

    def __post_init__(self):
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"--augment-fraction must be in (0, 1], got {self.fraction}")
        lo, hi = self.snr_db
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
            raise ConfigError(f"--snr-db must be LOW:HIGH with LOW <= HIGH, got {lo}:{hi}")
        if self.copies < 1:
            raise ConfigError(f"--copies must be at least 1, got {self.copies}")


def parse_layers(spec, num_hidden_states: int) -> List[int]:
    """``last`` | ``all`` | ``i,j,k`` (negative counts from the end) -> sorted hidden-state indices.

    Index 0 is the input of the first transformer layer, ``num_hidden_states - 1`` the
    model's last hidden state.
    """
    if isinstance(spec, (list, tuple)):
        items = [str(i) for i in spec]
    else:
        s = str(spec).strip().lower()
        if s == "last":
            return [num_hidden_states - 1]
        if s == "all":
            return list(range(num_hidden_states))
        items = [p.strip() for p in s.split(",") if p.strip()]
    if not items:
        raise ConfigError(f"--layers: expected last, all or comma-separated indices, got {spec!r}")
    out = []
    for p in items:
        try:
            i = int(p)
        except ValueError:
            raise ConfigError(f"--layers: expected last, all or comma-separated indices, got {spec!r}") from None
        if not -num_hidden_states <= i < num_hidden_states:
            raise ConfigError(f"--layers: index {i} out of range: this upstream has hidden states "
                              f"0..{num_hidden_states - 1} (0 = input of the first transformer layer, "
                              f"{num_hidden_states - 1} = last hidden state)")
        out.append(i % num_hidden_states)
    return sorted(set(out))


@dataclass(frozen=True)
class ExtractConfig:
    """Everything that decides what goes into a cache (written into ``extraction.json``)."""

    upstream: str
    layers: str = "last"
    dtype: str = "float16"
    max_seconds: Optional[float] = 8.0
    normalize: str = "global"
    pooled_stats: bool = False
    random_init: bool = False
    seed: int = 0
    revision: Optional[str] = None
    compute_dtype: str = "auto"
    shard_size: int = 256
    splits: Optional[Tuple[str, ...]] = None
    augmentation: Optional[NoiseAugmentation] = None

    def __post_init__(self):
        if self.dtype not in ("float16", "float32"):
            raise ConfigError(f"--dtype must be float16 or float32, got {self.dtype!r}")
        if self.normalize not in ("global", "utterance", "none"):
            raise ConfigError(f"--normalize must be global, utterance or none, got {self.normalize!r}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ConfigError(f"--max-seconds must be positive, got {self.max_seconds}")
        if self.shard_size < 1:
            raise ConfigError(f"--shard-size must be at least 1, got {self.shard_size}")


@dataclass
class ExtractStats:
    """Figures of one extraction run (filled in by :func:`extract_features` when passed)."""

    clips: int = 0
    skipped: int = 0
    shards_written: int = 0
    shards_kept: int = 0
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0
    loop_seconds: float = 0.0  # the decode / forward / write loop alone (no model loading, no statistics)
    forward_seconds: float = 0.0
    computed_frames: int = 0
    useful_frames: int = 0
    device: str = ""
    compute_dtype: str = ""
    batch_seconds: float = 0.0

    @property
    def forward_fraction(self) -> float:
        """Share of the extraction loop's wall time spent in the upstream's forward pass."""
        return self.forward_seconds / self.loop_seconds if self.loop_seconds else float("nan")

    @property
    def padding_ratio(self) -> float:
        return self.computed_frames / self.useful_frames if self.useful_frames else float("nan")

    @property
    def real_time_factor(self) -> float:
        """Wall seconds per second of audio processed (lower is faster)."""
        return self.wall_seconds / self.audio_seconds if self.audio_seconds else float("nan")

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(forward_fraction=self.forward_fraction, padding_ratio=self.padding_ratio,
                 real_time_factor=self.real_time_factor,
                 clips_per_second=self.clips / self.wall_seconds if self.wall_seconds else float("nan"))
        return d


# ----------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Job:
    """One clip to extract: an original clip, or a noisy copy of one."""

    name: str  # name in the cache
    source: str  # FileName of the audio
    clip: Clip  # record stored in clips.json (name == self.name)
    samples: int  # expected samples after resampling and truncation (for ordering)
    noise: Optional[dict] = None  # {"file", "snr_db", "offset"} for augmented copies


def _expected_samples(clip: Clip, max_seconds: Optional[float]) -> int:
    d = clip.duration if clip.duration is not None else (max_seconds or 0.0)
    if max_seconds is not None:
        d = min(d, max_seconds)
    return int(round(d * SAMPLE_RATE))


def _noise_fingerprint(noise_dir, files: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(noise_dir)}:{p.stat().st_size}\n".encode())
    return h.hexdigest()


def plan_jobs(corpus: Corpus, config: ExtractConfig, noise_files: Sequence[Path] = ()) -> List[Job]:
    """Every clip to extract, augmented copies included, in corpus order."""
    jobs: List[Job] = []
    aug = config.augmentation
    chosen = set()
    if aug is not None:
        train = sorted(c.name for c in corpus if c.split == "Train")
        k = int(round(aug.fraction * len(train)))
        rng = np.random.default_rng([config.seed, 7])
        chosen = {train[i] for i in rng.permutation(len(train))[:k]}
    noise_lengths: Dict[Path, float] = {}
    for clip in corpus:
        n = _expected_samples(clip, config.max_seconds)
        jobs.append(Job(clip.name, clip.name, clip, n))
        if clip.name not in chosen:
            continue
        for copy in range(1, aug.copies + 1):
            rng = np.random.default_rng([config.seed, 8, zlib.crc32(clip.name.encode()), copy])
            nf = noise_files[int(rng.integers(len(noise_files)))]
            if nf not in noise_lengths:
                try:
                    info = sf.info(str(nf))
                except Exception as e:
                    raise ConfigError(f"noise file {nf}: unreadable ({e})") from None
                noise_lengths[nf] = info.frames / info.samplerate
            snr = float(rng.uniform(*aug.snr_db))
            spare = max(0.0, noise_lengths[nf] - n / SAMPLE_RATE)
            offset = float(rng.uniform(0.0, spare)) if spare > 0 else 0.0
            name = f"{clip.name}{AUG_SEP}{copy}"
            noise = {"file": str(nf.relative_to(aug.noise_dir)), "snr_db": round(snr, 3), "offset": round(offset, 4)}
            jobs.append(Job(name, clip.name, dataclasses.replace(clip, name=name), n, noise))
    return jobs


def assign_shards(jobs: Sequence[Job], shard_size: int) -> List[List[Job]]:
    """Shards of ``shard_size`` jobs, clips sorted by length (then name) across the corpus."""
    ordered = sorted(jobs, key=lambda j: (j.samples, j.name))
    return [ordered[i:i + shard_size] for i in range(0, len(ordered), shard_size)]


def plan_batches(jobs: Sequence[Job], batch_seconds: float, *, batch_cost: float = 0.02) -> List[List[Job]]:
    """Batches of clips of similar length whose padded audio (size x longest) stays within
    ``batch_seconds``.

    Clips sorted by length are cut into consecutive batches by dynamic programming,
    minimising the padded samples computed plus a fixed cost per batch (``batch_cost``
    times the bound), so that padding stays small without making batches needlessly small.
    """
    ordered = sorted(jobs, key=lambda j: (j.samples, j.name))
    n = len(ordered)
    if n == 0:
        return []
    limit = batch_seconds * SAMPLE_RATE
    overhead = batch_cost * limit
    lengths = [max(j.samples, 1) for j in ordered]
    best = [0.0] + [math.inf] * n
    start = [0] * (n + 1)
    for end in range(1, n + 1):
        longest = lengths[end - 1]
        for begin in range(end - 1, -1, -1):
            size = end - begin
            if size > 1 and size * longest > limit:
                break
            cost = best[begin] + size * longest + overhead
            if cost <= best[end]:
                best[end], start[end] = cost, begin
    batches: List[List[Job]] = []
    end = n
    while end > 0:
        batches.append(ordered[start[end]:end])
        end = start[end]
    return batches[::-1]


class JobLoader:
    """A job's waveform through the signal path: its clip's audio, its noise (augmented copies)."""

    def __init__(self, corpus: Corpus, config: ExtractConfig, norm_stats: Optional[dict]):
        self.corpus = corpus
        self.noise_dir = Path(config.augmentation.noise_dir) if config.augmentation else None
        self.path = SignalPath(max_seconds=config.max_seconds, normalize=config.normalize, stats=norm_stats)

    def __call__(self, job: Job) -> np.ndarray:
        noise = None
        if job.noise is not None:
            noise = Noise(self.noise_dir / job.noise["file"], job.noise["snr_db"], job.noise["offset"])
        return self.path(self.corpus.audio_path(job.source), clip=job.name, noise=noise)


# ----------------------------------------------------------------------------- cache directory


def _describe(value) -> str:
    s = repr(value)
    return s if len(s) <= 120 else s[:117] + "..."


def compare_settings(existing: dict, requested: dict) -> List[str]:
    """Names and values of the settings that differ, one line each."""
    diffs = []
    for k in COMPARED:
        a, b = existing.get(k), requested.get(k)
        if a != b:
            diffs.append(f"{k}: cache has {_describe(a)}, requested {_describe(b)}")
    return diffs


def _settings_key(settings: dict) -> str:
    h = hashlib.sha256()
    for k in COMPARED:
        h.update(f"{k}={settings.get(k)!r}\n".encode())
    h.update(f"norm_stats={settings.get('normalize_stats')!r}\n".encode())
    return h.hexdigest()


def _is_cache_dir(path: Path) -> bool:
    return (path / MANIFEST).exists() or (path / SETTINGS).exists() or (path / SHARD_DIR).is_dir()


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CacheError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not _is_cache_dir(out) and not (out / UPSTREAM_DIR).is_dir():
            raise CacheError(f"--out {out}: directory is not empty and is not a feature cache; "
                             f"choose a new or empty directory")
        if overwrite:
            for child in out.iterdir():
                if child.is_dir():
                    shutil.rmtree(child)
                else:
                    child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    # leftovers of a killed run: temporary shard, sidecar and weight files
    for folder in (out, out / SHARD_DIR, out / UPSTREAM_DIR):
        if folder.is_dir():
            for child in folder.iterdir():
                if child.name.startswith(".") and child.name.endswith(".tmp") and child.is_file():
                    child.unlink()
                elif ".tmp" in child.name and child.is_dir() and folder.name == UPSTREAM_DIR:
                    shutil.rmtree(child, ignore_errors=True)


def projected_bytes(num_frames: int, n_clips: int, n_layers: int, dim: int, dtype: str, pooled_layers: int) -> int:
    per_value = 2 if dtype == "float16" else 4
    frames = num_frames * n_layers * dim * per_value
    pooled = n_clips * pooled_layers * 2 * dim * 4
    overhead = n_clips * 2048  # HDF5 object headers, chunk indices, names
    return frames + pooled + overhead


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


# ----------------------------------------------------------------------------- shard sidecars


def _sidecar_path(out: Path, index: int) -> Path:
    return out / shard_name(index).replace(".h5", ".json")


def _valid_shard(out: Path, index: int, jobs: Sequence[Job], key: str, *, check_hash: bool = True) -> Optional[dict]:
    """The sidecar of shard ``index`` if it is complete, made with ``key`` and intact."""
    side = _sidecar_path(out, index)
    if not side.is_file():
        return None
    try:
        rec = read_json(side)
    except ValueError:
        return None
    if rec.get("settings_key") != key:
        return None
    planned = sorted(j.name for j in jobs)
    done = sorted(list(rec.get("clips", [])) + [n for n, _ in rec.get("skipped", [])])
    if planned != done:
        return None
    path = out / rec["entry"]["file"]
    if not path.is_file() or path.stat().st_size != rec["entry"]["bytes"]:
        return None
    if check_hash and file_sha256(path) != rec["entry"]["sha256"]:
        return None
    return rec


# ----------------------------------------------------------------------------- pipeline


_END = object()  # ends a shard (and, between shards, the writer)
_ABORT = object()  # drops the shard being written


class _ShardWriter(threading.Thread):
    """Writes shards from a queue: ``("begin", index, skipped list)``, then one ``(name, frames,
    pooled)`` per clip, then ``_END`` (shard complete: renamed into place, sidecar written) or
    ``_ABORT`` (temporary file removed). A lone ``_END`` between shards stops the thread."""

    def __init__(self, out: Path, dtype: str, key: str, maxsize: int = 8):
        super().__init__(daemon=True, name="shard-writer")
        self.out = out
        self.dtype = dtype
        self.key = key
        self.q: "queue.Queue" = queue.Queue(maxsize=maxsize)
        self.error: Optional[BaseException] = None
        self.done: List[dict] = []

    def run(self):
        try:
            while True:
                ev = self.q.get()
                if ev is _END:
                    return
                _, index, skipped_box = ev
                frames_of: Dict[str, int] = {}

                def items():
                    while True:
                        item = self.q.get()
                        if item is _END:
                            return
                        if item is _ABORT:
                            raise _Aborted()
                        name, frames, pooled = item
                        frames_of[name] = int(frames.shape[0])
                        yield name, frames, pooled

                entry = write_shard(self.out / shard_name(index), items(), dtype=self.dtype, shard_index=index)
                rec = {"settings_key": self.key, "index": index, "entry": entry,
                       "clips": list(frames_of), "num_frames": frames_of, "skipped": skipped_box}
                write_json(_sidecar_path(self.out, index), rec)
                self.done.append(rec)
        except _Aborted:
            return
        except BaseException as e:  # reported to the main thread, whose put() stops waiting
            self.error = e

    def put(self, item):
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.q.put(item, timeout=0.5)
                return
            except queue.Full:
                continue


class _Aborted(Exception):
    pass


def _decode(loader: "JobLoader", job: Job, skip_bad: bool, runner: UpstreamRunner):
    try:
        x = loader(job)
        if runner.frames_for(len(x)) < 1:
            raise AudioError(loader.corpus.audio_path(job.source),
                             f"too short ({len(x)} samples) for the upstream's receptive field", job.name)
        return x
    except AudioError as e:
        if skip_bad:
            return e
        raise AudioError(e.path, e.reason + " (pass --skip-bad to leave such clips out and list them "
                                            "in the manifest)", e.clip) from None


def _run_shards(shards: Dict[int, List[Job]], *, out: Path, loader: "JobLoader", runner: UpstreamRunner,
                batch_seconds: float, workers: int, skip_bad: bool, dtype: str, key: str,
                stats: ExtractStats, progress: Optional[tqdm]) -> None:
    writer = _ShardWriter(out, dtype, key)
    writer.start()
    plan: List[Tuple[int, List[Job], bool, bool]] = []  # (shard, batch, first, last)
    for index, jobs in shards.items():
        batches = plan_batches(jobs, batch_seconds)
        for b, batch in enumerate(batches):
            plan.append((index, batch, b == 0, b == len(batches) - 1))
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="decode")
    pending: "deque[Tuple[int, List[Job], bool, bool, List[Future]]]" = deque()
    ahead = max(2, workers * 2)
    it = iter(plan)

    def refill():
        while len(pending) < ahead:
            try:
                index, batch, first, last = next(it)
            except StopIteration:
                return
            pending.append((index, batch, first, last, [pool.submit(_decode, loader, j, skip_bad, runner)
                                                         for j in batch]))

    skipped: List = []
    in_shard = False
    try:
        refill()
        while pending:
            index, batch, first, last, futures = pending.popleft()
            waves = [f.result() for f in futures]
            refill()
            if first:
                skipped = []
                writer.put(("begin", index, skipped))
                in_shard = True
            keep = []
            for job, w in zip(batch, waves):
                if isinstance(w, AudioError):
                    skipped.append([job.name, str(w)])
                else:
                    keep.append((job, w))
            outputs = runner([w for _, w in keep]) if keep else []
            for (job, w), (frames, pooled) in zip(keep, outputs):
                writer.put((job.name, frames, pooled))
                stats.audio_seconds += len(w) / SAMPLE_RATE
            stats.clips += len(keep)
            stats.skipped += len(batch) - len(keep)
            if last:
                writer.put(_END)
                in_shard = False
                stats.shards_written += 1
            if progress is not None:
                progress.update(len(batch))
        writer.put(_END)
        writer.join()
        if writer.error is not None:
            raise writer.error
    except BaseException:
        if in_shard and writer.is_alive() and writer.error is None:
            try:
                writer.q.put(_ABORT, timeout=5)
                writer.q.put(_END, timeout=5)
            except queue.Full:
                pass
        writer.join(timeout=30)
        for _, _, _, _, futures in pending:
            for f in futures:
                f.cancel()
        if writer.error is not None and not isinstance(writer.error, _Aborted):
            raise writer.error
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- entry point


def extract_features(corpus, upstream: str, out, *, layers="last", dtype: str = "float16",
                     max_seconds: Optional[float] = 8.0, normalize: str = "global", pooled_stats: bool = False,
                     random_init: bool = False, seed: int = 0, revision: Optional[str] = None,
                     batch_seconds: Optional[float] = None, device: str = "auto", compute_dtype: str = "auto",
                     shard_size: int = 256, workers: int = 2, skip_bad: bool = False,
                     splits: Optional[Sequence[str]] = None,
                     augment_noise=None, augment_fraction: float = 0.8, snr_db=(5.0, 20.0), copies: int = 1,
                     overwrite: bool = False, check_space: bool = True, verbose: bool = True,
                     stats: Optional[ExtractStats] = None) -> Path:
    """Extract ``upstream``'s hidden states over ``corpus`` (a root directory or a loaded
    :class:`~conilium.corpus.Corpus`) into the cache directory ``out``; returns ``out``.

    See ``extract-features --help`` for the options. A cache already complete with the
    same settings is returned untouched; one built with other settings is a
    :class:`CacheError` naming them (``overwrite=True`` rebuilds it). ``stats``, when
    given, receives the run's timing and padding figures.
    """
    t_start = time.perf_counter()
    stats = stats if stats is not None else ExtractStats()
    out = Path(out)
    dist, dev = init_distributed(device, backend="gloo", timeout_hours=6)  # rank 0 alone computes the statistics first
    clean = False
    try:
        result = _extract(corpus, upstream, out, dist, dev, t_start, stats, layers=layers, dtype=dtype,
                          max_seconds=max_seconds, normalize=normalize, pooled_stats=pooled_stats,
                          random_init=random_init, seed=seed, revision=revision, batch_seconds=batch_seconds,
                          device=device, compute_dtype=compute_dtype, shard_size=shard_size, workers=workers,
                          skip_bad=skip_bad, splits=splits, augment_noise=augment_noise,
                          augment_fraction=augment_fraction, snr_db=snr_db, copies=copies, overwrite=overwrite,
                          check_space=check_space, verbose=verbose)
        clean = True
        return result
    finally:
        dist.close(clean)


def _say(verbose: bool, msg: str) -> None:
    if verbose:
        tqdm.write(msg, file=sys.stderr)


def _extract(corpus, upstream, out: Path, dist: Dist, dev, t_start: float, stats: ExtractStats, *, layers, dtype,
             max_seconds, normalize, pooled_stats, random_init, seed, revision, batch_seconds, device,
             compute_dtype, shard_size, workers, skip_bad, splits, augment_noise, augment_fraction, snr_db,
             copies, overwrite, check_space, verbose) -> Path:
    if batch_seconds is not None and not batch_seconds > 0:
        raise ConfigError(f"--batch-seconds must be positive, got {batch_seconds}")
    verbose_here = verbose and dist.rank == 0
    if isinstance(snr_db, str):
        snr_db = parse_snr(snr_db)
    aug = None
    if augment_noise is not None:
        aug = NoiseAugmentation(str(Path(augment_noise).resolve()), float(augment_fraction),
                                (float(snr_db[0]), float(snr_db[1])), int(copies))
    config = ExtractConfig(upstream=str(upstream), layers=str(layers) if not isinstance(layers, (list, tuple))
                           else ",".join(str(i) for i in layers), dtype=dtype, max_seconds=max_seconds,
                           normalize=normalize, pooled_stats=bool(pooled_stats), random_init=bool(random_init),
                           seed=int(seed), revision=revision, compute_dtype=compute_dtype,
                           shard_size=int(shard_size), splits=tuple(splits) if splits else None, augmentation=aug)

    # -- the corpus ------------------------------------------------------------------------
    if not isinstance(corpus, Corpus):
        corpus = load_corpus(corpus, read_durations=True, skip_bad=skip_bad, splits=config.splits)
    elif config.splits:
        corpus = Corpus(root=corpus.root, clips={n: c for n, c in corpus.clips.items() if c.split in config.splits},
                        skipped=list(corpus.skipped))
    if len(corpus) == 0:
        raise CorpusError(f"{corpus.root}: no clips to extract"
                          + (f" in split(s) {', '.join(config.splits)}" if config.splits else ""))
    noise_files = list_noise_files(aug.noise_dir) if aug else []

    # -- the cache directory and the upstream (rank 0 prepares, the others follow) ------------
    error = None
    if dist.rank == 0:
        try:
            _prepare_out(out, overwrite)
            if random_init:  # save the random weights once, before any other rank loads them
                from .upstreams import build_random_upstream, random_init_dir

                build_random_upstream(config.upstream, random_init_dir(config.upstream, seed, out / UPSTREAM_DIR),
                                      seed=seed)
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
            if dist.world == 1:
                raise
    error = dist.broadcast(error)
    if error:
        raise CacheError(error)
    cdtype = pick_compute_dtype(compute_dtype, dev)
    if batch_seconds is None:
        batch_seconds = DEFAULT_BATCH_SECONDS[dev.type]
    model, identity = _quiet_load(verbose, config.upstream, random_init=random_init, seed=seed,
                                  random_root=out / UPSTREAM_DIR, revision=revision)
    if random_init:  # where the weights are, relative to the cache, for later stages
        from .upstreams import random_init_dir

        identity["path"] = f"{UPSTREAM_DIR}/{random_init_dir(config.upstream, seed, '.').name}"
    n_states = model.config.num_hidden_layers + 1
    layer_idx = parse_layers(config.layers, n_states)
    runner = UpstreamRunner(model, device=dev, compute_dtype=cdtype, layers=layer_idx, pooled_stats=pooled_stats)
    stride = 1
    for s in model.config.conv_stride:
        stride *= s

    settings = {
        "format": FORMAT_VERSION,
        "upstream": identity,
        "layers": layer_idx,
        "layers_spec": config.layers,
        "num_hidden_states": n_states,
        "dim": int(model.config.hidden_size),
        "dtype": dtype,
        "compute_dtype": cdtype,
        "frame_rate": SAMPLE_RATE / stride,
        "max_seconds": max_seconds,
        "normalize": normalize,
        "pooled_stats": bool(pooled_stats),
        "corpus_root": str(Path(corpus.root).resolve()),
        "corpus_fingerprint": corpus.fingerprint(),
        "splits": list(config.splits) if config.splits else None,
        "augmentation": None if aug is None else {
            "noise_dir": aug.noise_dir, "noise_files": len(noise_files),
            "noise_fingerprint": _noise_fingerprint(aug.noise_dir, noise_files),
            "fraction": aug.fraction, "snr_db": list(aug.snr_db), "copies": aug.copies, "seed": seed},
        "shard_size": int(shard_size),
        "code_version": conilium.__version__,
        "config": dataclasses.asdict(config),
    }

    # -- compare with what is on disk, fix the normalisation statistics ----------------------
    error = None
    if dist.rank == 0:
        try:
            settings = _reconcile(out, settings, corpus, config, skip_bad, workers, verbose_here)
        except Exception as e:
            error = f"{e}"
            if dist.world == 1:
                raise
    error = dist.broadcast(error)
    if error:
        raise CacheError(error)
    settings = dist.broadcast(settings)
    was_complete = bool(settings.get("complete_manifest"))
    key = _settings_key(settings)
    norm_stats = settings.get("normalize_stats")
    stats_skipped = [tuple(x) for x in settings.get("skipped_in_stats", [])]

    # -- plan -----------------------------------------------------------------------------------
    jobs = plan_jobs(corpus, config, noise_files)
    shards = assign_shards(jobs, config.shard_size)
    mine: Dict[int, List[Job]] = {}
    kept = 0
    for index, shard_jobs in enumerate(shards):
        if index % dist.world != dist.rank:
            continue
        if _valid_shard(out, index, shard_jobs, key) is not None:
            kept += 1
            continue
        mine[index] = shard_jobs
    stats.shards_kept = kept
    stats.device = dev.type
    stats.compute_dtype = cdtype
    stats.batch_seconds = batch_seconds
    todo_jobs = [j for v in mine.values() for j in v]
    todo_frames = sum(dist.gather(sum(runner.frames_for(j.samples) for j in todo_jobs)))
    todo_clips = sum(dist.gather(len(todo_jobs)))
    if was_complete and todo_clips == 0:
        runner.close()
        _say(verbose_here, f"{out}: cache already complete with these settings; nothing to do")
        stats.wall_seconds = time.perf_counter() - t_start
        return out
    useful = sum(runner.frames_for(j.samples) for j in jobs)
    total_bytes = projected_bytes(useful, len(jobs), len(layer_idx), settings["dim"], dtype,
                                  n_states if pooled_stats else 0)
    todo_bytes = projected_bytes(todo_frames, todo_clips, len(layer_idx), settings["dim"], dtype,
                                 n_states if pooled_stats else 0)
    error = None
    if dist.rank == 0:
        free = shutil.disk_usage(out).free
        _say(verbose_here, f"extracting {len(jobs)} clips ({len(corpus)} in the corpus"
             + (f", {len(jobs) - len(corpus)} noisy copies" if aug else "") + f") with {config.upstream} "
             f"on {dev.type} ({cdtype}) into {len(shards)} shard(s); layers {layer_idx}, {dtype}")
        _say(verbose_here, f"projected cache size: {_human(total_bytes)}"
             + (f" ({_human(todo_bytes)} still to write)" if todo_clips < len(jobs) else "")
             + f"; free disk: {_human(free)}")
        if check_space and todo_bytes > free:
            error = (f"projected cache size {_human(todo_bytes)} exceeds the free disk space at {out} "
                     f"({_human(free)}); free some space, store fewer --layers or use --dtype float16, "
                     f"or pass --no-space-check to try anyway")
    error = dist.broadcast(error)
    if error:
        raise CacheError(error)
    if kept:
        _say(verbose_here, f"resuming: {kept} complete shard(s) kept")

    # -- extract --------------------------------------------------------------------------------
    loader = JobLoader(corpus, config, norm_stats)
    todo = sum(len(v) for v in mine.values())
    progress = tqdm(total=todo, desc=f"extract {config.upstream}" + (f" [rank {dist.rank}]" if dist.world > 1 else ""),
                    unit="clip", disable=not verbose or todo == 0, file=sys.stderr, position=dist.rank,
                    dynamic_ncols=True, smoothing=0.1)
    error = None
    t_loop = time.perf_counter()
    try:
        _run_shards(mine, out=out, loader=loader, runner=runner, batch_seconds=batch_seconds, workers=workers,
                    skip_bad=skip_bad, dtype=dtype, key=key, stats=stats, progress=progress)
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

    # -- finish: rank 0 gathers the sidecars, writes clips.json, then the manifest ---------------
    if dist.rank == 0:
        _finish(out, settings, jobs, shards, key, stats_skipped, list(corpus.skipped))
    dist.barrier()
    stats.wall_seconds = time.perf_counter() - t_start
    if verbose_here:
        _say(True, f"{out}: {stats.clips} clip(s) extracted, {stats.skipped} skipped, "
                   f"{stats.shards_kept} shard(s) kept; {stats.wall_seconds:.1f} s")
    return out


def _quiet_load(verbose: bool, name: str, **kw):
    """load_upstream, without transformers' progress bars unless ``verbose``."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not verbose:
        hf_logging.disable_progress_bar()
    try:
        return load_upstream(name, **kw)
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _reconcile(out: Path, settings: dict, corpus: Corpus, config: ExtractConfig, skip_bad: bool, workers: int,
               verbose: bool) -> dict:
    """Check ``settings`` against the cache on disk; compute and record the normalisation stats."""
    found = None
    complete = False
    for path in (out / MANIFEST, out / SETTINGS):
        if path.is_file():
            try:
                existing = read_json(path)
            except ValueError:
                raise CacheError(f"{path}: unreadable (corrupt); pass --overwrite to rebuild the cache") from None
            diffs = compare_settings(existing, settings)
            if diffs:
                raise CacheError(f"{out} was built with other settings than requested:\n  " + "\n  ".join(diffs)
                                 + "\npass --overwrite to rebuild it, or choose another --out")
            found = dict(existing)  # settings.json (read last) when there is one
            if path.name == MANIFEST:
                complete = bool(existing.get("complete"))
    if found is not None:
        found["complete_manifest"] = complete
        if not (out / SETTINGS).is_file():
            write_json(out / SETTINGS, {k: v for k, v in found.items()
                                        if k not in ("complete_manifest", "shards", "skipped", "num_clips",
                                                     "clips_sha256", "complete")})
        return found
    stats_skipped: List[Tuple[str, str]] = []
    if config.normalize == "global":
        ns, stats_skipped = global_stats(corpus, max_seconds=config.max_seconds, skip_bad=skip_bad, workers=workers,
                                         verbose=verbose)
        settings["normalize_stats"] = ns
    else:
        settings["normalize_stats"] = None
    settings["skipped_in_stats"] = [list(x) for x in stats_skipped]
    write_json(out / SETTINGS, settings)
    return settings


def _finish(out: Path, settings: dict, jobs: List[Job], shards: List[List[Job]], key: str, stats_skipped,
            corpus_skipped) -> None:
    entries = []
    num_frames: Dict[str, Tuple[int, int]] = {}
    skipped: Dict[str, str] = {n: r for n, r in corpus_skipped}
    skipped.update({n: r for n, r in stats_skipped})
    for index, shard_jobs in enumerate(shards):
        rec = _valid_shard(out, index, shard_jobs, key, check_hash=False)
        if rec is None:
            raise CacheError(f"{out}: shard {index} is missing or damaged after extraction; rerun extract-features")
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
    write_clips(out, records)
    manifest = {k: v for k, v in settings.items() if k not in ("complete_manifest", "skipped_in_stats")}
    manifest.update({
        "format": FORMAT_VERSION,
        "num_clips": len(records),
        "skipped": [{"clip": n, "reason": r} for n, r in sorted(skipped.items())],
        "clips_sha256": file_sha256(out / CLIPS),
        "shards": entries,
        "complete": True,
    })
    write_manifest(out, manifest)

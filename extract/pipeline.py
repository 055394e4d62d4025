"""The extraction loop: decode, forward, write, overlapped.

For the shards a process has to make, :func:`run_shards` decodes the clips of the next
batches in a thread pool (:class:`JobLoader`: the one signal path, plus a job's noise),
runs the upstream in the calling thread, and hands each clip's hidden states to a writer
thread that streams them into the shard's HDF5 file through the
:class:`~conilium.cache.writer.CacheWriter` — so that the upstream is the bottleneck.
On CUDA (:data:`SUBMIT_AHEAD`) the results of a batch are taken one batch late: batch k+1
is submitted to the upstream (:meth:`~conilium.extract.encoder.UpstreamRunner.submit`)
before batch k's states are collected and written, so that their copy to host memory
overlaps the next forward pass. The writer sees the same events in the same order as
without the delay.
A shard is complete when its sidecar is written; a failure drops the shard being written.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from tqdm import tqdm

from conilium import SAMPLE_RATE
from conilium.audio import Noise, SignalPath
from conilium.cache.writer import CacheWriter
from conilium.corpus import Corpus
from conilium.errors import AudioError
from conilium.util import output_error

from .encoder import UpstreamRunner
from .plan import ExtractConfig, Job, plan_batches


@dataclass
class ExtractStats:
    """Figures of one extraction run (filled in by :func:`~conilium.extract.extract_features` when passed)."""

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
    #: batches padded to length buckets (:meth:`UpstreamRunner.use_length_buckets`)
    length_buckets: bool = False

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


class JobLoader:
    """A job's waveform through the signal path: its clip's audio, its noise (augmented copies)."""

    def __init__(self, corpus: Corpus, config: ExtractConfig, norm_stats: Optional[dict]):
        self.corpus = corpus
        self.noise_dir = Path(config.augmentation.noise_dir) if config.augmentation else None
        self.path = SignalPath(max_seconds=config.max_seconds, normalize=config.normalize, stats=norm_stats,
                               rescale_loud=config.rescale_loud)

    def __call__(self, job: Job) -> np.ndarray:
        noise = None
        if job.noise is not None:
            noise = Noise(self.noise_dir / job.noise["file"], job.noise["snr_db"], job.noise["offset"])
        return self.path(self.corpus.audio_path(job.source), clip=job.name, noise=noise)


#: batch k+1 is submitted to the upstream before batch k's results are written (False: each
#: batch is written as soon as it is submitted, the loop without the overlap). None: on a CUDA
#: device only, where the forward runs asynchronously and the overlap pays; on the CPU the
#: forward is done when submit() returns, and holding one batch back only costs memory
#: (measured ~8 % slower there, bench/bench_extract.py)
SUBMIT_AHEAD: Optional[bool] = None

_END = object()  # ends a shard (and, between shards, the writer)
_ABORT = object()  # drops the shard being written


class _Aborted(Exception):
    pass


class _ShardWriter(threading.Thread):
    """Writes shards from a queue: ``("begin", index, skipped list)``, then one ``(name, frames,
    pooled)`` per clip, then ``_END`` (shard complete: renamed into place, sidecar written) or
    ``_ABORT`` (temporary file removed). A lone ``_END`` between shards stops the thread."""

    def __init__(self, cache: CacheWriter, maxsize: int = 8):
        super().__init__(daemon=True, name="shard-writer")
        self.cache = cache
        self.q: "queue.Queue" = queue.Queue(maxsize=maxsize)
        self.error: Optional[BaseException] = None

    def run(self):
        try:
            while True:
                ev = self.q.get()
                if ev is _END:
                    return
                _, index, skipped_box = ev

                def items():
                    while True:
                        item = self.q.get()
                        if item is _END:
                            return
                        if item is _ABORT:
                            raise _Aborted()
                        yield item

                self.cache.write_shard(index, items(), skipped=skipped_box)
        except _Aborted:
            return
        except BaseException as e:  # reported to the main thread, whose put() stops waiting
            err = output_error(e, self.cache.out)  # a full disk, a read-only cache: one error naming it
            if err is not None and err is not e:
                err.__cause__ = e
            self.error = e if err is None else err

    def put(self, item):
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.q.put(item, timeout=0.5)
                return
            except queue.Full:
                continue


def _decode(loader: JobLoader, job: Job, skip_bad: bool, runner: UpstreamRunner):
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


def run_shards(shards: Dict[int, List[Job]], *, cache: CacheWriter, loader: JobLoader, runner: UpstreamRunner,
               batch_seconds: float, workers: int, skip_bad: bool, stats: ExtractStats,
               progress: Optional[tqdm]) -> None:
    """Extract and write ``shards`` (shard index → its jobs); unreadable clips are an error,
    or, with ``skip_bad``, left out and listed in their shard's sidecar."""
    writer = _ShardWriter(cache)
    writer.start()
    plan: List[Tuple[int, List[Job], bool, bool]] = []  # (shard, batch, first, last)
    for index, jobs in shards.items():
        batches = plan_batches(jobs, batch_seconds, min_samples=runner.min_samples, pad_to=runner.padded_samples)
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
    overlap = SUBMIT_AHEAD if SUBMIT_AHEAD is not None else runner.asynchronous
    submitted = None  # the batch whose results are yet to be written

    def collect(index, batch, first, last, waves, keep, handle):
        """Write a submitted batch: its shard's begin marker, its skipped clips, its clips, its
        shard's end marker; as the loop did before batches were submitted ahead."""
        nonlocal skipped, in_shard
        if first:
            skipped = []
            writer.put(("begin", index, skipped))
            in_shard = True
        for job, w in zip(batch, waves):
            if isinstance(w, AudioError):
                skipped.append([job.name, str(w)])
        outputs = runner.result(handle)
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

    try:
        refill()
        while pending:
            index, batch, first, last, futures = pending.popleft()
            try:
                waves = [f.result() for f in futures]
                refill()
                keep = [(job, w) for job, w in zip(batch, waves) if not isinstance(w, AudioError)]
                handle = runner.submit([w for _, w in keep]) if keep else None
            except BaseException:
                # the batch before was computed: it is written (ending its shard) as it would have
                # been before this one ran; a failure there is raised, this one chained to it
                if submitted is not None:
                    collect(*submitted)
                raise
            if submitted is not None:
                collect(*submitted)
            submitted = (index, batch, first, last, waves, keep, handle)
            if not overlap:
                collect(*submitted)
                submitted = None
        if submitted is not None:
            collect(*submitted)
        writer.put(_END)
        writer.join()
        if writer.error is not None:
            raise writer.error
    except BaseException:
        if writer.is_alive() and writer.error is None:  # between shards too: it waits for the next one
            try:
                if in_shard:
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

"""``predict --inputs``: prediction over very many files, as a resumable job of Parquet shards.

>>> from conilium.finetune.scale import PredictorSpec, run_job, read_predictions
>>> run_job(PredictorSpec("model", "models/wavlm-wbce-S"), "recordings/", "job/")
>>> read_predictions("job/")            # one pyarrow table, the shards in order

The inputs (a list file, one path a line, or a folder walked lazily in sorted order) are cut
into chunks of ``shard_files`` files; chunk ``k`` is predicted and written as
``DIR/shards/part-{k:06d}.parquet`` (the columns of ``predict --out FILE.parquet``) through a
temporary file renamed onto its name, then recorded as one line of ``DIR/index.jsonl``
(files, rows, predicted, failed and the first failed files with their errors). A chunk counts
as done only when its line is in the index and its shard is there, so a rerun after a kill
predicts the rest and nothing half-written is taken for done (a temporary file left by the
killed run is removed when its chunk is predicted again).

``DIR/job.json`` records what the shards were made with: the model (kind, path and a SHA-256
of its files), the options that change a row, the shard size and a fingerprint of the input
list. A rerun with anything else is refused with a message naming what differs.

Several processes share a job without talking to each other: under ``torchrun`` (the
``RANK`` and ``WORLD_SIZE`` variables) process ``r`` of ``K`` takes the chunks ``k ≡ r (mod
K)``; with ray (:func:`run_job_ray`) each actor loads the model once and predicts the
chunks it is handed. A chunk's rows do not depend on which process predicted it, so the
table of a job is the same, row for row, whatever the number of processes.

Nothing here imports torch; :meth:`PredictorSpec.build` loads the predictor it names.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from conilium.errors import ConfigError, ConiliumError
from conilium.util import atomic_path, check_writable, output_errors

from .results import FilePrediction, audio_suffixes, to_table

#: the format of job.json and of the index lines
JOB_FORMAT = 1
#: files per shard unless told
SHARD_FILES = 1000
#: failed files an index line names (its counts cover all of them)
FAILED_NAMED = 5
JOB_FILE = "job.json"
INDEX_FILE = "index.jsonl"
SHARD_DIR = "shards"
SOURCE_KINDS = ("model", "run", "onnx")


# ----------------------------------------------------------------------------- what predicts

@dataclass(frozen=True)
class PredictorSpec:
    """What :meth:`build` loads: ``kind`` ``model`` (a finetune-best directory), ``run`` (a
    train-head run) or ``onnx`` (an exported file), its path and the predictor's options.
    Picklable, so that a ray actor can build its own predictor from it."""

    kind: str
    path: str
    device: str = "auto"
    batch_size: int = 8
    max_seconds: Optional[float] = None
    max_whole_seconds: float = 120.0
    rescale_loud: Optional[bool] = None

    def __post_init__(self):
        if self.kind not in SOURCE_KINDS:
            raise ConfigError(f"predict: the model kind must be one of {', '.join(SOURCE_KINDS)}, not {self.kind!r}")
        object.__setattr__(self, "path", os.path.abspath(self.path))

    def build(self, local_rank: Optional[int] = None):
        """The predictor (:class:`~conilium.finetune.predict.Predictor`, torch, or
        :class:`~conilium.finetune.onnx_predict.OnnxPredictor`, onnxruntime). ``local_rank``
        (one of several processes on a machine): ``auto`` or ``cuda`` without a number takes
        that process's GPU, as torchrun's processes do."""
        device = self.device
        kw = dict(batch_size=self.batch_size, max_seconds=self.max_seconds,
                  max_whole_seconds=self.max_whole_seconds, rescale_loud=self.rescale_loud)
        if self.kind == "onnx":
            from .onnx_predict import OnnxPredictor, providers_for

            if local_rank is not None and device in ("auto", "cuda") and "CUDAExecutionProvider" in \
                    providers_for(device):
                device = f"cuda:{local_rank}"
            return OnnxPredictor(self.path, device=device, **kw)
        from .predict import Predictor

        if local_rank is not None and device in ("auto", "cuda"):
            import torch

            if torch.cuda.is_available():
                device = f"cuda:{local_rank % torch.cuda.device_count()}"
        kw["device"] = device

        return Predictor(self.path, **kw) if self.kind == "model" else Predictor(run=self.path, **kw)

    def settings(self) -> Dict[str, Any]:
        """What changes a row: the model (kind, path, hash of its files) and the options
        (not the device: a job may be resumed on another one)."""
        return {"model_kind": self.kind, "model_path": self.path, "model_sha256": source_hash(self.path),
                "batch_size": self.batch_size, "max_seconds": self.max_seconds,
                "max_whole_seconds": self.max_whole_seconds, "rescale_loud": self.rescale_loud}


def source_hash(path) -> str:
    """SHA-256 over the files of a model directory or run (relative names and contents, in
    sorted order), or of one file; an error naming ``path`` when it is missing."""
    path = Path(path)
    if path.is_file():
        files = [(path.name, path)]
    elif path.is_dir():
        files = sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*") if p.is_file())
    else:
        raise ConfigError(f"{path}: not found (the model to predict with)")
    h = hashlib.sha256()
    for name, p in files:
        h.update(name.encode("utf-8") + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


# ----------------------------------------------------------------------------- the inputs

def walk_audio(folder, pattern: str = "*") -> Iterator[str]:
    """The audio files below ``folder`` whose names match ``pattern``, in the order of their
    sorted paths (as :func:`~conilium.finetune.results.audio_files`), one directory read at a
    time: a folder of millions of files is never listed whole."""
    suffixes = audio_suffixes()

    def walk(d: str) -> Iterator[str]:
        try:
            with os.scandir(d) as it:
                # linked folders are not followed (as audio_files' rglob; a loop of links cannot trap the walk)
                entries = [(e.name + ("/" if e.is_dir(follow_symlinks=False) else ""), e) for e in it]
        except OSError as e:
            raise ConfigError(f"--inputs: cannot read the folder {d} ({e.strerror or e})") from None
        for key, e in sorted(entries, key=lambda t: t[0]):
            if key.endswith("/"):
                yield from walk(e.path)
            elif fnmatch.fnmatch(e.name, pattern) and os.path.splitext(e.name)[1].lower() in suffixes:
                yield e.path

    yield from walk(str(folder))


def iter_inputs(source, pattern: str = "*") -> Iterator[str]:
    """The paths of ``--inputs``: a folder's audio files (:func:`walk_audio`) or a list file's lines
    (blank lines and # comments skipped; relative paths as given)."""
    source = Path(source)
    if source.is_dir():
        return walk_audio(source, pattern)
    if not source.is_file():
        raise ConfigError(f"--inputs {source}: not found (a folder of audio files or a list file, one path a line)")
    if source.suffix.lower() in audio_suffixes():
        raise ConfigError(f"--inputs {source}: an audio file, not a list of them; give a folder or a text file with "
                          f"one path a line")

    def lines() -> Iterator[str]:
        try:
            with open(source, encoding="utf-8") as f:
                for line in f:
                    s = line.strip()
                    if s and not s.startswith("#"):
                        yield s
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--inputs {source}: cannot read ({getattr(e, 'strerror', None) or e})") from None

    return lines()


def fingerprint(paths: Iterator[str]) -> Tuple[str, int]:
    """SHA-256 of the input list (in order) and its length, in one pass."""
    h = hashlib.sha256()
    n = 0
    for p in paths:
        h.update(p.encode("utf-8", "surrogateescape") + b"\n")
        n += 1
    return h.hexdigest(), n


def chunks(paths: Iterator[str], size: int) -> Iterator[Tuple[int, List[str]]]:
    """``(k, files)`` for consecutive chunks of ``size`` paths."""
    k, buf = 0, []
    for p in paths:
        buf.append(p)
        if len(buf) == size:
            yield k, buf
            k, buf = k + 1, []
    if buf:
        yield k, buf


# ----------------------------------------------------------------------------- the job directory

@dataclass
class JobDir:
    """``DIR/job.json``, ``DIR/index.jsonl`` and ``DIR/shards/part-NNNNNN.parquet``."""

    root: Path

    def __post_init__(self):
        self.root = Path(os.path.abspath(self.root))

    @property
    def job_file(self) -> Path:
        return self.root / JOB_FILE

    @property
    def index_file(self) -> Path:
        return self.root / INDEX_FILE

    def shard(self, k: int) -> Path:
        return self.root / SHARD_DIR / f"part-{k:06d}.parquet"

    def job(self) -> Optional[dict]:
        if not self.job_file.exists():
            return None
        try:
            job = json.loads(self.job_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{self.job_file}: not a readable job description ({e}); remove the folder to start "
                              f"again") from None
        if not isinstance(job, dict) or "settings" not in job:
            raise ConfigError(f"{self.job_file}: not a predict --inputs job description; choose another --out")
        return job

    def index(self) -> Dict[int, dict]:
        """Shard number → its index line (the last one where a shard was written twice). A line
        cut short by a kill is ignored (its chunk is predicted again)."""
        out: Dict[int, dict] = {}
        if not self.index_file.exists():
            return out
        with open(self.index_file, encoding="utf-8") as f:
            for line in f:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    rec = json.loads(line)
                    out[int(rec["shard"])] = rec
        return out

    def done(self) -> Dict[int, dict]:
        """The chunks done: in the index, their shard present."""
        return {k: rec for k, rec in self.index().items() if self.shard(k).is_file()}

    def record(self, rec: dict) -> None:
        """Append one index line with a single write (lines of several processes do not mix)."""
        self.record_bytes((json.dumps(rec, sort_keys=True) + "\n").encode("utf-8"))

    def record_bytes(self, data: bytes) -> None:
        with output_errors(self.index_file):
            fd = os.open(self.index_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)

    def end_cut_line(self) -> None:
        """End a last index line cut short by a kill, so that the next line is not glued to it."""
        with contextlib.suppress(FileNotFoundError), output_errors(self.index_file):
            with open(self.index_file, "rb") as f:
                f.seek(0, os.SEEK_END)
                if f.tell() == 0:
                    return
                f.seek(-1, os.SEEK_END)
                if f.read(1) == b"\n":
                    return
            self.record_bytes(b"\n")

    def remove_temporaries(self, k: int) -> None:
        """Temporary files of shard ``k`` left by a process killed while writing it."""
        shard = self.shard(k)
        for p in shard.parent.glob(f".{shard.name}.*"):
            with contextlib.suppress(OSError):
                p.unlink()


def _show(value) -> str:
    return "not given" if value is None else repr(value)


def _differences(old: dict, new: dict) -> List[str]:
    return [f"{key}: {_show(old.get(key))} there, {_show(new.get(key))} now" for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key)]


def open_job(out, settings: Dict[str, Any]) -> JobDir:
    """The job directory ``out`` for ``settings``: created (``job.json`` written) when new, or
    checked against what it was started with; another job's folder is an error naming every
    setting that differs."""
    jd = JobDir(out)
    if jd.root.exists() and not jd.root.is_dir():
        raise ConfigError(f"--out {jd.root}: a file, not a folder (predict --inputs writes a folder of shards)")
    old = jd.job()
    if old is None:
        if jd.root.is_dir() and any(p.name not in (SHARD_DIR, INDEX_FILE, JOB_FILE)
                                  and not p.name.startswith(f".{JOB_FILE}.") for p in jd.root.iterdir()):
            # (job.json may appear meanwhile: another torchrun process writing the same one)
            raise ConfigError(f"--out {jd.root}: a folder with other files in it and no {JOB_FILE}; choose an empty "
                              f"or new folder")
        check_writable(jd.root / SHARD_DIR, what="output folder")
        job = {"format": JOB_FORMAT, "settings": settings}
        # every process of a torchrun job writes the same description
        with atomic_path(jd.job_file) as tmp:
            tmp.write_text(json.dumps(job, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return jd
    if int(old.get("format", 0)) > JOB_FORMAT:
        raise ConfigError(f"{jd.job_file}: written by a newer conilium (format {old.get('format')}); upgrade conilium")
    diff = _differences(old["settings"], settings)
    if diff:
        raise ConfigError(f"{jd.root}: a job started with other settings ({'; '.join(diff)}); resume it with "
                          f"the same model, inputs and options, or choose another --out")
    check_writable(jd.root / SHARD_DIR, what="output folder")
    jd.end_cut_line()
    return jd


# ----------------------------------------------------------------------------- predicting chunks

def predict_chunk(predictor, jd: JobDir, k: int, files: Sequence[str]) -> dict:
    """Predict chunk ``k`` (``files``), write its shard atomically and return its index line."""
    import pyarrow.parquet as pq

    try:
        results = predictor.predict(list(files), progress=False)
    except Exception:  # noqa: BLE001 - a failure no check of the inputs caught: find its file, keep the others
        results = [_predict_one(predictor, f) for f in files]
    table = to_table(results, predictor.classes, predictor.attributes)
    jd.remove_temporaries(k)
    with atomic_path(jd.shard(k), suffix=".tmp") as tmp:
        pq.write_table(table, tmp)
    failed = [r for r in results if not r.ok]
    return {"shard": k, "path": f"{SHARD_DIR}/{jd.shard(k).name}", "files": len(files), "rows": table.num_rows,
            "predicted": len(results) - len(failed), "failed": len(failed),
            "failed_files": [[r.file, r.error] for r in failed[:FAILED_NAMED]],
            "seconds": round(sum(float(r.seconds or 0.0) for r in results if r.ok), 3)}


def _predict_one(predictor, file: str):
    """One file alone; an exception becomes its row's error."""
    try:
        return predictor.predict([file], progress=False)[0]
    except Exception as e:  # noqa: BLE001
        first = (str(e).strip().splitlines() or [""])[0][:300]
        return FilePrediction(file, classes=tuple(predictor.classes), names=tuple(predictor.class_names),
                              error=f"prediction failed ({type(e).__name__}: {first})")


@dataclass
class JobSummary:
    """What a process did and saw: chunks predicted now and skipped as done, and over all of
    its chunks the files predicted and failed, with the first failed ones."""

    shards: int = 0
    predicted_now: int = 0
    skipped: int = 0
    files: int = 0
    predicted: int = 0
    failed: int = 0
    failed_files: List[Tuple[str, str]] = field(default_factory=list)
    complete: bool = False

    def add(self, rec: dict) -> None:
        self.files += int(rec["files"])
        self.predicted += int(rec["predicted"])
        self.failed += int(rec["failed"])
        room = FAILED_NAMED - len(self.failed_files)
        if room > 0:
            self.failed_files += [tuple(x) for x in rec.get("failed_files", [])[:room]]


class _Progress:
    """A tqdm bar over files with files/s and audio-hours/s."""

    def __init__(self, total: int, enabled: bool, desc: str):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="file", desc=desc, disable=not enabled, dynamic_ncols=True)
        self.start = time.monotonic()
        self.files = 0
        self.seconds = 0.0

    def update(self, rec: dict, skipped: bool = False) -> None:
        self.bar.update(int(rec["files"]))
        if skipped:
            return
        self.files += int(rec["files"])
        self.seconds += float(rec.get("seconds", 0.0))
        dt = max(time.monotonic() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.files / dt:.1f} files/s, {self.seconds / 3600 / dt:.3g} audio-h/s",
                                 refresh=False)

    def close(self) -> None:
        self.bar.close()


def _plan(spec_settings: Dict[str, Any], inputs, pattern: str, shard_files: int,
          extra: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    if shard_files < 1:
        raise ConfigError(f"--shard-files must be at least 1, not {shard_files}")
    digest, n = fingerprint(iter_inputs(inputs, pattern))
    if n == 0:
        raise ConfigError(f"--inputs {inputs}: no audio file in it" + (f" matching {pattern!r}" if pattern != "*"
                                                                        else ""))
    settings = dict(spec_settings)
    settings.update({"inputs": os.path.abspath(inputs), "glob": pattern, "input_files": n,
                     "input_sha256": digest, "shard_files": shard_files,
                     "shards": (n + shard_files - 1) // shard_files})
    settings.update(extra or {})
    return settings


def process_rank() -> Tuple[int, int]:
    """``(rank, world size)`` from torchrun's environment (``(0, 1)`` without it)."""
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError("RANK and WORLD_SIZE must be integers (torchrun sets them)") from None
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK {rank} is not below WORLD_SIZE {world}")
    return rank, world


def run_job(spec: PredictorSpec, inputs, out, *, pattern: str = "*", shard_files: int = SHARD_FILES,
            rank: Optional[int] = None, world: Optional[int] = None, progress: bool = False,
            extra: Optional[Dict[str, Any]] = None, predictor=None) -> JobSummary:
    """Predict the chunks of ``inputs`` that are this process's (``k ≡ rank mod world``; by
    default torchrun's RANK and WORLD_SIZE) and not yet done, into the job folder ``out``.
    ``extra`` adds settings recorded in job.json; ``predictor`` is one already built from
    ``spec``. The model is loaded only when there is a chunk to predict."""
    if rank is None or world is None:
        rank, world = process_rank()
    settings = _plan(spec.settings(), inputs, pattern, shard_files, extra)
    jd = open_job(out, settings)
    done = jd.done()
    summary = JobSummary()
    mine = [k for k in range(settings["shards"]) if k % world == rank]
    # one bar, the first process's (its share of the files): several would overwrite each other's line
    bar = _Progress(sum(min(shard_files, settings["input_files"] - k * shard_files) for k in mine),
                    progress and rank == 0, f"predicting (process 1/{world})" if world > 1 else "predicting")
    try:
        for k, files in chunks(iter_inputs(inputs, pattern), shard_files):
            if k % world != rank:
                continue
            summary.shards += 1
            if k in done:
                rec = done[k]
                summary.skipped += 1
                bar.update(rec, skipped=True)
            else:
                if predictor is None:
                    predictor = spec.build(int(os.environ.get("LOCAL_RANK", rank)) if world > 1 else None)
                rec = predict_chunk(predictor, jd, k, files)
                jd.record(rec)
                summary.predicted_now += 1
                bar.update(rec)
            summary.add(rec)
    finally:
        bar.close()
    summary.complete = len(jd.done()) == settings["shards"]
    return summary


# ----------------------------------------------------------------------------- ray

class _ChunkWorker:
    """A ray actor: the predictor loaded once, then chunk after chunk."""

    def __init__(self, spec: PredictorSpec, out: str, cwd: str):
        # relative input paths (a list file's) read as the driver reads them, the FileName column unchanged
        with contextlib.suppress(OSError):
            os.chdir(cwd)
        self.predictor = spec.build()
        self.jd = JobDir(out)

    def predict(self, k: int, files: List[str]) -> dict:
        return predict_chunk(self.predictor, self.jd, k, files)


def run_job_ray(spec: PredictorSpec, inputs, out, *, pattern: str = "*", shard_files: int = SHARD_FILES,
                address: Optional[str] = None, workers: int = 1, cpus_per_worker: float = 1.0,
                gpus_per_worker: float = 0.0, progress: bool = False,
                extra: Optional[Dict[str, Any]] = None) -> JobSummary:
    """:func:`run_job` on the ray cluster at ``address`` (or the ray this process has joined, or a
    local one started and shut down here): ``workers`` actors, each loading the model once,
    take the chunks not done; this process writes the index. ``out`` and the inputs must be
    on a file system every node sees (their absolute paths are sent)."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--backend ray needs ray: pip install 'conilium[cluster]'") from None
    if workers < 1:
        raise ConfigError(f"--n-jobs must be at least 1, not {workers}")
    settings = _plan(spec.settings(), inputs, pattern, shard_files, extra)
    jd = open_job(out, settings)
    done = jd.done()
    summary = JobSummary()
    bar = _Progress(settings["input_files"], progress, "predicting (ray)")
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 **({} if address else {"num_cpus": max(1, int(round(workers * cpus_per_worker)))}))
    actor = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=0)(_ChunkWorker)
    pool: List[Any] = []  # actors started as chunks need them: none for a finished job
    free: List[Any] = []
    running: Dict[Any, Tuple[Any, int]] = {}

    def collect() -> None:
        ready, _ = ray.wait(list(running), num_returns=1)
        w, k = running.pop(ready[0])
        free.append(w)
        try:
            rec = ray.get(ready[0])
        except Exception as e:  # noqa: BLE001 - ray's wrapper of the worker's error, or a lost worker
            first = (str(e).strip().splitlines() or [""])[-1][:500]
            raise ConiliumError(f"--backend ray: {jd.shard(k).name} failed on a ray worker ({first}); the shards "
                                f"done are kept, run the same command again to go on") from None
        jd.record(rec)
        summary.predicted_now += 1
        summary.add(rec)
        bar.update(rec)

    try:
        # chunks are handed out as actors free up: no more than one chunk per actor is held here
        for k, files in chunks(iter_inputs(inputs, pattern), shard_files):
            summary.shards += 1
            if k in done:
                summary.skipped += 1
                bar.update(done[k], skipped=True)
                summary.add(done[k])
                continue
            if not free and len(pool) < workers:
                pool.append(actor.remote(spec, str(jd.root), os.getcwd()))
                free.append(pool[-1])
            if not free:
                collect()
            w = free.pop()
            running[w.predict.remote(k, files)] = (w, k)
        while running:
            collect()
    finally:
        bar.close()
        if started:
            ray.shutdown()
    summary.complete = len(jd.done()) == settings["shards"]
    return summary


# ----------------------------------------------------------------------------- reading a job

def read_predictions(out, *, partial: bool = False):
    """One pyarrow table of a job's shards in chunk order (the input list's order). A job with
    chunks still to predict is an error naming how many, unless ``partial``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    jd = JobDir(out)
    job = jd.job()
    if job is None:
        raise ConfigError(f"{jd.root}: no {JOB_FILE}; not a folder written by predict --inputs")
    done = jd.done()
    n = int(job["settings"]["shards"])
    missing = [k for k in range(n) if k not in done]
    if missing and not partial:
        raise ConfigError(f"{jd.root}: {len(missing)} of {n} shard(s) not predicted yet (first: "
                          f"{jd.shard(missing[0]).name}); run the same predict --inputs again to finish it")
    tables = []
    for k in sorted(done):
        try:
            tables.append(pq.read_table(jd.shard(k)))
        except (OSError, pa.ArrowException) as e:
            raise ConfigError(f"{jd.shard(k)}: not a readable Parquet file ({e}); delete it and run the same "
                              f"predict --inputs again to predict its chunk again") from None
    if not tables:
        raise ConfigError(f"{jd.root}: no shard predicted yet")
    return pa.concat_tables(tables)


__all__ = ["JOB_FORMAT", "SHARD_FILES", "JobDir", "JobSummary", "PredictorSpec", "chunks", "fingerprint",
           "iter_inputs", "open_job", "predict_chunk", "process_rank", "read_predictions", "run_job", "run_job_ray",
           "source_hash", "walk_audio"]

"""predict: emotion probabilities of audio files, from a finetune-best model directory or
from a train-head run.

>>> from conilium.finetune.predict import Predictor
>>> results = Predictor("models/wavlm-wbce-S").predict(["a.wav", "b.flac"])
>>> results[0].prediction, results[0].probabilities
>>> Predictor(run="runs/wbce-S").predict(["a.wav"])        # a head trained on a feature cache

Any file soundfile reads is accepted: other sample rates are resampled to 16 kHz,
several channels are averaged, and the audio is truncated and normalised as in
training (the model directory, or the cache the run's head was trained on, says how),
through the same signal path, upstream forward and prediction loop as training's
scoring. The predicted emotion is ``argmax(probabilities + offsets)`` with the decision
offsets tuned on the development set (a model directory's; a run's when it is the
output of ``conilium-eval tune-thresholds``; all zero otherwise). A file that cannot be
read, or is too short for the upstream, gets an error instead of a prediction; the
others are still predicted.

Both kinds of source come down to one :class:`~conilium.heads.audio.Loaded`: a module callable on
``(waves, lengths)`` that returns logits, the signal path, classes, decision offsets and
loss. A run whose head predicts the attributes (``train-head --task attributes|joint``)
gives them too: ``EmoAct, EmoVal, EmoDom`` on the corpus's 1–7 scale, after the class
columns (an attributes-only run has no class columns and no Prediction).

For a run, that module is :class:`~conilium.heads.audio.RunModel` (:mod:`conilium.heads.audio`,
beside the heads): the upstream its cache names, run as
extraction ran it (:class:`~conilium.extract.encoder.UpstreamRunner`: the run's
hidden-state layers, or every layer's mean and standard deviation over frames for a
``--pooled-stats`` head, in the cache's compute dtype), then the run's head.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, TextIO, Tuple

import numpy as np
import soundfile as sf
import torch
from torch import nn
from torch.utils.data import DataLoader

from conilium import CLASS_NAMES, SAMPLE_RATE
from conilium.audio import SignalPath, audio_seconds
from conilium.errors import AudioError, ConfigError, ConiliumError
from conilium.heads.audio import Loaded, load_run
from conilium.heads.predict import predict_batches
from conilium.runtime import precision_dtype, resolve_device
from conilium.util import atomic_path

from .data import AudioClips, collate_waves
from .model import load_model_dir, offsets_array

OUTPUT_FORMATS = ("csv", "json", "parquet")


def min_samples(model: nn.Module) -> int:
    """The fewest samples for which the upstream (``model.encoder``) outputs a frame."""
    n = 1
    while model.encoder.frames_for(n) < 1:
        n *= 2
    lo, hi = n // 2, n
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if model.encoder.frames_for(mid) >= 1 else (mid, hi)
    return hi


def predict_clips(model: nn.Module, dataset: AudioClips, indices: Sequence[int], loss: str, *,
                  device: torch.device, batch_size: int, precision: str = "auto", num_workers: int = 0,
                  progress: bool = False, desc: str = "predicting",
                  on_error: Optional[Callable[[int, AudioError], None]] = None,
                  on_peak: Optional[Callable[[int, float], None]] = None) -> Dict[int, np.ndarray]:
    """Class scores (sigmoid or softmax, as the loss sees them) of dataset items ``indices``,
    in batches of clips of similar duration. A clip that cannot be read stops it, unless
    ``on_error(index, error)`` takes it; ``on_peak(index, peak)`` receives each read clip's
    largest absolute sample (before normalisation)."""
    dur = dataset.durations
    order = sorted(indices, key=lambda i: (0.0 if dur is None else float(dur[i]), i))
    batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate_waves, num_workers=num_workers)

    def inputs():
        for waves, lengths, idx, errors, peaks in loader:
            for i, error in errors:
                if on_error is None:
                    raise ConiliumError(str(error))
                on_error(i, error)
            if on_peak is not None:
                for i, peak in zip(idx, peaks):
                    on_peak(i, peak)
            if idx:
                yield (waves, lengths), idx

    return predict_batches(model, inputs(), loss, device=device, dtype=precision_dtype(precision, device),
                           progress=progress, desc=desc, total=len(batches))


#: An input whose peak stays below this level (dBFS) is reported silent.
SILENT_DBFS = -60.0
#: An input with fewer seconds than this is reported too short to judge.
SHORT_SECONDS = 1.0


@dataclass
class FilePrediction:
    """One input's result: class probabilities and predicted letter, or the reason it failed.

    ``file`` is the path, or ``<waveform i>`` for the i-th input given in memory.
    """

    file: str
    probabilities: Optional[np.ndarray] = None
    prediction: Optional[str] = None
    error: Optional[str] = None
    #: arousal, valence, dominance (corpus scale) for a model that predicts them
    attributes: Optional[np.ndarray] = None
    #: the class letters of ``probabilities``, in order
    classes: Tuple[str, ...] = ()
    #: seconds of audio the input has, and the seconds of it that were used (truncation)
    duration: Optional[float] = None
    seconds: Optional[float] = None
    #: the largest absolute sample of the audio used, before normalisation (full scale 1)
    peak: Optional[float] = None

    @property
    def warning(self) -> Optional[str]:
        """What the user should know about a prediction, ``; ``-joined: the input was cut short,
        is silent (peak below :data:`SILENT_DBFS`) or is too short to carry an emotion
        (under :data:`SHORT_SECONDS`); None when there is nothing to say."""
        if not self.ok:
            return None
        said = []
        if self.duration is not None and self.seconds is not None and self.seconds < self.duration - 1e-3:
            said.append(f"truncated: the first {self.seconds:g} s of {self.duration:.1f} s were used (--max-seconds "
                        f"changes it)")
        if self.peak is not None and self.peak < 10 ** (SILENT_DBFS / 20):
            level = "digital silence" if self.peak == 0 else f"peak {20 * np.log10(self.peak):.0f} dBFS"
            said.append(f"silent ({level}): the prediction says nothing about an emotion")
        if self.seconds is not None and self.seconds < SHORT_SECONDS:
            said.append(f"very short ({self.seconds:.2f} s of audio): the prediction is unreliable")
        return "; ".join(said) or None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def label(self) -> Optional[str]:
        """The predicted emotion's name (``Neutral`` for ``N``), None when nothing was predicted."""
        return None if self.prediction is None else CLASS_NAMES.get(self.prediction, self.prediction)

    @property
    def scores(self) -> Dict[str, float]:
        """Class letter → probability ({} when nothing was predicted)."""
        if self.probabilities is None:
            return {}
        return {c: float(p) for c, p in zip(self.classes, self.probabilities)}


# ----------------------------------------------------------------------------- what is predicted with

def load_model_source(model_dir, *, device: torch.device, precision: str = "auto") -> Loaded:
    """A finetune-best model directory: its end-to-end model, truncation, normalisation and offsets."""
    model, info = load_model_dir(model_dir, device=device)
    norm = info["normalize"]
    ms = info["max_seconds"]
    signal = SignalPath(max_seconds=float(ms) if ms else None, normalize=norm["mode"], stats=norm.get("stats"),
                        # models written before the option read audio as False does
                        rescale_loud=bool(info.get("rescale_loud", False)))
    return Loaded(model, signal, tuple(info["classes"]), offsets_array(info), info["loss"], precision, info)


# ----------------------------------------------------------------------------- the predictor

class Predictor:
    """A finetune-best model directory (``model_dir``) or a train-head run (``run``) that
    predicts files in length-sorted batches, one code path for both (:class:`Loaded`).

    ``max_seconds`` None truncates as in training (the model's, or the run's cache's); 0
    reads whole files, up to ``max_whole_seconds`` (the upstream's attention memory grows
    with the square of the length: a 150 s file took 3.4 GB on the CPU): a longer input
    gets an error saying so instead of exhausting the memory. ``rescale_loud`` None reads audio as in training (float audio at
    integer scale refused, or rescaled when the model or cache was made with
    ``rescale_loud``); True or False decides here.
    """

    def __init__(self, model_dir=None, *, run=None, device: str = "auto", batch_size: int = 8,
                 max_seconds: Optional[float] = None, precision: str = "auto", num_workers: int = 0,
                 rescale_loud: Optional[bool] = None, max_whole_seconds: float = 120.0):
        if (model_dir is None) == (run is None):
            raise ConfigError("predict from a finetune-best model directory or from a train-head run: give one "
                              "of the two")
        self.device = resolve_device(device)
        loaded = (load_model_source(model_dir, device=self.device, precision=precision) if run is None
                  else load_run(run, device=self.device, precision=precision))
        self.loaded = loaded
        self.model = loaded.model
        self.info = loaded.info
        self.classes = loaded.classes
        self.attributes = loaded.attributes
        self.offsets = loaded.offsets
        self.loss = loaded.loss
        self.batch_size = max(1, int(batch_size))
        base = loaded.signal
        ms = base.max_seconds if max_seconds is None else max_seconds
        self.signal = SignalPath(max_seconds=float(ms) if ms else None, normalize=base.normalize, stats=base.stats,
                                 rescale_loud=base.rescale_loud if rescale_loud is None else bool(rescale_loud))
        self.max_seconds = self.signal.max_seconds
        self.max_whole_seconds = float(max_whole_seconds)
        self.precision = loaded.precision
        self.num_workers = num_workers
        self._min_samples = min_samples(self.model)

    @staticmethod
    def _duration(path: str) -> float:
        """Whole duration from the header; 0 when unreadable (the read reports it)."""
        try:
            return audio_seconds(path)
        except AudioError:
            return 0.0

    def predict(self, inputs: Sequence, *, progress: bool = False) -> List[FilePrediction]:
        """Results in the order of ``inputs``: audio file paths, or waveforms in memory — a numpy
        array of 16 kHz samples, ``(samples,)`` or ``(samples, channels)``, or a pair
        ``(samples, sample_rate)`` — which go through the same signal path as files."""
        names, waves, durations = [], [], []
        for i, item in enumerate(inputs):
            wave = _in_memory(item)
            names.append(str(item) if wave is None else f"<waveform {i}>")
            waves.append(wave)
            if wave is None:
                durations.append(self._duration(str(item)))
            else:  # a bad rate is refused when the waveform is read
                rate = wave[1] if isinstance(wave[1], (int, np.integer)) and wave[1] > 0 else None
                durations.append(len(wave[0]) / rate if rate else 0.0)
        seconds = [min(d, self.max_seconds) if self.max_seconds else d for d in durations]
        results = [FilePrediction(n, classes=tuple(self.classes), duration=d, seconds=s)
                   for n, d, s in zip(names, durations, seconds)]
        todo = []
        for i, s in enumerate(seconds):
            if self.max_seconds is None and s > self.max_whole_seconds:
                results[i].error = (f"{s:.0f} s is too long to run whole (the upstream's memory grows with the "
                                    f"square of the length); give --max-seconds to use its beginning, or cut it "
                                    f"into segments first")
            else:
                todo.append(i)
        ds = AudioClips(names, [None] * len(names), signal=self.signal, durations=seconds,
                        min_samples=self._min_samples, waves=waves)

        def failed(i: int, error: AudioError) -> None:
            results[i].error = error.reason

        def peak(i: int, value: float) -> None:
            results[i].peak = value

        scores = predict_clips(self.model, ds, todo, self.loss, device=self.device,
                               batch_size=self.batch_size, precision=self.precision, num_workers=self.num_workers,
                               progress=progress, on_error=failed, on_peak=peak)
        c = len(self.classes)
        for i, p in scores.items():
            if not np.isfinite(p).all():
                results[i].error = ("the model's output is NaN or infinite (non-finite hidden states of the "
                                    "upstream or weights of the model); no prediction")
                continue
            if c:
                results[i].probabilities = p[:c]
                results[i].prediction = self.classes[int(np.argmax(p[:c] + self.offsets))]
            if self.attributes:
                results[i].attributes = p[c:]
        return results


def _in_memory(item) -> Optional[Tuple[np.ndarray, int]]:
    """``(samples, sample rate)`` of an input given in memory; None for a path."""
    if isinstance(item, (str, Path)):
        return None
    if isinstance(item, tuple) and len(item) == 2 and not isinstance(item[0], (str, Path)):
        return np.asarray(item[0]), item[1]
    if isinstance(item, (np.ndarray, list, torch.Tensor)):
        return np.asarray(item), SAMPLE_RATE
    raise ConfigError(f"predict: an input must be an audio file path, a waveform (numpy array of 16 kHz samples) "
                      f"or a (waveform, sample_rate) pair, not {type(item).__name__}")


def audio_files(folder, pattern: str = "*") -> List[str]:
    """The audio files below ``folder`` (recursively) whose names match ``pattern`` (a glob,
    ``*.wav`` say), sorted; audio means a suffix soundfile reads."""
    folder = Path(folder)
    suffixes = {f".{ext.lower()}" for ext in sf.available_formats()} | {".oga", ".opus"}
    found = sorted(str(p) for p in folder.rglob(pattern) if p.is_file() and p.suffix.lower() in suffixes)
    if not found:
        raise ConfigError(f"{folder}: no audio file matching {pattern!r} in it or below it")
    return found


def read_list(path) -> List[str]:
    """Audio paths of a list file: one per line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ConfigError(f"--list {path}: cannot read ({e.strerror or e})") from None
    return [s.strip() for s in lines if s.strip() and not s.strip().startswith("#")]


def output_format(path) -> str:
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in OUTPUT_FORMATS:
        raise ConfigError(f"--out {path}: the file name must end in .csv, .json or .parquet (it picks the format)")
    return suffix


def write_csv(f: TextIO, results: Iterable[FilePrediction], classes: Sequence[str],
              attributes: Sequence[str] = ()) -> None:
    """``FileName``, one probability column per class, ``Prediction``, the attribute columns
    (``EmoAct, EmoVal, EmoDom``, for a model that predicts them), ``Error`` (empty when
    predicted). A model without classes has no class columns and no ``Prediction``."""
    w = csv.writer(f)
    w.writerow(["FileName", *classes, *(["Prediction"] if classes else []), *attributes, "Seconds", "Warning",
                "Error"])
    for r in results:
        row = [r.file]
        if classes:
            row += [f"{v:.6f}" for v in r.probabilities] if r.ok else [""] * len(classes)
            row.append(r.prediction or "")
        if attributes:
            row += [f"{v:.6f}" for v in r.attributes] if r.ok else [""] * len(attributes)
        seconds = "" if r.seconds is None or not r.ok else f"{r.seconds:.3f}"
        w.writerow([*row, seconds, r.warning or "", r.error or ""])


def to_json(results: Iterable[FilePrediction], classes: Sequence[str], attributes: Sequence[str] = ()) -> list:
    out = []
    for r in results:
        item = {"file": r.file}
        if classes:
            item["probabilities"] = (None if not r.ok else
                                     {c: round(float(v), 6) for c, v in zip(classes, r.probabilities)})
            item["prediction"] = r.prediction
        if attributes:
            item["attributes"] = None if not r.ok else {a: round(float(v), 6) for a, v in zip(attributes, r.attributes)}
        item["seconds"] = None if r.seconds is None or not r.ok else round(float(r.seconds), 3)
        item["warning"] = r.warning
        item["error"] = r.error
        out.append(item)
    return out


def to_table(results: Sequence[FilePrediction], classes: Sequence[str], attributes: Sequence[str] = ()):
    """The CSV's columns as an Arrow table: probabilities and attributes as float64 (null where
    an input failed), FileName, Prediction and Error as strings."""
    import pyarrow as pa

    cols = {"FileName": pa.array([r.file for r in results], pa.string())}
    for k, c in enumerate(classes):
        cols[c] = pa.array([float(r.probabilities[k]) if r.ok else None for r in results], pa.float64())
    if classes:
        cols["Prediction"] = pa.array([r.prediction for r in results], pa.string())
    for k, a in enumerate(attributes):
        cols[a] = pa.array([float(r.attributes[k]) if r.ok else None for r in results], pa.float64())
    cols["Seconds"] = pa.array([float(r.seconds) if r.ok and r.seconds is not None else None for r in results],
                               pa.float64())
    cols["Warning"] = pa.array([r.warning for r in results], pa.string())
    cols["Error"] = pa.array([r.error for r in results], pa.string())
    return pa.table(cols)


def write_results(out, results: Sequence[FilePrediction], classes: Sequence[str],
                  attributes: Sequence[str] = ()) -> None:
    """Write CSV, JSON or Parquet by the suffix of ``out``, atomically."""
    fmt = output_format(out)
    with atomic_path(out, suffix=f".{fmt}.tmp") as tmp:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            pq.write_table(to_table(results, classes, attributes), tmp)
            return
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            if fmt == "csv":
                write_csv(f, results, classes, attributes)
            else:
                json.dump(to_json(results, classes, attributes), f, indent=2)
                f.write("\n")


def results_csv(results: Sequence[FilePrediction], classes: Sequence[str], attributes: Sequence[str] = ()) -> str:
    buf = io.StringIO()
    write_csv(buf, results, classes, attributes)
    return buf.getvalue()

"""What predict gives back and writes, without torch: one :class:`FilePrediction` per input,
the inputs it was asked for (files, a folder, a list file, waveforms in memory) and the CSV,
JSON and Parquet writers.

:class:`~conilium.finetune.predict.Predictor` (PyTorch) and
:class:`~conilium.finetune.onnx_predict.OnnxPredictor` (onnxruntime) share all of it: how
the inputs are read and checked (:func:`plan_inputs`, :func:`read_clip`), how scores become
probabilities, a prediction and attributes (:func:`fill_predictions`), and the output files.
Nothing here imports torch.
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

from conilium import SAMPLE_RATE
from conilium.audio import SignalPath, audio_seconds
from conilium.classes import class_names
from conilium.errors import AudioError, ConfigError
from conilium.util import atomic_path

OUTPUT_FORMATS = ("csv", "json", "parquet")

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
    #: the classes' names, in the same order (empty: MSP-Podcast's names for its eight classes, else the codes)
    names: Tuple[str, ...] = ()
    #: seconds of audio the input has, and the seconds of it that were used (truncation)
    duration: Optional[float] = None
    seconds: Optional[float] = None
    #: the largest absolute sample of the audio used, before normalisation (full scale 1)
    peak: Optional[float] = None
    #: for a segment of a recording (``predict --segment``): its start and end in the file, seconds
    start: Optional[float] = None
    end: Optional[float] = None

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
        """The predicted emotion's name (``Neutral`` for MSP-Podcast's ``N``; a corpus's own class set
        names its own), None when nothing was predicted."""
        if self.prediction is None:
            return None
        names = self.names or class_names(self.classes)
        return dict(zip(self.classes, names)).get(self.prediction, self.prediction)

    @property
    def scores(self) -> Dict[str, float]:
        """Class letter → probability ({} when nothing was predicted)."""
        if self.probabilities is None:
            return {}
        return {c: float(p) for c, p in zip(self.classes, self.probabilities)}


def _in_memory(item) -> Optional[Tuple[np.ndarray, int]]:
    """``(samples, sample rate)`` of an input given in memory; None for a path."""
    if isinstance(item, (str, Path)):
        return None
    if isinstance(item, tuple) and len(item) == 2 and not isinstance(item[0], (str, Path)):
        return np.asarray(item[0]), item[1]
    if isinstance(item, (np.ndarray, list)) or _is_tensor(item):
        return np.asarray(item), SAMPLE_RATE
    raise ConfigError(f"predict: an input must be an audio file path, a waveform (numpy array of 16 kHz samples) "
                      f"or a (waveform, sample_rate) pair, not {type(item).__name__}")


def _is_tensor(item) -> bool:
    """A torch tensor, told without importing torch (a caller holding one has imported it)."""
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(item, torch.Tensor)


def read_clip(signal: SignalPath, path, name: Optional[str], *, wave: Optional[tuple] = None, min_samples: int = 0,
              noise: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> Tuple[np.ndarray, float]:
    """One input through the signal path: ``(waveform, peak)``, ``peak`` being the largest absolute
    sample as read (before noise and normalisation, so that silence can be told from a quiet clip
    normalised up). ``wave`` is ``(samples, sample rate)`` given in memory in place of reading
    ``path``; ``noise(x)`` mixes noise in before the normalisation. An input that cannot be read,
    or is shorter than ``min_samples``, raises :class:`~conilium.errors.AudioError` naming it."""
    x = signal.read(path, clip=name) if wave is None else signal.take(*wave, source=path, clip=name)
    if len(x) < min_samples:
        raise AudioError(path, f"too short ({len(x)} samples at 16 kHz; the upstream outputs no frame "
                               f"for it)", name)
    peak = float(np.max(np.abs(x))) if len(x) else 0.0
    if noise is not None:
        x = noise(x)
    return signal.finish(x, path, clip=name), peak


def _duration(path: str) -> float:
    """Whole duration from the header; 0 when unreadable (the read reports it)."""
    try:
        return audio_seconds(path)
    except AudioError:
        return 0.0


@dataclass
class Plan:
    """The inputs of one predict call: ``names`` (paths, or ``<waveform i>``), ``waves``
    (``(samples, rate)`` given in memory, else None), the seconds each will use, one
    :class:`FilePrediction` per input (errors already set for those not to run) and the
    indices of those ``todo``."""

    names: List[str]
    waves: List[Optional[tuple]]
    seconds: List[float]
    results: List[FilePrediction]
    todo: List[int]


def plan_inputs(inputs: Sequence, classes: Sequence[str], *, max_seconds: Optional[float],
                max_whole_seconds: float, class_set_names: Sequence[str] = ()) -> Plan:
    """Names, in-memory waveforms, durations and seconds used of ``inputs`` (audio file paths, or
    waveforms in memory — a numpy array of 16 kHz samples, ``(samples,)`` or ``(samples, channels)``,
    or a pair ``(samples, sample_rate)``); an input too long to run whole (``max_seconds`` None and
    more than ``max_whole_seconds``) gets an error instead of a place in ``todo``. Each result is
    labelled with ``class_set_names``, the names of ``classes`` (:attr:`FilePrediction.names`)."""
    names, waves, durations = [], [], []
    for i, item in enumerate(inputs):
        wave = _in_memory(item)
        names.append(str(item) if wave is None else f"<waveform {i}>")
        waves.append(wave)
        if wave is None:
            durations.append(_duration(str(item)))
        else:  # a bad rate is refused when the waveform is read
            rate = wave[1] if isinstance(wave[1], (int, np.integer)) and wave[1] > 0 else None
            durations.append(len(wave[0]) / rate if rate else 0.0)
    seconds = [min(d, max_seconds) if max_seconds else d for d in durations]
    results = [FilePrediction(n, classes=tuple(classes), names=tuple(class_set_names), duration=d, seconds=s)
               for n, d, s in zip(names, durations, seconds)]
    todo = []
    for i, s in enumerate(seconds):
        if max_seconds is None and s > max_whole_seconds:
            results[i].error = (f"{s:.0f} s is too long to run whole (the upstream's memory grows with the "
                                f"square of the length); give --max-seconds to use its beginning, or cut it "
                                f"into segments first")
        else:
            todo.append(i)
    return Plan(names, waves, seconds, results, todo)


def length_batches(indices: Sequence[int], seconds: Sequence[float], batch_size: int) -> List[List[int]]:
    """``indices`` in batches of ``batch_size`` clips of similar duration (sorted by seconds, then index)."""
    order = sorted(indices, key=lambda i: (float(seconds[i]), i))
    return [order[k : k + batch_size] for k in range(0, len(order), batch_size)]


def fill_predictions(results: Sequence[FilePrediction], scores: Dict[int, np.ndarray], classes: Sequence[str],
                     offsets: np.ndarray, attributes: Sequence[str] = ()) -> None:
    """Set each scored input's probabilities, prediction (``argmax(probabilities + offsets)``) and
    attributes from its row of ``scores`` (class scores, then attribute values); a row that is not
    finite becomes an error."""
    c = len(classes)
    for i, p in scores.items():
        if not np.isfinite(p).all():
            results[i].error = ("the model's output is NaN or infinite (non-finite hidden states of the "
                                "upstream or weights of the model); no prediction")
            continue
        if c:
            results[i].probabilities = p[:c]
            results[i].prediction = classes[int(np.argmax(p[:c] + offsets))]
        if attributes:
            results[i].attributes = p[c:]


def audio_suffixes() -> set:
    """The file suffixes taken for audio (lower case, with the dot): those soundfile reads."""
    return {f".{ext.lower()}" for ext in sf.available_formats()} | {".oga", ".opus"}


def audio_files(folder, pattern: str = "*") -> List[str]:
    """The audio files below ``folder`` (recursively) whose names match ``pattern`` (a glob,
    ``*.wav`` say), sorted; audio means a suffix soundfile reads."""
    folder = Path(folder)
    suffixes = audio_suffixes()
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


def _bound(v: Optional[float]) -> str:
    return "" if v is None else f"{v:.3f}"


def write_csv(f: TextIO, results: Iterable[FilePrediction], classes: Sequence[str],
              attributes: Sequence[str] = (), *, segments: bool = False) -> None:
    """``FileName``, one probability column per class, ``Prediction``, the attribute columns
    (``EmoAct, EmoVal, EmoDom``, for a model that predicts them), ``Error`` (empty when
    predicted). A model without classes has no class columns and no ``Prediction``.
    ``segments``: ``Start`` and ``End`` (seconds, 3 decimals) after ``FileName``, one row a segment."""
    w = csv.writer(f)
    w.writerow(["FileName", *(["Start", "End"] if segments else []), *classes,
                *(["Prediction"] if classes else []), *attributes, "Seconds", "Warning", "Error"])
    for r in results:
        row = [r.file, *([_bound(r.start), _bound(r.end)] if segments else [])]
        if classes:
            row += [f"{v:.6f}" for v in r.probabilities] if r.ok else [""] * len(classes)
            row.append(r.prediction or "")
        if attributes:
            row += [f"{v:.6f}" for v in r.attributes] if r.ok else [""] * len(attributes)
        seconds = "" if r.seconds is None or not r.ok else f"{r.seconds:.3f}"
        w.writerow([*row, seconds, r.warning or "", r.error or ""])


def to_json(results: Iterable[FilePrediction], classes: Sequence[str], attributes: Sequence[str] = (), *,
            segments: bool = False) -> list:
    out = []
    for r in results:
        item = {"file": r.file}
        if segments:
            item["start"] = None if r.start is None else round(float(r.start), 3)
            item["end"] = None if r.end is None else round(float(r.end), 3)
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


def to_table(results: Sequence[FilePrediction], classes: Sequence[str], attributes: Sequence[str] = (), *,
             segments: bool = False):
    """The CSV's columns as an Arrow table: probabilities and attributes as float64 (null where
    an input failed), FileName, Prediction and Error as strings."""
    import pyarrow as pa

    cols = {"FileName": pa.array([r.file for r in results], pa.string())}
    if segments:
        cols["Start"] = pa.array([None if r.start is None else round(float(r.start), 3) for r in results], pa.float64())
        cols["End"] = pa.array([None if r.end is None else round(float(r.end), 3) for r in results], pa.float64())
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
                  attributes: Sequence[str] = (), *, segments: bool = False) -> None:
    """Write CSV, JSON or Parquet by the suffix of ``out``, atomically (``segments``: with the
    segments' ``Start`` and ``End``)."""
    fmt = output_format(out)
    with atomic_path(out, suffix=f".{fmt}.tmp") as tmp:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            pq.write_table(to_table(results, classes, attributes, segments=segments), tmp)
            return
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            if fmt == "csv":
                write_csv(f, results, classes, attributes, segments=segments)
            else:
                json.dump(to_json(results, classes, attributes, segments=segments), f, indent=2)
                f.write("\n")


def results_csv(results: Sequence[FilePrediction], classes: Sequence[str], attributes: Sequence[str] = (), *,
                segments: bool = False) -> str:
    buf = io.StringIO()
    write_csv(buf, results, classes, attributes, segments=segments)
    return buf.getvalue()


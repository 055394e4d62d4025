"""predict: emotion probabilities of audio files, from a finetune-best model directory.

>>> from conilium.finetune.predict import Predictor
>>> results = Predictor("models/wavlm-wbce-S").predict(["a.wav", "b.flac"])
>>> results[0].prediction, results[0].probabilities

Any file soundfile reads is accepted: other sample rates are resampled to 16 kHz,
several channels are averaged, and the audio is truncated and normalised as in
training (the model directory says how), through the same signal path, upstream
forward and prediction loop as training's scoring. The predicted emotion is
``argmax(probabilities + offsets)`` with the decision offsets tuned on the development
set after training (all zero when tuning was off). A file that cannot be read, or is
too short for the upstream, gets an error instead of a prediction; the others are
still predicted.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, TextIO

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import DataLoader

from conilium.audio import SignalPath
from conilium.errors import AudioError, ConfigError, ConiliumError
from conilium.heads.predict import predict_batches
from conilium.runtime import resolve_device
from conilium.util import atomic_path

from .config import precision_dtype
from .data import AudioClips, collate_waves
from .model import EndToEndModel, load_model_dir, offsets_array

OUTPUT_FORMATS = ("csv", "json")


def min_samples(model: EndToEndModel) -> int:
    """The fewest samples for which the upstream outputs a frame."""
    n = 1
    while model.encoder.frames_for(n) < 1:
        n *= 2
    lo, hi = n // 2, n
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if model.encoder.frames_for(mid) >= 1 else (mid, hi)
    return hi


def predict_clips(model: EndToEndModel, dataset: AudioClips, indices: Sequence[int], loss: str, *,
                  device: torch.device, batch_size: int, precision: str = "auto", num_workers: int = 0,
                  progress: bool = False, desc: str = "predicting",
                  on_error: Optional[Callable[[int, AudioError], None]] = None) -> Dict[int, np.ndarray]:
    """Class scores (sigmoid or softmax, as the loss sees them) of dataset items ``indices``,
    in batches of clips of similar duration. A clip that cannot be read stops it, unless
    ``on_error(index, error)`` takes it."""
    dur = dataset.durations
    order = sorted(indices, key=lambda i: (0.0 if dur is None else float(dur[i]), i))
    batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate_waves, num_workers=num_workers)

    def inputs():
        for waves, lengths, idx, errors in loader:
            for i, error in errors:
                if on_error is None:
                    raise ConiliumError(str(error))
                on_error(i, error)
            if idx:
                yield (waves, lengths), idx

    return predict_batches(model, inputs(), loss, device=device, dtype=precision_dtype(precision, device),
                           progress=progress, desc=desc, total=len(batches))


@dataclass
class FilePrediction:
    """One file's result: class probabilities and predicted letter, or the reason it failed."""

    file: str
    probabilities: Optional[np.ndarray] = None
    prediction: Optional[str] = None
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Predictor:
    """A loaded model directory that predicts files in length-sorted batches.

    ``max_seconds`` None truncates as in training; 0 reads whole files. ``rescale_loud``
    None reads audio as in training (float audio at integer scale refused, or rescaled
    when the model was trained with ``rescale_loud``); True or False decides here.
    """

    def __init__(self, model_dir, *, device: str = "auto", batch_size: int = 8,
                 max_seconds: Optional[float] = None, precision: str = "auto", num_workers: int = 0,
                 rescale_loud: Optional[bool] = None):
        self.device = resolve_device(device)
        self.model, self.info = load_model_dir(model_dir, device=self.device)
        self.classes = tuple(self.info["classes"])
        self.offsets = offsets_array(self.info)
        self.loss = self.info["loss"]
        self.batch_size = max(1, int(batch_size))
        ms = self.info["max_seconds"] if max_seconds is None else max_seconds
        norm = self.info["normalize"]
        if rescale_loud is None:  # models written before the option read audio as False does
            rescale_loud = bool(self.info.get("rescale_loud", False))
        self.signal = SignalPath(max_seconds=float(ms) if ms else None, normalize=norm["mode"],
                                 stats=norm.get("stats"), rescale_loud=rescale_loud)
        self.max_seconds = self.signal.max_seconds
        self.precision = precision
        self.num_workers = num_workers
        self._min_samples = min_samples(self.model)

    def _seconds(self, path: str) -> float:
        """Duration as read (truncated), from the header; 0 when unreadable (the read reports it)."""
        try:
            info = sf.info(path)
            seconds = info.frames / info.samplerate
        except Exception:
            return 0.0
        return min(seconds, self.max_seconds) if self.max_seconds else seconds

    def predict(self, files: Sequence, *, progress: bool = False) -> List[FilePrediction]:
        """Results in the order of ``files``."""
        files = [str(f) for f in files]
        results: List[FilePrediction] = [FilePrediction(f) for f in files]
        ds = AudioClips(files, [None] * len(files), signal=self.signal,
                        durations=[self._seconds(f) for f in files], min_samples=self._min_samples)

        def failed(i: int, error: AudioError) -> None:
            results[i].error = error.reason

        scores = predict_clips(self.model, ds, range(len(files)), self.loss, device=self.device,
                               batch_size=self.batch_size, precision=self.precision, num_workers=self.num_workers,
                               progress=progress, on_error=failed)
        for i, p in scores.items():
            results[i].probabilities = p
            results[i].prediction = self.classes[int(np.argmax(p + self.offsets))]
        return results


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
        raise ConfigError(f"--out {path}: the file name must end in .csv or .json (it picks the format)")
    return suffix


def write_csv(f: TextIO, results: Iterable[FilePrediction], classes: Sequence[str]) -> None:
    """``FileName``, one probability column per class, ``Prediction``, ``Error`` (empty when predicted)."""
    w = csv.writer(f)
    w.writerow(["FileName", *classes, "Prediction", "Error"])
    for r in results:
        probs = [f"{v:.6f}" for v in r.probabilities] if r.ok else [""] * len(classes)
        w.writerow([r.file, *probs, r.prediction or "", r.error or ""])


def to_json(results: Iterable[FilePrediction], classes: Sequence[str]) -> list:
    return [{"file": r.file,
             "probabilities": None if not r.ok else {c: round(float(v), 6) for c, v in zip(classes, r.probabilities)},
             "prediction": r.prediction, "error": r.error} for r in results]


def write_results(out, results: Sequence[FilePrediction], classes: Sequence[str]) -> None:
    """Write CSV or JSON by the suffix of ``out``, atomically."""
    fmt = output_format(out)
    with atomic_path(out, suffix=f".{fmt}.tmp") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            if fmt == "csv":
                write_csv(f, results, classes)
            else:
                json.dump(to_json(results, classes), f, indent=2)
                f.write("\n")


def results_csv(results: Sequence[FilePrediction], classes: Sequence[str]) -> str:
    buf = io.StringIO()
    write_csv(buf, results, classes)
    return buf.getvalue()

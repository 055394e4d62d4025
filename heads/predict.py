"""predict: emotion probabilities of audio files, from a finetune-best model directory.

>>> from conilium.heads.predict import Predictor
>>> results = Predictor("models/wavlm-wbce-S").predict(["a.wav", "b.flac"])
>>> results[0].prediction, results[0].probabilities

Any file soundfile reads is accepted: other sample rates are resampled to 16 kHz,
several channels are averaged, and the audio is truncated and normalised as in
training (the model directory says how). The predicted emotion is
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
from typing import Dict, Iterable, List, Optional, Sequence, TextIO

import numpy as np
import torch
from tqdm import tqdm

from conilium.audio import normalize, read_audio
from conilium.errors import AudioError, ConfigError
from conilium.util import atomic_path

from .finetune import _autocast, collate_waves, load_model_dir, offsets_array
from .train import resolve_device
from .losses import probabilities

OUTPUT_FORMATS = ("csv", "json")


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

    ``max_seconds`` None truncates as in training; 0 reads whole files.
    """

    def __init__(self, model_dir, *, device: str = "auto", batch_size: int = 8,
                 max_seconds: Optional[float] = None, precision: str = "auto"):
        self.device = resolve_device(device)
        self.model, self.info = load_model_dir(model_dir, device=self.device)
        self.classes = tuple(self.info["classes"])
        self.offsets = offsets_array(self.info)
        self.loss = self.info["loss"]
        self.batch_size = max(1, int(batch_size))
        ms = self.info["max_seconds"] if max_seconds is None else max_seconds
        self.max_seconds = float(ms) if ms else None
        self.normalize = self.info["normalize"]
        self.precision = precision

    def _read(self, path: str) -> np.ndarray:
        x = read_audio(path, max_seconds=self.max_seconds)
        frames = int(self.model.frame_lengths(torch.tensor(len(x))))
        if frames < 1:
            raise AudioError(path, f"too short ({len(x)} samples at 16 kHz; the upstream outputs no frame for it)")
        return normalize(x, self.normalize["mode"], self.normalize.get("stats"))

    def predict(self, files: Sequence, *, progress: bool = False, chunk: int = 256) -> List[FilePrediction]:
        """Results in the order of ``files``."""
        files = [str(f) for f in files]
        results: List[FilePrediction] = [FilePrediction(f) for f in files]
        bar = tqdm(total=len(files), desc="predicting", unit="file", disable=not progress)
        for start in range(0, len(files), chunk):
            waves: Dict[int, np.ndarray] = {}
            for i in range(start, min(start + chunk, len(files))):
                try:
                    waves[i] = self._read(files[i])
                except AudioError as e:
                    results[i].error = e.reason
                    bar.update(1)
            order = sorted(waves, key=lambda i: (len(waves[i]), i))
            for b in range(0, len(order), self.batch_size):
                idx = order[b : b + self.batch_size]
                x, lengths, _, _ = collate_waves([(i, waves[i], None) for i in idx])
                with torch.no_grad(), _autocast(self.device, self.precision):
                    logits = self.model(x.to(self.device), lengths.to(self.device))
                p = probabilities(logits.float(), self.loss).cpu().numpy().astype(np.float64)
                decided = np.argmax(p + self.offsets, axis=1)
                for k, i in enumerate(idx):
                    results[i].probabilities = p[k]
                    results[i].prediction = self.classes[int(decided[k])]
                bar.update(len(idx))
        bar.close()
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

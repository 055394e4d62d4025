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
from typing import Callable, Dict, Iterable, List, Optional, Sequence, TextIO

import numpy as np
import soundfile as sf
import torch
from torch import nn
from torch.utils.data import DataLoader

from conilium.audio import SignalPath
from conilium.errors import AudioError, ConfigError, ConiliumError
from conilium.heads.audio import Loaded, load_run
from conilium.heads.predict import predict_batches
from conilium.runtime import precision_dtype, resolve_device
from conilium.util import atomic_path

from .data import AudioClips, collate_waves
from .model import load_model_dir, offsets_array

OUTPUT_FORMATS = ("csv", "json")


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
    #: arousal, valence, dominance (corpus scale) for a model that predicts them
    attributes: Optional[np.ndarray] = None

    @property
    def ok(self) -> bool:
        return self.error is None


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
    reads whole files. ``rescale_loud`` None reads audio as in training (float audio at
    integer scale refused, or rescaled when the model or cache was made with
    ``rescale_loud``); True or False decides here.
    """

    def __init__(self, model_dir=None, *, run=None, device: str = "auto", batch_size: int = 8,
                 max_seconds: Optional[float] = None, precision: str = "auto", num_workers: int = 0,
                 rescale_loud: Optional[bool] = None):
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
        self.precision = loaded.precision
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


def write_csv(f: TextIO, results: Iterable[FilePrediction], classes: Sequence[str],
              attributes: Sequence[str] = ()) -> None:
    """``FileName``, one probability column per class, ``Prediction``, the attribute columns
    (``EmoAct, EmoVal, EmoDom``, for a model that predicts them), ``Error`` (empty when
    predicted). A model without classes has no class columns and no ``Prediction``."""
    w = csv.writer(f)
    w.writerow(["FileName", *classes, *(["Prediction"] if classes else []), *attributes, "Error"])
    for r in results:
        row = [r.file]
        if classes:
            row += [f"{v:.6f}" for v in r.probabilities] if r.ok else [""] * len(classes)
            row.append(r.prediction or "")
        if attributes:
            row += [f"{v:.6f}" for v in r.attributes] if r.ok else [""] * len(attributes)
        w.writerow([*row, r.error or ""])


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
        item["error"] = r.error
        out.append(item)
    return out


def write_results(out, results: Sequence[FilePrediction], classes: Sequence[str],
                  attributes: Sequence[str] = ()) -> None:
    """Write CSV or JSON by the suffix of ``out``, atomically."""
    fmt = output_format(out)
    with atomic_path(out, suffix=f".{fmt}.tmp") as tmp:
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

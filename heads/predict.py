"""The one prediction loop: batches in, class scores out, for any model of the project.

Heads on cached features (:mod:`conilium.heads.train`), end-to-end models on audio
(:mod:`conilium.finetune`) and ``predict`` on new files all score clips the same way:
the model in eval mode, no gradients, the forward under the device's autocast, and the
scores as the loss sees them (sigmoid for the BCE family, softmax otherwise).
:func:`predict_many` scores several models on the same batches, each batch moved to the
device once (train-grid's heads sharing a data pass); :func:`predict_batches` is it with
one model.

A model with attribute outputs (``model.attribute_outputs`` > 0, the last columns of its
output, trained on the [0, 1] rescale) gets its class scores followed by its attribute
values on the corpus scale (:func:`conilium.targets.from_unit`), bounded to that scale: the
CCC loss trains on the raw outputs, which may leave [0, 1]; what a model reports never leaves
the annotators' 1–7.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from conilium.runtime import autocast
from conilium.targets import from_unit

from conilium.training.losses import probabilities

#: A batch: the model's positional inputs (CPU or device tensors, or None) and the clips' indices.
Batch = Tuple[Sequence[Optional[torch.Tensor]], Sequence[int]]


def attribute_outputs(model: torch.nn.Module) -> int:
    """How many of ``model``'s last output columns are attributes (0 for class-only models)."""
    return int(getattr(model, "attribute_outputs", 0) or 0)


def scores_of(model: torch.nn.Module, logits: torch.Tensor, loss: str) -> torch.Tensor:
    """Class scores as the loss sees them, then attribute values on the corpus scale (clamped
    to it)."""
    a = attribute_outputs(model)
    if a == 0:
        return probabilities(logits, loss)
    classes = logits[:, : logits.shape[1] - a]
    parts = [probabilities(classes, loss)] if classes.shape[1] else []
    return torch.cat(parts + [from_unit(logits[:, logits.shape[1] - a:].clamp(0.0, 1.0))], dim=1)


def to_device(t, device: torch.device):
    """A tensor, or a nest of tuples of tensors (a fusion head's input), on ``device``; None stays None."""
    if t is None:
        return None
    if isinstance(t, (tuple, list)):
        return tuple(to_device(u, device) for u in t)
    return t.to(device, non_blocking=True)


def predict_many(models: Sequence[Tuple[torch.nn.Module, str]], batches: Iterable[Batch], *,
                 device: torch.device, dtype: str = "float32", progress: bool = False, desc: str = "predicting",
                 total: Optional[int] = None,
                 on_batch: Optional[Callable[[int, Dict[int, np.ndarray]], None]] = None) -> List[Dict[int, np.ndarray]]:
    """For each ``(model, loss)``, the class scores (float64, one row per clip) keyed by clip index.

    Every batch is moved to the device once and given to every model in turn; a model's
    scores are those :func:`predict_batches` gives it alone. ``on_batch(k, scores)``
    receives model ``k``'s scores of each batch as they come.
    """
    was = [m.training for m, _ in models]
    for m, _ in models:
        m.eval()
    out: List[Dict[int, np.ndarray]] = [{} for _ in models]
    try:
        with torch.no_grad():
            for inputs, idx in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False,
                                    total=total):
                args = [to_device(t, device) for t in inputs]
                keys = [int(i) for i in idx]
                for k, (model, loss) in enumerate(models):
                    with autocast(device, dtype):
                        logits = model(*args)
                    p = scores_of(model, logits.float(), loss).cpu().numpy().astype(np.float64)
                    got = dict(zip(keys, p))
                    out[k].update(got)
                    if on_batch is not None:
                        on_batch(k, got)
    finally:
        for (m, _), w in zip(models, was):
            m.train(w)
    return out


def predict_batches(model: torch.nn.Module, batches: Iterable[Batch], loss: str, *, device: torch.device,
                    dtype: str = "float32", progress: bool = False, desc: str = "predicting",
                    total: Optional[int] = None,
                    on_batch: Optional[Callable[[Dict[int, np.ndarray]], None]] = None) -> Dict[int, np.ndarray]:
    """Class scores (float64, one row per clip) of every batch, keyed by clip index.

    ``on_batch`` receives each batch's scores as they come (e.g. to write them out).
    """
    each = None if on_batch is None else (lambda _k, got: on_batch(got))
    return predict_many([(model, loss)], batches, device=device, dtype=dtype, progress=progress, desc=desc,
                        total=total, on_batch=each)[0]


def stack_scores(scores: Dict[int, np.ndarray], n: int, n_classes: int) -> np.ndarray:
    """(n, n_classes) array of ``scores`` keyed 0..n-1 (``n_classes``: the width of a row)."""
    out = np.zeros((n, n_classes), dtype=np.float64)
    for i, p in scores.items():
        out[i] = p
    return out

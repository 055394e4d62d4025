"""The one prediction loop: batches in, class scores out, for any model of the project.

Heads on cached features (:mod:`conilium.heads.train`), end-to-end models on audio
(:mod:`conilium.finetune`) and ``predict`` on new files all score clips the same way:
the model in eval mode, no gradients, the forward under the device's autocast, and the
scores as the loss sees them (sigmoid for the BCE family, softmax otherwise).
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from conilium.runtime import autocast

from .losses import probabilities

#: A batch: the model's positional inputs (CPU tensors or None) and the clips' indices.
Batch = Tuple[Sequence[Optional[torch.Tensor]], Sequence[int]]


def predict_batches(model: torch.nn.Module, batches: Iterable[Batch], loss: str, *, device: torch.device,
                    dtype: str = "float32", progress: bool = False, desc: str = "predicting",
                    total: Optional[int] = None,
                    on_batch: Optional[Callable[[Dict[int, np.ndarray]], None]] = None) -> Dict[int, np.ndarray]:
    """Class scores (float64, one row per clip) of every batch, keyed by clip index.

    ``on_batch`` receives each batch's scores as they come (e.g. to write them out).
    """
    was = model.training
    model.eval()
    out: Dict[int, np.ndarray] = {}
    try:
        with torch.no_grad():
            for inputs, idx in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False,
                                    total=total):
                args = [None if t is None else t.to(device, non_blocking=True) for t in inputs]
                with autocast(device, dtype):
                    logits = model(*args)
                p = probabilities(logits.float(), loss).cpu().numpy().astype(np.float64)
                got = {int(i): p[k] for k, i in enumerate(idx)}
                out.update(got)
                if on_batch is not None:
                    on_batch(got)
    finally:
        model.train(was)
    return out


def stack_scores(scores: Dict[int, np.ndarray], n: int, n_classes: int) -> np.ndarray:
    """(n, n_classes) array of ``scores`` keyed 0..n-1."""
    out = np.zeros((n, n_classes), dtype=np.float64)
    for i, p in scores.items():
        out[i] = p
    return out

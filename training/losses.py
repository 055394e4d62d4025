"""Training losses (the paper's equations 1–3, plus focal loss).

Every loss takes ``logits`` (N, C), ``targets`` (N, C) — one-hot or soft — and
``weights`` (C,) or None, and returns a scalar.

* ``wce``   eq. 1: −1/N Σ_i Σ_c w_c y_ic log softmax(z)_ic   (hard targets only)
* ``bce``   eq. 2 without weights
* ``wbce``  eq. 2: −1/N Σ_i Σ_c w_c [y log σ(z) + (1−y) log(1−σ(z))]
* ``kld``   eq. 3: 1/(N·C) Σ_i Σ_c y log(y / softmax(z)), with 0·log 0 = 0
* ``focal`` −1/N Σ_i Σ_c w_c y_ic (1 − p_ic)^γ log p_ic on softmax outputs, γ = 2

Note that eq. 1 divides by N, not by Σ w_{y_i} as ``torch.nn.CrossEntropyLoss`` does.

The attribute loss (arousal, valence, dominance) is :func:`ccc_loss`: ``1 − CCC`` per
attribute over the batch, averaged over the attributes.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .config import LOSS_PROPERTIES


def _w(weights: Optional[torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
    if weights is None:
        return torch.ones(logits.shape[1], dtype=logits.dtype, device=logits.device)
    return weights.to(dtype=logits.dtype, device=logits.device)


def wce(logits, targets, weights=None):
    logp = F.log_softmax(logits, dim=1)
    return -(targets * logp * _w(weights, logits)).sum(dim=1).mean()


def bce(logits, targets, weights=None):
    # binary_cross_entropy_with_logits is the numerically stable y log σ + (1−y) log(1−σ)
    per = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return (per * _w(weights, logits)).sum(dim=1).mean()


def kld(logits, targets, weights=None):
    logp = F.log_softmax(logits, dim=1)
    # F.kl_div(input=log q, target=p) = p (log p − log q), with 0·log 0 taken as 0
    per = F.kl_div(logp, targets, reduction="none")
    if weights is not None:
        per = per * _w(weights, logits)
    return per.sum() / (logits.shape[0] * logits.shape[1])


def focal(logits, targets, weights=None, gamma: float = 2.0):
    logp = F.log_softmax(logits, dim=1)
    p = logp.exp()
    return -(targets * (1 - p).pow(gamma) * logp * _w(weights, logits)).sum(dim=1).mean()


def ccc_loss(predictions: torch.Tensor, targets: torch.Tensor, mask: Optional[torch.Tensor] = None,
             eps: float = 1e-8) -> torch.Tensor:
    """Mean over attributes of ``1 − CCC``, CCC computed over the batch's clips.

    ``CCC = 2 cov(p, t) / (var p + var t + (mean p − mean t)² + eps)``, with population
    (1/N) moments; ``predictions`` and ``targets`` are (N, A). ``mask`` (N,), 1 for the
    clips with attribute targets and 0 for the others, weights the moments (no clip:
    every moment is 0, the loss is 1 and its gradient 0). A batch of one clip has zero
    variances and covariance: CCC is 0, never NaN.
    """
    p = predictions.float()
    t = targets.to(dtype=p.dtype, device=p.device)
    if mask is None:
        w = torch.full((p.shape[0], 1), 1.0 / max(p.shape[0], 1), dtype=p.dtype, device=p.device)
    else:
        m = mask.to(dtype=p.dtype, device=p.device).reshape(-1, 1)
        w = m / m.sum().clamp(min=1.0)
        t = torch.where(m > 0, t, torch.zeros_like(t))  # unknown targets (NaN) must not reach the sums
    mp, mt = (w * p).sum(dim=0), (w * t).sum(dim=0)
    dp, dt = p - mp, t - mt
    vp, vt = (w * dp * dp).sum(dim=0), (w * dt * dt).sum(dim=0)
    cov = (w * dp * dt).sum(dim=0)
    ccc = 2 * cov / (vp + vt + (mp - mt) ** 2 + eps)
    return (1 - ccc).mean()


def masked_bce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of one logit per clip, averaged over the clips whose ``mask`` is 1 (an
    auxiliary label known: a clip without it does not count); 0, with zero gradients, for a
    batch where no clip has it. ``targets`` may be soft (mixed); unknown ones may be NaN."""
    z = logits.float().reshape(-1)
    m = mask.to(dtype=z.dtype, device=z.device).reshape(-1)
    t = torch.where(m > 0, targets.to(dtype=z.dtype, device=z.device).reshape(-1), torch.zeros_like(z))
    per = F.binary_cross_entropy_with_logits(z, t, reduction="none")
    return (per * m).sum() / m.sum().clamp(min=1.0)


#: loss name → (function, output activation, uses class weights, target kinds it accepts); the
#: properties come from :data:`conilium.training.config.LOSS_PROPERTIES` (importable without torch).
_FUNCTIONS = {"wce": wce, "bce": bce, "wbce": bce, "kld": kld, "focal": focal}
LOSSES = {name: (_FUNCTIONS[name],) + properties for name, properties in LOSS_PROPERTIES.items()}


def loss_fn(loss: str):
    return LOSSES[loss][0]


def uses_weights(loss: str) -> bool:
    return LOSSES[loss][2]


def activation(loss: str) -> str:
    return LOSSES[loss][1]


def probabilities(logits: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-class scores as the loss sees them: sigmoid for BCE losses, softmax otherwise."""
    return torch.sigmoid(logits) if activation(loss) == "sigmoid" else torch.softmax(logits, dim=1)

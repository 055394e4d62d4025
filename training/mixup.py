"""Mixup: each training batch mixed with a permutation of itself, its targets mixed alike.

For a batch of ``n`` clips, :class:`Mixup` draws a permutation ``π`` of the batch and one
weight per clip, ``λ_i ~ Beta(α, α)``; clip ``i`` becomes ``λ_i x_i + (1 − λ_i) x_π(i)``
and so do its targets (soft class targets, attribute values). The heads mix their pooled
representation (manifold mixup: the pooling's output, before the classifier); end-to-end
fine-tuning mixes the waveforms (:func:`mix_waves`: a mixed clip is as long as the longer
of its two).

The draws come from a numpy generator of the run's own (seeded from the run's seed and,
for fine-tuning, the epoch and process), never from torch's global stream: a run with
mixup is repeatable, and a run without it (``alpha`` 0, the default) draws nothing and
computes nothing more, so it is bitwise the run it was before the option existed.

The class losses WCE, (W)BCE and focal are linear in the target vector, so the loss of a
mixed target is the same mixture of the two clips' losses, each class's column still
weighted by its class weight: the class weights keep their meaning with soft targets.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch

#: tells the mixup stream apart from the run's other streams seeded from the same seed
_TAG = 0x6D6978  # "mix"


class Mixup:
    """The draws of one run's mixup: ``alpha`` (> 0) and a seed sequence (the run's seed, and
    whatever else makes the stream its own: the epoch, the process)."""

    def __init__(self, alpha: float, seed: Sequence[int]):
        if not alpha > 0:
            raise ValueError(f"mixup alpha must be positive, not {alpha}")
        self.alpha = float(alpha)
        self.rng = np.random.default_rng(np.random.SeedSequence([int(s) for s in seed] + [_TAG]))

    def draw(self, n: int) -> Tuple[np.ndarray, np.ndarray]:
        """A permutation of ``n`` clips and their weights ``λ`` (n,), each ~ Beta(alpha, alpha)."""
        lam = self.rng.beta(self.alpha, self.alpha, size=n)
        perm = self.rng.permutation(n)
        return perm, lam

    def pairs(self, n: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
        """:meth:`draw` as tensors on ``device``: the permutation (long) and ``λ`` (float32)."""
        perm, lam = self.draw(n)
        return (torch.as_tensor(perm, dtype=torch.long, device=device),
                torch.as_tensor(lam, dtype=torch.float32, device=device))


def mixup_or_none(alpha: float, seed: Sequence[int]) -> Optional[Mixup]:
    """A :class:`Mixup`, or None for ``alpha`` 0 (no mixup: nothing drawn)."""
    return Mixup(alpha, seed) if alpha else None


def mix(x: torch.Tensor, perm: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``λ_i x_i + (1 − λ_i) x_perm(i)`` along the first axis (``lam``: (n,), broadcast over the rest)."""
    w = lam.to(dtype=x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))
    return w * x + (1 - w) * x[perm]


def mix_mask(mask: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Where a mixed clip has a known value: where both of its clips have one."""
    return mask * mask[perm]


def mix_waves(waves: torch.Tensor, lengths: torch.Tensor, perm: torch.Tensor,
              lam: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mixed zero-padded waveforms (B, N) and their lengths: a mixed clip lasts as long as the
    longer of its two (past the shorter one's end, the longer one alone, scaled by its weight)."""
    return mix(waves, perm, lam), torch.maximum(lengths, lengths[perm])

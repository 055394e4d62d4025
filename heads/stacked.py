"""The heads of a data pass computed as one module: their weights stacked, one kernel per layer.

The heads of a train-grid data pass (:func:`conilium.heads.train.train_heads`) read the same
batches, but each alone runs its own forward pass, backward pass and optimiser step: on a GPU,
five heads are five times the kernel launches and the Python of one, and a head's step at
batch 16 is mostly that overhead. :class:`StackedHeads` holds the weights of H heads of one
architecture (one :class:`~conilium.heads.model.HeadConfig`) stacked on a first axis, and
computes all of them at once:

* the layer mix: each head's own softmax-weighted sum of the stored layers (the arithmetic of
  :class:`~conilium.heads.model.LayerMix`), or the one selected layer, shared by every head;
* the attentive pooling: frames shared by every head (one layer) go through one matrix product
  with the heads' projections side by side and one with their attention vectors on a block
  diagonal, per-head frames (a weighted mix) through batched products; the weighted mean and
  second moment over the frames as batched products (on one thread: a few rows each);
* the classifier's linear layers as batched products, the layer norm over every head at once;
* dropout: each head's masks drawn from its own random stream, in the order its
  :class:`~conilium.heads.model.MaskDropout` modules draw them alone.

One AdamW (fused where torch has it) updates the stacked weights; the heads' losses are summed
for the one backward pass, and as the heads share no weight, each head's gradient is its own
loss's. A head whose training has stopped (patience, a non-finite loss) stays in the stack,
its loss left out of the sum and its weights no longer read.

The batched products are other kernels than a head's own, so a head trained in a stack
matches its own train-head run to float32 rounding, not bitwise: its Development scores
within 1e-4 after several epochs in tests/test_stacked_heads.py. Like a head alone, a stack
gives the same numbers on 1 or 2 CPU threads (small products on one thread). Heads are
stacked when :func:`unstackable` finds nothing against it and ``stack_heads`` asks for it
(:func:`use_stack`: ``auto`` on CUDA, ``on``, ``off``).
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from conilium.runtime import SMALL_ROWS, autocast, on_one_thread, thread_invariant_softmax, valid_mask

from .model import EmotionHead, HeadConfig, dropout_mask
from .predict import scores_of, to_device

MIX = "layer_mix.weights"
SAP_W, SAP_B, ATTENTION = "pooling.sap_linear.weight", "pooling.sap_linear.bias", "pooling.attention"
FC_W, FC_B = "classifier.fc.0.0.weight", "classifier.fc.0.0.bias"
LN_W, LN_B = "classifier.fc.0.1.weight", "classifier.fc.0.1.bias"
OUTPUTS = (("classifier.out.0.weight", "classifier.out.0.bias"),
           ("classifier.attributes.weight", "classifier.attributes.bias"))


def use_stack(mode: str, device: torch.device) -> bool:
    """Whether ``stack_heads`` (``auto``, ``on``, ``off``) asks for stacking on ``device``."""
    return mode == "on" or (mode == "auto" and device.type == "cuda")


#: Why a pass of one head is not stacked (it is where its steps are graphed: :mod:`conilium.heads.graphs`).
ONE_HEAD = "one head in the pass"


def unstackable(configs: Sequence, head_configs: Sequence[Sequence[HeadConfig]]) -> Optional[str]:
    """Why the heads of these runs (their TrainConfigs, and each run's head configs) cannot be
    stacked; None when they can."""
    if len(configs) < 2:
        return ONE_HEAD
    if any(len(h) != 1 for h in head_configs):
        return "fusion heads are trained one by one"
    if len({h[0] for h in head_configs}) != 1:
        return "the heads differ in architecture (layers, pooling, sizes, dropout or outputs)"
    if head_configs[0][0].gender or any(getattr(c, "aux", None) for c in configs):
        return "--aux heads are trained one by one"
    if any(getattr(c, "mixup", 0) for c in configs):
        return "--mixup heads are trained one by one"
    if len({(c.lr, c.weight_decay) for c in configs}) != 1:
        return "the heads differ in learning rate or weight decay"
    return None


class StackedHeads(nn.Module):
    """H :class:`~conilium.heads.model.EmotionHead` of one config as one module.

    Built from the heads (their current weights copied, stacked on a first axis); the weights
    keep the heads' state-dict names (``names``), and :meth:`head_state` gives head ``k``'s
    state dict, loadable into an EmotionHead. ``forward(x, lengths, masks)`` gives the
    (H, batch, outputs) of every head; ``masks`` (training: :meth:`draw_masks`) or None (no dropout).
    """

    def __init__(self, heads: Sequence[EmotionHead]):
        super().__init__()
        configs = {h.config for h in heads}
        if len(configs) != 1:
            raise ValueError("heads of different configs cannot be stacked")
        self.config: HeadConfig = heads[0].config
        self.size = len(heads)
        named = [dict(h.named_parameters()) for h in heads]
        self.names: List[str] = list(named[0])
        if set(heads[0].state_dict()) != set(self.names):
            raise ValueError("a head with buffers cannot be stacked")
        self.weights = nn.ParameterList(
            nn.Parameter(torch.stack([p[n].detach() for p in named]).clone(), requires_grad=named[0][n].requires_grad)
            for n in self.names)
        self._at: Dict[str, int] = {n: i for i, n in enumerate(self.names)}
        self.mix_index = heads[0].layer_mix.index
        self.norm_eps = heads[0].classifier.fc[0][1].eps
        self.hidden = self.config.hidden

    def weight(self, name: str) -> Optional[torch.Tensor]:
        i = self._at.get(name)
        return None if i is None else self.weights[i]

    def head_state(self, k: int) -> Dict[str, torch.Tensor]:
        """Head ``k``'s weights as an EmotionHead state dict, copied to the CPU."""
        return {n: self.weights[i][k].detach().cpu().clone() for i, n in enumerate(self.names)}

    @property
    def pooled_width(self) -> int:
        """Width of a head's pooled vector (the classifier's input)."""
        return self.weight(FC_W).shape[2]

    def draw_masks(self, streams: Sequence, batch: int, device: torch.device) -> Optional[Tuple[torch.Tensor, ...]]:
        """The dropout masks of a training step, (H, batch, pooled width) and (H, batch, hidden):
        head ``k``'s drawn in ``streams[k]`` (a :class:`~conilium.training.state.RandomStream`),
        as its two dropouts draw them alone; ones for a head whose stream is None (not training).
        None without dropout."""
        p = float(self.config.dropout)
        if p == 0.0:
            return None
        shapes = ((batch, self.pooled_width), (batch, self.hidden))
        if p == 1.0:
            return tuple(torch.zeros((self.size,) + s, device=device) for s in shapes)
        drawn: List[List[torch.Tensor]] = [[], []]
        for stream in streams:
            if stream is None:
                for j, s in enumerate(shapes):
                    drawn[j].append(torch.ones(s, device=device))
                continue
            with stream:
                for j, s in enumerate(shapes):
                    drawn[j].append(dropout_mask(s, p, device=device, dtype=torch.float32))
        return tuple(torch.stack(m) for m in drawn)

    def _mix(self, x: torch.Tensor, axis: int) -> Tuple[torch.Tensor, bool]:
        """The layer axis reduced: (the result, whether it is shared by every head); a per-head
        result has the head axis first."""
        if self.mix_index is not None:
            return x.select(axis, self.mix_index), True
        w = self.weight(MIX)
        if w.shape[1] == 1 and not w.requires_grad:  # the softmax of one weight is 1: the layer itself
            return x.select(axis, 0), True
        shape = [1] * x.dim()
        shape[axis] = w.shape[1]
        return torch.stack([(x * thread_invariant_softmax(w[k], 0).to(x.dtype).view(shape)).sum(dim=axis)
                            for k in range(self.size)]), False

    def _linear(self, x: torch.Tensor, weight: str, bias: str) -> torch.Tensor:
        """(H, B, in) → (H, B, out) through each head's own linear layer, one batched product
        (on one thread for a few rows, as :class:`~conilium.runtime.ThreadInvariantLinear`)."""
        w, b = self.weight(weight), self.weight(bias)
        fn = lambda t, w_, b_: torch.baddbmm(b_.unsqueeze(1), t, w_.transpose(1, 2))  # noqa: E731
        if x.shape[1] > SMALL_ROWS:
            return fn(x, w, b)
        return on_one_thread(fn, x, w, b)

    def embed(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Every head's pooled vector, (H, B, pooled width)."""
        H = self.size
        if self.config.pooling == "stats":
            z, shared = self._mix(x, 1)
            return z.expand((H,) + tuple(z.shape)) if shared else z
        xs, shared = self._mix(x, 2)
        mask = valid_mask(lengths, x.shape[1])
        if self.config.pooling == "mean":
            m = mask.unsqueeze(-1).to(xs.dtype)
            z = (xs * m).sum(dim=-2) / m.sum(dim=1).clamp(min=1.0)
            return z.expand((H,) + tuple(z.shape)) if shared else z
        w, b, a = self.weight(SAP_W), self.weight(SAP_B), self.weight(ATTENTION)
        B, T = x.shape[0], x.shape[1]
        D = w.shape[2]
        if shared:
            # one product for every head, their projections side by side: (B, T, H·D); each head's
            # scores through one product with the attention vectors on a block diagonal: (B, H, T)
            h = torch.tanh(F.linear(xs, w.reshape(H * D, D), b.reshape(H * D)))
            scores = (h.reshape(B * T, H * D) @ torch.block_diag(*a.unbind(0))).view(B, T, H).transpose(1, 2)
            weights = thread_invariant_softmax(scores.masked_fill(~mask[:, None, :], float("-inf")), 2)
            # weighted sums over the frames as products: (B, H, T) @ (B, T, D), on one thread (few rows)
            mu = on_one_thread(torch.bmm, weights, xs)
            second = on_one_thread(torch.bmm, weights, xs * xs)
            return torch.cat([mu, _std(mu, second)], dim=-1).transpose(0, 1)
        h = torch.tanh(torch.baddbmm(b.unsqueeze(1), xs.reshape(H, B * T, D), w.transpose(1, 2)))
        scores = torch.bmm(h, a).view(H, B, T).masked_fill(~mask, float("-inf"))
        weights = thread_invariant_softmax(scores, 2).reshape(H * B, 1, T)
        frames = xs.reshape(H * B, T, D)
        mu = on_one_thread(torch.bmm, weights, frames).view(H, B, D)
        second = on_one_thread(torch.bmm, weights, frames * frames).view(H, B, D)
        return torch.cat([mu, _std(mu, second)], dim=-1)

    def classify(self, z: torch.Tensor, masks: Optional[Tuple[torch.Tensor, ...]] = None) -> torch.Tensor:
        """The classifier of every head on its pooled vectors ``z`` (H, B, width): (H, B, outputs)."""
        if masks is not None:
            z = z * masks[0]
        h = self._linear(z, FC_W, FC_B)
        shape, eps = (self.hidden,), self.norm_eps

        def norm(t, w, b):
            return F.layer_norm(t, shape, None, None, eps) * w.unsqueeze(1) + b.unsqueeze(1)

        h = torch.relu(on_one_thread(norm, h, self.weight(LN_W), self.weight(LN_B)))
        if masks is not None:
            h = h * masks[1]
        outs = [self._linear(h, w, b) for w, b in OUTPUTS if w in self._at]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def forward(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None,
                masks: Optional[Tuple[torch.Tensor, ...]] = None) -> torch.Tensor:
        return self.classify(self.embed(x, lengths), masks)


def _std(mu: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The attentive pooling's standard deviation from the weighted mean and second moment."""
    return torch.sqrt((second - mu * mu).clamp(min=1e-5))


def predict_stacked(stack: StackedHeads, members: Sequence[Tuple[int, torch.nn.Module, str]], batches: Iterable,
                    n: int, *, device: torch.device) -> List[np.ndarray]:
    """For each ``(slot, model, loss)``, the (n, outputs) scores of the stack's head ``slot`` on
    ``batches`` (``(x, lengths, indices)``), as :func:`~conilium.heads.recipe.predict_heads` gives
    ``model``'s: class scores as ``loss`` sees them, then attribute values on the corpus scale."""
    was = stack.training
    stack.eval()
    out = [np.zeros((n, model.output_width), dtype=np.float64) for _, model, _ in members]
    try:
        with torch.no_grad():
            for x, lengths, idx in batches:
                with autocast(device, "float32"):
                    logits = stack(to_device(x, device), to_device(lengths, device)).float()
                rows = np.asarray([int(i) for i in idx])
                for k, (slot, model, loss) in enumerate(members):
                    out[k][rows] = scores_of(model, logits[slot], loss).cpu().numpy().astype(np.float64)
    finally:
        stack.train(was)
    return out

"""Pooling heads on upstream frames.

The attentive head has the structure of the MSP-Podcast challenge baseline, with the
same parameter names, so that the baseline's released ``final_pool.pt`` and
``final_ser.pt`` load into :class:`AttentiveStatsPooling` and :class:`Classifier` as
they are:

* pooling: ``h = tanh(sap_linear(x))``, scores ``h · attention``, softmax over the
  clip's valid frames only, output weighted mean ‖ weighted std with
  ``std = sqrt(clamp(E[x²] − μ², 1e-5))``;
* classifier: dropout → Linear(in, 1024) → LayerNorm → ReLU → dropout → Linear(1024, 8).

A head may also predict the attributes (arousal, valence, dominance): a Linear(1024, 3)
beside the class output, on the same hidden layer (``HeadConfig.attributes``); its
outputs follow the class logits in the head's output, ``(B, num_classes + attributes)``.
An attributes-only head (``num_classes=0``) has no class output. With ``attributes=0``
(the default) the head is exactly the classifier alone: same parameters, same
initialisation draws, same outputs.

Frames come as ``(batch, time, layers, dim)`` with per-clip valid lengths; when the
cache holds several layers, :class:`LayerMix` takes a learnable softmax-weighted sum of
them (the SUPERB way) or selects one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
from torch import nn

from conilium import CLASSES
from conilium.runtime import ThreadInvariantLayerNorm, ThreadInvariantLinear, thread_invariant_softmax, valid_mask

from .config import FUSIONS


class AttentiveStatsPooling(nn.Module):
    """Attentive statistics pooling over valid frames (challenge-baseline parameter names)."""

    def __init__(self, dim: int):
        super().__init__()
        self.sap_linear = ThreadInvariantLinear(dim, dim)
        self.attention = nn.Parameter(torch.empty(dim, 1))
        nn.init.normal_(self.attention, mean=0.0, std=1.0)
        self.out_dim = 2 * dim

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.sap_linear(x))
        scores = (h @ self.attention).squeeze(-1)
        scores = scores.masked_fill(~mask, float("-inf"))
        w = thread_invariant_softmax(scores, 1).unsqueeze(-1)
        mu = (x * w).sum(dim=1)
        second = (x * x * w).sum(dim=1)
        std = torch.sqrt((second - mu * mu).clamp(min=1e-5))
        return torch.cat([mu, std], dim=-1)


class MeanPooling(nn.Module):
    """Plain mean over valid frames."""

    def __init__(self, dim: int):
        super().__init__()
        self.out_dim = dim

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(x.dtype)
        return (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


POOLINGS = {"attentive": AttentiveStatsPooling, "mean": MeanPooling}


class LayerMix(nn.Module):
    """Reduce a layer axis: learnable softmax-weighted sum (``"weighted"``) or one layer (an int)."""

    def __init__(self, num_layers: int, layers: Union[str, int] = "weighted"):
        super().__init__()
        self.num_layers = num_layers
        if layers == "weighted":
            self.weights = nn.Parameter(torch.zeros(num_layers))
            self.index = None
        else:
            index = int(layers)
            if not -num_layers <= index < num_layers:
                raise ValueError(f"layer index {index} out of range for {num_layers} stored layer(s)")
            self.weights = None
            self.index = index % num_layers

    def forward(self, x: torch.Tensor, axis: int = 2) -> torch.Tensor:
        if self.index is not None:
            return x.select(axis, self.index)
        w = thread_invariant_softmax(self.weights, 0).to(x.dtype)
        shape = [1] * x.dim()
        shape[axis] = self.num_layers
        return (x * w.view(shape)).sum(dim=axis)


def dropout_mask(shape, p: float, *, device, dtype) -> torch.Tensor:
    """A dropout mask: each value 0 with probability ``p``, else ``1 / (1 - p)``; drawn from
    the global random stream as torch's CPU dropout draws it (``bernoulli_``, then the scale)."""
    return torch.empty(shape, device=device, dtype=dtype).bernoulli_(1 - p).div_(1 - p)


class MaskDropout(nn.Dropout):
    """:class:`torch.nn.Dropout` whose mask is drawn the same way on every device.

    On CPU torch draws a dropout mask with ``bernoulli_`` and multiplies; on CUDA a fused
    kernel draws its own way. Here the mask is always :func:`dropout_mask`: a head's CPU
    numbers are torch's, bitwise, and the heads of a grid pass computed as one stacked module
    (:mod:`conilium.heads.stacked`) draw exactly the masks each draws alone, on any device."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = float(self.p)
        if not self.training or p == 0.0 or x.numel() == 0:
            return x
        if p == 1.0:
            return x * torch.zeros((), dtype=x.dtype, device=x.device)
        return x * dropout_mask(x.shape, p, device=x.device, dtype=x.dtype)


class Classifier(nn.Module):
    """dropout → Linear → LayerNorm → ReLU → dropout → Linear (challenge-baseline names)."""

    def __init__(self, in_dim: int, hidden: int = 1024, num_classes: int = len(CLASSES), dropout: float = 0.5,
                 attributes: int = 0, gender: int = 0):
        super().__init__()
        self.inp_drop = MaskDropout(dropout)
        self.fc = nn.ModuleList([nn.Sequential(ThreadInvariantLinear(in_dim, hidden), ThreadInvariantLayerNorm(hidden),
                                               nn.ReLU(), MaskDropout(dropout))])
        self.out = nn.Sequential(ThreadInvariantLinear(hidden, num_classes)) if num_classes else None
        # created after the class output, so that a head with attributes draws the same
        # initial class weights as one without
        self.attributes = ThreadInvariantLinear(hidden, attributes) if attributes else None
        # the auxiliary gender logit, created last: the other outputs draw the same initial weights
        self.gender = ThreadInvariantLinear(hidden, 1) if gender else None

    def forward(self, x: torch.Tensor, aux: bool = False):
        """The outputs (class logits, then attribute values); with ``aux``, also the auxiliary
        gender logit (B,): ``(outputs, gender)``."""
        h = self.inp_drop(x)
        for block in self.fc:
            h = block(h)
        if self.attributes is None:
            y = self.out(h)
        elif self.out is None:
            y = self.attributes(h)
        else:
            y = torch.cat([self.out(h), self.attributes(h)], dim=1)
        if not aux:
            return y
        if self.gender is None:
            raise ValueError("this head has no auxiliary gender output")
        return y, self.gender(h).squeeze(1)


@dataclass(frozen=True)
class HeadConfig:
    """Everything needed to rebuild a head: written into every run directory."""

    dim: int
    num_layers: int = 1
    layers: Union[str, int] = "weighted"  # "weighted" or an index into the stored layers
    pooling: str = "attentive"  # attentive | mean | stats (pooled per-layer statistics input)
    hidden: int = 1024
    dropout: float = 0.5
    num_classes: int = len(CLASSES)
    attributes: int = 0  # attribute outputs (3: arousal, valence, dominance) after the class logits
    gender: int = 0  # 1: an auxiliary gender logit beside the outputs (training only; forward(aux=True))


def classifier_for(in_dim: int, config: HeadConfig) -> Classifier:
    """The :class:`Classifier` of a head of ``config`` over pooled vectors of ``in_dim``; a
    ValueError for a config without class or attribute outputs."""
    if config.num_classes < 0 or config.attributes < 0 or config.num_classes + config.attributes == 0:
        raise ValueError(f"a head needs class or attribute outputs, not num_classes={config.num_classes}, "
                         f"attributes={config.attributes}")
    return Classifier(in_dim, config.hidden, config.num_classes, config.dropout, config.attributes, config.gender)


class EmotionHead(nn.Module):
    """Layer mix → pooling → classifier.

    ``pooling="stats"`` is the layer-probing head on the cache's pooled per-layer
    statistics: its input is ``(batch, layers, 2·dim)`` (mean ‖ std of each layer) and
    no frames are needed.
    """

    def __init__(self, config: HeadConfig):
        super().__init__()
        self.config = config
        self.layer_mix = LayerMix(config.num_layers, config.layers)
        if config.pooling == "stats":
            self.pooling = None
            in_dim = 2 * config.dim
        else:
            if config.pooling not in POOLINGS:
                raise ValueError(f"unknown pooling {config.pooling!r}; expected one of "
                                 f"{', '.join(list(POOLINGS) + ['stats'])}")
            self.pooling = POOLINGS[config.pooling](config.dim)
            in_dim = self.pooling.out_dim
        self.classifier = classifier_for(in_dim, config)

    @property
    def attribute_outputs(self) -> int:
        """How many of the last output columns are attribute values (0: class logits only)."""
        return self.config.attributes

    @property
    def output_width(self) -> int:
        """Columns of the head's output: class logits, then attribute values."""
        return self.config.num_classes + self.config.attributes

    def embed(self, x: torch.Tensor, lengths: torch.Tensor = None) -> torch.Tensor:
        """Pooled clip vector: ``x`` is (B, T, L, D) frames with ``lengths``, or (B, L, 2D) stats."""
        if self.pooling is None:
            return self.layer_mix(x, axis=1)
        x = self.layer_mix(x, axis=2)
        return self.pooling(x, valid_mask(lengths, x.shape[1]))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor = None, aux: bool = False):
        """Class logits then attribute values; with ``aux``, ``(those, gender logit)``."""
        return self.classifier(self.embed(x, lengths), aux=aux)


class GenderOutput(nn.Module):
    """A model with an auxiliary gender output (an :class:`EmotionHead` or an end-to-end model),
    seen as a model whose one output column is that logit (to predict it as any output)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *inputs) -> torch.Tensor:
        return self.model(*inputs, aux=True)[1].unsqueeze(1)


class PoolingBranch(nn.Module):
    """One modality of a :class:`FusionHead`: its layer mix and its pooling over its own frames
    (an audio cache's frames, a text cache's tokens)."""

    def __init__(self, config: HeadConfig):
        super().__init__()
        if config.pooling not in POOLINGS:
            raise ValueError(f"a fusion branch pools frames ({', '.join(POOLINGS)}), not {config.pooling!r}")
        self.layer_mix = LayerMix(config.num_layers, config.layers)
        self.pooling = POOLINGS[config.pooling](config.dim)
        self.out_dim = self.pooling.out_dim

    def mix(self, x: torch.Tensor, lengths: torch.Tensor):
        """The branch's frames with their layers mixed, (B, T, D), and their valid mask."""
        x = self.layer_mix(x, axis=2)
        return x, valid_mask(lengths, x.shape[1])

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.pooling(*self.mix(x, lengths))


class CrossAttention(nn.Module):
    """Frames of one branch (queries: a text cache's tokens) attending to those of another (keys and
    values: the audio frames), padding left out: one attention layer (one head), its output added to
    the queries and layer-normalised."""

    def __init__(self, query_dim: int, memory_dim: int):
        super().__init__()
        self.attention = nn.MultiheadAttention(query_dim, 1, kdim=memory_dim, vdim=memory_dim, batch_first=True)
        self.norm = ThreadInvariantLayerNorm(query_dim)

    def forward(self, q: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor) -> torch.Tensor:
        out, _ = self.attention(q, memory, memory, key_padding_mask=~memory_mask, need_weights=False)
        return self.norm(q + out)


class FusionHead(nn.Module):
    """One :class:`PoolingBranch` per feature cache, their pooled vectors concatenated into one
    :class:`Classifier`.

    ``configs``: each branch's :class:`HeadConfig`, the primary cache's first; the classifier's
    sizes and outputs (``hidden``, ``dropout``, ``num_classes``, ``attributes``, ``gender``) are the
    first one's. ``fusion="cross-attention"`` adds a :class:`CrossAttention` of the last branch's
    frames (a text cache's tokens) over the first branch's (audio), pooled over the last branch's
    valid frames by a pooling of its own kind, its vector concatenated after the branches'.
    The input is a tuple of ``(frames, lengths)`` pairs, one per branch in order, given as ``x``
    (``lengths`` unused), so that a fusion head is called as an :class:`EmotionHead` is:
    ``model(x)``, ``model(x, None, aux=True)``, ``model.embed(x)``.
    """

    def __init__(self, configs, fusion: str = "concat"):
        super().__init__()
        configs = list(configs)
        if len(configs) < 2:
            raise ValueError(f"a fusion head needs two branches or more, not {len(configs)}")
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; expected one of {', '.join(FUSIONS)}")
        self.config = configs[0]
        self.branch_configs = configs
        self.fusion = fusion
        self.branches = nn.ModuleList([PoolingBranch(c) for c in configs])
        in_dim = sum(b.out_dim for b in self.branches)
        self.cross = self.cross_pooling = None
        if fusion == "cross-attention":
            last = configs[-1]
            self.cross = CrossAttention(last.dim, configs[0].dim)
            self.cross_pooling = POOLINGS[last.pooling](last.dim)
            in_dim += self.cross_pooling.out_dim
        self.classifier = classifier_for(in_dim, self.config)

    attribute_outputs = EmotionHead.attribute_outputs
    output_width = EmotionHead.output_width

    def embed(self, x, lengths=None) -> torch.Tensor:
        """The branches' pooled vectors side by side; ``x``: one ``(frames, lengths)`` per branch."""
        if len(x) != len(self.branches):
            raise ValueError(f"a fusion head of {len(self.branches)} branches fed {len(x)} input(s)")
        mixed = [b.mix(xb, lb) for b, (xb, lb) in zip(self.branches, x)]
        pooled = [b.pooling(h, m) for b, (h, m) in zip(self.branches, mixed)]
        if self.cross is not None:
            (audio, audio_mask), (text, text_mask) = mixed[0], mixed[-1]
            pooled.append(self.cross_pooling(self.cross(text, audio, audio_mask), text_mask))
        return torch.cat(pooled, dim=-1)

    def forward(self, x, lengths=None, aux: bool = False):
        return self.classifier(self.embed(x, lengths), aux=aux)


def build_head(configs, fusion: str = "concat"):
    """The head of one :class:`HeadConfig` (an :class:`EmotionHead`) or of several (a :class:`FusionHead`)."""
    configs = list(configs)
    return EmotionHead(configs[0]) if len(configs) == 1 else FusionHead(configs, fusion)

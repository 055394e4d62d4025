"""The one forward pass of an upstream, used by extraction, fine-tuning and prediction.

:class:`UpstreamEncoder` wraps a wav2vec 2.0-family model (WavLM, wav2vec 2.0, HuBERT)
or a Whisper encoder (:mod:`.whisper`: log-mel front end, 30 s or clip-length input)
and returns the hidden states of chosen layers for a batch of zero-padded waveforms.
Extraction calls it under ``inference_mode`` (:class:`UpstreamRunner`), fine-tuning
trains through it and prediction runs it on new audio, so cached features equal the
features a fine-tuned model sees by construction.

A clip's features must not depend on the other clips of its batch. Two parts of a
wav2vec 2.0-family upstream see padding (Whisper: see :mod:`.whisper`):

* the CNN feature encoder. With a layer-normalised encoder (``feat_extract_norm="layer"``:
  WavLM, wav2vec2-large-robust, HuBERT large) every output frame depends only on the
  samples under its receptive field, and the convolutions have no padding, so the valid
  frames of a zero-padded clip equal those of the clip alone; the batch runs padded. With
  a group-normalised encoder (``"group"``: wav2vec2-base) the first layer normalises over
  time, so padding would change every frame: each clip runs through the encoder alone,
  unpadded.
* the transformer. Its frames are padded and an attention mask (True = real frame) is
  passed to the encoder, which zeroes padded frames before the positional convolution
  (so real frames see the same zeros as at the end of an unpadded clip) and removes
  padded keys from attention.

Hidden states are taken with forward hooks on the encoder's layers, which works the
same across transformers versions: index 0 is the input of the first transformer layer,
index ``i`` the output of layer ``i``, and the last index is the model's
``last_hidden_state`` (after the final layer norm of pre-LN models), as transformers 4.x
reported them with ``output_hidden_states=True``. The hooks only record inside
:meth:`UpstreamEncoder.hidden_states`, so gradient checkpointing's recomputation in the
backward pass leaves them alone.
"""

from __future__ import annotations

import contextlib
import time
import types
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from conilium import SAMPLE_RATE
from conilium.errors import ConfigError
from conilium.runtime import BF16_WEIGHTS, CompiledCall, autocast, valid_mask

from .plan import bucket_samples
from .whisper import MAX_SAMPLES, WhisperFamily, check_input, is_whisper
from .whisper import freeze_front_end as whisper_freeze


def hidden_shape(model: nn.Module) -> Tuple[int, int]:
    """``(num_hidden_states, dim)`` of an upstream model of any family, from its config, as
    :class:`UpstreamEncoder` reports them: hidden states 0 (input of the first transformer
    layer) to ``num_hidden_states - 1`` (the last), each ``dim`` wide."""
    family = WhisperFamily if is_whisper(model) else Wav2Vec2Family
    return family.shape(model.config)


class UpstreamEncoder(nn.Module):
    """Hidden states of an upstream (wav2vec 2.0 family or Whisper) for zero-padded waveforms.

    ``hidden_states(waves, lengths, layers)`` takes waveforms (B, N) with their lengths
    in samples and returns ``(states, frames)``: (B, T, len(layers), D) hidden states
    (indices as in the feature cache: 0 = input of the first transformer layer, the last
    = ``last_hidden_state``) and each clip's valid frame count (B,). Gradients flow
    through everything but a frozen convolutional front end. With ``fused_attention``
    WavLM's attention runs through ``scaled_dot_product_attention``
    (:func:`use_fused_attention`; equal to transformers' own forward within float
    rounding). ``whisper_input`` ("30s" or "clip") is the input length of a Whisper
    encoder (:mod:`.whisper`); other families ignore it.

    What differs between families lives in a small strategy (:class:`Wav2Vec2Family`,
    :class:`~conilium.extract.whisper.WhisperFamily`): frame arithmetic, the forward, what
    :meth:`freeze_front_end` freezes. The wrapped transformers model is ``self.model`` for
    every family (its weights are ``model.*`` in the state dict).
    """

    def __init__(self, model: nn.Module, *, fused_attention: bool = True, whisper_input: str = "30s"):
        super().__init__()
        if is_whisper(model):
            family = WhisperFamily(model, whisper_input=whisper_input)
            self.fused_attention = 0  # transformers runs Whisper's attention with SDPA itself
            self.whisper_input: Optional[str] = family.whisper_input
        else:
            check_input(whisper_input)
            family = Wav2Vec2Family(model, fused_attention=fused_attention)
            self.fused_attention = family.fused_attention
            self.whisper_input = None
        self.model = model
        self.family = family
        self.num_hidden_states = family.num_hidden_states
        self.dim = family.dim

    @property
    def last(self) -> int:
        """Index of the last hidden state."""
        return self.num_hidden_states - 1

    @property
    def frame_rate(self) -> float:
        """Output frames per second of audio (16 kHz)."""
        return self.family.frame_rate

    @property
    def max_samples(self) -> Optional[int]:
        """The longest input the upstream takes, in samples (None: no limit)."""
        return self.family.max_samples

    def check_layers(self, layers: Sequence[int]) -> Tuple[int, ...]:
        out = tuple(int(i) for i in layers)
        for i in out:
            if not 0 <= i <= self.last:
                raise ConfigError(f"hidden state {i} out of range: the upstream has hidden states 0..{self.last}")
        return out

    def close(self) -> None:
        """Remove the hooks (the wrapped model is left as it was)."""
        self.family.close()

    def freeze_front_end(self) -> None:
        """Freeze the convolutional front end (the CNN feature encoder; Whisper's two convolutions)."""
        self.family.freeze_front_end()

    def make_traceable(self) -> None:
        """Compute the forward with tensor operations only, no lengths read back into Python, so that
        a trace of it (ONNX export) holds for any batch size and length (:meth:`Wav2Vec2Family.traceable_cnn`).
        The hidden states of every clip's valid frames are those of the usual forward, within float
        rounding. Only the wav2vec 2.0 family can be traced so."""
        if not isinstance(self.family, Wav2Vec2Family):
            raise ConfigError(f"a {self.model.config.model_type} upstream cannot be traced for any input length; "
                              f"supported: the wav2vec 2.0 family (WavLM, wav2vec 2.0, HuBERT)")
        self.family.traceable = True

    # ---- lengths --------------------------------------------------------------------------
    def frames_for(self, num_samples: int) -> int:
        """Frames the upstream outputs for ``num_samples`` input samples (0 when too short)."""
        return self.family.frames_for(num_samples)

    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Valid output frames of clips of ``lengths`` samples."""
        return self.family.frame_lengths(lengths)

    def padded_frames(self, frames: torch.Tensor) -> int:
        """Frames computed for each clip of a batch whose clips have ``frames`` valid frames."""
        return self.family.padded_frames(frames)

    # ---- forward --------------------------------------------------------------------------
    def hidden_states(self, waves: torch.Tensor, lengths: torch.Tensor,
                      layers: Optional[Sequence[int]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, T, len(layers), D) hidden states ``layers`` (default: the last) and the valid
        frame count of each clip."""
        layers = (self.last,) if layers is None else self.check_layers(layers)
        frames = self.frame_lengths(lengths)
        if int(frames.min()) < 1:
            raise ConfigError(f"a clip of {int(lengths.min())} samples is too short for the upstream "
                              f"(no output frame)")
        return self.family.hidden_states(waves, lengths, frames, layers), frames


class Wav2Vec2Family:
    """:class:`UpstreamEncoder`'s strategy for the wav2vec 2.0 family (WavLM, wav2vec 2.0, HuBERT)."""

    max_samples = None
    #: the CNN runs through :meth:`traceable_cnn` (:meth:`UpstreamEncoder.make_traceable`)
    traceable = False
    #: the batch runs at its padded length, not its longest clip's (length buckets, see
    #: :meth:`UpstreamRunner.use_length_buckets`): the CNN through :meth:`traceable_cnn`
    whole_batch = False

    def __init__(self, model: nn.Module, *, fused_attention: bool = True):
        for part in ("feature_extractor", "feature_projection", "encoder"):
            if not hasattr(model, part):
                raise ConfigError(f"upstream {type(model).__name__} is not a wav2vec 2.0-family model "
                                  f"(no {part}); supported: WavLM, wav2vec 2.0, HuBERT, Whisper")
        if getattr(model, "adapter", None) is not None:
            raise ConfigError("upstreams with an adapter (add_adapter=True) are not supported")
        self.model = model
        self.fused_attention = use_fused_attention(model) if fused_attention else 0
        config = model.config
        self.group_norm_encoder = getattr(config, "feat_extract_norm", "layer") == "group"
        self.num_hidden_states, self.dim = self.shape(config)
        stride = 1
        for s in config.conv_stride:
            stride *= s
        self.frame_rate = SAMPLE_RATE / stride
        self._captured: Optional[Dict[int, torch.Tensor]] = None
        enc_layers = model.encoder.layers
        self._hooks = [enc_layers[0].register_forward_pre_hook(self._capture_input)]
        for i, layer in enumerate(enc_layers):
            self._hooks.append(layer.register_forward_hook(self._capture_output(i + 1)))

    @staticmethod
    def shape(config) -> Tuple[int, int]:
        """``(hidden states, width)`` of a wav2vec 2.0-family upstream with this config."""
        return int(config.num_hidden_layers) + 1, int(config.hidden_size)

    # ---- hooks ----------------------------------------------------------------------------
    def _capture_input(self, module, args):
        if self._captured is not None and args:
            self._captured[0] = args[0]

    def _capture_output(self, index: int):
        def hook(module, args, output):
            if self._captured is not None:
                self._captured[index] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def freeze_front_end(self) -> None:
        self.model.freeze_feature_encoder()

    # ---- lengths --------------------------------------------------------------------------
    def frames_for(self, num_samples: int) -> int:
        n = int(num_samples)
        for k, s in zip(self.model.config.conv_kernel, self.model.config.conv_stride):
            n = (n - k) // s + 1
            if n <= 0:
                return 0
        return n

    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return self.model._get_feat_extract_output_lengths(lengths).to(torch.long)

    def padded_frames(self, frames: torch.Tensor) -> int:
        return int(frames.max())

    # ---- forward --------------------------------------------------------------------------
    def _cnn(self, waves: torch.Tensor, lengths: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """CNN features (B, T, C), each clip's valid frames then zeros."""
        fe = self.model.feature_extractor
        t_max = int(frames.max())
        frozen = not any(p.requires_grad for p in fe.parameters())
        with torch.no_grad() if (frozen and torch.is_grad_enabled()) else contextlib.nullcontext():
            if self.group_norm_encoder or waves.shape[0] == 1:
                out = []
                for i in range(waves.shape[0]):
                    f = fe(waves[i : i + 1, : int(lengths[i])])[0, :, : int(frames[i])]
                    out.append(nn.functional.pad(f, (0, t_max - f.shape[-1])))
                feats = torch.stack(out)
            else:
                feats = fe(waves[:, : int(lengths.max())])[:, :, :t_max]
        return feats.transpose(1, 2)

    def traceable_cnn(self, waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """CNN features (B, T, C) of the whole zero-padded batch in one call, T following the padded
        length: every clip's valid frames equal :meth:`_cnn`'s, the frames after them are left as
        computed (the transformer's attention mask drops them). A group-normalised encoder
        normalises its first layer over each clip's valid frames only, which is what running the
        clip alone does; the convolutions have no padding, so the later layers' valid frames only
        see valid frames."""
        fe = self.model.feature_extractor
        x = waves[:, None]
        for i, layer in enumerate(fe.conv_layers):
            if i == 0 and self.group_norm_encoder:
                x = layer.conv(x)
                k, s = self.model.config.conv_kernel[0], self.model.config.conv_stride[0]
                valid = torch.div(lengths - k, s, rounding_mode="floor") + 1
                x = layer.activation(_masked_group_norm(layer.layer_norm, x, valid))
            else:
                x = layer(x)
        return x.transpose(1, 2)

    def hidden_states(self, waves: torch.Tensor, lengths: torch.Tensor, frames: torch.Tensor,
                      layers: Tuple[int, ...]) -> torch.Tensor:
        up = self.model
        last = self.num_hidden_states - 1
        only_last = layers == (last,)
        with warnings.catch_warnings():
            # WavLM passes a boolean padding mask beside its float position bias
            warnings.filterwarnings("ignore", message=".*mismatched key_padding_mask.*")
            whole = self.traceable or self.whole_batch
            feats = self.traceable_cnn(waves, lengths) if whole else self._cnn(waves, lengths, frames)
            mask = valid_mask(frames, feats.shape[1])
            proj = up.feature_projection(feats)
            hidden = proj[0] if isinstance(proj, tuple) else proj
            hidden = up._mask_hidden_states(hidden, attention_mask=mask)  # SpecAugment, in training only
            self._captured = None if only_last else {}
            try:
                out = up.encoder(hidden, attention_mask=mask)
                captured = self._captured
            finally:
                self._captured = None
        last_state = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if only_last:
            return last_state.unsqueeze(2)
        captured[last] = last_state
        for i in range(1, self.num_hidden_states):  # a layer LayerDrop skipped passes its input on
            if i not in captured:
                captured[i] = captured[i - 1]
        return torch.stack([captured[i] for i in layers], dim=2)


def _masked_group_norm(norm: nn.GroupNorm, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``norm`` (a GroupNorm over time) of ``x`` (B, C, T) with each clip's statistics taken over its
    first ``valid[b]`` frames only."""
    b, c, t = x.shape
    g = norm.num_groups
    m = valid_mask(valid, t).to(x.dtype)[:, None, None, :]  # (B, 1, 1, T)
    xg = x.reshape(b, g, c // g, t)
    n = m.sum(dim=3, keepdim=True) * (c // g)
    mean = (xg * m).sum(dim=(2, 3), keepdim=True) / n
    var = (((xg - mean) ** 2) * m).sum(dim=(2, 3), keepdim=True) / n
    y = ((xg - mean) / torch.sqrt(var + norm.eps)).reshape(b, c, t)
    if norm.affine:
        y = y * norm.weight[None, :, None] + norm.bias[None, :, None]
    return y


def freeze_front_end(upstream: nn.Module) -> None:
    """Freeze an upstream's convolutional front end, whatever its family (before it is wrapped)."""
    if is_whisper(upstream):
        whisper_freeze(upstream)
    else:
        upstream.freeze_feature_encoder()


# ----------------------------------------------------------------------------- fused attention

def _wavlm_sdpa(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor],
                gated_position_bias: torch.Tensor):
    """WavLM's self-attention through ``scaled_dot_product_attention``.

    transformers computes it with ``multi_head_attention_forward(need_weights=True)``,
    which materialises and returns the (B·H, T, T) weights. The same product —
    softmax(q·kᵀ/√d + gated relative position bias, padded keys excluded)·v, dropout on
    the weights in training — as one fused call; the weights are not returned.
    """
    bsz, tgt, embed = hidden_states.shape
    heads, dim = self.num_heads, self.head_dim

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.view(bsz, tgt, heads, dim).transpose(1, 2)

    # the projections are called as modules, so that LoRA adapters around them (:mod:`.lora`) take part
    q = split(self.q_proj(hidden_states))
    k = split(self.k_proj(hidden_states))
    v = split(self.v_proj(hidden_states))
    bias = gated_position_bias.view(bsz, heads, tgt, tgt).to(q.dtype)
    if attention_mask is not None:
        padded = attention_mask.ne(1)[:, None, None, :]
        bias = bias.masked_fill(padded, float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                         dropout_p=self.dropout if self.training else 0.0)
    out = out.transpose(1, 2).reshape(bsz, tgt, embed)
    return self.out_proj(out), None


#: Attention modules computed with the fused kernel: class name → replacement of the method
#: ``torch_multi_head_self_attention`` (the families transformers already runs with SDPA —
#: wav2vec 2.0, HuBERT — are left as they are).
_FUSED = {"WavLMAttention": _wavlm_sdpa}
_FUSED_NEEDS = ("q_proj", "k_proj", "v_proj", "out_proj", "num_heads", "head_dim", "dropout",
                "torch_multi_head_self_attention")


def use_fused_attention(model: nn.Module) -> int:
    """Compute ``model``'s attention with ``scaled_dot_product_attention`` where transformers
    does not; returns the number of attention modules switched.

    Guarded by what the transformers version provides: a module whose attributes are not
    the ones the fused forward reads keeps its own forward (see :func:`fused_attention_ok`).
    """
    switched = 0
    for module in model.modules():
        fused = _FUSED.get(type(module).__name__)
        if fused is None or not all(hasattr(module, a) for a in _FUSED_NEEDS):
            continue
        if module.head_dim * module.num_heads != module.q_proj.out_features:
            continue
        module.torch_multi_head_self_attention = types.MethodType(fused, module)
        switched += 1
    return switched


def pad_waves(waves: Sequence[np.ndarray], to: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad float32 waveforms to the longest (or to ``to`` samples, when longer):
    ``(waves (B, N), lengths (B,))``."""
    lengths = torch.tensor([len(w) for w in waves], dtype=torch.long)
    longest = int(lengths.max()) if len(waves) else 1
    x = torch.zeros(len(waves), max(longest, to or 0), dtype=torch.float32)
    for i, w in enumerate(waves):
        x[i, : len(w)] = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
    return x, lengths


class PendingBatch:
    """A batch :meth:`UpstreamRunner.submit` has started (its forward pass launched, its states on
    their way to host memory; already there on CPU), for :meth:`UpstreamRunner.result` to resolve."""

    __slots__ = ("waves", "kept", "pooled", "frames", "finite", "done", "seconds", "padded")

    def __init__(self, waves: Sequence[np.ndarray], kept: torch.Tensor, pooled: Optional[torch.Tensor],
                 frames: torch.Tensor, finite: Optional[torch.Tensor], done, seconds: float, padded: int):
        self.waves = waves
        self.kept = kept  # (B, T, len(layers), D), in the runner's transfer dtype
        self.pooled = pooled  # (B, all hidden states, 2, D) float32, or None
        self.frames = frames  # (B,) valid frames of each clip
        self.finite = finite  # 0-d bool, when the states were narrowed: every narrowed value is finite
        self.done = done  # CUDA: recorded once the copies to host memory are done
        self.seconds = seconds
        self.padded = padded  # transformer frames computed for each clip (padding included)


class UpstreamRunner:
    """Extraction's use of :class:`UpstreamEncoder`: lists of waveforms in, one result per clip.

    ``__call__(waves)`` returns, per clip, ``(frames, pooled)``: an array of shape
    (frames, len(layers), dim) holding the hidden states ``layers`` (indices into all
    ``num_hidden_states``), and, with ``pooled_stats``, a float32 array (all hidden states,
    2, dim) of the per-layer mean and standard deviation over the clip's frames (else
    None). ``whisper_input``: a Whisper encoder's input length (:mod:`.whisper`).
    ``forward_seconds`` accumulates the time spent in the model (synchronised on
    CUDA); ``computed_frames`` / ``useful_frames`` count transformer frames including /
    excluding padding.

    ``stored_dtype`` is the dtype the cache stores frames in ("float16" or "float32"). On
    CUDA the states leave the device in it (``transfer_dtype``: half the bytes for float16),
    converted there from the float32 states with the rounding NumPy's conversion on the host
    would apply, so the values stored are the same; on CPU they stay float32 and the cache
    writer converts them, off the forward's thread. ``frames`` is float32 unless
    ``transfer_dtype`` is float16. The pooled statistics are float32 either way.

    ``submit(waves)`` launches a batch and ``result(pending)`` returns its clips, so that a
    caller can submit the next batch before taking a batch's results: on CUDA the states
    are copied into pinned host memory on a side stream, overlapping the next forward
    pass. ``__call__`` is the two at once.

    :meth:`use_length_buckets` pads every batch up to one of a few lengths
    (:func:`~conilium.extract.plan.bucket_samples`), so that the device sees few distinct
    shapes: each new shape costs a CUDA device new attention and convolution plans.
    """

    def __init__(self, model, *, device: torch.device, compute_dtype: str = "float32",
                 layers: Optional[Sequence[int]] = None, pooled_stats: bool = False, whisper_input: str = "30s",
                 compile: bool = False, stored_dtype: str = "float32"):
        self.encoder = UpstreamEncoder(model.eval(), whisper_input=whisper_input).to(device)
        #: ``bfloat16-weights``: the upstream's weights cast to bfloat16 and its input too (no autocast)
        self.input_dtype = torch.float32
        if compute_dtype == BF16_WEIGHTS:  # a Whisper encoder is refused before (plan.resolve_for_family)
            self.encoder.to(dtype=torch.bfloat16)
            self.input_dtype = torch.bfloat16
        #: ``compile``: the forward through ``torch.compile`` (dynamic shapes: clips of every
        #: length share one compiled graph, after a first compilation of some seconds)
        self.compiled = bool(compile)
        self._forward = (CompiledCall(self.encoder.hidden_states, what="the upstream's forward",
                                      without="extract without --compile")
                         if self.compiled else self.encoder.hidden_states)
        self.device = torch.device(device)
        self.compute_dtype = compute_dtype
        self.num_hidden_states = self.encoder.num_hidden_states
        self.dim = self.encoder.dim
        self.layers = list(range(self.num_hidden_states)) if layers is None else list(layers)
        self.pooled_stats = pooled_stats
        if stored_dtype not in ("float16", "float32"):
            raise ConfigError(f"stored dtype {stored_dtype!r}: float16 or float32")
        self.stored_dtype = stored_dtype
        #: the dtype the kept states leave the device in
        self.transfer_dtype = (torch.float16 if stored_dtype == "float16" and self.device.type == "cuda"
                               else torch.float32)
        self._copy_stream = None
        #: length buckets: a batch runs padded to bucket_samples(longest, bucket_cap); None: off
        self.bucket_cap: Optional[int] = None
        self.forward_seconds = 0.0
        self.computed_frames = 0
        self.useful_frames = 0

    def _call(self, x: torch.Tensor, lengths: torch.Tensor, wanted):
        return self._forward(x, lengths, wanted)

    def frames_for(self, num_samples: int) -> int:
        return self.encoder.frames_for(num_samples)

    @property
    def min_samples(self) -> int:
        """Samples the model computes for a clip at least, whatever its length: a Whisper
        encoder on its 30 s input computes 30 s for every clip; 0 for the others."""
        return MAX_SAMPLES if self.encoder.whisper_input == "30s" else 0

    @property
    def frame_rate(self) -> float:
        """Output frames per second of audio (the cache manifest's ``frame_rate``)."""
        return self.encoder.frame_rate

    def close(self) -> None:
        self.encoder.close()

    def __call__(self, waves: Sequence[np.ndarray]) -> List[Tuple[np.ndarray, Optional[np.ndarray]]]:
        return self.result(self.submit(waves))

    def use_length_buckets(self, cap: int) -> bool:
        """Pad each batch up to its length bucket, never beyond ``cap`` samples (the run's longest
        clip); the valid frames are those of the batch padded to its longest clip, within float
        rounding. Whether it applies: a Whisper encoder has its own input length (False)."""
        if not isinstance(self.encoder.family, Wav2Vec2Family):
            return False
        self.bucket_cap = int(cap)
        self.encoder.family.whole_batch = True
        return True

    def padded_samples(self, longest: int) -> int:
        """The samples a batch whose longest clip has ``longest`` samples runs at."""
        return longest if self.bucket_cap is None else bucket_samples(longest, self.bucket_cap)

    @property
    def asynchronous(self) -> bool:
        """Whether :meth:`submit` returns while the forward still runs (a CUDA device), so that
        submitting the next batch before collecting this one keeps the device busy."""
        return self.device.type == "cuda"

    @torch.inference_mode()
    def submit(self, waves: Sequence[np.ndarray]) -> Optional[PendingBatch]:
        """Launch the forward pass of ``waves`` and the copy of its states to host memory
        (None for no waves)."""
        return self._submit(waves, self.transfer_dtype) if waves else None

    def _submit(self, waves: Sequence[np.ndarray], transfer: torch.dtype) -> PendingBatch:
        t0 = time.perf_counter()
        x, lengths = pad_waves(waves, to=self.padded_samples(max(len(w) for w in waves)))
        wanted = list(range(self.num_hidden_states)) if self.pooled_stats else self.layers
        with autocast(self.device, self.compute_dtype):
            states, frames = self._call(x.to(self.device, self.input_dtype), lengths.to(self.device), wanted)
        states = states.float()  # (B, T, L, D)
        pooled = None
        if self.pooled_stats:
            m = valid_mask(frames, states.shape[1])[:, :, None, None].float()
            n = m.sum(dim=1)  # (B, 1, 1)
            mean = (states * m).sum(dim=1) / n
            var = (((states - mean[:, None]) ** 2) * m).sum(dim=1) / n
            pooled = torch.stack([mean, var.sqrt()], dim=2)  # (B, L, 2, D)
        kept = states if len(self.layers) == states.shape[2] else states[:, :, self.layers]
        finite = None
        if transfer != kept.dtype:
            kept = kept.to(transfer)
            finite = torch.isfinite(kept).all()
        done = None
        if self.device.type == "cuda":
            kept, pooled, frames, finite, done = self._to_host(kept, pooled, frames, finite)
        padded = states.shape[1] if self.bucket_cap is not None else self.encoder.padded_frames(frames)
        return PendingBatch(waves, kept, pooled, frames, finite, done, time.perf_counter() - t0, padded)

    def _to_host(self, *tensors: Optional[torch.Tensor]):
        """Copies of ``tensors`` in pinned host memory, made on a side stream once the work queued
        so far is done, and the event recorded after them: the copies overlap the next forward
        pass. The device tensors are marked as used by that stream, so that their memory is not
        handed to the next forward before the copies have read it."""
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        stream = self._copy_stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        out = []
        with torch.cuda.stream(stream):
            for t in tensors:
                if t is None:
                    out.append(None)
                    continue
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t, non_blocking=True)
                t.record_stream(stream)
                out.append(host)
            done = torch.cuda.Event()
            done.record(stream)
        return (*out, done)

    @torch.inference_mode()
    def result(self, pending: Optional[PendingBatch]) -> List[Tuple[np.ndarray, Optional[np.ndarray]]]:
        """The clips of a submitted batch, once its states are in host memory.

        Each clip's arrays are views of its batch's own host tensors (on CUDA pinned ones,
        allocated per batch), which the arrays keep alive: the memory goes back to PyTorch
        only once no clip's array is left, so no later batch is copied under a reader.
        A batch whose narrowed states are not all finite (a value beyond float16's range)
        is computed again and returned as float32, for the cache writer to report the clip
        and the value as it does for states narrowed on the host."""
        if pending is None:
            return []
        t0 = time.perf_counter()
        if pending.done is not None:
            pending.done.synchronize()
        if pending.finite is not None and not bool(pending.finite):
            self.forward_seconds += pending.seconds + time.perf_counter() - t0
            pending = self._submit(pending.waves, torch.float32)
            t0 = time.perf_counter()
            if pending.done is not None:
                pending.done.synchronize()
        kept = pending.kept.numpy()
        pooled = None if pending.pooled is None else pending.pooled.numpy()
        counts = pending.frames.tolist()
        self.forward_seconds += pending.seconds + time.perf_counter() - t0
        self.computed_frames += len(counts) * pending.padded
        self.useful_frames += sum(counts)
        return [(kept[i, :n], None if pooled is None else pooled[i]) for i, n in enumerate(counts)]

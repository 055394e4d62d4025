"""Batch-independent forward passes of an upstream over variable-length clips.

A clip's features must not depend on the other clips of its batch. Two parts of a
wav2vec 2.0-style upstream see padding:

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
reported them with ``output_hidden_states=True``.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from conilium.errors import ConfigError


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"unknown device {device!r}; expected auto, cpu or cuda")
    return torch.device(device)


def pick_compute_dtype(compute_dtype: str, device: torch.device) -> str:
    """``auto``: float32 on CPU; bfloat16 on CUDA where supported, else float16."""
    if compute_dtype == "auto":
        if device.type != "cuda":
            return "float32"
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if compute_dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"unknown compute dtype {compute_dtype!r}; expected auto, float32, bfloat16 or float16")
    if compute_dtype != "float32" and device.type != "cuda":
        raise ConfigError(f"--compute-dtype {compute_dtype} (autocast) is only used on CUDA; use float32 on CPU")
    return compute_dtype


@contextlib.contextmanager
def _no_tf32():
    """Full float32 on CUDA: no TF32 in matrix products and convolutions (restored after)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


class UpstreamRunner:
    """Runs a wav2vec 2.0-family model over lists of waveforms, one clip's result per clip.

    ``__call__(waves)`` returns, per clip, ``(frames, pooled)``: a float32 array of shape
    (frames, len(layers), dim) holding the hidden states ``layers`` (indices into all
    ``num_hidden_states``), and, with ``pooled_stats``, a float32 array (all hidden states,
    2, dim) of the per-layer mean and standard deviation over the clip's frames (else None). ``forward_seconds`` accumulates the time spent in
    the model (synchronised on CUDA); ``computed_frames`` / ``useful_frames`` count
    transformer frames including / excluding padding.
    """

    def __init__(self, model, *, device: torch.device, compute_dtype: str = "float32",
                 layers: Optional[Sequence[int]] = None, pooled_stats: bool = False):
        self.model = model.eval().to(device)
        self.device = device
        self.compute_dtype = compute_dtype
        config = model.config
        for part in ("feature_extractor", "feature_projection", "encoder"):
            if not hasattr(model, part):
                raise ConfigError(f"upstream {type(model).__name__} is not a wav2vec 2.0-family model "
                                  f"(no {part}); supported: WavLM, wav2vec 2.0, HuBERT")
        self.group_norm_encoder = getattr(config, "feat_extract_norm", "layer") == "group"
        self.num_hidden_states = config.num_hidden_layers + 1
        self.dim = config.hidden_size
        self.layers = list(range(self.num_hidden_states)) if layers is None else list(layers)
        self.pooled_stats = pooled_stats
        self.forward_seconds = 0.0
        self.computed_frames = 0
        self.useful_frames = 0
        self._captured: List[Optional[torch.Tensor]] = []
        layers = model.encoder.layers
        self._hooks = [layers[0].register_forward_pre_hook(self._capture_input)]
        for i, layer in enumerate(layers):
            self._hooks.append(layer.register_forward_hook(self._capture_output(i + 1)))

    # ---- hooks ----------------------------------------------------------------------------
    def _capture_input(self, module, args):
        if self._captured and args:
            self._captured[0] = args[0]

    def _capture_output(self, index: int):
        def hook(module, args, output):
            if self._captured:
                self._captured[index] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # ---- forward --------------------------------------------------------------------------
    def frames_for(self, num_samples: int) -> int:
        """Frames the upstream outputs for ``num_samples`` input samples (0 when too short)."""
        n = int(num_samples)
        for k, s in zip(self.model.config.conv_kernel, self.model.config.conv_stride):
            n = (n - k) // s + 1
            if n <= 0:
                return 0
        return n

    def _autocast(self):
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        if self.compute_dtype != "float32":
            return torch.autocast("cuda", dtype=getattr(torch, self.compute_dtype))
        return _no_tf32()

    def _features(self, waves: Sequence[np.ndarray], lengths: List[int]) -> torch.Tensor:
        """CNN features of every clip, zero-padded to the longest: (B, T, C)."""
        fe = self.model.feature_extractor
        t_max = max(lengths)
        if self.group_norm_encoder or len(waves) == 1:
            feats = []
            for w, n in zip(waves, lengths):
                x = torch.from_numpy(np.ascontiguousarray(w)).to(self.device)[None]
                f = fe(x).transpose(1, 2)[0, :n]
                if f.shape[0] < t_max:
                    f = torch.nn.functional.pad(f, (0, 0, 0, t_max - f.shape[0]))
                feats.append(f)
            return torch.stack(feats)
        n_max = max(len(w) for w in waves)
        x = torch.zeros(len(waves), n_max, dtype=torch.float32)
        for i, w in enumerate(waves):
            x[i, : len(w)] = torch.from_numpy(w)
        f = fe(x.to(self.device)).transpose(1, 2)
        return f[:, :t_max]

    @torch.inference_mode()
    def __call__(self, waves: Sequence[np.ndarray]) -> List[Tuple[np.ndarray, Optional[np.ndarray]]]:
        if not waves:
            return []
        lengths = [self.frames_for(len(w)) for w in waves]
        t0 = time.perf_counter()
        t_max = max(lengths)
        mask = torch.zeros(len(waves), t_max, dtype=torch.bool)
        for i, n in enumerate(lengths):
            mask[i, :n] = True
        mask = mask.to(self.device)
        self._captured = [None] * self.num_hidden_states
        with self._autocast(), warnings.catch_warnings():
            # WavLM passes a boolean padding mask beside its float position bias
            warnings.filterwarnings("ignore", message=".*mismatched key_padding_mask.*")
            feats = self._features(waves, lengths)
            proj = self.model.feature_projection(feats)
            hidden = proj[0] if isinstance(proj, tuple) else proj
            out = self.model.encoder(hidden, attention_mask=mask)
            last = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        self._captured[-1] = last
        if any(h is None for h in self._captured):
            raise RuntimeError("upstream hooks did not capture every hidden state")
        states = torch.stack([h.float() for h in self._captured], dim=2)  # (B, T, L, D)
        self._captured = []
        pooled = None
        if self.pooled_stats:
            m = mask[:, :, None, None].float()
            n = m.sum(dim=1)  # (B, 1, 1)
            mean = (states * m).sum(dim=1) / n
            var = (((states - mean[:, None]) ** 2) * m).sum(dim=1) / n
            pooled = torch.stack([mean, var.sqrt()], dim=2).cpu().numpy()  # (B, L, 2, D)
        if len(self.layers) == states.shape[2]:
            kept = states
        else:
            kept = states[:, :, self.layers]
        kept = kept.cpu().numpy()
        self.forward_seconds += time.perf_counter() - t0
        self.computed_frames += len(waves) * t_max
        self.useful_frames += sum(lengths)
        return [(kept[i, :n], None if pooled is None else pooled[i]) for i, n in enumerate(lengths)]

"""Whisper's encoder as an upstream: log-mel front end, frame arithmetic, loading, forward.

The upstream is the encoder of a Whisper model (transformers' ``WhisperEncoder``; the
decoder is never loaded). Its input is the log-mel spectrogram of transformers' own
``WhisperFeatureExtractor`` (``feature_size`` = the model's ``num_mel_bins``; hop 160,
400-point FFT, 30 s chunks: the settings of every released Whisper), computed per clip on
the clip zero-padded to 30 s, exactly as the model was trained.

Frames. Mel frame ``k`` is centred on sample ``160·k``; a clip of ``n`` samples has
``ceil(n / 160)`` mel frames centred inside it (the feature extractor's ``attention_mask``
for the padded input), and the encoder's stride-2 convolution makes ``(m - 1) // 2 + 1``
frames of ``m`` mel frames (the model's ``_get_feat_extract_output_lengths``): 50 frames
per second, ``ceil(n / 320)`` in all. Only those frames are kept.

Input length (``whisper_input``):

* ``"30s"`` (default): every clip's mel is the full 30 s input (3000 mel frames, 1500
  encoder frames), the model's own forward as trained; the frames after the clip's are
  computed and dropped. A clip's features do not depend on its batch.
* ``"clip"``: the mel cut to the clip's frames, the positional embeddings cut to its
  encoder frames, padded mel frames and convolution outputs zeroed (as the convolutions'
  own zero padding at the clip's end) and padded keys masked in attention, so a clip's
  features equal those of the clip alone whatever its batch. Much faster for short clips;
  the features differ from the 30 s input's (the model never saw inputs cut short): see
  ``bench/bench_extract.py --forward`` for both figures.

Hidden-state indices are those of the other families: 0 = the input of the first
transformer layer (convolutions + positional embedding), ``i`` = the output of layer ``i``,
the last = ``last_hidden_state`` (after the encoder's final layer norm).
"""

from __future__ import annotations

import contextlib
import types
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from conilium import SAMPLE_RATE
from conilium.errors import ConfigError
from conilium.runtime import valid_mask

from .registry import WHISPER_INPUTS  # noqa: F401 (re-exported)

#: Samples per mel frame (the feature extractor's hop) and per encoder frame (conv stride 2).
MEL_HOP = 160
SAMPLES_PER_FRAME = 2 * MEL_HOP
#: Whisper's input window: 30 s.
CHUNK_SECONDS = 30
MAX_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE
#: Fine-tuning's configuration keys (the wav2vec 2.0 family's names) → Whisper's; None: no counterpart.
OVERRIDE_KEYS = {"hidden_dropout": "dropout", "attention_dropout": "attention_dropout",
                 "activation_dropout": "activation_dropout", "feat_proj_dropout": None, "final_dropout": None,
                 "layerdrop": "encoder_layerdrop", "mask_time_prob": "mask_time_prob",
                 "apply_spec_augment": "apply_spec_augment"}
#: Checkpoint keys of full Whisper models (…ForConditionalGeneration, WhisperModel, …ForAudioClassification)
#: → the encoder's own.
_ENCODER_KEYS = {r"^model\.encoder\.": "", r"^encoder\.": ""}


def is_whisper(model_or_config) -> bool:
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "model_type", None) == "whisper"


def check_input(whisper_input: str) -> str:
    if whisper_input not in WHISPER_INPUTS:
        raise ConfigError(f"whisper_input must be one of {', '.join(WHISPER_INPUTS)}, got {whisper_input!r}")
    return whisper_input


def mel_frames(num_samples: int) -> int:
    """Mel frames centred inside a clip of ``num_samples`` samples."""
    return max(0, -(-int(num_samples) // MEL_HOP))


def frames_for(num_samples: int) -> int:
    """Encoder frames of a clip of ``num_samples`` samples (0 when empty): 50 per second."""
    m = mel_frames(num_samples)
    return (m - 1) // 2 + 1 if m > 0 else 0


# ----------------------------------------------------------------------------- building and loading

def encoder_from_config(config):
    """A randomly initialised Whisper encoder of ``config`` (the caller seeds torch)."""
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    return WhisperEncoder(config)


def load_encoder(source: str, *, revision: Optional[str] = None, overrides: Optional[Dict] = None, **access):
    """The encoder of the Whisper model at ``source`` (a hub id or a directory), through
    ``from_pretrained``; the checkpoint may hold the whole model or the encoder alone (as a
    finetune-best model directory does). ``overrides`` use fine-tuning's (wav2vec 2.0) key
    names (:data:`OVERRIDE_KEYS`) or Whisper's own; ``access`` goes to both
    ``from_pretrained`` calls (e.g. ``local_files_only=True`` offline)."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    config = WhisperConfig.from_pretrained(source, revision=revision, **access)
    for key, value in (overrides or {}).items():
        key = OVERRIDE_KEYS.get(key, key)
        if key is None:
            continue
        if not hasattr(config, key):
            raise ConfigError(f"upstream {source}: Whisper has no configuration value {key!r}")
        setattr(config, key, value)
    return WhisperEncoder.from_pretrained(source, config=config, revision=revision, key_mapping=_ENCODER_KEYS,
                                          **access)


def feature_extractor(config):
    """transformers' ``WhisperFeatureExtractor`` for a model of ``config`` (its mel bins)."""
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=int(config.num_mel_bins), sampling_rate=SAMPLE_RATE,
                                   hop_length=MEL_HOP, chunk_length=CHUNK_SECONDS, n_fft=400)


def freeze_front_end(model) -> None:
    """No gradient into the convolutions (the positional embedding is fixed already)."""
    for module in (model.conv1, model.conv2, model.embed_positions):
        module.requires_grad_(False)


# ----------------------------------------------------------------------------- the forward

def _bidirectional_mask(config, x: torch.Tensor, mask: torch.Tensor):
    """The key-padding mask in the form the model's attention implementation takes."""
    try:
        from transformers.masking_utils import create_bidirectional_mask
    except ImportError:  # transformers 4.x: an additive float mask
        from transformers.modeling_attn_mask_utils import _prepare_4d_attention_mask

        return _prepare_4d_attention_mask(mask.to(x.dtype), x.dtype)
    return create_bidirectional_mask(config=config, inputs_embeds=x, attention_mask=mask)


class WhisperFamily:
    """:class:`~conilium.extract.encoder.UpstreamEncoder`'s strategy for a Whisper encoder."""

    frame_rate = SAMPLE_RATE / SAMPLES_PER_FRAME
    max_samples = MAX_SAMPLES

    def __init__(self, model: nn.Module, *, whisper_input: str = "30s"):
        for part in ("conv1", "conv2", "embed_positions", "layers", "layer_norm"):
            if not hasattr(model, part):
                raise ConfigError(f"upstream {type(model).__name__} is not a Whisper encoder (no {part}); load "
                                  f"Whisper models through conilium.extract.upstreams.load_upstream")
        self.model = model
        self.whisper_input = check_input(whisper_input)
        self.features = feature_extractor(model.config)
        self.positions = int(model.config.max_source_positions)
        if self.positions * SAMPLES_PER_FRAME != MAX_SAMPLES:
            raise ConfigError(f"Whisper encoder with {self.positions} positions: only the released 30 s input "
                              f"(1500 positions) is supported")
        self.num_hidden_states, self.dim = self.shape(model.config)

    @staticmethod
    def shape(config) -> Tuple[int, int]:
        """``(hidden states, width)`` of a Whisper encoder with this config."""
        return int(config.encoder_layers) + 1, int(config.d_model)

    # ---- lengths ----------------------------------------------------------------------------
    def frames_for(self, num_samples: int) -> int:
        return frames_for(num_samples)

    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        mel = torch.div(lengths + (MEL_HOP - 1), MEL_HOP, rounding_mode="floor")
        frames = self.model._get_feat_extract_output_lengths(mel)
        return torch.where(mel > 0, frames, torch.zeros_like(frames)).to(torch.long)

    def padded_frames(self, frames: torch.Tensor) -> int:
        """Encoder frames computed per clip of a batch whose clips have ``frames`` frames."""
        return self.positions if self.whisper_input == "30s" else int(frames.max())

    def freeze_front_end(self) -> None:
        freeze_front_end(self.model)

    def close(self) -> None:
        pass

    # ---- forward ----------------------------------------------------------------------------
    def log_mel(self, waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, mel bins, 3000) float32 log-mel of each clip zero-padded to 30 s, on ``waves``' device:
        ``WhisperFeatureExtractor`` over each clip's own samples (its STFT on that device)."""
        n_max = int(lengths.max())
        if n_max > MAX_SAMPLES:
            raise ConfigError(f"a clip of {n_max / SAMPLE_RATE:.2f} s is longer than Whisper's "
                              f"{CHUNK_SECONDS} s input: truncate the audio to at most {CHUNK_SECONDS} s "
                              f"(--max-seconds)")
        dev = waves.device
        clips = [waves[i, : int(n)].detach().float().cpu().numpy() for i, n in enumerate(lengths.tolist())]
        with torch.autocast(dev.type, enabled=False) if dev.type in ("cuda", "cpu") else contextlib.nullcontext():
            mel = self.features(clips, sampling_rate=SAMPLE_RATE, padding="max_length", max_length=MAX_SAMPLES,
                                truncation=False, return_tensors="np",
                                device="cpu" if dev.type == "cpu" else str(dev))["input_features"]
        return torch.from_numpy(np.ascontiguousarray(mel, dtype=np.float32)).to(dev)

    def _spec_augment(self, mel: torch.Tensor, mel_valid: torch.Tensor) -> torch.Tensor:
        """Whisper's own SpecAugment (``WhisperModel._mask_input_features``) inside each clip's mel frames."""
        config = self.model.config
        if not getattr(config, "apply_spec_augment", False):
            return mel
        from transformers.models.whisper.modeling_whisper import WhisperModel

        holder = types.SimpleNamespace(config=config, training=True)
        return WhisperModel._mask_input_features(holder, mel.clone(), attention_mask=mel_valid.long())

    def hidden_states(self, waves: torch.Tensor, lengths: torch.Tensor, frames: torch.Tensor,
                      layers: Sequence[int]) -> torch.Tensor:
        enc = self.model
        last = self.num_hidden_states - 1
        mel = self.log_mel(waves, lengths)
        mel_len = torch.div(lengths + (MEL_HOP - 1), MEL_HOP, rounding_mode="floor")
        clip = self.whisper_input == "clip"
        if clip:
            m = int(mel_len.max())
            t = int(frames.max())
            mel_keep = valid_mask(mel_len, m)
            mel = mel[:, :, :m] * mel_keep[:, None, :]
        else:
            t = self.positions
        if enc.training:
            mel = self._spec_augment(mel, valid_mask(mel_len, mel.shape[-1]))
        front = [*enc.conv1.parameters(), *enc.conv2.parameters()]
        frozen = not any(p.requires_grad for p in front)
        mel = mel.to(enc.conv1.weight.dtype)
        with torch.no_grad() if (frozen and torch.is_grad_enabled()) else contextlib.nullcontext():
            x = F.gelu(enc.conv1(mel))
            if clip:  # padded mel frames give the zeros conv2's own padding gives at the clip's end
                x = x * mel_keep[:, None, :].to(x.dtype)
            x = F.gelu(enc.conv2(x)).transpose(1, 2)  # (B, t, D)
        x = x + enc.embed_positions.weight[:t].to(x.dtype)
        x = F.dropout(x, p=enc.dropout, training=enc.training)
        mask = None
        if clip and int(frames.min()) < t:
            mask = _bidirectional_mask(enc.config, x, valid_mask(frames, t))
        wanted = set(layers)
        captured: Dict[int, torch.Tensor] = {}
        if 0 in wanted:
            captured[0] = x
        for i, layer in enumerate(enc.layers):
            if enc.training and enc.layerdrop > 0 and torch.rand([]) < enc.layerdrop:
                pass  # LayerDrop: the skipped layer passes its input on
            else:
                x = layer(x, mask)
            if i + 1 in wanted and i + 1 != last:
                captured[i + 1] = x
        captured[last] = enc.layer_norm(x)
        t_out = int(frames.max())
        return torch.stack([captured[i][:, :t_out] for i in layers], dim=2)


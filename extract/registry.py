"""The upstream registry: each registry name's Hugging Face model id, architecture family
and configuration, as plain data (families: wavlm, wav2vec2, hubert, whisper; for Whisper
the upstream is the model's encoder, see :mod:`.whisper`), and the text upstreams
(:data:`TEXT_UPSTREAMS`, :mod:`.text`).

This module imports neither torch nor transformers, so that ``extract-features --help``
lists the names and :mod:`conilium.finetune.config` checks them without loading a
model; :mod:`.upstreams` builds and loads the models (the family's transformers
configuration class: :data:`conilium.extract.upstreams.FAMILIES`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

# The large models: 24 transformer layers of width 1024, layer-normalised CNN encoder,
# pre-LN ("stable") transformer.
_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
              feat_extract_norm="layer", do_stable_layer_norm=True)
# Small demo architectures: same transformer structure, tiny widths. The CNN encoder is two
# wide layers (kernel 40 / stride 20, then kernel 8 / stride 16: the same 320-sample hop,
# 50 frames/s) instead of seven 64-wide ones: with random weights the deep narrow stack
# loses most of what the audio says (pooled-feature probes near chance on the demo
# corpus), the shallow wide one keeps it and runs several times faster.
_DEMO = dict(hidden_size=96, num_hidden_layers=3, num_attention_heads=4, intermediate_size=192,
             conv_dim=(256, 256), conv_kernel=(40, 8), conv_stride=(20, 16),
             num_conv_pos_embeddings=32, num_conv_pos_embedding_groups=4)
# Whisper: the encoder's shape (the upstream is the encoder alone; the decoder is never built).
# Every released Whisper encoder takes 30 s of 80 (large-v3: 128) log-mel bins, 1500 positions.
_WHISPER = {
    "tiny": dict(d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536, num_mel_bins=80),
    "base": dict(d_model=512, encoder_layers=6, encoder_attention_heads=8, encoder_ffn_dim=2048, num_mel_bins=80),
    "small": dict(d_model=768, encoder_layers=12, encoder_attention_heads=12, encoder_ffn_dim=3072, num_mel_bins=80),
    "medium": dict(d_model=1024, encoder_layers=24, encoder_attention_heads=16, encoder_ffn_dim=4096,
                   num_mel_bins=80),
    "large": dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120, num_mel_bins=80),
}
_WHISPER["large-v3"] = dict(_WHISPER["large"], num_mel_bins=128)
# The demo Whisper: the same encoder structure (two convolutions, sinusoidal positions over 30 s,
# pre-LN transformer), tiny widths.
_DEMO_WHISPER = dict(d_model=96, encoder_layers=3, encoder_attention_heads=4, encoder_ffn_dim=192, num_mel_bins=80)


@dataclass(frozen=True)
class UpstreamSpec:
    """A registered upstream: where real weights live and how to build the architecture."""

    model_id: Optional[str]  # None: random-init only (demo architectures)
    family: str
    config: Dict = field(default_factory=dict)
    description: str = ""


UPSTREAMS: Dict[str, UpstreamSpec] = {
    "wavlm-large": UpstreamSpec("microsoft/wavlm-large", "wavlm", dict(_LARGE, conv_bias=False),
                                "WavLM Large (the paper's best upstream)"),
    "wav2vec2-large-robust": UpstreamSpec("facebook/wav2vec2-large-robust", "wav2vec2", dict(_LARGE, conv_bias=True),
                                          "wav2vec 2.0 Large, robust pre-training"),
    "wav2vec2-base": UpstreamSpec("facebook/wav2vec2-base", "wav2vec2", dict(feat_extract_norm="group"),
                                  "wav2vec 2.0 Base (group-normalised CNN encoder)"),
    "hubert-large": UpstreamSpec("facebook/hubert-large-ls960-ft", "hubert", dict(_LARGE, conv_bias=True),
                                 "HuBERT Large fine-tuned for ASR on LibriSpeech 960 h (the paper's footnote)"),
    "hubert-large-ll60k": UpstreamSpec("facebook/hubert-large-ll60k", "hubert", dict(_LARGE, conv_bias=True),
                                       "HuBERT Large, self-supervised on Libri-Light 60k h (no ASR fine-tuning)"),
    "whisper-large-v3": UpstreamSpec("openai/whisper-large-v3", "whisper", _WHISPER["large-v3"],
                                     "Whisper large-v3 encoder (128 mel bins, 30 s input)"),
    "whisper-large-v3-turbo": UpstreamSpec("openai/whisper-large-v3-turbo", "whisper", _WHISPER["large-v3"],
                                           "Whisper large-v3-turbo encoder (large-v3's encoder shape)"),
    "whisper-large-v2": UpstreamSpec("openai/whisper-large-v2", "whisper", _WHISPER["large"],
                                     "Whisper large-v2 encoder"),
    "whisper-medium": UpstreamSpec("openai/whisper-medium", "whisper", _WHISPER["medium"], "Whisper medium encoder"),
    "whisper-small": UpstreamSpec("openai/whisper-small", "whisper", _WHISPER["small"], "Whisper small encoder"),
    "whisper-base": UpstreamSpec("openai/whisper-base", "whisper", _WHISPER["base"], "Whisper base encoder"),
    "whisper-tiny": UpstreamSpec("openai/whisper-tiny", "whisper", _WHISPER["tiny"], "Whisper tiny encoder"),
    "demo-wavlm": UpstreamSpec(None, "wavlm", dict(_DEMO, feat_extract_norm="layer", do_stable_layer_norm=True),
                               "small WavLM-style architecture for the demo and tests"),
    "demo-wav2vec2-base": UpstreamSpec(None, "wav2vec2", dict(_DEMO, feat_extract_norm="group"),
                                       "small wav2vec2-base-style architecture (group norm) for the demo and tests"),
    "demo-wav2vec2-large": UpstreamSpec(None, "wav2vec2", dict(_DEMO, feat_extract_norm="layer", do_stable_layer_norm=True),
                                        "small wav2vec2-large-robust-style architecture for the demo and tests"),
    "demo-hubert": UpstreamSpec(None, "hubert", dict(_DEMO, feat_extract_norm="layer", do_stable_layer_norm=True),
                                "small HuBERT-style architecture for the demo and tests"),
    "demo-whisper": UpstreamSpec(None, "whisper", _DEMO_WHISPER,
                                 "small Whisper-encoder-style architecture for the demo and tests"),
}

#: Text upstreams (:mod:`.text`): transformers text encoders run over a corpus's transcripts;
#: their frames are tokens. ``demo-text`` is a small RoBERTa-style encoder with seeded random
#: weights and a word-level tokenizer built from the demo corpus's vocabulary.
TEXT_UPSTREAMS: Dict[str, UpstreamSpec] = {
    "roberta-base": UpstreamSpec("FacebookAI/roberta-base", "roberta", {}, "RoBERTa base (12 layers, 768 wide)"),
    "roberta-large": UpstreamSpec("FacebookAI/roberta-large", "roberta", {}, "RoBERTa large (24 layers, 1024 wide)"),
    "modernbert-large": UpstreamSpec("answerdotai/ModernBERT-large", "modernbert", {},
                                     "ModernBERT large (28 layers, 1024 wide)"),
    "deberta-v3-large": UpstreamSpec("microsoft/deberta-v3-large", "deberta-v2", {},
                                     "DeBERTa-v3 large (24 layers, 1024 wide; needs sentencepiece)"),
    "demo-text": UpstreamSpec(None, "roberta", dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                                    intermediate_size=128, max_position_embeddings=130),
                              "small RoBERTa-style text encoder for the demo and tests"),
}
#: transformers model types run as text upstreams when given as a local model directory.
TEXT_MODEL_TYPES = ("roberta", "xlm-roberta", "bert", "modernbert", "deberta", "deberta-v2", "electra", "distilbert",
                    "albert", "camembert", "mpnet")

#: A Whisper encoder's input length (``whisper_input``): its own 30 s input, or the input cut to
#: the clip (:mod:`.whisper`); here, without torch, for configuration checks and ``--help``.
WHISPER_INPUTS = ("30s", "clip")

#: Marker file of a model directory written by finetune-best; its upstream is in ``upstream/``.
from conilium.dirs import MODEL_MARKER as FINETUNED_MARKER  # noqa: E402

"""The end-to-end model (upstream + head) and its directory on disk.

A model directory (written by :func:`save_model_dir`) holds ``upstream/`` (the
upstream's ``save_pretrained``), ``head.pt`` and, written last, ``conilium_model.json``
(the marker: classes, truncation, normalisation, decision offsets, head layers). It is
a model for ``predict`` and for ``extract-features --upstream MODEL_DIR``, and — with
the run files ``finetune-best`` writes beside — a run directory for ``conilium-eval``.

A model trained with LoRA (``finetune-best --lora-rank``) keeps the unchanged base
weights in ``upstream/`` and the adapter in ``adapter/`` (peft's layout), and
``conilium_model.json`` describes it under ``lora`` (format 2). Loading the directory
merges the adapter into the base weights (:func:`conilium.extract.lora.merge_adapter`),
so the model runs as a plain transformers model.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

import conilium
from conilium import CLASSES, SAMPLE_RATE
from conilium.errors import ConfigError
from conilium.dirs import ModelDir
from conilium.extract.encoder import UpstreamEncoder, hidden_shape
from conilium.extract.lora import has_adapters
from conilium.extract.upstreams import load_upstream
from conilium.training.losses import activation
from conilium.heads.model import EmotionHead, HeadConfig
from conilium.util import atomic_path, output_errors

from .config import FinetuneConfig

MODEL_FILE = ModelDir.MARKER  # conilium_model.json: written last, marks a complete model directory
HEAD_FILE = ModelDir.HEAD
UPSTREAM_DIR = ModelDir.UPSTREAM
ADAPTER_DIR = ModelDir.ADAPTER  # adapter/: a LoRA model's adapter (peft's save format)
MODEL_FORMAT = ModelDir.FORMAT
LORA_MODEL_FORMAT = ModelDir.LORA_FORMAT  # a model directory with a LoRA adapter/ beside upstream/


class EndToEndModel(nn.Module):
    """Upstream (through the one :class:`~conilium.extract.encoder.UpstreamEncoder`) → hidden
    states ``layers`` → :class:`~conilium.heads.model.EmotionHead`.

    ``layers`` are hidden-state indices as in the feature cache (0 = input of the first
    transformer layer, ``i`` = output of layer ``i``, the last = the model's
    ``last_hidden_state``), so a head trained on a cache maps onto this model. The
    forward takes zero-padded waveforms (B, N) with their lengths in samples and returns
    logits (B, classes); a clip's logits do not depend on the rest of its batch.
    ``whisper_input`` ("30s" or "clip"): a Whisper encoder's input length, as the cache the
    head was trained on was made (:mod:`conilium.extract.whisper`); other families ignore it.
    """

    def __init__(self, upstream: nn.Module, head: EmotionHead, layers: Optional[Sequence[int]] = None, *,
                 whisper_input: str = "30s"):
        super().__init__()
        self.encoder = UpstreamEncoder(upstream, whisper_input=whisper_input)
        self.head = head
        self.num_hidden_states = self.encoder.num_hidden_states
        last = self.encoder.last
        self.layers = self.encoder.check_layers(layers if layers is not None else (last,))
        if last not in self.layers:
            raise ConfigError(f"the head must read the upstream's last hidden state ({last}); it reads "
                              f"{list(self.layers)}, which would leave the top transformer layers untrained")
        if head.config.num_layers != len(self.layers):
            raise ConfigError(f"head expects {head.config.num_layers} layer(s), model gives {len(self.layers)}")
        if head.config.dim != hidden_shape(upstream)[1]:
            raise ConfigError(f"head width {head.config.dim} differs from the upstream's hidden size "
                              f"{hidden_shape(upstream)[1]}")

    @property
    def upstream(self) -> nn.Module:
        """The wrapped transformers model (its weights are ``encoder.model.*`` in the state dict)."""
        return self.encoder.model

    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Valid output frames of clips of ``lengths`` samples."""
        return self.encoder.frame_lengths(lengths)

    def hidden_states(self, waves: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, T, len(layers), D) hidden states and the valid frame count of each clip."""
        return self.encoder.hidden_states(waves, lengths, self.layers)

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor, aux: bool = False):
        """Logits; with ``aux``, ``(logits, gender logit)`` (a head with an auxiliary output)."""
        x, frames = self.hidden_states(waves, lengths)
        return self.head(x, frames, aux=aux)


def enable_checkpointing(upstream) -> None:
    """Recompute each transformer layer's activations in the backward pass (less memory)."""
    if hasattr(upstream, "activation_checkpointing_enable"):  # transformers >= 5
        upstream.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        upstream.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def default_head_config(upstream, config: FinetuneConfig, num_classes: int = len(CLASSES)) -> HeadConfig:
    extra = {"gender": 1} if config.aux == "gender" else {}  # a head without --aux stays as it was
    return HeadConfig(dim=hidden_shape(upstream)[1], num_layers=1, layers=0, pooling=config.pooling,
                      hidden=config.hidden, dropout=config.dropout, num_classes=num_classes, **extra)


def upstream_overrides(config: FinetuneConfig) -> Dict[str, float]:
    """transformers configuration values replaced before the upstream is built."""
    o: Dict[str, float] = {}
    if config.upstream_dropout is not None:
        for k in ("hidden_dropout", "attention_dropout", "activation_dropout", "feat_proj_dropout",
                  "final_dropout"):
            o[k] = float(config.upstream_dropout)
    if config.layerdrop is not None:
        o["layerdrop"] = float(config.layerdrop)
    if config.mask_time_prob is not None:
        # 0 switches SpecAugment off and keeps the mask vector, so the weights load unchanged
        if config.mask_time_prob > 0:
            o["mask_time_prob"] = float(config.mask_time_prob)
            o["apply_spec_augment"] = True
        else:
            o["apply_spec_augment"] = False
    return o


def save_model_dir(out, model: EndToEndModel, info: Mapping) -> Path:
    """Write ``upstream/`` (save_pretrained), ``head.pt`` and, last, ``conilium_model.json``.

    ``info`` holds at least ``max_seconds``, ``normalize`` ({"mode", "stats"}), ``loss``
    and ``offsets`` (class → decision offset), optionally ``classes`` (the class codes, MSP-Podcast's
    eight by default); the sample rate, head config and hidden-state layers are added here. Each part is written under a temporary name and
    renamed, ``conilium_model.json`` last, so a directory with that file is complete. A
    failure to write (full disk, read-only) is an :class:`~conilium.errors.OutputError`
    naming the file, with no temporary copy left.

    An upstream carrying LoRA adapters needs ``info["lora"]`` (the description
    :func:`~conilium.extract.lora.add_adapters` returned): ``upstream/`` then gets the base
    weights under their own names, unchanged by training, and ``adapter/`` the adapter.
    """
    from conilium.extract.lora import base_state_dict, save_adapter

    out = Path(out)
    model_dir = ModelDir(out)
    lora = info.get("lora")
    if bool(lora) != has_adapters(model.upstream):
        raise ConfigError("save_model_dir: info['lora'] must describe the upstream's LoRA adapters exactly when it "
                          "carries some")
    with output_errors(out):
        out.mkdir(parents=True, exist_ok=True)
        model_dir.marker_path.unlink(missing_ok=True)
    if lora:
        _replace_dir(out, UPSTREAM_DIR,
                     lambda tmp: model.upstream.save_pretrained(tmp, state_dict=base_state_dict(model.upstream)))
        _replace_dir(out, ADAPTER_DIR, lambda tmp: save_adapter(model.upstream, tmp))
    else:
        _replace_dir(out, UPSTREAM_DIR, lambda tmp: model.upstream.save_pretrained(tmp))
        shutil.rmtree(out / ADAPTER_DIR, ignore_errors=True)  # an older LoRA model's adapter
    head_ckpt = {
        "format": MODEL_FORMAT,
        "head_config": asdict(model.head.config),
        "state_dict": {k: v.detach().cpu() for k, v in model.head.state_dict().items()},
        "loss": info["loss"],
        "labels": info.get("labels"),
        "layers": list(model.layers),
    }
    with atomic_path(model_dir.head_path, suffix=".pt.tmp") as t:
        torch.save(head_ckpt, t)
    meta = {k: v for k, v in info.items() if k != "lora"}
    meta.update({
        "format": LORA_MODEL_FORMAT if lora else MODEL_FORMAT,
        "conilium_version": conilium.__version__,
        "classes": list(info.get("classes") or CLASSES),
        "sample_rate": SAMPLE_RATE,
        "head_config": asdict(model.head.config),
        "layers": list(model.layers),
        "activation": activation(info["loss"]),
        "upstream_family": model.upstream.config.model_type,
    })
    if model.encoder.whisper_input is not None:
        meta["whisper_input"] = model.encoder.whisper_input
    if lora:
        meta["lora"] = dict(lora, adapter=ADAPTER_DIR, base=UPSTREAM_DIR, merged_on_load=True)
    model_dir.write_info(meta)
    return out


def _replace_dir(out: Path, name: str, write) -> None:
    """``write(folder)`` into a temporary folder of ``out``, then rename it to ``out/name`` (replacing
    an older one). A full disk or a read-only directory: an OutputError naming ``name``, and no partial
    copy left."""
    tmp = out / f".{name}.tmp{os.getpid()}"
    old = out / f".{name}.old{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with output_errors(out / name, where=out):
            write(tmp)
            if (out / name).exists():
                os.replace(out / name, old)
            os.replace(tmp, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def read_model_info(model_dir) -> dict:
    """``conilium_model.json`` of a model directory, with a clear error when it is not one
    (:meth:`conilium.dirs.ModelDir.info`)."""
    return ModelDir(model_dir).info()


def load_model_dir(model_dir, *, device="cpu") -> Tuple[EndToEndModel, dict]:
    """The model of a finetune-best directory (eval mode, on ``device``) and its description.

    A LoRA model's adapter is merged into the base upstream (:func:`load_upstream` does it)."""
    model_dir = Path(model_dir)
    info = read_model_info(model_dir)
    upstream, _ = load_upstream(str(model_dir))
    hpath = ModelDir(model_dir).head_path
    if not hpath.is_file():
        raise ConfigError(f"{model_dir}: {HEAD_FILE} missing")
    ckpt = torch.load(hpath, map_location="cpu", weights_only=True)
    head = EmotionHead(HeadConfig(**ckpt["head_config"]))
    head.load_state_dict(ckpt["state_dict"])
    model = EndToEndModel(upstream, head, info["layers"],
                          whisper_input=info.get("whisper_input") or "30s").to(device).eval()
    return model, info


def offsets_array(info: Mapping) -> np.ndarray:
    offsets = info.get("offsets") or {}
    return np.array([float(offsets.get(c, 0.0)) for c in info.get("classes", CLASSES)], dtype=np.float64)


def set_decision_offsets(model_dir, offsets: Mapping[str, float], thresholds: Optional[Mapping] = None) -> dict:
    """Record decision offsets (class → offset added before the argmax) in a model directory.

    ``thresholds`` (how they were tuned: split, untuned / tuned / cross-validated
    macro-F1, the tuned run) goes into ``conilium_model.json`` and, when the directory is
    also a run, its ``metrics.json``. Each file is replaced atomically.
    """
    model_dir = ModelDir(model_dir)
    info = model_dir.info()
    classes = info["classes"]
    missing = [c for c in classes if c not in offsets]
    if missing:
        raise ConfigError(f"decision offsets for {model_dir.path} lack class(es) {', '.join(missing)}")
    info["offsets"] = {c: float(offsets[c]) for c in classes}
    info["thresholds"] = None if thresholds is None else dict(thresholds)
    if model_dir.is_complete():
        metrics = model_dir.metrics()
        metrics["thresholds"] = info["thresholds"]
        model_dir.write_metrics(metrics)
    model_dir.write_info(info)
    return info

"""LoRA adapters on an upstream's transformer layers (the ``peft`` library).

``finetune-best --lora-rank R`` freezes the upstream and trains low-rank adapters beside
chosen linear projections of its transformer layers (by default the attention's query,
key, value and output projections of every layer) together with the head. The adapters
are put into the transformers model in place (:func:`peft.inject_adapter_in_model`), so
the model keeps its attribute paths, its configuration and the layers
:class:`~conilium.extract.encoder.UpstreamEncoder` hooks: the one upstream forward runs
unchanged, with ``lora_A``/``lora_B`` weights beside the frozen ``base_layer`` ones.

A model directory keeps the *unchanged* base weights in ``upstream/`` and the adapter
in ``adapter/`` (``adapter_config.json`` and ``adapter_model.safetensors``, the layout
``PeftModel.save_pretrained`` writes, so ``PeftModel.from_pretrained(base, "M/adapter")``
reads it too). Loading such a directory as an upstream (:func:`merge_adapter`, called by
:func:`~conilium.extract.upstreams.load_upstream`) applies the adapter and merges it into
the base weights (``merge_and_unload``): predict and ``extract-features --upstream
MODEL_DIR`` run a plain transformers model at full speed.

This module imports torch and peft only inside its functions, so that option checks
(:func:`parse_lora_layers`, :func:`check_lora_modules`) stay light.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from conilium.errors import ConfigError

#: Short names of ``--lora-modules`` → the linear layer's path inside one transformer layer, per family
#: (wav2vec 2.0 family: ``encoder.layers.<i>``; Whisper encoder: ``layers.<i>``).
LORA_MODULES: Dict[str, Dict[str, str]] = {
    "wav2vec2": {"q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj",
                 "o": "attention.out_proj", "fc1": "feed_forward.intermediate_dense",
                 "fc2": "feed_forward.output_dense"},
    "whisper": {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                "o": "self_attn.out_proj", "fc1": "fc1", "fc2": "fc2"},
}
#: The default targets: the attention projections.
DEFAULT_LORA_MODULES = ("q", "k", "v", "o")
#: The default ``--lora-alpha`` is this multiple of the rank (a scale of alpha / rank = 2).
DEFAULT_ALPHA_PER_RANK = 2.0
ADAPTER_DIR = "adapter"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_NAME = "default"
#: Key prefix of ``PeftModel.save_pretrained``'s weights (a PeftModel around a LoraModel around the model).
_PEFT_PREFIX = "base_model.model."


# ----------------------------------------------------------------------------- options (no torch)

def parse_lora_layers(spec: Optional[str]) -> Optional[Tuple[int, ...]]:
    """``--lora-layers``: transformer layer indices from ``"0-11"``, ``"8,9,10,11"`` or ``"0-3,20-23"``
    (None or empty: every layer). Sorted, without repeats."""
    if spec is None or not str(spec).strip():
        return None
    out = set()
    for part in str(spec).split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not m:
            raise ConfigError(f"--lora-layers {spec!r}: {part!r} is not a layer index or a range such as 8-11 "
                              f"(transformer layers count from 0)")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ConfigError(f"--lora-layers {spec!r}: range {part!r} runs backwards")
        out.update(range(lo, hi + 1))
    return tuple(sorted(out))


def check_lora_modules(spec: Optional[str]) -> Tuple[str, ...]:
    """``--lora-modules``: comma-separated short names (q, k, v, o, fc1, fc2) or paths of linear layers
    inside a transformer layer (e.g. ``attention.gru_rel_pos_linear``); default q,k,v,o."""
    if spec is None:
        return DEFAULT_LORA_MODULES
    names = tuple(dict.fromkeys(s.strip() for s in str(spec).split(",") if s.strip()))
    if not names:
        raise ConfigError(f"--lora-modules {spec!r} names no module; use e.g. q,k,v,o")
    for n in names:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", n):
            raise ConfigError(f"--lora-modules: {n!r} is neither a short name ({', '.join(LORA_MODULES['wav2vec2'])}) "
                              f"nor a module path inside a transformer layer (e.g. attention.q_proj)")
    return names


def resolve_alpha(rank: int, alpha: Optional[float]) -> float:
    """``--lora-alpha``, or its default of :data:`DEFAULT_ALPHA_PER_RANK` × rank."""
    return float(alpha) if alpha is not None else DEFAULT_ALPHA_PER_RANK * int(rank)


# ----------------------------------------------------------------------------- targets

def _layout(model) -> Tuple[str, str]:
    """(family key of :data:`LORA_MODULES`, module path of the transformer layer list)."""
    from .whisper import is_whisper

    if is_whisper(model):
        return "whisper", "layers"
    if hasattr(model, "encoder") and hasattr(model.encoder, "layers"):
        return "wav2vec2", "encoder.layers"
    raise ConfigError(f"LoRA: upstream {type(model).__name__} is not a supported family "
                      f"(WavLM, wav2vec 2.0, HuBERT, Whisper encoder)")


def lora_targets(model, modules: Sequence[str], layers: Optional[Sequence[int]] = None) -> List[str]:
    """Full names of the linear layers that get adapters: ``modules`` (short names or paths inside a
    transformer layer) of transformer ``layers`` (None: all). A module that matches no linear layer, or
    a layer index out of range, is a :class:`ConfigError`."""
    from torch import nn

    family, prefix = _layout(model)
    stack = model.get_submodule(prefix)
    n = len(stack)
    chosen = list(range(n)) if layers is None else list(layers)
    bad = [i for i in chosen if not 0 <= i < n]
    if bad:
        raise ConfigError(f"--lora-layers: layer(s) {', '.join(map(str, bad))} out of range: the upstream has "
                          f"transformer layers 0..{n - 1}")
    table = LORA_MODULES[family]
    linear = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    targets: List[str] = []
    for short in modules:
        path = table.get(short, short)
        found = [f"{prefix}.{i}.{path}" for i in chosen if f"{prefix}.{i}.{path}" in linear]
        if not found:
            inside = sorted(name[len(f"{prefix}.0."):] for name in linear if name.startswith(f"{prefix}.0."))
            raise ConfigError(f"--lora-modules: {short!r} matches no linear layer in the transformer layers of "
                              f"{type(model).__name__}; short names: {', '.join(table)}; linear layers of a "
                              f"transformer layer: {', '.join(inside)}")
        targets += found
    return sorted(set(targets), key=targets.index)


# ----------------------------------------------------------------------------- training

def add_adapters(model, *, rank: int, alpha: Optional[float] = None, dropout: float = 0.0,
                 layers: Optional[Sequence[int]] = None, modules: Sequence[str] = DEFAULT_LORA_MODULES) -> dict:
    """Freeze ``model`` and inject LoRA adapters (in place); return the description a model
    directory records (rank, alpha, dropout, layers, modules, targets).

    The adapters' ``lora_A`` are drawn from torch's global random stream (``lora_B`` starts at
    zero, so the model's output is unchanged until training moves it). WavLM's attention must
    run through :func:`~conilium.extract.encoder.use_fused_attention`, which calls the
    projections as modules: transformers' own WavLM attention reads their weights directly and
    would skip the adapters.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ConfigError(f"--lora-rank must be at least 1, not {rank}")
    if has_adapters(model):
        raise ConfigError("the upstream already carries LoRA adapters")
    targets = lora_targets(model, modules, layers)
    a = resolve_alpha(rank, alpha)
    config = LoraConfig(r=int(rank), lora_alpha=a, lora_dropout=float(dropout), target_modules=targets,
                        bias="none")
    model.requires_grad_(False)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    _check_attention_uses_adapters(model)
    n_layers = len(model.get_submodule(_layout(model)[1]))
    return {"rank": int(rank), "alpha": a, "dropout": float(dropout),
            "layers": list(range(n_layers)) if layers is None else [int(i) for i in layers],
            "modules": list(modules), "targets": len(targets), "adapter": ADAPTER_DIR}


def _check_attention_uses_adapters(model) -> None:
    """WavLM: switch the attention to the fused forward (projections called as modules) and refuse to
    go on where it cannot be."""
    from .encoder import _wavlm_sdpa, use_fused_attention

    use_fused_attention(model)
    for name, m in model.named_modules():
        if type(m).__name__ != "WavLMAttention":
            continue
        wrapped = any(has_adapters(getattr(m, p)) for p in ("q_proj", "k_proj", "v_proj", "out_proj"))
        fused = getattr(getattr(m, "torch_multi_head_self_attention", None), "__func__", None) is _wavlm_sdpa
        if wrapped and not fused:
            raise ConfigError(f"LoRA on {name}: this transformers version's WavLM attention cannot run through "
                              f"conilium's fused attention, and its own forward would ignore the adapters")


def has_adapters(module) -> bool:
    """Whether ``module`` (or one inside it) is a peft LoRA layer."""
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in module.modules())


def trainable_lora_state(model) -> Dict[str, "object"]:
    """The adapter weights of ``model`` (keys as ``PeftModel.save_pretrained`` writes them)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    return {_PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in state.items()}


def base_state_dict(model) -> Dict[str, "object"]:
    """``model``'s own weights under their original names, without the adapters: what
    ``save_pretrained`` of the model before :func:`add_adapters` would write."""
    out = {}
    for k, v in model.state_dict().items():
        if ".lora_" in k:
            continue
        out[k.replace(".base_layer.", ".")] = v
    return out


def save_adapter(model, path) -> None:
    """Write the adapter of ``model`` into the folder ``path`` (config and weights, peft's layout)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.peft_config[ADAPTER_NAME]
    config.save_pretrained(str(path))
    save_file(trainable_lora_state(model), str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})


# ----------------------------------------------------------------------------- loading

def check_adapter_dir(path) -> Path:
    """``path`` as an adapter folder (config and weights present), or a :class:`ConfigError` naming it."""
    path = Path(path)
    for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (path / f).is_file():
            raise ConfigError(f"{path}: LoRA adapter incomplete ({f} missing); the model directory was not fully "
                              f"written — train it again (finetune-best --resume with its checkpoints)")
    return path


def merge_adapter(model, adapter_dir):
    """``model`` with the LoRA adapter of ``adapter_dir`` applied and merged into its weights
    (``PeftModel``'s ``merge_and_unload``): a plain transformers model, no adapter layer left."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    adapter_dir = check_adapter_dir(adapter_dir)
    try:
        config = LoraConfig.from_pretrained(str(adapter_dir))
        weights = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    except (ValueError, OSError, TypeError, SafetensorError) as e:
        raise ConfigError(f"{adapter_dir}: unreadable LoRA adapter ({e})") from None
    config.inference_mode = True
    with warnings.catch_warnings():
        # raised by transformers when peft reads the model's checkpointing flag; harmless
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        try:
            peft_model = get_peft_model(model, config, adapter_name=ADAPTER_NAME)
        except ValueError as e:
            raise ConfigError(f"{adapter_dir}: the adapter does not fit the upstream in {adapter_dir.parent} "
                              f"({e})") from None
        result = set_peft_model_state_dict(peft_model, weights, adapter_name=ADAPTER_NAME)
        missing = [k for k in result.missing_keys if ".lora_" in k]
        unexpected = list(result.unexpected_keys)
        if missing or unexpected:
            raise ConfigError(f"{adapter_dir / ADAPTER_WEIGHTS}: the adapter weights do not match the upstream "
                              f"({len(missing)} missing, e.g. {missing[:2]}; {len(unexpected)} unexpected, "
                              f"e.g. {unexpected[:2]})")
        merged = peft_model.merge_and_unload(safe_merge=True)
    if hasattr(merged, "peft_config"):
        del merged.peft_config
    return merged

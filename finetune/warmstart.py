"""Where fine-tuning starts: a fresh head, a train-head run's head, or the challenge baseline.

:func:`build_model` puts the upstream and a head together and says which truncation and
normalisation the start implies: a head trained on a cache keeps that cache's settings
(its features were made with them: truncation, normalisation, a Whisper encoder's input
length), the challenge baseline brings its own statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Mapping, Optional, Tuple

from conilium.audio import NORMALIZE_MODES
from conilium.classes import MSP_PODCAST, ClassSet
from conilium.errors import ConfigError
from conilium.extract.encoder import hidden_shape
from conilium.heads.model import EmotionHead
from conilium.heads.train import load_head

from .baseline import load_baseline
from .config import FinetuneConfig
from .model import EndToEndModel, default_head_config


@dataclass
class Start:
    """The model to train and what its starting point implies."""

    model: EndToEndModel
    normalize: str
    normalize_stats: Optional[dict]
    max_seconds: float
    info: dict = field(default_factory=dict)  # start_from, written to config.json and the model
    note: Optional[str] = None  # a remark for the user (e.g. a head trained with another loss)


def build_model(config: FinetuneConfig, upstream, identity: Mapping, classes: ClassSet = MSP_PODCAST) -> Start:
    """The end-to-end model of ``config``'s starting point (``init_head``, ``baseline_ckpt`` or a new head)
    for the corpus's ``classes``; a head of another class set is a ConfigError."""
    norm_mode, norm_stats, max_seconds = config.normalize, None, config.max_seconds
    whisper_input = getattr(config, "whisper_input", None) or "30s"
    info = {"kind": "random-init upstream" if config.random_init else "pretrained upstream"}
    note = None
    if config.init_head:
        head, layers, settings = head_from_run(config.init_head, upstream, identity, classes)
        info = {"kind": "train-head run", "path": str(Path(config.init_head).resolve()),
                "head_loss": settings.get("loss"), "head_labels": settings.get("labels")}
        if settings.get("loss") not in (None, config.loss):
            note = (f"note: the head was trained with --loss {settings.get('loss')}, fine-tuning uses "
                    f"--loss {config.loss}")
        if settings.get("normalize") in NORMALIZE_MODES:
            norm_mode = settings["normalize"]
            norm_stats = settings.get("normalize_stats") if norm_mode == "global" else None
        if settings.get("max_seconds"):
            max_seconds = float(settings["max_seconds"])
        if settings.get("whisper_input"):  # the head saw features of this input length
            whisper_input = settings["whisper_input"]
    elif config.baseline_ckpt:
        if not classes.is_default:
            raise ConfigError(f"--baseline-ckpt {config.baseline_ckpt}: the challenge baseline predicts MSP-Podcast's "
                              f"eight classes, the corpus has its own class set ({classes.describe()})")
        head, layers, base_info = load_baseline(config.baseline_ckpt, upstream)
        info = {"kind": "challenge baseline", **base_info}
        if base_info.get("normalize_stats") is not None and config.normalize == "global":
            norm_stats = base_info["normalize_stats"]
    else:
        head = EmotionHead(default_head_config(upstream, config, len(classes)))
        layers = None
    return Start(EndToEndModel(upstream, head, layers, whisper_input=whisper_input), norm_mode, norm_stats,
                 max_seconds, info, note)


def head_from_run(run_dir, upstream, identity: Mapping,
                  classes: ClassSet = MSP_PODCAST) -> Tuple[EmotionHead, List[int], dict]:
    """The head of a train-head run, checked against the upstream and the corpus's ``classes``;
    its hidden-state layers and the cache's settings (normalisation, truncation) to train with."""
    head, ckpt = load_head(run_dir)
    manifest = ckpt.cache_manifest
    where = f"--init-head {run_dir}"
    if head.config.num_classes and tuple(ckpt.classes) != tuple(classes.codes):
        raise ConfigError(f"{where}: the head predicts the classes {','.join(ckpt.classes)}, the corpus has the "
                          f"class set {','.join(classes.codes)}: start from a head trained on a cache of this corpus")
    if head.config.attributes or head.config.num_classes == 0:
        raise ConfigError(f"{where}: the head was trained with train-head --task {ckpt.task} "
                          f"(it predicts arousal, valence, dominance); finetune-best trains the eight classes only: "
                          f"start it from a --task categories run")
    inp = ckpt.input
    if inp.get("kind") != "frames" or head.config.pooling == "stats":
        raise ConfigError(f"{where}: the head was trained on pooled per-layer statistics (--pooled-stats), "
                          f"which an end-to-end model does not produce; train a head on frames instead")
    num_hidden_states, dim = hidden_shape(upstream)
    if head.config.dim != dim:
        raise ConfigError(f"{where}: head width {head.config.dim} differs from upstream {identity.get('name')}'s "
                          f"hidden size {dim}: the head was trained on another upstream")
    check_same_upstream(manifest.upstream, identity, where)
    layers = ckpt.upstream_layers
    last = num_hidden_states - 1
    if not layers:
        raise ConfigError(f"{where}: the checkpoint does not say which upstream layers the head read")
    if head.config.layers != "weighted" and len(layers) == 1 and layers[0] != last:
        raise ConfigError(f"{where}: the head read hidden state {layers[0]} only, not the last one ({last}); "
                          f"fine-tuning needs a head on the last layer or on a weighted mix of layers "
                          f"(train-head --layers -1 or --layers weighted on a cache with the last layer)")
    if last not in layers:
        raise ConfigError(f"{where}: the head mixes hidden states {layers}, not the last one ({last}); "
                          f"fine-tuning needs the last layer among them")
    settings = {"normalize": manifest.normalize, "normalize_stats": manifest.normalize_stats,
                "max_seconds": manifest.max_seconds, "loss": ckpt.loss, "labels": ckpt.labels,
                "whisper_input": manifest.whisper_input}
    return head, layers, settings


def check_same_upstream(cached: Mapping, ours: Mapping, where: str) -> None:
    """Clear error unless the cache's upstream identity is the upstream being fine-tuned."""
    if not cached:
        raise ConfigError(f"{where}: the cache manifest names no upstream; cannot check it is the one fine-tuned")
    a, b = cached.get("weights_sha256"), ours.get("weights_sha256")
    if a and b:
        if a != b:
            raise ConfigError(f"{where}: the head was trained on features of upstream {cached.get('name')} "
                              f"({cached.get('source')}, weights {a[:12]}…), not on {ours.get('name')} "
                              f"({ours.get('source')}, weights {b[:12]}…); use the same --upstream "
                              f"(and --random-init-seed) as the cache")
        return
    ka = (cached.get("model_id"), cached.get("revision"))
    kb = (ours.get("model_id"), ours.get("revision"))
    if ka[0] is None or ka[0] != kb[0] or (ka[1] and kb[1] and ka[1] != kb[1]):
        raise ConfigError(f"{where}: the head was trained on features of upstream {dict(cached)}, "
                          f"not on {dict(ours)}; use the same --upstream and --revision as the cache")

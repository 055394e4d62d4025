"""What defines a fine-tuning run: :class:`FinetuneConfig` and its checks.

The module imports torch only inside the functions that need it, so that ``finetune-best --help``
reads the defaults from :class:`FinetuneConfig` without loading the training code.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping, Optional, Tuple

from conilium.audio import NORMALIZE_MODES
from conilium.errors import ConfigError, ConiliumError
from conilium.extract.registry import UPSTREAMS, WHISPER_INPUTS
from conilium.heads.config import check_loss
from conilium.targets import TARGET_KINDS
from conilium.util import reject_unknown_fields

PRECISIONS = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that defines a fine-tuning run; written to ``config.json``.

    ``upstream_dropout`` / ``layerdrop`` / ``mask_time_prob`` replace the upstream
    configuration's dropout probabilities, LayerDrop and SpecAugment time masking
    (None keeps the pretrained model's values, as the baseline does). ``init_head`` is a
    train-head run directory and ``baseline_ckpt`` a directory with the challenge
    baseline's ``final_ssl.pt``/``final_pool.pt``/``final_ser.pt`` to start from.
    ``max_train_clips`` keeps the first N training clips (quick trials). ``rescale_loud``
    divides float audio stored at integer scale back to [-1, 1] instead of refusing it
    (:func:`conilium.audio.read_audio`); the model directory keeps it for prediction. The
    fields in :data:`RUNTIME_FIELDS` change speed or bookkeeping, not results.

    ``lora_rank`` trains LoRA adapters of that rank instead of the upstream's weights
    (:mod:`conilium.extract.lora`): the upstream is frozen, adapters go beside the linear
    layers ``lora_modules`` (short names q, k, v, o, fc1, fc2 or paths inside a transformer
    layer; default the attention's q,k,v,o) of the transformer layers ``lora_layers``
    (default all), scaled by ``lora_alpha`` / ``lora_rank`` (default alpha: 2 × rank), with
    ``lora_dropout`` on their input (default 0). None (the default) fine-tunes the whole
    transformer; the other ``lora_*`` fields then must stay None.

    ``normalize`` ``"auto"`` becomes ``"global"`` for the wav2vec 2.0 family and ``"none"``
    for a Whisper encoder (its log-mel front end takes the audio as recorded);
    ``whisper_input`` is a Whisper encoder's input length (``"30s"``, the default, or
    ``"clip"``), refused for other families. Both are settled when the run starts
    (:func:`conilium.finetune.train.settle_family_settings`), and ``config.json`` records them
    settled; a ``--init-head`` run's cache decides both for the model it starts.

    ``max_seconds`` None (not given) becomes :data:`DEFAULT_MAX_SECONDS` (8 s, the
    paper's), or :data:`BASELINE_MAX_SECONDS` (12 s) with ``baseline_ckpt``: the challenge
    baseline was trained and is scored on 12-second clips, so starting from it keeps its
    truncation unless a value is given. The resolved number is what ``config.json``
    records. (:func:`dataclasses.replace` keeps a resolved value: give ``max_seconds=None``
    with a new ``baseline_ckpt`` to resolve it again.)
    """

    corpus: str
    out: str
    upstream: str = "wavlm-large"
    random_init: bool = False
    random_init_seed: int = 0
    revision: Optional[str] = None
    loss: str = "wbce"
    labels: str = "S"
    sampler: Optional[str] = None
    lr: float = 1e-5
    weight_decay: float = 0.01
    batch_size: int = 16
    grad_accum: int = 1
    epochs: int = 40
    patience: Optional[int] = None
    seed: int = 0
    max_seconds: Optional[float] = None  # None: 8 s, or 12 s with baseline_ckpt (see above)
    normalize: str = "auto"
    rescale_loud: bool = False
    pooling: str = "attentive"
    hidden: int = 1024
    dropout: float = 0.5
    upstream_dropout: Optional[float] = None
    layerdrop: Optional[float] = None
    mask_time_prob: Optional[float] = None
    augment_noise: Optional[str] = None
    augment_fraction: float = 0.8
    snr_db: Tuple[float, float] = (5.0, 20.0)
    init_head: Optional[str] = None
    baseline_ckpt: Optional[str] = None
    lora_rank: Optional[int] = None  # None: full fine-tuning of the upstream's transformer
    lora_alpha: Optional[float] = None  # None: 2 x lora_rank
    lora_dropout: Optional[float] = None  # None: 0
    lora_layers: Optional[str] = None  # transformer layer indices, e.g. "0-11" or "8,9,10,11"; None: all
    lora_modules: Optional[str] = None  # e.g. "q,k,v,o" (the default), "q,v", "q,k,v,o,fc1,fc2"
    whisper_input: Optional[str] = None  # Whisper only: "30s" (None) or "clip"
    bucket_batches: int = 50
    max_train_clips: Optional[int] = None
    p_threshold: float = 0.6
    s_threshold: float = 0.5
    train_split: str = "Train"
    dev_split: str = "Development"
    tune_thresholds: bool = True
    skip_bad: bool = False
    # runtime only
    precision: str = "auto"
    gradient_checkpointing: bool = False
    device: str = "auto"
    num_workers: int = 2
    eval_batch_size: int = 16
    keep_checkpoints: bool = False
    threads: Optional[int] = None

    def __post_init__(self):
        if self.max_seconds is None:
            object.__setattr__(self, "max_seconds", default_max_seconds(self.baseline_ckpt))

    @classmethod
    def from_dict(cls, d: Mapping) -> "FinetuneConfig":
        reject_unknown_fields(cls, d, "fine-tuning")
        d = dict(d)
        if "snr_db" in d:
            d["snr_db"] = tuple(float(x) for x in d["snr_db"])
        return cls(**d)

    def to_json(self) -> dict:
        return asdict(self)


#: Truncation of a fine-tuning run (the paper's 8-second clips) and of one that starts from the challenge
#: baseline's checkpoint (the baseline's 12 seconds, msplabresearch/MSP-Podcast_Challenge).
DEFAULT_MAX_SECONDS = 8.0
BASELINE_MAX_SECONDS = 12.0


def default_max_seconds(baseline_ckpt: Optional[str] = None) -> float:
    """The truncation when ``--max-seconds`` is not given: the baseline's 12 s when starting from it, else 8 s."""
    return BASELINE_MAX_SECONDS if baseline_ckpt else DEFAULT_MAX_SECONDS


#: Fields that may differ between a run and its ``--resume`` (speed and bookkeeping only,
#: plus ``epochs``/``patience``, so that a finished run can be continued for longer).
RUNTIME_FIELDS = ("precision", "gradient_checkpointing", "device", "num_workers", "eval_batch_size",
                  "keep_checkpoints", "threads", "epochs", "patience")


class FinetuneError(ConiliumError):
    """Fine-tuning cannot go on (non-finite loss, unusable checkpoint, inconsistent resume)."""


# ----------------------------------------------------------------------------- checks

def check_config(config: FinetuneConfig) -> None:
    """Errors for option values that are wrong whatever the corpus."""
    from conilium.heads.model import POOLINGS  # torch: loaded to check a config, not to read its defaults
    from conilium.heads.samplers import check_sampler

    if config.labels not in TARGET_KINDS:
        raise ConfigError(f"unknown --labels {config.labels!r}; expected one of {', '.join(TARGET_KINDS)}")
    check_loss(config.loss, config.labels)
    check_sampler(config.sampler)
    if config.pooling not in POOLINGS:
        raise ConfigError(f"unknown --pooling {config.pooling!r}; expected one of {', '.join(POOLINGS)}")
    if not (config.lr > 0 and math.isfinite(config.lr)):
        raise ConfigError(f"--lr must be a positive number, not {config.lr}")
    for name in ("batch_size", "grad_accum", "epochs", "hidden", "bucket_batches", "eval_batch_size"):
        if int(getattr(config, name)) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(config, name)}")
    if config.grad_accum > config.batch_size:
        raise ConfigError(f"--grad-accum {config.grad_accum} exceeds --batch-size {config.batch_size}: "
                          f"a micro-batch needs at least one clip")
    if config.patience is not None and config.patience < 1:
        raise ConfigError(f"--patience must be at least 1 (or unset), not {config.patience}")
    if not config.max_seconds > 0:
        raise ConfigError(f"--max-seconds must be positive, not {config.max_seconds}")
    if config.normalize not in ("auto",) + NORMALIZE_MODES:
        raise ConfigError(f"--normalize must be one of auto, {', '.join(NORMALIZE_MODES)}, not {config.normalize!r}")
    if config.whisper_input is not None and config.whisper_input not in WHISPER_INPUTS:
        raise ConfigError(f"--whisper-input must be {' or '.join(WHISPER_INPUTS)}, not {config.whisper_input!r}")
    for name in ("dropout", "upstream_dropout", "layerdrop", "mask_time_prob"):
        v = getattr(config, name)
        if v is not None and not 0 <= v < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1), not {v}")
    if not 0 <= config.augment_fraction <= 1:
        raise ConfigError(f"--augment-fraction must be in [0, 1], not {config.augment_fraction}")
    lo, hi = config.snr_db
    if lo > hi:
        raise ConfigError(f"--snr-db: low {lo} above high {hi}")
    if config.init_head and config.baseline_ckpt:
        raise ConfigError("--init-head and --baseline-ckpt are two different starting points: give one")
    if config.precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, not {config.precision!r}")
    if config.max_train_clips is not None and config.max_train_clips < 1:
        raise ConfigError(f"--max-train-clips must be at least 1, not {config.max_train_clips}")
    if config.num_workers < 0:
        raise ConfigError(f"--num-workers must be >= 0, not {config.num_workers}")
    check_lora(config)
    if config.random_init and config.upstream not in UPSTREAMS:
        raise ConfigError(f"--random-init needs a registered upstream name ({', '.join(UPSTREAMS)}), "
                          f"not {config.upstream!r}")


def check_lora(config: FinetuneConfig) -> None:
    """Errors for the ``--lora-*`` options (a layer index beyond the upstream's layers is caught
    here for registered architectures, else when the upstream is loaded)."""
    from conilium.extract.lora import check_lora_modules, parse_lora_layers

    others = [name for name in ("lora_alpha", "lora_dropout", "lora_layers", "lora_modules")
              if getattr(config, name) is not None]
    if config.lora_rank is None:
        if others:
            raise ConfigError(f"{', '.join('--' + n.replace('_', '-') for n in others)} without --lora-rank: "
                              f"give --lora-rank R to train LoRA adapters (full fine-tuning has no adapters)")
        return
    if isinstance(config.lora_rank, bool) or int(config.lora_rank) != config.lora_rank or config.lora_rank < 1:
        raise ConfigError(f"--lora-rank must be a whole number of at least 1, not {config.lora_rank}")
    if config.lora_alpha is not None and not (config.lora_alpha > 0 and math.isfinite(config.lora_alpha)):
        raise ConfigError(f"--lora-alpha must be a positive number, not {config.lora_alpha}")
    if config.lora_dropout is not None and not 0 <= config.lora_dropout < 1:
        raise ConfigError(f"--lora-dropout must be in [0, 1), not {config.lora_dropout}")
    check_lora_modules(config.lora_modules)
    layers = parse_lora_layers(config.lora_layers)
    spec = UPSTREAMS.get(config.upstream)
    n = None if spec is None else spec.config.get("num_hidden_layers", spec.config.get("encoder_layers"))
    if layers and n is not None and layers[-1] >= n:
        raise ConfigError(f"--lora-layers {config.lora_layers}: {config.upstream} has transformer layers "
                          f"0..{n - 1}")


def precision_dtype(precision: str, device) -> str:
    """The compute dtype of ``--precision`` on ``device``: bfloat16 autocast on CUDA for
    ``bfloat16`` (and for ``auto`` where supported), float32 otherwise."""
    import torch

    if device.type == "cuda" and precision in ("auto", "bfloat16"):
        if precision == "bfloat16" or torch.cuda.is_bf16_supported():
            return "bfloat16"
    return "float32"

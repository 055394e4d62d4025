"""What defines a fine-tuning run: :class:`FinetuneConfig` and its checks.

The module imports torch only inside the functions that need it, so that ``finetune-best --help``
reads the defaults from :class:`FinetuneConfig` without loading the training code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

from conilium.audio import NORMALIZE_MODES
from conilium.corpus import ALLOW_SYMLINKS_HELP
from conilium.errors import ConfigError, TrainingError
from conilium.extract.registry import UPSTREAMS, WHISPER_INPUTS
from conilium.training.config import SEED_MAX, RunConfig, option, runtime_fields

PRECISIONS = ("auto", "float32", "bfloat16")

#: Truncation of a fine-tuning run (the paper's 8-second clips) and of one that starts from the challenge
#: baseline's checkpoint (the baseline's 12 seconds, msplabresearch/MSP-Podcast_Challenge).
DEFAULT_MAX_SECONDS = 8.0
BASELINE_MAX_SECONDS = 12.0


def default_max_seconds(baseline_ckpt: Optional[str] = None) -> float:
    """The truncation when ``--max-seconds`` is not given: the baseline's 12 s when starting from it, else 8 s."""
    return BASELINE_MAX_SECONDS if baseline_ckpt else DEFAULT_MAX_SECONDS


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig(RunConfig):
    """Everything that defines a fine-tuning run; written to ``config.json``.

    ``upstream_dropout`` / ``layerdrop`` / ``mask_time_prob`` replace the upstream
    configuration's dropout probabilities, LayerDrop and SpecAugment time masking
    (None keeps the pretrained model's values, as the baseline does). ``init_head`` is a
    train-head run directory and ``baseline_ckpt`` a directory with the challenge
    baseline's ``final_ssl.pt``/``final_pool.pt``/``final_ser.pt`` to start from.
    ``max_train_clips`` keeps the first N training clips (quick trials). ``rescale_loud``
    divides float audio stored at integer scale back to [-1, 1] instead of refusing it
    (:func:`conilium.audio.read_audio`); the model directory keeps it for prediction. The
    runtime fields (:func:`~conilium.training.config.runtime_fields`) change speed or bookkeeping, not results.

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

    corpus: str = option(help="Corpus root: the MSP-Podcast layout (Audios/, Labels/) or a corpus.csv/corpus.jsonl manifest.", cli=False)
    out: str = option(help="Model directory to write.", cli=False)
    upstream: str = option("wavlm-large", "Registry name (wavlm-large, wav2vec2-large-robust, wav2vec2-base, "
                           "hubert-large, demo-*), a Hugging Face model id or a local model directory.")
    random_init: bool = option(False, "The --upstream architecture with seeded random weights, no download "
                               "(timing, tests, demo-*).")
    random_init_seed: int = option(0, "Seed of the random weights (use the one the cache was extracted with, for "
                                   "--init-head).", minimum=0, maximum=SEED_MAX, integer=True)
    revision: Optional[str] = option(None, "Hub revision (branch, tag or commit) of --upstream.")
    lr: float = option(1e-5, "AdamW learning rate.", minimum=0, open_min=True)
    batch_size: int = option(16, "Clips per optimiser step, over all processes and accumulation steps.",
                             minimum=1, integer=True)
    grad_accum: int = option(1, "Split each process's share of a batch into this many forward/backward passes "
                             "(less memory).", minimum=1, integer=True)
    max_seconds: Optional[float] = option(None, "Truncate every clip to this many seconds.", minimum=0,
                                          open_min=True, default_text=f"{DEFAULT_MAX_SECONDS:g}; "
                                          f"{BASELINE_MAX_SECONDS:g} with --baseline-ckpt, the challenge baseline's")
    normalize: str = option("auto", "Waveform normalisation: global (mean/std over the Train audio, kept in the "
                            "model), utterance, none; auto = global, or none for a Whisper encoder.",
                            choices=("auto",) + NORMALIZE_MODES)
    rescale_loud: bool = option(False, "Divide float audio stored at integer scale (samples far beyond [-1, 1], "
                                "e.g. int16 values) back to [-1, 1] instead of stopping at such a file; kept in "
                                "the model for predict.")
    upstream_dropout: Optional[float] = option(None, "Replace the upstream's dropout probabilities (default: the "
                                               "pretrained model's).", minimum=0, maximum=1, open_max=True)
    layerdrop: Optional[float] = option(None, "Replace the upstream's LayerDrop probability.", minimum=0,
                                        maximum=1, open_max=True)
    mask_time_prob: Optional[float] = option(None, "SpecAugment time-mask probability in the upstream (0 turns "
                                             "it off; default: the model's).", minimum=0, maximum=1,
                                             open_max=True)
    augment_noise: Optional[str] = option(None, "Folder of noise recordings (e.g. MUSAN noise): mix one into a "
                                          "fraction of training clips.")
    augment_fraction: float = option(0.8, "Share of training clips that get noise, drawn anew each epoch.",
                                     minimum=0, maximum=1)
    snr_db: Tuple[float, float] = option((5.0, 20.0), "SNR range LOW:HIGH (dB) of the added noise.", cli=False)
    init_head: Optional[str] = option(None, "Start from the head of a train-head run on this upstream's frozen "
                                      "cache (its layer choice, truncation and normalisation are used).")
    baseline_ckpt: Optional[str] = option(None, "Start from the challenge baseline's final_ssl.pt, final_pool.pt, "
                                          "final_ser.pt in this folder.")
    # LoRA (None: full fine-tuning of the upstream's transformer); checked by check_lora
    lora_rank: Optional[int] = option(None, "Train LoRA adapters of this rank (and the head) instead of the "
                                      "upstream, which stays frozen; the model directory keeps the base upstream/ "
                                      "and the adapter/.", minimum=1, integer=True)
    lora_alpha: Optional[float] = option(None, "LoRA scale numerator: adapters are scaled by alpha / rank.",
                                         minimum=0, open_min=True, default_text="2 x --lora-rank")
    lora_dropout: Optional[float] = option(None, "Dropout on the adapters' input.", minimum=0, maximum=1,
                                           open_max=True, default_text="0")
    lora_layers: Optional[str] = option(None, "Transformer layers (from 0) that get adapters, e.g. 0-11 or "
                                        "8,9,10,11.", metavar="SPEC", default_text="all")
    lora_modules: Optional[str] = option(None, "Linear layers of each transformer layer that get adapters: q, k, "
                                         "v, o (attention), fc1, fc2 (feed-forward) or a module path inside the "
                                         "layer.", metavar="LIST", default_text="q,k,v,o")
    whisper_input: Optional[str] = option(None, "A Whisper encoder's input: 30s (its own window; the default) or "
                                          "clip (cut to the clip, positional embeddings sliced). Whisper only; "
                                          "with --init-head, the head's cache decides.",
                                          choices=(None,) + WHISPER_INPUTS)
    bucket_batches: int = option(50, "Batches per duration-sorted pool of the batch plan.", minimum=1,
                                 integer=True)
    max_train_clips: Optional[int] = option(None, "Use only the first N training clips (quick trials).",
                                            minimum=1, integer=True)
    tune_thresholds: bool = option(True, "Tune decision offsets on the development set after training.",
                                   cli=False)
    skip_bad: bool = option(False, "Leave out (and list) clips whose audio is missing or unreadable.")
    # runtime only
    precision: str = option("auto", "auto: bf16 autocast on CUDA, float32 on CPU.", choices=PRECISIONS,
                            runtime=True)
    gradient_checkpointing: bool = option(False, "Recompute transformer activations (less memory).",
                                          runtime=True)
    compile: bool = option(False, "Run the training forward (and its backward) through torch.compile, dynamic "
                           "shapes; meant for GPUs (the first step waits for the compilation; needs a C++ "
                           "compiler on CPU). Without dropout, LayerDrop and SpecAugment the losses equal the eager ones "
                           "within float rounding; with them the compiled kernels make their own random draws.",
                           runtime=True)
    num_workers: int = option(2, "DataLoader processes decoding audio.", minimum=0, integer=True, runtime=True)
    eval_batch_size: int = option(16, "Clips per batch when scoring and predicting.", minimum=1, integer=True,
                                  runtime=True)
    keep_checkpoints: bool = option(False, "Keep checkpoints/ (last and best epoch) after training, to continue "
                                    "later with --resume.", runtime=True)
    allow_symlinks: bool = option(False, ALLOW_SYMLINKS_HELP, runtime=True)

    what = "fine-tuning"

    def __post_init__(self):
        if self.max_seconds is None:
            object.__setattr__(self, "max_seconds", default_max_seconds(self.baseline_ckpt))

    @classmethod
    def _from_json(cls, d: dict) -> dict:
        if "snr_db" in d:
            d["snr_db"] = tuple(float(x) for x in d["snr_db"])
        return d

    def check(self) -> None:
        """Errors for option values that are wrong whatever the corpus."""
        check_lora(self)  # before the generic bounds: its messages say more
        super().check()
        if self.grad_accum > self.batch_size:
            raise ConfigError(f"--grad-accum {self.grad_accum} exceeds --batch-size {self.batch_size}: "
                              f"a micro-batch needs at least one clip")
        lo, hi = self.snr_db
        if lo > hi:
            raise ConfigError(f"--snr-db: low {lo} above high {hi}")
        if self.aux and (self.init_head or self.baseline_ckpt):
            raise ConfigError(f"--aux {self.aux} adds an output to a new head; --init-head and --baseline-ckpt start "
                              f"from a head without it: leave out one or the other")
        if self.init_head and self.baseline_ckpt:
            raise ConfigError("--init-head and --baseline-ckpt are two different starting points: give one")
        if self.random_init and self.upstream not in UPSTREAMS:
            raise ConfigError(f"--random-init needs a registered upstream name ({', '.join(UPSTREAMS)}), "
                              f"not {self.upstream!r}")


#: What a fine-tuning run's ``config.json`` records beside the config's fields (read back
#: by ``finetune-best --config FILE``, they are left out).
RECORDED_KEYS = ("kind", "upstream_identity", "start_from", "normalize_stats", "world_size", "max_seconds_used",
                 "normalize_used")

#: Fields that may differ between a run and its ``--resume``: speed and bookkeeping, plus
#: ``epochs``/``patience``, so that a finished run can be continued for longer.
RESUMABLE_FIELDS = runtime_fields(FinetuneConfig) + ("epochs", "patience")


class FinetuneError(TrainingError):
    """Fine-tuning cannot go on (non-finite loss, unusable checkpoint, inconsistent resume)."""


# ----------------------------------------------------------------------------- checks

def check_config(config: FinetuneConfig) -> None:
    """Errors for option values that are wrong whatever the corpus."""
    config.check()


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

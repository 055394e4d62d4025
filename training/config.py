"""What every training run shares, declared once: :class:`RunConfig` and the option metadata.

A config is a frozen, keyword-only dataclass. Each field that users set carries its
option's description in ``field(metadata=...)`` (made by :func:`option`): the help text,
the accepted values (``choices``) or bounds, whether it changes results or only speed
(``runtime``). From that one declaration come

* the checks (:func:`check_fields`: a value out of bounds or not among the choices is a
  :class:`~conilium.errors.ConfigError` in the command line's words, ``--lr must be …``),
* the command-line options (:mod:`conilium.cli.options` builds click options from the
  fields: name, type, default, help), and
* which fields may differ between a run and its rerun or resume (:func:`runtime_fields`).

:class:`RunConfig` holds the fields of the head runs (:class:`conilium.heads.config.TrainConfig`)
and of end-to-end fine-tuning (:class:`conilium.finetune.config.FinetuneConfig`) alike:
targets, loss, sampler, optimiser, schedule, seed, head sizes, splits, device and
runtime. A subclass adds its own fields and may redeclare a shared field to change its
default (the heads' learning rate is 1e-3, fine-tuning's 1e-5).

This module imports neither torch nor h5py: ``--help`` reads it.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from conilium.errors import ConfigError
from conilium.targets import AGREEMENT_READINGS, TARGET_KINDS
from conilium.util import reject_unknown_fields

_ANY_TARGETS = TARGET_KINDS

#: loss name → (output activation, uses class weights, target kinds it accepts); the loss
#: functions themselves are :data:`conilium.training.losses.LOSSES`.
LOSS_PROPERTIES = {
    "wce": ("softmax", True, ("hard",)),
    "bce": ("sigmoid", False, _ANY_TARGETS),
    "wbce": ("sigmoid", True, _ANY_TARGETS),
    "kld": ("softmax", False, _ANY_TARGETS),
    "focal": ("softmax", True, _ANY_TARGETS),
}

#: Sampler names (``None``, written ``none`` on the command line: the clips shuffled once per epoch).
SAMPLERS = ("balanced",)
#: Auxiliary tasks of ``--aux`` (``None``, written ``none``: no auxiliary task).
AUX_TASKS = ("gender",)
#: Random seeds: what numpy and scikit-learn accept everywhere.
SEED_MAX = 2 ** 32 - 1
#: Frame poolings of a head (:data:`conilium.heads.model.POOLINGS` holds the modules).
POOLING_NAMES = ("attentive", "mean")

_LOSS_HELP = ("wce: weighted cross-entropy (hard labels only); bce/wbce: (weighted) binary cross-entropy "
              "(wbce on S targets is the paper's best); kld: Kullback-Leibler divergence; focal: "
              "class-weighted focal loss.")
_LABELS_HELP = ("Training targets: hard (consensus one-hot), P (share of primaries), S (share of primary + "
                "secondary labels), P*/S* (P/S on high-agreement training clips only).")


def option(default: Any = MISSING, help: str = "", *, choices: Optional[Sequence] = None,
           minimum: Optional[float] = None, maximum: Optional[float] = None, open_min: bool = False,
           open_max: bool = False, integer: bool = False, none: Optional[str] = None, runtime: bool = False,
           cli: bool = True, metavar: Optional[str] = None, default_text: Optional[str] = None):
    """A dataclass field with its option's description.

    ``choices``: the accepted values; ``minimum``/``maximum`` (with ``open_*`` for a strict
    bound) and ``integer``: a number's range; ``none``: the word the command line uses for
    ``None`` among the choices (``--sampler none``); ``runtime``: the field changes speed or
    bookkeeping, not results; ``cli=False``: no command-line option is made for it (a
    value the command computes, or a tuple with its own parser); ``default_text``: shown
    as the default in ``--help`` where the default is decided later (``None`` → "8 s").
    """
    meta = dict(help=help, choices=None if choices is None else tuple(choices), minimum=minimum, maximum=maximum,
                open_min=open_min, open_max=open_max, integer=integer, none=none, runtime=runtime, cli=cli,
                metavar=metavar, default_text=default_text)
    return field(default=default, metadata={"option": meta})


def option_meta(f) -> Optional[dict]:
    """The :func:`option` description of a dataclass field (None for a plain field)."""
    return f.metadata.get("option")


def flag_name(name: str) -> str:
    """The command-line spelling of a field: ``batch_size`` → ``--batch-size``."""
    return "--" + name.replace("_", "-")


def bounds_text(meta: Mapping) -> Optional[str]:
    """How an error states a field's range: "a positive number", "at least 1", "in [0, 1)", …"""
    lo, hi = meta["minimum"], meta["maximum"]
    if lo is None and hi is None:
        return None
    if hi is None:
        if meta["integer"]:
            return f"at least {int(lo) + (1 if meta['open_min'] else 0)}"
        if lo == 0 and meta["open_min"]:
            return "a positive number"
        return f"a number {'>' if meta['open_min'] else '>='} {lo:g}"
    left = "(" if meta["open_min"] else "["
    right = ")" if meta["open_max"] else "]"
    return f"in {left}{lo:g}, {hi:g}{right}"


def check_value(name: str, value: Any, meta: Mapping) -> None:
    """ConfigError when ``value`` is not among the field's choices or outside its bounds."""
    if value is None:
        return  # an unset optional value: its own rule decides (a default chosen later)
    if meta["choices"] is not None:
        if value not in meta["choices"]:
            words = [meta["none"] if c is None else str(c) for c in meta["choices"]]
            raise ConfigError(f"unknown {flag_name(name)} {value!r}; expected one of {', '.join(words)}")
        return
    text = bounds_text(meta)
    if text is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{flag_name(name)} must be {text}, not {value!r}")
    ok = math.isfinite(value) and not (meta["integer"] and int(value) != value)
    lo, hi = meta["minimum"], meta["maximum"]
    if lo is not None:
        ok = ok and (value > lo if meta["open_min"] else value >= lo)
    if hi is not None:
        ok = ok and (value < hi if meta["open_max"] else value <= hi)
    if not ok:
        raise ConfigError(f"{flag_name(name)} must be {text}, not {value}")


def check_fields(config) -> None:
    """Every field of ``config`` against its declared choices and bounds."""
    for f in fields(config):
        meta = option_meta(f)
        if meta is not None:
            check_value(f.name, getattr(config, f.name), meta)


def check_loss(loss: str, labels: str) -> None:
    """Clear error for an unknown loss or a loss/target pair that makes no sense."""
    if loss not in LOSS_PROPERTIES:
        raise ConfigError(f"unknown loss {loss!r}; expected one of {', '.join(LOSS_PROPERTIES)}")
    allowed = LOSS_PROPERTIES[loss][2]
    if labels not in allowed:
        raise ConfigError(f"--loss {loss} needs --labels {' or '.join(allowed)} "
                          f"(it is defined on one-hot consensus targets), not {labels}")


def runtime_fields(cls) -> Tuple[str, ...]:
    """The fields of config class ``cls`` that change speed or bookkeeping, not results."""
    return tuple(f.name for f in fields(cls) if (option_meta(f) or {}).get("runtime"))


def defaults(cls) -> Dict[str, Any]:
    """Field name → default of config class ``cls`` (fields without a default left out)."""
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


def differing_fields(cls, a: Mapping, b: Mapping, *, ignore: Sequence[str] = ()) -> list:
    """The fields in which two config mappings of ``cls`` describe different runs; a field
    missing from one of them (written before the field existed) reads as its default."""
    base = defaults(cls)
    ka, kb = {**base, **a}, {**base, **b}
    skip = set(runtime_fields(cls)) | set(ignore)
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731 (JSON reads tuples as lists)
    return sorted(k for k in set(ka) | set(kb) if k not in skip and norm(ka.get(k)) != norm(kb.get(k)))


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """The fields every training run shares (see the module's docstring)."""

    loss: str = option("wbce", _LOSS_HELP, choices=LOSS_PROPERTIES)
    labels: str = option("S", _LABELS_HELP, choices=TARGET_KINDS)
    sampler: Optional[str] = option(None, "balanced: draw each training clip with weight 1/f(its class), with "
                                    "replacement; the loss's class weights are then off.",
                                    choices=(None,) + SAMPLERS, none="none")
    pooling: str = option("attentive", "Frame pooling: attentive statistics (challenge baseline) or plain mean.",
                          choices=POOLING_NAMES)
    lr: float = option(1e-3, "AdamW learning rate.", minimum=0, open_min=True)
    weight_decay: float = option(0.01, "AdamW weight decay.", minimum=0)
    batch_size: int = option(16, "Clips per optimiser step.", minimum=1, integer=True)
    epochs: int = option(40, "Maximum number of epochs; the best epoch by development macro-F1 is kept.",
                         minimum=1, integer=True)
    patience: Optional[int] = option(None, "Stop after this many epochs without a better development score "
                                     "(default: never).", minimum=1, integer=True)
    seed: int = option(0, "Same seed, same data, same options: the same metrics (on CPU).", minimum=0,
                       maximum=SEED_MAX, integer=True)
    p_threshold: float = option(0.6, "--labels P*: keep training clips whose top primary share reaches this.",
                                minimum=0, maximum=1, open_min=True)
    s_threshold: float = option(0.5, "--labels S*: keep training clips whose top perceived-label share reaches "
                                "this.", minimum=0, maximum=1, open_min=True)
    agreement_over: str = option("all", "--labels P*/S*: the agreement share over all annotators' labels, Other "
                                 "included (all: the paper's wording), or over target-class labels only "
                                 "(targets).", choices=AGREEMENT_READINGS)
    hidden: int = option(1024, "Classifier hidden width.", minimum=1, integer=True)
    dropout: float = option(0.5, "Head dropout.", minimum=0, maximum=1, open_max=True)
    mixup: float = option(0.0, "Mixup: mix each training clip with another of its batch, weight lambda ~ "
                          "Beta(ALPHA, ALPHA) drawn per clip, targets mixed alike (heads: the pooled representation, "
                          "manifold mixup; fine-tuning: the waveform); 0: off.", minimum=0, metavar="ALPHA")
    balanced_stage: int = option(0, "After training, restore the best epoch and train the classifier's output "
                                 "layer alone for this many more epochs on class-balanced batches, keeping the "
                                 "better of the two stages by the selection metric; 0: off.", minimum=0,
                                 integer=True, metavar="EPOCHS")
    aux: Optional[str] = option(None, "Auxiliary task learnt beside the classes: gender (one more output of the "
                                "head, binary cross-entropy over the clips whose gender is known; clips of unknown "
                                "gender do not count); arousal/valence/dominance: train-head --task joint.",
                                choices=(None,) + AUX_TASKS, none="none")
    aux_weight: float = option(1.0, "--aux: weight of the auxiliary loss added to the main loss.", minimum=0)
    train_split: str = option("Train", "Split the head trains on.")
    dev_split: str = option("Development", "Split that selects the best epoch (all its scoreable clips are "
                            "scored).")
    # speed and bookkeeping only
    device: str = option("auto", "auto, cpu, cuda or cuda:N.", runtime=True)
    num_workers: int = option(0, "DataLoader worker processes reading the data.", minimum=0, integer=True,
                              runtime=True)
    threads: Optional[int] = option(None, "torch CPU threads (default: torch's choice).", minimum=1, integer=True,
                                    runtime=True)

    @property
    def thresholds(self) -> Dict[str, Any]:
        """For :func:`conilium.targets.training_set`: the P*/S* thresholds and, under
        ``"over"``, the reading of the agreement share."""
        return {"P*": self.p_threshold, "S*": self.s_threshold, "over": self.agreement_over}

    def check(self) -> None:
        """Errors for option values that are wrong whatever the data (subclasses add their rules)."""
        check_fields(self)
        check_loss(self.loss, self.labels)

    @classmethod
    def from_dict(cls, d: Mapping):
        """Build from a JSON mapping (a ``config.json``); unknown keys are an error naming them,
        keys written before a field existed read as its default."""
        reject_unknown_fields(cls, d, cls.what)
        return cls(**cls._from_json(dict(d)))

    @classmethod
    def _from_json(cls, d: dict) -> dict:
        """JSON values → field values (a subclass converts its own: lists to tuples, …)."""
        return d

    def to_json(self) -> dict:
        return asdict(self)

    #: how messages name this kind of config ("training", "fine-tuning")
    what = "training"

"""What defines a head run, and the names its options accept: :class:`TrainConfig`, the
losses' properties, the grid backends and presets.

This module imports neither torch nor h5py, so that ``train-head --help`` and
``train-grid --help`` (and :mod:`conilium.finetune.config`) read the defaults and the
names from here without loading the training code; :mod:`.train`, :mod:`.losses` and
:mod:`.grid` import them from here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Union

from conilium.errors import ConfigError
from conilium.util import reject_unknown_fields

_ANY_TARGETS = ("hard", "P", "S", "P*", "S*")

#: loss name → (output activation, uses class weights, target kinds it accepts); the loss
#: functions themselves are :data:`conilium.heads.losses.LOSSES`.
LOSS_PROPERTIES = {
    "wce": ("softmax", True, ("hard",)),
    "bce": ("sigmoid", False, _ANY_TARGETS),
    "wbce": ("sigmoid", True, _ANY_TARGETS),
    "kld": ("softmax", False, _ANY_TARGETS),
    "focal": ("softmax", True, _ANY_TARGETS),
}


def check_loss(loss: str, labels: str) -> None:
    """Clear error for an unknown loss or a loss/target pair that makes no sense."""
    if loss not in LOSS_PROPERTIES:
        raise ConfigError(f"unknown loss {loss!r}; expected one of {', '.join(LOSS_PROPERTIES)}")
    allowed = LOSS_PROPERTIES[loss][2]
    if labels not in allowed:
        raise ConfigError(f"--loss {loss} needs --labels {' or '.join(allowed)} "
                          f"(it is defined on one-hot consensus targets), not {labels}")


#: Ready grid specs (``train-grid --preset NAME`` reads ``SPEC_DIR/NAME.json``).
SPEC_DIR = Path(__file__).resolve().parent / "specs"
#: joblib backends of ``train-grid``.
BACKENDS = ("loky", "threading", "dask", "ray")


#: What a head learns: the eight classes (default), the attributes (arousal, valence,
#: dominance), or both.
TASKS = ("categories", "attributes", "joint")
#: Weight of the CCC loss in ``task="joint"``: categories loss + weight × (1 − mean CCC).
DEFAULT_ATTRIBUTE_WEIGHT = 1.0


def check_task(task: str, attribute_weight: float) -> None:
    if task not in TASKS:
        raise ConfigError(f"unknown --task {task!r}; expected one of {', '.join(TASKS)}")
    if not (attribute_weight >= 0 and attribute_weight < float("inf")):
        raise ConfigError(f"--attribute-weight must be a number >= 0, not {attribute_weight}")


def presets() -> List[str]:
    return sorted(p.stem for p in SPEC_DIR.glob("*.json"))


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a head training run; written to ``config.json``.

    ``layers`` is ``"weighted"`` (learnable softmax mix of every stored layer) or the
    upstream hidden-state number to use (0 = CNN output; negative counts from the last
    stored layer). ``pooled_stats`` trains on the cache's per-layer mean ‖ std instead of
    frames (``pooling`` is then unused). With ``sampler="balanced"`` the loss's class
    weights are off. ``p_threshold``/``s_threshold`` are the agreement thresholds of
    ``labels="P*"``/``"S*"``, and ``agreement_over`` how the share is read: ``"all"``
    (over all annotators' labels, Other included, as the paper writes it) or
    ``"targets"`` (over target-class labels only); see :mod:`conilium.targets`.
    ``preload``: ``"auto"`` keeps the selected Train and Development features in memory
    when they take at most ``preload_budget_gb``, ``"yes"``/``"no"`` force it; the
    fields after ``train_on_xo`` change speed, not results.

    ``task``: ``"categories"`` (the eight classes, the loss above; the best epoch by
    Development macro-F1), ``"attributes"`` (arousal, valence, dominance only, with the
    CCC loss, on every training clip with attribute values, X and O clips included; the
    best epoch by Development mean CCC; ``loss``/``labels`` unused) or ``"joint"`` (the
    categories loss on the categories' training clips + ``attribute_weight`` × the CCC
    loss on those of them with attribute values; best epoch by macro-F1).
    ``train_on_xo``: with soft targets, X and O clips train too, on their annotators'
    target-class labels (:func:`conilium.targets.training_set`); they are never scored.
    Configs written before these fields existed read with their defaults.
    """

    cache: str
    loss: str = "wbce"
    labels: str = "S"
    pooling: str = "attentive"
    layers: Union[str, int] = "weighted"
    pooled_stats: bool = False
    sampler: Optional[str] = None
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 16
    epochs: int = 40
    patience: Optional[int] = None
    seed: int = 0
    p_threshold: float = 0.6
    s_threshold: float = 0.5
    agreement_over: str = "all"
    hidden: int = 1024
    dropout: float = 0.5
    train_split: str = "Train"
    dev_split: str = "Development"
    task: str = "categories"
    attribute_weight: float = DEFAULT_ATTRIBUTE_WEIGHT
    train_on_xo: bool = False
    # speed only
    num_workers: int = 0
    device: str = "auto"
    preload: str = "auto"
    preload_budget_gb: float = 2.0
    threads: Optional[int] = None

    @classmethod
    def from_dict(cls, d: Mapping) -> "TrainConfig":
        """Build from a JSON mapping; unknown keys are an error naming them."""
        from .data import parse_layers  # the data module imports torch: only when a config is read

        reject_unknown_fields(cls, d, "training")
        if "cache" not in d:
            raise ConfigError("training option 'cache' (the feature cache directory) is required")
        d = dict(d)
        d["cache"] = str(d["cache"])
        if "layers" in d:
            d["layers"] = parse_layers(d["layers"])
        return cls(**d)

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def thresholds(self) -> Dict[str, Union[float, str]]:
        """For :func:`conilium.targets.training_set`: the P*/S* thresholds and, under
        ``"over"``, the reading of the agreement share."""
        return {"P*": self.p_threshold, "S*": self.s_threshold, "over": self.agreement_over}

"""What defines a head run, and the names its options accept: :class:`TrainConfig`, the
grid backends and presets.

This module imports neither torch nor h5py, so that ``train-head --help`` and
``train-grid --help`` read the defaults and the names from here without loading the
training code. The fields a head run shares with end-to-end fine-tuning are declared
once, in :class:`conilium.training.config.RunConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple, Union

from conilium.cachedir import VERIFY_MODES
from conilium.errors import ConfigError
from conilium.targets import base_kind
from conilium.training.config import RunConfig, option

#: Ready grid specs (``train-grid --preset NAME`` reads ``SPEC_DIR/NAME.json``).
SPEC_DIR = Path(__file__).resolve().parent / "specs"
#: joblib backends of ``train-grid``.
BACKENDS = ("loky", "threading", "dask", "ray")


#: What a head learns: the eight classes (default), the attributes (arousal, valence,
#: dominance), or both.
TASKS = ("categories", "attributes", "joint")
#: How a fusion head combines its caches (``TrainConfig.fusion``).
FUSIONS = ("concat", "cross-attention")
#: ``TrainConfig.stack_heads``: the heads of a data pass as one stacked module (auto: on CUDA).
STACK_MODES = ("auto", "on", "off")
#: Weight of the CCC loss in ``task="joint"``: categories loss + weight × (1 − mean CCC).
DEFAULT_ATTRIBUTE_WEIGHT = 1.0


def presets() -> List[str]:
    return sorted(p.stem for p in SPEC_DIR.glob("*.json"))


@dataclass(frozen=True, kw_only=True)
class TrainConfig(RunConfig):
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
    runtime fields change speed, not results.

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

    cache: str = option(help="Feature cache directory written by extract-features.", cli=False)
    layers: Union[str, int] = option("weighted", "'weighted' (learnable softmax mix of the stored layers) or one "
                                     "upstream layer number (0 = CNN output, -1 = last stored layer).")
    more_caches: Tuple[str, ...] = option((), "Further feature caches of the same clips (train-head: --cache "
                                          "repeated; the first is the primary); one pooling branch per cache, "
                                          "their pooled vectors concatenated into the classifier (fusion).",
                                          cli=False)
    fusion: str = option("concat", "A fusion run (--cache given more than once): concat: each cache's pooled vector, "
                         "concatenated into the classifier; cross-attention: besides, the last cache's frames (a "
                         "text cache's tokens) attend to the first cache's (the audio frames) through one attention "
                         "layer, and their pooled result joins the concatenation.", choices=FUSIONS)
    pooled_stats: bool = option(False, "Train on the cache's per-layer utterance mean+std instead of frames (fast "
                                "layer probing; needs a cache extracted with --pooled-stats; --pooling is then "
                                "unused).")
    task: str = option("categories", "categories: the eight classes (best epoch by development macro-F1); "
                       "attributes: arousal, valence, dominance only, CCC loss, on every Train clip with attribute "
                       "values, X and O included (best epoch by development mean CCC; --loss/--labels unused); "
                       "joint: the categories loss + --attribute-weight x the CCC loss (best epoch by development "
                       "macro-F1).", choices=TASKS)
    attribute_weight: float = option(DEFAULT_ATTRIBUTE_WEIGHT, "--task joint: weight of the CCC loss "
                                     "(1 - mean CCC) added to the categories loss.", minimum=0)
    train_on_xo: bool = option(False, "Soft targets (--labels P, S, P*, S*): train on X (no agreement) and O "
                               "(other) clips too, on their annotators' target-class labels; clips with none stay "
                               "out; never scored.")
    # speed only
    num_workers: int = option(0, "DataLoader worker processes reading the shards when streaming (not preloaded); "
                              "on a GPU, 4 workers about doubled the streaming rate in bench/bench_heads.py.",
                              minimum=0, integer=True, runtime=True)
    preload: str = option("auto", "Keep the selected Train/Development features in memory; auto: when they fit "
                          "--preload-budget-gb, else stream them from the shards (bounded memory).",
                          choices=("auto", "yes", "no"), runtime=True)
    preload_budget_gb: float = option(2.0, "Memory budget of --preload auto, in GiB.", minimum=0, runtime=True)
    stack_heads: str = option("auto", "train-grid --stack-heads: compute the heads of a data pass as one stacked module (their "
                              "weights stacked, one kernel per layer for all of them, one optimiser step) when they "
                              "share an architecture, learning rate and weight decay and use neither --mixup nor "
                              "--aux; auto: on CUDA. Each head's numbers then match its own train-head run within "
                              "float32 rounding (not bitwise).", choices=STACK_MODES, runtime=True, cli=False)
    cuda_graphs: str = option("auto", "Train the heads of a data pass (stacked; a head alone too) on fixed shapes, the "
                              "frames of a batch padded to a few buckets, each shape's step captured once as a CUDA "
                              "graph and replayed (eager where capture fails; metrics.json says which); auto: on "
                              "CUDA (with stack_heads not off), off: eager steps. As stacked heads, its numbers "
                              "match the eager run's within float32 rounding, not bitwise.", choices=STACK_MODES,
                              runtime=True)
    verify: str = option("first", "When a clip's frames are checked against their CRC-32 and for NaN or infinite "
                         "values: first (the run's first read of the clip; later epochs reuse the check), always "
                         "(every read: also catches a shard rewritten during the run), never (no check).",
                         choices=VERIFY_MODES, runtime=True)

    what = "training"

    @classmethod
    def from_dict(cls, d) -> "TrainConfig":
        if "cache" not in d:
            raise ConfigError("training option 'cache' (the feature cache directory) is required")
        return super().from_dict(d)

    @classmethod
    def _from_json(cls, d: dict) -> dict:
        from .data import parse_layers  # the data module imports torch: only when a config is read

        d["cache"] = str(d["cache"])
        if "more_caches" in d:
            more = d["more_caches"]
            if isinstance(more, (str, bytes)) or not isinstance(more, (list, tuple)):
                raise ConfigError(f"training option 'more_caches' must be a list of cache directories, not {more!r}")
            d["more_caches"] = tuple(str(c) for c in more)
        if "layers" in d:
            d["layers"] = parse_layers(d["layers"])
        return d

    def to_json(self) -> dict:
        d = super().to_json()
        if not self.more_caches:  # a one-cache run's config.json stays as it always was
            del d["more_caches"]
            if self.fusion == "concat":
                del d["fusion"]
        else:
            d["more_caches"] = list(self.more_caches)
        return d

    @property
    def caches(self) -> Tuple[str, ...]:
        """Every cache the run reads, the primary first."""
        return (str(self.cache),) + tuple(self.more_caches)

    def check(self) -> None:
        """Errors for option values that are wrong whatever the cache."""
        from .data import parse_layers

        super().check()
        parse_layers(self.layers)
        if self.fusion != "concat" and not self.more_caches:
            raise ConfigError(f"--fusion {self.fusion} combines several caches; give --cache more than once "
                              f"(an audio cache, then a text cache)")
        if self.more_caches:
            if self.pooled_stats:
                raise ConfigError("--pooled-stats reads one cache's per-layer statistics; a fusion run (--cache "
                                  "given more than once) pools each cache's frames with its own branch: drop "
                                  "--pooled-stats")
            seen = [str(Path(c).resolve()) for c in self.caches]
            twice = sorted({c for c in self.caches if seen.count(str(Path(c).resolve())) > 1})
            if twice:
                raise ConfigError(f"--cache {', '.join(twice)} given more than once; each cache of a fusion run "
                                  f"is one branch")
        if self.task == "attributes" and self.sampler is not None:
            raise ConfigError(f"--sampler {self.sampler} draws clips by consensus class; --task attributes trains "
                              f"on every clip with attribute values (X and O included): use no sampler")
        if self.balanced_stage and self.task == "attributes":
            raise ConfigError(f"--balanced-stage {self.balanced_stage} balances batches by consensus class; --task "
                              f"attributes has no class output to train on them")
        if self.train_on_xo:
            if self.balanced_stage:
                raise ConfigError(f"--train-on-xo with --balanced-stage {self.balanced_stage}: the balanced batches "
                                  f"are drawn by consensus class, and X and O clips have none")
            if self.task == "attributes":
                raise ConfigError("--train-on-xo adds X and O clips to the category targets; --task attributes "
                                  "already trains on every clip with attribute values, X and O included")
            if base_kind(self.labels) == "hard":
                raise ConfigError(f"--train-on-xo needs soft targets (--labels P, S, P* or S*, and a loss other "
                                  f"than wce): X and O clips have no one-hot consensus target, not --labels "
                                  f"{self.labels}" + (f" with --loss {self.loss}" if self.loss == "wce" else ""))
            if self.sampler is not None:
                raise ConfigError(f"--train-on-xo with --sampler {self.sampler}: the sampler draws by consensus "
                                  f"class, and X and O clips have none")

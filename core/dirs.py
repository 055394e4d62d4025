"""The directories conilium writes, one class per kind, and what kind a directory is.

=================  ==========================================================================
:class:`CacheDir`  a feature cache (extract-features): ``manifest.json`` (read as a
                   :class:`Manifest`), ``clips.json``, ``extraction.json``, ``shards/``,
                   ``upstream/`` (defined in :mod:`conilium.cachedir`, re-exported here)
:class:`RunDir`    a run (train-head, tune-thresholds, ensemble, finetune-best):
                   ``config.json``, ``metrics.json``, ``predictions/<Split>.csv``, and a
                   train-head run's ``model.pt``, a tuned run's ``thresholds.json``
:class:`ModelDir`  a finetune-best model directory (also a run directory):
                   ``conilium_model.json`` (written last), ``head.pt``, ``upstream/``,
                   ``adapter/``, and ``checkpoints/last.pt`` while it trains
:class:`GridDir`   a train-grid output folder: ``grid.json``, ``results.csv``, one run per folder
:class:`ReportDir` a report folder: ``REPORT.md``, ``report.json``, ``figures/`` (a
                   ``report.md`` of earlier versions still marks one)
:class:`StudyDir`  the study's results folder (``run_all.sh``): ``study.json``,
                   ``report_spec.json``, ``REPORT.md``, ``runs/``, ``models/``, ``corpus/``
=================  ==========================================================================

Each class knows its file names and format version, reads its JSON files into values
(files written by earlier versions, without the keys added since, read with the
defaults those versions had) and writes them atomically. :func:`dir_kind` tells the
kinds apart from the files alone (no model library is imported), :func:`describe_dir`
says it in words, and :func:`not_a_cache` says what to pass instead when a directory
given as a feature cache is another kind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from .cachedir import MANIFEST_CHECKSUM, UPGRADE_HINT, CacheDir, Manifest, file_sha256  # noqa: F401 (re-exported)
from .cachedir import as_dict as _mapping
from .cachedir import json_object_or_none as _json_object_or_none
from .errors import CacheError, ConfigError, ConiliumError
from .util import read_json, write_json


class RunError(ConiliumError):
    """A run directory or predictions file is missing or malformed."""


# ----------------------------------------------------------------------------- runs and models

class RunDir:
    """A run directory: what produced it (``config.json``), its scores (``metrics.json``,
    written last: a run with one is complete) and its predictions (``predictions/<Split>.csv``).
    A train-head run adds its best head (``model.pt``), a tune-thresholds run its decision
    offsets (``thresholds.json``)."""

    CONFIG = "config.json"
    METRICS = "metrics.json"
    PREDICTIONS = "predictions"
    CHECKPOINT = "model.pt"
    THRESHOLDS = "thresholds.json"

    def __init__(self, path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    @property
    def config_path(self) -> Path:
        return self.path / self.CONFIG

    @property
    def metrics_path(self) -> Path:
        return self.path / self.METRICS

    @property
    def checkpoint_path(self) -> Path:
        return self.path / self.CHECKPOINT

    @property
    def thresholds_path(self) -> Path:
        return self.path / self.THRESHOLDS

    def prediction_path(self, split: str) -> Path:
        return self.path / self.PREDICTIONS / f"{split}.csv"

    def splits(self) -> List[str]:
        """The splits with a predictions file, sorted."""
        d = self.path / self.PREDICTIONS
        return sorted(p.stem for p in d.glob("*.csv")) if d.is_dir() else []

    def has_config(self) -> bool:
        return self.config_path.is_file()

    def is_complete(self) -> bool:
        return self.metrics_path.is_file()

    def has_outputs(self) -> bool:
        """Predictions or metrics written: the run's training finished."""
        return (self.path / self.PREDICTIONS).is_dir() or self.is_complete()

    def has_checkpoint(self) -> bool:
        return self.checkpoint_path.is_file()

    def config(self) -> dict:
        """``config.json``; a :class:`RunError` naming the directory when it is missing or damaged."""
        p = self.config_path
        if not p.is_file():
            raise RunError(f"{self.path}: not a run directory (no {self.CONFIG})")
        try:
            config = read_json(p)
        except ValueError as e:
            raise RunError(f"{p}: damaged run configuration ({e}); rerun the command that wrote "
                           f"{self.path}") from None
        if not isinstance(config, dict):
            raise RunError(f"{p}: damaged run configuration (not a JSON object)")
        return config

    def config_or_none(self) -> Optional[dict]:
        try:
            return self.config()
        except (RunError, OSError):
            return None

    @property
    def kind(self) -> Optional[str]:
        """What wrote the run: None for train-head, else the config's ``kind`` (``"thresholds"``,
        ``"ensemble"``, ``"finetune"``); None too when the config is unreadable."""
        return (_json_object_or_none(self.config_path) or {}).get("kind")

    @property
    def cache(self) -> Optional[str]:
        """The feature cache a head run was trained on (None for other runs)."""
        value = (_json_object_or_none(self.config_path) or {}).get("cache")
        return str(value) if value else None

    def metrics(self) -> dict:
        """``metrics.json``; a :class:`RunError` naming it when missing or damaged."""
        got = self.metrics_or_none()
        if got is None:
            raise RunError(f"{self.path}: no readable {self.METRICS} (not a complete run)")
        return got

    def metrics_or_none(self) -> Optional[dict]:
        return _json_object_or_none(self.metrics_path)

    def write_config(self, config: Mapping) -> None:
        write_json(self.config_path, config)

    def write_metrics(self, metrics: Mapping) -> None:
        write_json(self.metrics_path, metrics)


class ModelDir(RunDir):
    """A finetune-best model directory; with the run files finetune-best writes beside, also a
    run directory. ``conilium_model.json`` (the model's description) is written last: a
    directory with it is complete; one with ``checkpoints/last.pt`` only is still training
    (or was stopped)."""

    MARKER = "conilium_model.json"
    HEAD = "head.pt"
    UPSTREAM = "upstream"
    ADAPTER = "adapter"
    CHECKPOINTS = "checkpoints"
    LAST_CHECKPOINT = f"{CHECKPOINTS}/last.pt"
    FORMAT = 1
    #: a model directory with a LoRA adapter/ beside upstream/
    LORA_FORMAT = 2
    #: what every description holds
    REQUIRED = ("classes", "max_seconds", "normalize", "loss", "head_config", "layers")

    @property
    def marker_path(self) -> Path:
        return self.path / self.MARKER

    @property
    def head_path(self) -> Path:
        return self.path / self.HEAD

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def last_checkpoint(self) -> Path:
        return self.path / self.LAST_CHECKPOINT

    def is_model(self) -> bool:
        return self.marker_path.is_file()

    def is_unfinished(self) -> bool:
        return not self.is_model() and self.last_checkpoint.is_file()

    def info(self) -> dict:
        """``conilium_model.json``, with a :class:`ConfigError` when the directory is no model,
        the file is damaged, lacks a field or is of a newer format."""
        path = self.marker_path
        if not path.is_file():
            raise ConfigError(f"{self.path}: not a finetune-best model directory (no {self.MARKER}); "
                              f"train one with finetune-best")
        try:
            info = read_json(path)
        except ValueError as e:
            raise ConfigError(f"{path}: corrupt model description ({e})") from None
        for key in self.REQUIRED:
            if key not in info:
                raise ConfigError(f"{path}: missing field {key!r}")
        if int(info.get("format", self.FORMAT)) > self.LORA_FORMAT:
            raise ConfigError(f"{path}: model format {info.get('format')} is newer than this conilium reads "
                              f"(up to {self.LORA_FORMAT}); update conilium")
        return info

    def info_or_none(self) -> Optional[dict]:
        """The description as it is on disk, unchecked; None when missing or unreadable."""
        return _json_object_or_none(self.marker_path)

    def write_info(self, info: Mapping) -> None:
        write_json(self.marker_path, info)

    @property
    def upstream(self) -> dict:
        """The upstream's identity the description records (empty when none)."""
        return _mapping((self.info_or_none() or {}).get("upstream"))


#: The file that marks a complete finetune-best model directory.
MODEL_MARKER = ModelDir.MARKER


class GridDir:
    """A train-grid output folder: one run directory per run, ``grid.json`` (the runs and the
    data passes that train them) and ``results.csv`` (one row per run)."""

    PLAN = "grid.json"
    RESULTS = "results.csv"
    #: ``results.csv`` as a readable table
    RESULTS_TABLE = "results.md"
    #: with ``--seeds``: each configuration's mean and standard deviation over its seeds
    SEEDS = "seeds.csv"

    def __init__(self, path):
        self.path = Path(path)

    @property
    def plan_path(self) -> Path:
        return self.path / self.PLAN

    @property
    def results_path(self) -> Path:
        return self.path / self.RESULTS

    @property
    def results_table_path(self) -> Path:
        return self.path / self.RESULTS_TABLE

    @property
    def seeds_path(self) -> Path:
        return self.path / self.SEEDS

    def run(self, name: str) -> RunDir:
        return RunDir(self.path / name)

    def is_grid(self) -> bool:
        return self.results_path.is_file() or self.plan_path.is_file()

    def write_plan(self, runs: Sequence[Mapping], passes: Sequence[Sequence[str]]) -> None:
        """``grid.json``: ``runs`` (name, config, paper row) and ``passes`` (run names per data pass)."""
        write_json(self.plan_path, {"runs": list(runs), "passes": [list(p) for p in passes]})


class ReportDir:
    """A report folder (``conilium-eval report``, and the study's results folder).

    The Markdown is ``REPORT.md`` wherever a report is written; the ``report.md`` that
    earlier versions of ``conilium-eval report`` wrote still marks a report folder."""

    MARKDOWN = "REPORT.md"
    LEGACY_MARKDOWN = "report.md"
    DATA = "report.json"
    FIGURES = "figures"

    def __init__(self, path):
        self.path = Path(path)

    @property
    def markdown_path(self) -> Path:
        return self.path / self.MARKDOWN

    @property
    def legacy_markdown_path(self) -> Path:
        return self.path / self.LEGACY_MARKDOWN

    @property
    def data_path(self) -> Path:
        return self.path / self.DATA

    @property
    def figures(self) -> Path:
        return self.path / self.FIGURES

    def is_report(self) -> bool:
        return any(p.is_file() for p in (self.markdown_path, self.legacy_markdown_path, self.data_path))


class StudyDir(ReportDir):
    """The study's results folder (``run_all.sh``): its settings, runs, models, corpus
    figures, report spec and the report itself (``REPORT.md``, as any report folder)."""

    SETTINGS = "study.json"
    SPEC = "report_spec.json"
    REPORT = ReportDir.MARKDOWN

    @property
    def settings_path(self) -> Path:
        return self.path / self.SETTINGS

    @property
    def spec_path(self) -> Path:
        return self.path / self.SPEC

    @property
    def report_path(self) -> Path:
        return self.path / self.REPORT

    @property
    def runs(self) -> Path:
        return self.path / "runs"

    @property
    def models(self) -> Path:
        return self.path / "models"

    @property
    def corpus_figures(self) -> Path:
        return self.path / "corpus"

    def write_settings(self, settings: Mapping) -> None:
        write_json(self.settings_path, settings)

    def write_spec(self, spec: Mapping) -> None:
        write_json(self.spec_path, spec)


# ----------------------------------------------------------------------------- what a directory is

#: The kinds of directory :func:`dir_kind` tells apart, and how messages name them.
KINDS = {
    "file": "a file",
    "model": "a finetune-best model directory",
    "model-unfinished": "a finetune-best model directory whose training did not finish",
    "cache": "a feature cache",
    "cache-unfinished": "a feature cache whose extraction did not finish",
    "run": "a run directory",
    "run-unfinished": "a run directory whose training did not finish (no predictions)",
    "finetune-run": "a finetune-best run directory",
    "finetune-run-unfinished": "a finetune-best run directory whose training did not finish (no predictions)",
    "corpus": "a corpus (Audios/, Labels/)",
    "grid": "a train-grid output directory (a folder of run directories)",
    "report": "a report folder",
    "empty": "an empty directory",
    "audio": "a folder of audio files",
    "runs": "a folder of run directories",
    "caches": "a folder of feature caches",
}
#: The kinds a folder of runs holds.
RUN_KINDS = ("run", "finetune-run", "model")


def _is_corpus(p: Path) -> bool:
    return ((p / "Labels").is_dir() or (p / "Audios").is_dir() or (p / "corpus.csv").is_file()
            or (p / "corpus.jsonl").is_file())


def _own_kind(p: Path) -> Optional[str]:
    """The kind of the directory ``p`` from its own files (not its children's)."""
    model = ModelDir(p)
    if model.is_model():
        return "model"
    if model.last_checkpoint.is_file():
        return "model-unfinished"
    cache = CacheDir(p)
    if cache.has_manifest():
        return "cache"
    if any((p / t).exists() for t in CacheDir.TRACES):
        return "cache-unfinished"
    if any(t.name.startswith(f".{CacheDir.SETTINGS}.") for t in cache.own_temporaries()):
        return "cache-unfinished"  # killed while writing its first file
    run = RunDir(p)
    if run.has_config():
        kind = "finetune-run" if run.kind == "finetune" else "run"
        return kind if run.has_outputs() else f"{kind}-unfinished"
    if _is_corpus(p):
        return "corpus"
    if GridDir(p).is_grid():
        return "grid"
    if ReportDir(p).is_report():
        return "report"
    return None


#: suffixes of the audio files a corpus holds (those soundfile reads that corpora use)
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif", ".au", ".opus")


def _files_kind(p: Path) -> Optional[str]:
    """A folder without sub-folders: empty, a folder of audio files, or none of the kinds."""
    try:
        names = [c.name for c in p.iterdir() if not c.name.startswith(".")]
    except OSError:
        return None
    if not names:
        return "empty"
    return "audio" if any(n.lower().endswith(AUDIO_SUFFIXES) for n in names) else None


def _children(p: Path) -> Optional[List[Path]]:
    try:
        return sorted(c for c in p.iterdir() if not c.name.startswith(".") and c.is_dir())
    except OSError:
        return None


def dir_kind(path) -> Optional[str]:
    """Which of :data:`KINDS` ``path`` is, from the files conilium writes; None when it does not
    exist or is none of them. For messages when a command is given one kind for another."""
    p = Path(path)
    if p.is_file():
        return "file"
    if not p.is_dir():
        return None
    kind = _own_kind(p)
    if kind is not None:
        return kind
    children = _children(p)
    if children is None:
        return None
    if not children:
        return _files_kind(p)
    if any(dir_kind(c) in RUN_KINDS for c in children):
        return "runs"
    if any(dir_kind(c) == "cache" for c in children):
        return "caches"
    return None


def describe_dir(path) -> Optional[str]:
    """:func:`dir_kind` in words ("a feature cache", "a folder of run directories (a, b)", ...)."""
    kind = dir_kind(path)
    if kind is None:
        return None
    if kind in ("runs", "caches"):
        inner = RUN_KINDS if kind == "runs" else ("cache",)
        some = [str(c) for c in _children(Path(path)) if dir_kind(c) in inner]
        return f"{KINDS[kind]} ({', '.join(some[:5])}{' …' if len(some) > 5 else ''})"
    return KINDS[kind]


def _not_a_cache_dir(p: Path, kind: Optional[str]) -> Optional[str]:
    if kind in ("model", "model-unfinished"):
        unfinished = "" if kind == "model" else " (unfinished)"
        return (f"{p} is a finetune-best model directory{unfinished}, not a feature cache. To train a head "
                f"on its fine-tuned upstream, extract features with it first (extract-features --corpus CORPUS "
                f"--upstream {p} --out CACHE_DIR) and pass that CACHE_DIR to --cache; to predict with it, use "
                f"predict --model {p}")
    if kind is not None and kind.startswith(("run", "finetune-run")):
        used = RunDir(p).cache
        tail = (f"; this run was trained on --cache {used}" if used else
                "; pass the cache directory extract-features wrote")
        return f"{p} is a train-head run directory (config.json, metrics.json/model.pt), not a feature cache{tail}"
    if kind == "grid":
        return (f"{p} is a train-grid output directory, not a feature cache; pass the cache directory "
                f"extract-features wrote")
    if kind == "corpus":
        return (f"{p} is a corpus (Audios/, Labels/), not a feature cache; extract its features first "
                f"(extract-features --corpus {p} --upstream UPSTREAM --out CACHE_DIR) and pass that CACHE_DIR "
                f"to --cache")
    if kind == "cache-unfinished":
        return None  # an unfinished extraction: the cache reader says to resume it
    caches = sorted(c.name for c in p.iterdir() if c.is_dir() and CacheDir(c).has_manifest())
    if caches:
        shown = ", ".join(str(p / c) for c in caches[:5]) + (" …" if len(caches) > 5 else "")
        return f"{p} is not a feature cache but a folder of caches; pass one of them to --cache: {shown}"
    return (f"{p} is not a feature cache (no {CacheDir.MANIFEST}, and nothing extract-features writes); "
            f"pass the directory extract-features wrote")


def not_a_cache(path) -> Optional[str]:
    """Why ``path``, a directory without ``manifest.json``, is not a feature cache: what it is
    (a train-head run, a finetune-best model directory, a corpus, a folder of caches, …) and
    what to pass instead; None when it looks like a cache whose extraction did not finish
    (or when it has a manifest, or does not exist: the cache reader explains those)."""
    p = Path(path)
    if p.is_file():
        if p.name == CacheDir.MANIFEST:
            return f"{p} is a cache's manifest file; pass its directory to --cache: {p.parent}"
        return f"{p} is a file, not a feature cache directory; pass the directory extract-features wrote"
    if not p.is_dir() or CacheDir(p).has_manifest():
        return None
    return _not_a_cache_dir(p, _own_kind(p))


def check_cache_dir(path) -> None:
    """A :class:`CacheError` saying what ``path`` is, when it is another kind of directory than
    a feature cache (see :func:`not_a_cache`); silence otherwise."""
    why = not_a_cache(path)
    if why is not None:
        raise CacheError(why)


def read_json_or_none(path) -> Optional[Dict[str, Any]]:
    """The JSON object in ``path``; None when it is missing, unreadable or not an object."""
    return _json_object_or_none(Path(path))

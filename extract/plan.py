"""What an extraction makes, planned before anything runs.

:class:`ExtractConfig` holds every setting that decides a cache's content. From it and a
corpus, :func:`plan_jobs` lists every clip to extract (and every noise-augmented copy of a
Train clip, ``<FileName>#aug<k>``, with its noise file, SNR and offset drawn from the
seed), :func:`assign_shards` puts them into shards, clips sorted by length across the
corpus, and :func:`plan_batches` cuts a shard into batches of similar lengths that pad
little.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import soundfile as sf

from conilium import SAMPLE_RATE
from conilium.audio import parse_snr
from conilium.corpus import Clip, Corpus
from conilium.errors import ConfigError
from conilium.util import BUCKET_STEPS, bucket_length, reject_unknown_fields  # noqa: F401 - BUCKET_STEPS: re-exported

from .registry import WHISPER_INPUTS

AUG_SEP = "#aug"
#: ``--normalize`` values; ``auto`` is resolved per upstream family (:func:`resolve_for_family`).
NORMALIZE_CHOICES = ("auto", "global", "utterance", "none")
#: A Whisper encoder's input window (seconds): the longest clip it takes.
WHISPER_MAX_SECONDS = 30.0


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class NoiseAugmentation:
    """Noise copies of Train clips (paper 3.2), stored as ``<FileName>#aug<k>``.

    ``noise_dir`` is kept as an absolute path; ``snr_db`` may be given as ``"LOW:HIGH"``.
    """

    noise_dir: str
    fraction: float = 0.8
    snr_db: Tuple[float, float] = (5.0, 20.0)
    copies: int = 1

    def __post_init__(self):
        snr = parse_snr(self.snr_db) if isinstance(self.snr_db, str) else tuple(float(v) for v in self.snr_db)
        object.__setattr__(self, "noise_dir", str(Path(self.noise_dir).resolve()))
        object.__setattr__(self, "fraction", float(self.fraction))
        object.__setattr__(self, "snr_db", snr)
        object.__setattr__(self, "copies", int(self.copies))
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"--augment-fraction must be in (0, 1], got {self.fraction}")
        lo, hi = self.snr_db
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
            raise ConfigError(f"--snr-db must be LOW:HIGH with LOW <= HIGH, got {lo}:{hi}")
        if self.copies < 1:
            raise ConfigError(f"--copies must be at least 1, got {self.copies}")


@dataclass(frozen=True)
class ExtractConfig:
    """Everything that decides what goes into a cache (written into ``extraction.json`` and
    the manifest's ``"config"``); how fast it is made is up to :func:`extract_features`'s
    keyword arguments.

    ``layers``: ``"last"``, ``"all"``, or hidden-state indices (``"6,12,-1"`` or a list);
    ``splits``: only these splits (a list or ``"Train,Development"``); ``augmentation``:
    noisy copies of Train clips (:class:`NoiseAugmentation`, or its fields as a dict);
    ``rescale_loud``: float audio stored at integer scale is divided back to [-1, 1]
    (:func:`conilium.audio.read_audio`) instead of stopping the extraction.
    ``normalize`` ``"auto"`` is ``"global"`` (mean/std over the Train audio, the paper's)
    for the wav2vec 2.0 family and ``"none"`` for a Whisper encoder, whose log-mel front end
    expects the audio as recorded; ``whisper_input`` is a Whisper encoder's input length
    (``"30s"``, the model's own and the default, or ``"clip"``; :mod:`conilium.extract.whisper`),
    refused for other families. Both are resolved when the upstream is loaded
    (:func:`resolve_for_family`), and the cache records the resolved values.

    >>> ExtractConfig("demo-wavlm", random_init=True, layers="all", pooled_stats=True)
    """

    upstream: str
    layers: str = "last"
    dtype: str = "float16"
    max_seconds: Optional[float] = 8.0
    normalize: str = "auto"
    pooled_stats: bool = False
    random_init: bool = False
    seed: int = 0
    revision: Optional[str] = None
    compute_dtype: str = "auto"
    shard_size: int = 256
    splits: Optional[Tuple[str, ...]] = None
    augmentation: Optional[NoiseAugmentation] = None
    rescale_loud: bool = False
    whisper_input: Optional[str] = None
    #: ``--compile``: the upstream's forward through ``torch.compile`` (recorded only when on)
    compile: bool = False

    def __post_init__(self):
        layers = self.layers
        layers = ",".join(str(i) for i in layers) if isinstance(layers, (list, tuple)) else str(layers)
        splits = self.splits
        if isinstance(splits, str):
            splits = [s.strip() for s in splits.split(",") if s.strip()]
        aug = self.augmentation
        if isinstance(aug, Mapping):
            reject_unknown_fields(NoiseAugmentation, aug, "augmentation")
            aug = NoiseAugmentation(**aug)
        normalised = dict(upstream=str(self.upstream), layers=layers, pooled_stats=bool(self.pooled_stats),
                          random_init=bool(self.random_init), seed=int(self.seed), shard_size=int(self.shard_size),
                          splits=tuple(splits) if splits else None, augmentation=aug,
                          rescale_loud=bool(self.rescale_loud), compile=bool(self.compile))
        for name, value in normalised.items():
            object.__setattr__(self, name, value)
        if self.dtype not in ("float16", "float32"):
            raise ConfigError(f"--dtype must be float16 or float32, got {self.dtype!r}")
        if self.normalize not in NORMALIZE_CHOICES:
            raise ConfigError(f"--normalize must be {', '.join(NORMALIZE_CHOICES[:-1])} or {NORMALIZE_CHOICES[-1]}, "
                              f"got {self.normalize!r}")
        if self.whisper_input is not None and self.whisper_input not in WHISPER_INPUTS:
            raise ConfigError(f"--whisper-input must be {' or '.join(WHISPER_INPUTS)}, got {self.whisper_input!r}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ConfigError(f"--max-seconds must be positive, got {self.max_seconds}")
        if self.shard_size < 1:
            raise ConfigError(f"--shard-size must be at least 1, got {self.shard_size}")
        if self.augmentation is not None and not isinstance(self.augmentation, NoiseAugmentation):
            raise ConfigError(f"augmentation must be a NoiseAugmentation, got {self.augmentation!r}")

    @classmethod
    def from_dict(cls, d: Mapping) -> "ExtractConfig":
        """Build from a JSON mapping (e.g. a manifest's ``"config"``); unknown keys are an error."""
        reject_unknown_fields(cls, d, "extraction")
        if "upstream" not in d:
            raise ConfigError("extraction option 'upstream' is required")
        return cls(**d)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        if not d["compile"]:
            del d["compile"]  # a cache extracted without it records what it always recorded
        return d


def resolve_for_family(config, whisper: bool):
    """``config`` (an :class:`ExtractConfig`, or any frozen dataclass with ``upstream``,
    ``normalize``, ``whisper_input`` and ``max_seconds``: finetune-best's config too) with
    ``normalize`` and ``whisper_input`` settled for the upstream's family (``whisper``: a
    Whisper encoder), or a ConfigError for a setting that family cannot take."""
    changes = {}
    if config.normalize == "auto":
        changes["normalize"] = "none" if whisper else "global"
    if whisper:
        if getattr(config, "compute_dtype", None) == "bfloat16-weights":
            raise ConfigError(f"--compute-dtype bfloat16-weights: not for a Whisper encoder ({config.upstream}: its "
                              f"log-mel input is computed in float32); use --compute-dtype bfloat16 (autocast)")
        changes["whisper_input"] = config.whisper_input or WHISPER_INPUTS[0]
        if config.max_seconds is None or config.max_seconds > WHISPER_MAX_SECONDS:
            raise ConfigError(f"{config.upstream}: a Whisper encoder takes at most {WHISPER_MAX_SECONDS:g} s of audio; "
                              f"give --max-seconds {WHISPER_MAX_SECONDS:g} or less "
                              f"(not {f'{config.max_seconds:g}' if config.max_seconds is not None else 'no limit'})")
    elif config.whisper_input is not None:
        raise ConfigError(f"--whisper-input applies to Whisper encoders only; {config.upstream} is not one")
    return dataclasses.replace(config, **changes) if changes else config


def parse_layers(spec, num_hidden_states: int) -> List[int]:
    """``last`` | ``all`` | ``i,j,k`` (negative counts from the end) -> sorted hidden-state indices.

    Index 0 is the input of the first transformer layer, ``num_hidden_states - 1`` the
    model's last hidden state.
    """
    if isinstance(spec, (list, tuple)):
        items = [str(i) for i in spec]
    else:
        s = str(spec).strip().lower()
        if s == "last":
            return [num_hidden_states - 1]
        if s == "all":
            return list(range(num_hidden_states))
        items = [p.strip() for p in s.split(",") if p.strip()]
    if not items:
        raise ConfigError(f"--layers: expected last, all or comma-separated indices, got {spec!r}")
    out = []
    for p in items:
        try:
            i = int(p)
        except ValueError:
            raise ConfigError(f"--layers: expected last, all or comma-separated indices, got {spec!r}") from None
        if not -num_hidden_states <= i < num_hidden_states:
            raise ConfigError(f"--layers: index {i} out of range: this upstream has hidden states "
                              f"0..{num_hidden_states - 1} (0 = input of the first transformer layer, "
                              f"{num_hidden_states - 1} = last hidden state)")
        out.append(i % num_hidden_states)
    return sorted(set(out))


# ----------------------------------------------------------------------------- jobs, shards, batches


@dataclass(frozen=True)
class Job:
    """One clip to extract: an original clip, or a noisy copy of one."""

    name: str  # name in the cache
    source: str  # FileName of the audio
    clip: Clip  # record stored in clips.json (name == self.name)
    samples: int  # expected samples after resampling and truncation (for ordering)
    noise: Optional[dict] = None  # {"file", "snr_db", "offset"} for augmented copies


def _expected_samples(clip: Clip, max_seconds: Optional[float]) -> int:
    d = clip.duration if clip.duration is not None else (max_seconds or 0.0)
    if max_seconds is not None:
        d = min(d, max_seconds)
    return int(round(d * SAMPLE_RATE))


def noise_fingerprint(noise_dir, files: Sequence[Path]) -> str:
    """Digest of the noise files' names and sizes (recorded with the augmentation settings)."""
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(noise_dir)}:{p.stat().st_size}\n".encode())
    return h.hexdigest()


def plan_jobs(corpus: Corpus, config: ExtractConfig, noise_files: Sequence[Path] = ()) -> List[Job]:
    """Every clip to extract, augmented copies included, in corpus order."""
    jobs: List[Job] = []
    aug = config.augmentation
    chosen = set()
    if aug is not None:
        train = sorted(c.name for c in corpus if c.split == "Train")
        k = int(round(aug.fraction * len(train)))
        rng = np.random.default_rng([config.seed, 7])
        chosen = {train[i] for i in rng.permutation(len(train))[:k]}
    noise_lengths: Dict[Path, float] = {}
    for clip in corpus:
        n = _expected_samples(clip, config.max_seconds)
        jobs.append(Job(clip.name, clip.name, clip, n))
        if clip.name not in chosen:
            continue
        for copy in range(1, aug.copies + 1):
            rng = np.random.default_rng([config.seed, 8, zlib.crc32(clip.name.encode()), copy])
            nf = noise_files[int(rng.integers(len(noise_files)))]
            if nf not in noise_lengths:
                try:
                    info = sf.info(str(nf))
                except Exception as e:
                    raise ConfigError(f"noise file {nf}: unreadable ({e})") from None
                noise_lengths[nf] = info.frames / info.samplerate
            snr = float(rng.uniform(*aug.snr_db))
            spare = max(0.0, noise_lengths[nf] - n / SAMPLE_RATE)
            offset = float(rng.uniform(0.0, spare)) if spare > 0 else 0.0
            name = f"{clip.name}{AUG_SEP}{copy}"
            noise = {"file": str(nf.relative_to(aug.noise_dir)), "snr_db": round(snr, 3), "offset": round(offset, 4)}
            jobs.append(Job(name, clip.name, dataclasses.replace(clip, name=name), n, noise))
    return jobs


def assign_shards(jobs: Sequence[Job], shard_size: int) -> List[List[Job]]:
    """Shards of ``shard_size`` jobs, clips sorted by length (then name) across the corpus."""
    ordered = sorted(jobs, key=lambda j: (j.samples, j.name))
    return [ordered[i:i + shard_size] for i in range(0, len(ordered), shard_size)]


#: the unit bucket lengths are counted in: one output frame of the wav2vec 2.0 family (20 ms)
BUCKET_HOP = 320


def bucket_samples(n: int, cap: Optional[int] = None) -> int:
    """The length a batch whose longest clip has ``n`` samples is padded to with length buckets
    (:func:`conilium.util.bucket_length` in hops of :data:`BUCKET_HOP` samples), at most ``cap``
    (the run's longest clip: clips cut at ``--max-seconds`` share that length already) and at
    least ``n``. Between 1 and 30 s there are 40 such lengths, against one per distinct clip
    length unbucketed."""
    return bucket_length(n, unit=BUCKET_HOP, cap=cap)


def plan_batches(jobs: Sequence[Job], batch_seconds: float, *, batch_cost: float = 0.02,
                 min_samples: int = 0, pad_to=None) -> List[List[Job]]:
    """Batches of clips of similar length whose padded audio (size x longest) stays within
    ``batch_seconds``. ``min_samples``: what the model computes for a clip at least (a Whisper
    encoder on its 30 s input computes 30 s for every clip), counted instead of shorter lengths.
    ``pad_to(longest)``: the length a batch is padded to (length buckets,
    :func:`bucket_samples`), counted instead of its longest clip's.

    Clips sorted by length are cut into consecutive batches by dynamic programming,
    minimising the padded samples computed plus a fixed cost per batch (``batch_cost``
    times the bound), so that padding stays small without making batches needlessly small.
    ``batch_seconds`` 0 gives one clip per batch.
    """
    ordered = sorted(jobs, key=lambda j: (j.samples, j.name))
    n = len(ordered)
    if n == 0:
        return []
    limit = batch_seconds * SAMPLE_RATE
    overhead = batch_cost * limit
    lengths = [max(j.samples, min_samples, 1) for j in ordered]
    if pad_to is not None:
        lengths = [max(n, int(pad_to(n))) for n in lengths]
    best = [0.0] + [math.inf] * n
    start = [0] * (n + 1)
    for end in range(1, n + 1):
        longest = lengths[end - 1]
        for begin in range(end - 1, -1, -1):
            size = end - begin
            if size > 1 and size * longest > limit:
                break
            cost = best[begin] + size * longest + overhead
            if cost <= best[end]:
                best[end], start[end] = cost, begin
    batches: List[List[Job]] = []
    end = n
    while end > 0:
        batches.append(ordered[start[end]:end])
        end = start[end]
    return batches[::-1]

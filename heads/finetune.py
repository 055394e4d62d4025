"""finetune-best: the upstream and an attentive head trained end to end on the audio.

>>> from conilium.heads.finetune import FinetuneConfig, finetune
>>> finetune(FinetuneConfig(corpus="MSP-PODCAST-1.11", out="models/wavlm-wbce-S"))

The paper's best configuration, as the challenge baseline trains it: the upstream's
transformer is trained, its convolutional feature encoder stays frozen, an attentive
statistics pooling head and classifier sit on its last hidden state, WBCE on the
S targets, AdamW at 1e-5, batches of 16 clips, at most 40 epochs, the best epoch by
macro-F1 over every Development clip, audio truncated to 8 s and normalised with one
mean and standard deviation over the Train audio (the extraction stage's ``global``
normalisation).

How a step runs:

* **batches** — an epoch is a permutation of the training clips (or the class-balanced
  sampler's draws), cut into pools of ``bucket_batches`` batches whose clips are sorted
  by duration, so a batch holds clips of similar length (little padding); the order of
  the batches is shuffled. The plan is a pure function of the seed and the epoch.
* **scale** — under ``torchrun`` each global batch is dealt out to the ranks (clips
  ``rank::world``), each rank's share cut into ``grad_accum`` micro-batches; every
  micro-batch loss is weighted by its share of the global batch, so a step's gradient
  is the mean over the global batch whatever the number of processes. gloo on CPU,
  NCCL on GPUs; bf16 autocast on CUDA; optional gradient checkpointing.
* **padding** — a clip's output does not depend on its batch: valid frames only are
  pooled, the transformer gets an attention mask, and a group-normalised CNN encoder
  (wav2vec2-base) runs clip by clip.
* **noise augmentation** (paper 3.2) — a fraction of the training clips of each epoch
  get a random noise file mixed in at a random SNR, decided by (seed, epoch, clip).
* **resume** — after each epoch ``checkpoints/last.pt`` (model, optimizer, RNG and
  sampler state, history) is replaced atomically; ``resume=True`` continues from it and
  ends with the same model as an uninterrupted run.

The output directory (see :func:`save_model_dir`) is a model for ``predict`` and for
``extract-features --upstream MODEL_DIR``, and a run directory for ``conilium-eval``.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import soundfile as sf
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import conilium
from conilium import CLASSES, SAMPLE_RATE
from conilium.audio import normalize, read_audio
from conilium.corpus import Clip, Corpus, audio_dir, load_corpus
from conilium.errors import AudioError, ConfigError, ConiliumError
from conilium.extract.upstreams import FINETUNED_MARKER, UPSTREAMS, load_upstream
from conilium.targets import TARGET_KINDS, class_counts, class_weights, training_set
from conilium.util import atomic_path, read_json, reject_unknown_fields, write_json

from .losses import activation, check_loss, loss_fn, probabilities, uses_weights
from .model import POOLINGS, EmotionHead, HeadConfig, valid_mask
from .samplers import balanced_weights, check_sampler
from .train import resolve_device

MODEL_FILE = FINETUNED_MARKER  # conilium_model.json: written last, marks a complete model directory
HEAD_FILE = "head.pt"
UPSTREAM_DIR = "upstream"
CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"
TUNED_DIR = "tuned"
MODEL_FORMAT = 1
NORMALIZE_MODES = ("global", "utterance", "none")
PRECISIONS = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that defines a fine-tuning run; written to ``config.json``.

    ``upstream_dropout`` / ``layerdrop`` / ``mask_time_prob`` replace the upstream
    configuration's dropout probabilities, LayerDrop and SpecAugment time masking
    (None keeps the pretrained model's values, as the baseline does). ``init_head`` is a
    train-head run directory and ``baseline_ckpt`` a directory with the challenge
    baseline's ``final_ssl.pt``/``final_pool.pt``/``final_ser.pt`` to start from.
    ``max_train_clips`` keeps the first N training clips (quick trials). The fields in
    :data:`RUNTIME_FIELDS` change speed or bookkeeping, not results.
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
    max_seconds: float = 8.0
    normalize: str = "global"
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

    @classmethod
    def from_dict(cls, d: Mapping) -> "FinetuneConfig":
        reject_unknown_fields(cls, d, "fine-tuning")
        d = dict(d)
        if "snr_db" in d:
            d["snr_db"] = tuple(float(x) for x in d["snr_db"])
        return cls(**d)

    def to_json(self) -> dict:
        return asdict(self)


#: Fields that may differ between a run and its ``--resume`` (speed and bookkeeping only,
#: plus ``epochs``/``patience``, so that a finished run can be continued for longer).
RUNTIME_FIELDS = ("precision", "gradient_checkpointing", "device", "num_workers", "eval_batch_size",
                  "keep_checkpoints", "threads", "epochs", "patience")


class FinetuneError(ConiliumError):
    """Fine-tuning cannot go on (non-finite loss, unusable checkpoint, inconsistent resume)."""


# ----------------------------------------------------------------------------- checks

def check_config(config: FinetuneConfig) -> None:
    """Errors for option values that are wrong whatever the corpus."""
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
    if config.normalize not in NORMALIZE_MODES:
        raise ConfigError(f"--normalize must be one of {', '.join(NORMALIZE_MODES)}, not {config.normalize!r}")
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
    if config.random_init and config.upstream not in UPSTREAMS:
        raise ConfigError(f"--random-init needs a registered upstream name ({', '.join(UPSTREAMS)}), "
                          f"not {config.upstream!r}")


# ----------------------------------------------------------------------------- the model

class EndToEndModel(nn.Module):
    """Upstream (wav2vec 2.0 family) → hidden states ``layers`` → :class:`EmotionHead`.

    ``layers`` are hidden-state indices as in the feature cache (0 = input of the first
    transformer layer, ``i`` = output of layer ``i``, the last = the model's
    ``last_hidden_state``), so a head trained on a cache maps onto this model. The
    forward takes zero-padded waveforms (B, N) with their lengths in samples and returns
    logits (B, classes); a clip's logits do not depend on the rest of its batch.
    """

    def __init__(self, upstream: nn.Module, head: EmotionHead, layers: Optional[Sequence[int]] = None):
        super().__init__()
        for part in ("feature_extractor", "feature_projection", "encoder"):
            if not hasattr(upstream, part):
                raise ConfigError(f"upstream {type(upstream).__name__} is not a wav2vec 2.0-family model "
                                  f"(no {part}); supported: WavLM, wav2vec 2.0, HuBERT")
        if getattr(upstream, "adapter", None) is not None:
            raise ConfigError("upstreams with an adapter (add_adapter=True) are not supported")
        self.upstream = upstream
        self.head = head
        self.num_hidden_states = upstream.config.num_hidden_layers + 1
        last = self.num_hidden_states - 1
        self.layers = tuple(int(i) for i in (layers if layers is not None else (last,)))
        for i in self.layers:
            if not 0 <= i <= last:
                raise ConfigError(f"hidden state {i} out of range: the upstream has hidden states 0..{last}")
        if last not in self.layers:
            raise ConfigError(f"the head must read the upstream's last hidden state ({last}); it reads "
                              f"{list(self.layers)}, which would leave the top transformer layers untrained")
        if head.config.num_layers != len(self.layers):
            raise ConfigError(f"head expects {head.config.num_layers} layer(s), model gives {len(self.layers)}")
        if head.config.dim != upstream.config.hidden_size:
            raise ConfigError(f"head width {head.config.dim} differs from the upstream's hidden size "
                              f"{upstream.config.hidden_size}")
        self.group_norm_encoder = getattr(upstream.config, "feat_extract_norm", "layer") == "group"
        self._captured: Optional[Dict[int, torch.Tensor]] = None
        self._hooks = []
        if self.layers != (last,):
            enc_layers = upstream.encoder.layers
            self._hooks.append(enc_layers[0].register_forward_pre_hook(self._capture_input))
            for i, layer in enumerate(enc_layers):
                self._hooks.append(layer.register_forward_hook(self._capture_output(i + 1)))

    # hooks fire only inside forward(): gradient checkpointing re-runs layers in backward
    def _capture_input(self, module, args):
        if self._captured is not None:
            self._captured[0] = args[0]

    def _capture_output(self, index: int):
        def hook(module, args, output):
            if self._captured is not None:
                self._captured[index] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Valid output frames of clips of ``lengths`` samples."""
        return self.upstream._get_feat_extract_output_lengths(lengths).to(torch.long)

    def _cnn(self, waves: torch.Tensor, lengths: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        fe = self.upstream.feature_extractor
        t_max = int(frames.max())
        frozen = not any(p.requires_grad for p in fe.parameters())
        with torch.no_grad() if frozen else contextlib.nullcontext():
            if self.group_norm_encoder:
                out = []
                for i in range(waves.shape[0]):
                    f = fe(waves[i : i + 1, : int(lengths[i])])[0, :, : int(frames[i])]
                    out.append(nn.functional.pad(f, (0, t_max - f.shape[-1])))
                feats = torch.stack(out)
            else:
                feats = fe(waves[:, : int(lengths.max())])[:, :, :t_max]
        return feats.transpose(1, 2)

    def hidden_states(self, waves: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, T, len(layers), D) hidden states and the valid frame count of each clip."""
        frames = self.frame_lengths(lengths)
        if int(frames.min()) < 1:
            raise ConfigError(f"a clip of {int(lengths.min())} samples is too short for the upstream "
                              f"(no output frame)")
        feats = self._cnn(waves, lengths, frames)
        mask = valid_mask(frames, feats.shape[1])
        up = self.upstream
        proj = up.feature_projection(feats)
        hidden = proj[0] if isinstance(proj, tuple) else proj
        hidden = up._mask_hidden_states(hidden, attention_mask=mask)  # SpecAugment, in training only
        self._captured = {} if self._hooks else None
        try:
            out = up.encoder(hidden, attention_mask=mask)
            last = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            if not self._hooks:
                return last.unsqueeze(2), frames
            captured = self._captured
        finally:
            self._captured = None
        captured[self.num_hidden_states - 1] = last
        for i in range(1, self.num_hidden_states):  # a layer LayerDrop skipped passes its input on
            if i not in captured:
                captured[i] = captured[i - 1]
        return torch.stack([captured[i] for i in self.layers], dim=2), frames

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x, frames = self.hidden_states(waves, lengths)
        return self.head(x, frames)


def enable_checkpointing(upstream) -> None:
    """Recompute each transformer layer's activations in the backward pass (less memory)."""
    if hasattr(upstream, "activation_checkpointing_enable"):  # transformers >= 5
        upstream.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        upstream.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def default_head_config(upstream, config: FinetuneConfig) -> HeadConfig:
    return HeadConfig(dim=upstream.config.hidden_size, num_layers=1, layers=0, pooling=config.pooling,
                      hidden=config.hidden, dropout=config.dropout)


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


# ----------------------------------------------------------------------------- the model directory

def save_model_dir(out, model: EndToEndModel, info: Mapping) -> Path:
    """Write ``upstream/`` (save_pretrained), ``head.pt`` and, last, ``conilium_model.json``.

    ``info`` holds at least ``max_seconds``, ``normalize`` ({"mode", "stats"}), ``loss``
    and ``offsets`` (class → decision offset); the classes, sample rate, head config and
    hidden-state layers are added here. Each part is written under a temporary name and
    renamed, ``conilium_model.json`` last, so a directory with that file is complete.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MODEL_FILE).unlink(missing_ok=True)
    tmp = out / f".{UPSTREAM_DIR}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.upstream.save_pretrained(tmp)
    old = out / f".{UPSTREAM_DIR}.old{os.getpid()}"
    if (out / UPSTREAM_DIR).exists():
        os.replace(out / UPSTREAM_DIR, old)
    os.replace(tmp, out / UPSTREAM_DIR)
    shutil.rmtree(old, ignore_errors=True)
    head_ckpt = {
        "format": MODEL_FORMAT,
        "head_config": asdict(model.head.config),
        "state_dict": {k: v.detach().cpu() for k, v in model.head.state_dict().items()},
        "loss": info["loss"],
        "labels": info.get("labels"),
        "layers": list(model.layers),
    }
    with atomic_path(out / HEAD_FILE, suffix=".pt.tmp") as t:
        torch.save(head_ckpt, t)
    meta = dict(info)
    meta.update({
        "format": MODEL_FORMAT,
        "conilium_version": conilium.__version__,
        "classes": list(CLASSES),
        "sample_rate": SAMPLE_RATE,
        "head_config": asdict(model.head.config),
        "layers": list(model.layers),
        "activation": activation(info["loss"]),
        "upstream_family": model.upstream.config.model_type,
    })
    write_json(out / MODEL_FILE, meta)
    return out


def read_model_info(model_dir) -> dict:
    """``conilium_model.json`` of a model directory, with a clear error when it is not one."""
    model_dir = Path(model_dir)
    path = model_dir / MODEL_FILE
    if not path.is_file():
        raise ConfigError(f"{model_dir}: not a finetune-best model directory (no {MODEL_FILE}); "
                          f"train one with finetune-best")
    try:
        info = read_json(path)
    except ValueError as e:
        raise ConfigError(f"{path}: corrupt model description ({e})") from None
    for key in ("classes", "max_seconds", "normalize", "loss", "head_config", "layers"):
        if key not in info:
            raise ConfigError(f"{path}: missing field {key!r}")
    return info


def load_model_dir(model_dir, *, device="cpu") -> Tuple[EndToEndModel, dict]:
    """The model of a finetune-best directory (eval mode, on ``device``) and its description."""
    model_dir = Path(model_dir)
    info = read_model_info(model_dir)
    upstream, _ = load_upstream(str(model_dir))
    hpath = model_dir / HEAD_FILE
    if not hpath.is_file():
        raise ConfigError(f"{model_dir}: {HEAD_FILE} missing")
    ckpt = torch.load(hpath, map_location="cpu", weights_only=True)
    head = EmotionHead(HeadConfig(**ckpt["head_config"]))
    head.load_state_dict(ckpt["state_dict"])
    model = EndToEndModel(upstream, head, info["layers"]).to(device).eval()
    return model, info


def normalize_wave(x: np.ndarray, info_normalize: Mapping) -> np.ndarray:
    return normalize(x, info_normalize["mode"], info_normalize.get("stats"))


def offsets_array(info: Mapping) -> np.ndarray:
    offsets = info.get("offsets") or {}
    return np.array([float(offsets.get(c, 0.0)) for c in info.get("classes", CLASSES)], dtype=np.float64)


# ----------------------------------------------------------------------------- audio data

class NoiseMixer:
    """Mixes a random noise recording into a fraction of the clips, at a random SNR.

    Whether clip ``index`` is noisy in ``epoch``, which file of ``noise_dir``, from where
    in it and at which SNR are drawn from a generator seeded with (seed, epoch, index):
    the same for any number of processes or DataLoader workers, and after a resume. The
    mixing is the extraction stage's (:func:`conilium.extract.extract.mix_noise`).
    """

    def __init__(self, noise_dir, *, fraction: float, snr_db: Tuple[float, float], seed: int):
        from conilium.extract.extract import list_noise_files

        self.files = list_noise_files(noise_dir)
        self.fraction = float(fraction)
        self.snr_db = (float(snr_db[0]), float(snr_db[1]))
        self.seed = int(seed)
        self._seconds: Dict[int, float] = {}

    def _duration(self, k: int) -> float:
        if k not in self._seconds:
            try:
                info = sf.info(str(self.files[k]))
            except Exception as e:
                raise AudioError(self.files[k], f"unreadable noise file ({e})") from None
            self._seconds[k] = info.frames / info.samplerate
        return self._seconds[k]

    def __call__(self, x: np.ndarray, *, epoch: int, index: int, clip: Optional[str] = None) -> np.ndarray:
        from conilium.extract.extract import mix_noise

        rng = np.random.default_rng([self.seed, epoch, index, 0x6E6F697365])
        if rng.random() >= self.fraction:
            return x
        k = int(rng.integers(len(self.files)))
        snr = float(rng.uniform(*self.snr_db))
        spare = max(0.0, self._duration(k) - len(x) / SAMPLE_RATE)
        offset = float(rng.uniform(0.0, spare)) if spare > 0 else 0.0
        return mix_noise(x, self.files[k], snr, offset, clip=clip or str(index))


class AudioClips(Dataset):
    """Decoded, truncated, (noise-augmented,) normalised clips.

    Items are keyed ``(index, epoch)`` so that augmentation is decided per epoch. A
    clip that cannot be read comes back as its error message; the training loop raises it.
    """

    def __init__(self, paths: Sequence[Path], names: Sequence[str], *, max_seconds: Optional[float],
                 normalize_mode: str, stats: Optional[Mapping] = None, noise: Optional[NoiseMixer] = None,
                 durations: Optional[Sequence[float]] = None):
        self.paths = [Path(p) for p in paths]
        self.names = list(names)
        self.durations = None if durations is None else np.asarray(durations, dtype=np.float64)
        self.max_seconds = max_seconds
        self.mode = normalize_mode
        self.stats = dict(stats) if stats else None
        self.noise = noise

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, None)
        try:
            x = read_audio(self.paths[index], max_seconds=self.max_seconds, clip=self.names[index])
        except AudioError as e:
            return index, None, str(e)
        if self.noise is not None and epoch is not None:
            try:
                x = self.noise(x, epoch=epoch, index=index, clip=self.names[index])
            except AudioError as e:
                return index, None, str(e)
        return index, normalize(x, self.mode, self.stats), None


def collate_waves(items) -> Tuple[torch.Tensor, torch.Tensor, List[int], List[str]]:
    """Zero-pad waveforms to the longest: ``(waves (B, N), lengths (B,), indices, errors)``."""
    errors = [e for _, _, e in items if e is not None]
    items = [(i, x) for i, x, e in items if e is None]
    if not items:
        return torch.zeros(0, 1), torch.zeros(0, dtype=torch.long), [], errors
    lengths = torch.tensor([len(x) for _, x in items], dtype=torch.long)
    waves = torch.zeros(len(items), int(lengths.max()), dtype=torch.float32)
    for k, (_, x) in enumerate(items):
        waves[k, : len(x)] = torch.from_numpy(x)
    return waves, lengths, [i for i, _ in items], errors


# ----------------------------------------------------------------------------- batch plans

def epoch_batches(durations: Sequence[float], *, batch_size: int, seed: int, epoch: int,
                  bucket_batches: int = 50, draw_weights: Optional[np.ndarray] = None,
                  min_batch: int = 1) -> List[List[int]]:
    """The global batches of one epoch: lists of clip indices, clips of similar duration together.

    A permutation of the clips (or, with ``draw_weights``, as many weighted draws with
    replacement) is cut into pools of ``bucket_batches`` batches; each pool is sorted by
    duration and cut into batches of ``batch_size``; the batch order is shuffled. A
    pool's last batch with fewer than ``max(batch_size // 2, min_batch)`` clips joins the
    batch before it, so every rank and micro-batch gets a clip; the plan does not
    depend on the number of processes as long as ``min_batch <= batch_size // 2``.
    """
    durations = np.asarray(durations, dtype=np.float64)
    n = len(durations)
    rng = np.random.default_rng([seed, epoch, 0x626174636865])
    if draw_weights is not None:
        p = np.asarray(draw_weights, dtype=np.float64)
        order = rng.choice(n, size=n, replace=True, p=p / p.sum())
    else:
        order = rng.permutation(n)
    if n < min_batch:
        raise ConfigError(f"{n} training clip(s) cannot fill {min_batch} processes x micro-batches")
    pool = batch_size * bucket_batches
    smallest = max(batch_size // 2, min_batch)
    batches: List[List[int]] = []
    for start in range(0, n, pool):
        chunk = order[start : start + pool]
        chunk = chunk[np.argsort(durations[chunk], kind="stable")]
        cut = [chunk[i : i + batch_size].tolist() for i in range(0, len(chunk), batch_size)]
        if len(cut[-1]) < smallest:
            if len(cut) > 1:
                cut[-2].extend(cut.pop())
            elif batches:
                batches[-1].extend(cut.pop())
        batches.extend(cut)
    perm = rng.permutation(len(batches))
    return [batches[i] for i in perm]


def rank_micro_batches(batch: Sequence[int], durations: Sequence[float], *, rank: int, world: int,
                       grad_accum: int) -> List[List[int]]:
    """This rank's micro-batches of one global batch: clips ``rank::world`` of the batch sorted by
    duration, cut into ``grad_accum`` contiguous pieces."""
    ordered = sorted(batch, key=lambda i: (durations[i], i))
    mine = ordered[rank::world]
    return [list(map(int, p)) for p in np.array_split(np.asarray(mine, dtype=np.int64), grad_accum) if len(p)]


# ----------------------------------------------------------------------------- distributed helpers

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1

    def barrier(self):
        if self.on:
            dist.barrier()

    def all_sum(self, values: Sequence[float]) -> List[float]:
        if not self.on:
            return [float(v) for v in values]
        t = torch.tensor(list(values), dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        return t.cpu().tolist()

    def gather(self, obj):
        if not self.on:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        if not self.on:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def init_distributed(device_name: str) -> Tuple[Dist, torch.device]:
    """Join the torchrun process group (gloo on CPU, NCCL on CUDA) when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    d = Dist(rank, world, local)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        d.initialised_here = True
    return d, device


def _autocast(device: torch.device, precision: str):
    if device.type == "cuda" and precision in ("auto", "bfloat16"):
        if precision == "bfloat16" or torch.cuda.is_bf16_supported():
            return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Dropout, LayerDrop and SpecAugment draws of an epoch depend on (seed, epoch, rank) only."""
    s = int(np.random.SeedSequence([seed, epoch, rank, 0x65706f6368]).generate_state(1)[0])
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- preparation

@dataclass
class Prepared:
    corpus_root: Path
    train: List[Clip]
    train_targets: np.ndarray
    train_counts: Dict[str, int]
    weights: Optional[np.ndarray]
    splits: Dict[str, List[Clip]]  # every split other than the training split, dev first
    audio_dir: Path
    corpus: Corpus


def prepare(config: FinetuneConfig) -> Prepared:
    """Read the corpus and check every choice against it (clear errors before any training)."""
    check_config(config)
    corpus = load_corpus(config.corpus, read_durations=True, skip_bad=config.skip_bad)
    train_clips = corpus.split(config.train_split)
    if not train_clips:
        raise ConfigError(f"corpus {config.corpus} has no clip in split {config.train_split!r} "
                          f"(splits: {', '.join(corpus.splits)})")
    if config.labels not in ("hard",) and not any(c.annotations for c in train_clips):
        raise ConfigError(f"--labels {config.labels} needs the annotators' labels, but corpus {config.corpus} "
                          f"has none (no Labels/labels_detailed.csv); use --labels hard")
    clips, targets, counts = training_set(train_clips, config.labels,
                                          thresholds={"P*": config.p_threshold, "S*": config.s_threshold})
    if config.max_train_clips is not None:
        clips, targets = clips[: config.max_train_clips], targets[: config.max_train_clips]
    if not clips:
        raise ConfigError(f"no training clip left for --labels {config.labels} in split {config.train_split} "
                          f"(dropped: {counts})")
    dev = corpus.split(config.dev_split)
    if not any(c.scoreable for c in dev):
        raise ConfigError(f"corpus {config.corpus} has no scoreable clip in split {config.dev_split!r} to select "
                          f"the best epoch (splits: {', '.join(corpus.splits)})")
    labels = [c.emo_class for c in clips]
    weights = class_weights(labels) if (uses_weights(config.loss) and config.sampler is None) else None
    splits = {config.dev_split: dev}
    for s in corpus.splits:
        if s not in (config.train_split, config.dev_split):
            splits[s] = corpus.split(s)
    return Prepared(Path(config.corpus), clips, targets, counts, weights, splits,
                    audio_dir(config.corpus), corpus)


# ----------------------------------------------------------------------------- warm starts

def head_from_run(run_dir, upstream, identity: Mapping) -> Tuple[EmotionHead, List[int], dict]:
    """The head of a train-head run, checked against the upstream; its hidden-state layers and
    the cache's settings (normalisation, truncation) to train with."""
    from .train import load_head

    head, ckpt = load_head(run_dir)
    manifest = ckpt.get("cache_manifest") or {}
    where = f"--init-head {run_dir}"
    inp = ckpt.get("input") or {}
    if inp.get("kind") != "frames" or head.config.pooling == "stats":
        raise ConfigError(f"{where}: the head was trained on pooled per-layer statistics (--pooled-stats), "
                          f"which an end-to-end model does not produce; train a head on frames instead")
    if head.config.dim != upstream.config.hidden_size:
        raise ConfigError(f"{where}: head width {head.config.dim} differs from upstream {identity.get('name')}'s "
                          f"hidden size {upstream.config.hidden_size}: the head was trained on another upstream")
    check_same_upstream(manifest.get("upstream") or {}, identity, where)
    layers = [int(i) for i in inp.get("upstream_layers", [])]
    last = upstream.config.num_hidden_layers
    if not layers:
        raise ConfigError(f"{where}: the checkpoint does not say which upstream layers the head read")
    if head.config.layers != "weighted" and len(layers) == 1 and layers[0] != last:
        raise ConfigError(f"{where}: the head read hidden state {layers[0]} only, not the last one ({last}); "
                          f"fine-tuning needs a head on the last layer or on a weighted mix of layers "
                          f"(train-head --layers -1 or --layers weighted on a cache with the last layer)")
    if last not in layers:
        raise ConfigError(f"{where}: the head mixes hidden states {layers}, not the last one ({last}); "
                          f"fine-tuning needs the last layer among them")
    settings = {"normalize": manifest.get("normalize"), "normalize_stats": manifest.get("normalize_stats"),
                "max_seconds": manifest.get("max_seconds"), "loss": ckpt.get("loss"), "labels": ckpt.get("labels")}
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


# ----------------------------------------------------------------------------- evaluation

def predict_clips(model: EndToEndModel, dataset: AudioClips, indices: Sequence[int], loss: str, *,
                  device: torch.device, batch_size: int, precision: str = "auto", num_workers: int = 0,
                  progress: bool = False, desc: str = "predicting") -> Dict[int, np.ndarray]:
    """Class scores (sigmoid or softmax, as the loss sees them) of dataset items ``indices``."""
    dur = dataset.durations
    order = sorted(indices, key=lambda i: (0.0 if dur is None else float(dur[i]), i))
    batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate_waves, num_workers=num_workers)
    was = model.training
    model.eval()
    out: Dict[int, np.ndarray] = {}
    with torch.no_grad():
        for waves, lengths, idx, errors in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
            if errors:
                raise ConiliumError(errors[0])
            with _autocast(device, precision):
                logits = model(waves.to(device), lengths.to(device))
            p = probabilities(logits.float(), loss).cpu().numpy().astype(np.float64)
            for k, i in enumerate(idx):
                out[i] = p[k]
    model.train(was)
    return out


# ----------------------------------------------------------------------------- training

def _checkpoint_paths(out: Path) -> Tuple[Path, Path]:
    return out / CHECKPOINT_DIR / LAST, out / CHECKPOINT_DIR / BEST


def _save(obj, path: Path) -> None:
    with atomic_path(path, suffix=".pt.tmp") as tmp:
        torch.save(obj, tmp)


def _cpu_state(module: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def finetune(config: FinetuneConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
             on_epoch_end: Optional[Callable[[dict], None]] = None) -> dict:
    """Fine-tune end to end and write the model directory ``config.out``; return its metrics.

    Works alone or as one process of ``torchrun`` (each rank calls it with the same
    config). ``resume`` continues from ``out/checkpoints/last.pt``; ``overwrite`` starts
    over in an ``out`` that holds a run. ``on_epoch_end(record)`` is called on every rank
    after each epoch's checkpoint is written (record: epoch, train_loss, dev scores).
    """
    d, device = init_distributed(config.device)
    try:
        return _finetune(config, d, device, resume=resume, overwrite=overwrite, progress=progress and d.main,
                         on_epoch_end=on_epoch_end)
    finally:
        if d.initialised_here and dist.is_initialized():
            dist.destroy_process_group()


def _check_out_dir(out: Path, config: FinetuneConfig, resume: bool, overwrite: bool) -> Tuple[Optional[dict], bool]:
    """What to do with ``out``: ``(checkpoint to resume from or None, whether to clear it first)``.

    With ``resume`` and no completed epoch yet (no checkpoint, no finished model), the run
    starts afresh, so a script may always pass ``--resume``.
    """
    last, _ = _checkpoint_paths(out)
    has_model = (out / MODEL_FILE).is_file()
    has_ckpt = last.is_file()
    has_run = has_model or has_ckpt or (out / "config.json").is_file()
    if (out / "config.json").is_file() and not overwrite:
        try:
            kind = read_json(out / "config.json").get("kind")
        except (ValueError, AttributeError):
            kind = None
        if kind != "finetune":
            raise ConfigError(f"{out} holds a config.json that finetune-best did not write (another kind of run?); "
                              f"choose another --out, or replace it with --overwrite")
    if resume and not overwrite:
        if not has_ckpt:
            if has_model:
                raise ConfigError(f"--resume: {out} holds a finished model whose checkpoints were removed; "
                                  f"use --keep-checkpoints to be able to continue a finished run, or --overwrite "
                                  f"to train again")
            return None, has_run  # nothing completed yet: start (again) from the beginning
        ckpt = torch.load(last, map_location="cpu", weights_only=False)
        saved = ckpt["config"]
        now = config.to_json()
        diff = sorted(k for k in set(saved) | set(now)
                      if k not in RUNTIME_FIELDS and _norm(saved.get(k)) != _norm(now.get(k)))
        if diff:
            raise ConfigError(f"--resume: {out} was started with other settings ({', '.join(diff)}: "
                              + "; ".join(f"{k} was {saved.get(k)!r}, now {now.get(k)!r}" for k in diff)
                              + "); resume with the same options, or start over with --overwrite")
        return ckpt, False
    if has_run and not overwrite:
        raise ConfigError(f"{out} already holds a fine-tuning run; continue it with --resume, choose another "
                          f"--out, or start over with --overwrite")
    return None, has_run


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def _finetune(config: FinetuneConfig, d: Dist, device: torch.device, *, resume: bool, overwrite: bool,
              progress: bool, on_epoch_end) -> dict:
    from conilium.evaluate.thresholds import tune_run

    from .train import write_run_outputs

    out = Path(config.out)
    if config.threads:
        torch.set_num_threads(int(config.threads))
    prep = prepare(config)
    ckpt, clear, problem = None, False, None
    if d.main:
        try:
            ckpt, clear = _check_out_dir(out, config, resume, overwrite)
        except ConfigError as e:
            problem = str(e)
    problem, resuming = d.broadcast((problem, ckpt is not None))
    if problem:
        raise ConfigError(problem)
    if resuming and not d.main:
        ckpt = torch.load(_checkpoint_paths(out)[0], map_location="cpu", weights_only=False)
    if d.main and not resuming:
        if clear:
            for p in (MODEL_FILE, "metrics.json", HEAD_FILE, "config.json"):
                (out / p).unlink(missing_ok=True)
            for p in (CHECKPOINT_DIR, "predictions", UPSTREAM_DIR, TUNED_DIR):
                shutil.rmtree(out / p, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
    d.barrier()

    # ---- the model: upstream, head, starting point
    random_root = out / CHECKPOINT_DIR / "random-init"
    torch.manual_seed(config.seed)
    if config.random_init and d.main:
        load_upstream(config.upstream, random_init=True, seed=config.random_init_seed, random_root=random_root,
                      config_overrides=upstream_overrides(config))
    d.barrier()
    upstream, identity = load_upstream(config.upstream, random_init=config.random_init,
                                       seed=config.random_init_seed, random_root=random_root,
                                       revision=config.revision, config_overrides=upstream_overrides(config))
    upstream.freeze_feature_encoder()
    cfg = upstream.config
    spec_augment = getattr(cfg, "apply_spec_augment", True) and (
        getattr(cfg, "mask_time_prob", 0) > 0 or getattr(cfg, "mask_feature_prob", 0) > 0)
    if getattr(upstream, "masked_spec_embed", None) is not None and not spec_augment:
        upstream.masked_spec_embed.requires_grad_(False)  # SpecAugment off: the mask vector is unused
    norm_mode, norm_stats, max_seconds = config.normalize, None, config.max_seconds
    start_from = {"kind": "random-init upstream" if config.random_init else "pretrained upstream"}
    torch.manual_seed(config.seed)
    if config.init_head:
        head, layers, settings = head_from_run(config.init_head, upstream, identity)
        start_from = {"kind": "train-head run", "path": str(Path(config.init_head).resolve()),
                      "head_loss": settings.get("loss"), "head_labels": settings.get("labels")}
        if progress and settings.get("loss") not in (None, config.loss):
            tqdm.write(f"note: the head was trained with --loss {settings.get('loss')}, fine-tuning uses "
                       f"--loss {config.loss}")
        if settings.get("normalize") in NORMALIZE_MODES:
            norm_mode = settings["normalize"]
            norm_stats = settings.get("normalize_stats") if norm_mode == "global" else None
        if settings.get("max_seconds"):
            max_seconds = float(settings["max_seconds"])
    elif config.baseline_ckpt:
        from .baseline import load_baseline

        head, layers, base_info = load_baseline(config.baseline_ckpt, upstream)
        start_from = {"kind": "challenge baseline", **base_info}
        if base_info.get("normalize_stats") is not None and config.normalize == "global":
            norm_stats = base_info["normalize_stats"]
    else:
        head = EmotionHead(default_head_config(upstream, config))
        layers = None
    model = EndToEndModel(upstream, head, layers)
    if config.gradient_checkpointing:
        enable_checkpointing(upstream)
    model.to(device)

    # ---- data
    train_paths = [prep.audio_dir / c.name for c in prep.train]
    durations = np.array([min(c.duration or 0.0, max_seconds) for c in prep.train])
    train_ds = AudioClips(train_paths, [c.name for c in prep.train], max_seconds=max_seconds,
                          normalize_mode=norm_mode, stats=None, durations=durations)
    if ckpt is not None:
        norm_stats = ckpt["normalize"]["stats"]
    elif norm_mode == "global" and norm_stats is None:
        norm_stats = d.broadcast(_train_audio_stats(prep, config, max_seconds, progress) if d.main else None)
    train_ds.stats = norm_stats
    if config.augment_noise:
        train_ds.noise = NoiseMixer(config.augment_noise, fraction=config.augment_fraction,
                                    snr_db=config.snr_db, seed=config.seed)
    draw = balanced_weights([c.emo_class for c in prep.train]) if config.sampler == "balanced" else None
    targets = torch.as_tensor(prep.train_targets)
    weights = None if prep.weights is None else torch.as_tensor(prep.weights, device=device)
    fn = loss_fn(config.loss)

    eval_sets: Dict[str, Tuple[AudioClips, List[Clip]]] = {}
    for split, clips in prep.splits.items():
        ds = AudioClips([prep.audio_dir / c.name for c in clips], [c.name for c in clips], max_seconds=max_seconds,
                        normalize_mode=norm_mode, stats=norm_stats, durations=[c.duration or 0.0 for c in clips])
        eval_sets[split] = (ds, clips)
    dev_ds, dev_clips = eval_sets[config.dev_split]

    # ---- optimiser and state
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    history: List[dict] = []
    best = {"f1_macro": -1.0, "epoch": 0}
    first_epoch = 1
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        history = list(ckpt["history"])
        best = dict(ckpt["best"])
        first_epoch = int(ckpt["sampler"]["next_epoch"])
        rng = ckpt.get("rng", {}).get(d.rank)
        if rng is not None:
            _set_rng_state(rng)
    train_model: nn.Module = model
    if d.on:
        find_unused = bool(getattr(upstream.config, "layerdrop", 0.0))  # LayerDrop leaves layers unused
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=find_unused)

    def dev_scores() -> Tuple[dict, Dict[str, np.ndarray]]:
        return _evaluate_split(model, dev_ds, dev_clips, config, d, device, progress, f"scoring {config.dev_split}")

    if d.main:
        write_json(out / "config.json", {**config.to_json(), "kind": "finetune", "upstream_identity": identity,
                                         "start_from": start_from, "normalize_stats": norm_stats,
                                         "world_size": d.world, "max_seconds_used": max_seconds,
                                         "normalize_used": norm_mode})
    last_path, best_path = _checkpoint_paths(out)
    since_best = sum(1 for _ in _epochs_since_best(history, best))
    t_start = time.time()
    min_batch = d.world * config.grad_accum
    epoch = first_epoch - 1
    for epoch in range(first_epoch, config.epochs + 1):
        if config.patience is not None and since_best >= config.patience:
            break
        t0 = time.time()
        _seed_epoch(config.seed, epoch, d.rank)
        batches = epoch_batches(durations, batch_size=config.batch_size, seed=config.seed, epoch=epoch,
                                bucket_batches=config.bucket_batches, draw_weights=draw, min_batch=min_batch)
        plan = [rank_micro_batches(b, durations, rank=d.rank, world=d.world, grad_accum=config.grad_accum)
                for b in batches]
        flat = [[(i, epoch) for i in mb] for parts in plan for mb in parts]
        loader = DataLoader(train_ds, batch_sampler=flat, collate_fn=collate_waves,
                            num_workers=config.num_workers, generator=torch.Generator().manual_seed(epoch))
        it = iter(loader)
        model.train()
        loss_sum, seen = 0.0, 0
        bar = tqdm(total=len(batches), desc=f"epoch {epoch}/{config.epochs}", unit="step", disable=not progress,
                   leave=False)
        for step, (gbatch, parts) in enumerate(zip(batches, plan), start=1):
            n_global = len(gbatch)
            for k, _ in enumerate(parts):
                waves, lengths, idx, errors = next(it)
                if errors:
                    raise ConiliumError(f"training stopped: {errors[0]}")
                y = targets[idx].to(device)
                sync = contextlib.nullcontext() if (k == len(parts) - 1 or not d.on) else train_model.no_sync()
                with sync:
                    with _autocast(device, config.precision):
                        logits = train_model(waves.to(device, non_blocking=True), lengths.to(device))
                    loss = fn(logits.float(), y, weights)
                    bad = d.all_sum([0.0 if torch.isfinite(loss) else 1.0])[0] if d.on else float(
                        not torch.isfinite(loss))
                    if bad:
                        bar.close()
                        raise FinetuneError(
                            f"training stopped: the {config.loss} loss is not finite at epoch {epoch}, step {step} "
                            f"(lr {config.lr}); lower --lr, or check the audio of clips "
                            f"{', '.join(train_ds.names[i] for i in idx[:5])}")
                    (loss * (len(idx) * d.world / n_global)).backward()
                loss_sum += float(loss.detach()) * len(idx)
                seen += len(idx)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / max(seen, 1):.4f}")
        bar.close()
        loss_sum, seen = d.all_sum([loss_sum, seen])
        dev, _ = dev_scores()
        record = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1), "dev_f1_macro": dev["f1_macro"],
                  "dev_f1_micro": dev["f1_micro"], "seconds": round(time.time() - t0, 3)}
        history.append(record)
        improved = dev["f1_macro"] > best["f1_macro"]
        if improved:
            best = {"f1_macro": dev["f1_macro"], "epoch": epoch}
            since_best = 0
        else:
            since_best += 1
        if d.main:
            if improved:
                _save({"model": _cpu_state(model), "epoch": epoch}, best_path)
            rng_all = d.gather(_rng_state())
            _save({"config": config.to_json(), "model": _cpu_state(model), "optimizer": optimizer.state_dict(),
                   "history": history, "best": best, "rng": dict(enumerate(rng_all)),
                   "sampler": {"seed": config.seed, "next_epoch": epoch + 1, "bucket_batches": config.bucket_batches,
                               "batch_size": config.batch_size},
                   "normalize": {"mode": norm_mode, "stats": norm_stats}}, last_path)
        else:
            d.gather(_rng_state())
        d.barrier()
        if progress:
            tqdm.write(f"epoch {epoch}: train loss {record['train_loss']:.4f}, {config.dev_split} macro-F1 "
                       f"{dev['f1_macro']:.4f} (best {best['f1_macro']:.4f} at epoch {best['epoch']}), "
                       f"{record['seconds']:.1f} s")
        if on_epoch_end is not None:
            on_epoch_end(dict(record))
    train_seconds = time.time() - t_start

    # ---- the best epoch: predictions of every split, thresholds, the model directory
    if not best_path.is_file():
        raise FinetuneError(f"{out}: no best checkpoint ({best_path}) — no epoch was completed")
    model.load_state_dict(torch.load(best_path, map_location="cpu", weights_only=True)["model"])
    split_predictions = {}
    for split, (ds, clips) in eval_sets.items():
        _, probs = _evaluate_split(model, ds, clips, config, d, device, progress, f"predicting {split}")
        split_predictions[split] = ([c.name for c in clips], probs, [c.emo_class for c in clips])
    if not d.main:
        d.barrier()
        return {}
    dev_refs = split_predictions[config.dev_split][2]
    training = {
        "clips": len(prep.train),
        "class_counts": dict(zip(CLASSES, class_counts([c.emo_class for c in prep.train]).tolist())),
        "dropped": prep.train_counts,
        "class_weights": None if prep.weights is None else dict(zip(CLASSES, prep.weights.tolist())),
        "sampler": config.sampler,
        "epochs_run": len(history),
        "seconds_this_session": round(train_seconds, 3),
        "world_size": d.world,
        "device": str(device),
        "start_from": start_from,
        "augment_noise": config.augment_noise,
    }
    metrics = write_run_outputs(out, split_predictions, history, best["epoch"], dev_split=config.dev_split,
                                extra={"training": training, "kind": "finetune"})
    offsets = np.zeros(len(CLASSES))
    thresholds = None
    if config.tune_thresholds:
        n_scoreable = sum(1 for r in dev_refs if r in CLASSES)
        k = min(5, n_scoreable)
        tuned_metrics = tune_run(out, out / TUNED_DIR, tune_split=config.dev_split, k=k if k >= 2 else 0,
                                 seed=config.seed, overwrite=True)
        offsets = np.array([tuned_metrics["offsets"][c] for c in CLASSES])
        cv = tuned_metrics.get("cross_validation")
        thresholds = {
            "offsets": tuned_metrics["offsets"],
            "tune_split": config.dev_split,
            "f1_macro_untuned": tuned_metrics["untuned"][config.dev_split]["f1_macro"],
            "f1_macro_tuned": tuned_metrics["splits"][config.dev_split]["f1_macro"],
            "f1_macro_cross_validated": cv["f1_macro_pooled"] if cv else None,
            "tuned_run": TUNED_DIR,
        }
        metrics["thresholds"] = thresholds
        write_json(out / "metrics.json", metrics)
    save_model_dir(out, model, {
        "max_seconds": max_seconds,
        "normalize": {"mode": norm_mode, "stats": norm_stats},
        "offsets": {c: float(o) for c, o in zip(CLASSES, offsets)},
        "thresholds": thresholds,
        "loss": config.loss,
        "labels": config.labels,
        "upstream": identity,
        "best_epoch": best["epoch"],
        "dev_f1_macro": best["f1_macro"],
        "start_from": start_from,
    })
    if not config.keep_checkpoints:
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    d.barrier()
    return metrics


def _train_audio_stats(prep: Prepared, config: FinetuneConfig, max_seconds: float, progress: bool) -> dict:
    """Global mean/std of the Train audio, exactly as extract-features computes them."""
    from conilium.extract.extract import ExtractConfig, global_stats

    ec = ExtractConfig(upstream=config.upstream, max_seconds=max_seconds, normalize="global")
    stats, _ = global_stats(prep.corpus, ec, skip_bad=config.skip_bad, workers=max(1, config.num_workers),
                            verbose=progress)
    return stats


def _epochs_since_best(history: Sequence[dict], best: Mapping):
    for r in history:
        if r["epoch"] > best.get("epoch", 0):
            yield r


def _evaluate_split(model: EndToEndModel, ds: AudioClips, clips: Sequence[Clip], config: FinetuneConfig, d: Dist,
                    device: torch.device, progress: bool, desc: str) -> Tuple[dict, np.ndarray]:
    """Scores of one split's clips, computed in shares by every rank; (dev scores or {}, probs)."""
    from conilium.evaluate.metrics import score

    order = sorted(range(len(clips)), key=lambda i: (ds.durations[i], i))
    mine = order[d.rank :: d.world]
    part = predict_clips(model, ds, mine, config.loss, device=device, batch_size=config.eval_batch_size,
                         precision=config.precision, num_workers=config.num_workers, progress=progress, desc=desc)
    merged: Dict[int, np.ndarray] = {}
    for piece in d.gather(part):
        merged.update(piece)
    probs = np.stack([merged[i] for i in range(len(clips))]) if clips else np.zeros((0, len(CLASSES)))
    refs = [c.emo_class for c in clips]
    scores = score(refs, [CLASSES[i] for i in probs.argmax(axis=1)]) if any(r in CLASSES for r in refs) else {}
    return scores, probs

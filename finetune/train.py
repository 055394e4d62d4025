"""finetune-best: the upstream and an attentive head trained end to end on the audio.

>>> from conilium.finetune import FinetuneConfig, finetune
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
* **LoRA** — with ``lora_rank`` the upstream is frozen once the starting point is loaded
  and peft's LoRA adapters are put beside the chosen linear layers of its transformer
  (:mod:`conilium.extract.lora`); the adapters and the head are trained, the rest of the
  step is the same. The model directory keeps the base upstream and the adapter apart.
* **resume** — after each epoch ``checkpoints/last.pt`` (model, optimizer, RNG and
  sampler state, history) is replaced atomically; ``resume=True`` continues from it and
  ends with the same model as an uninterrupted run.
* **one writer** — rank 0 holds a lock on ``out`` (:mod:`conilium.locking`) for the
  whole run: a second finetune-best on the same directory stops with a message naming
  the first (or waits, ``wait_for_lock``). ``out`` is checked for being writable, and
  for room for the checkpoints, before training; a failure to write (full disk,
  read-only) is an :class:`~conilium.errors.OutputError` naming the file on every rank,
  and leaves no ``metrics.json`` nor ``conilium_model.json`` behind.

A run goes through four steps a reader can follow: :func:`prepare` (the corpus, the
targets, every check before any training), :func:`build` (upstream, head and starting
point, :mod:`conilium.finetune.warmstart`), :func:`fit` (the epochs) and :func:`export`
(the best epoch's predictions of every split and the model directory, see
:func:`~conilium.finetune.model.save_model_dir`). Decision thresholds are tuned after
that by the caller (``finetune-best`` chains ``conilium-eval tune-thresholds`` and
:func:`~conilium.finetune.model.set_decision_offsets`).
"""

from __future__ import annotations

import contextlib
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from conilium import CLASSES
from conilium.audio import NoiseMixer, SignalPath, global_stats
from conilium.corpus import Clip, Corpus, audio_dir, load_corpus
from conilium import errors as _errors
from conilium.errors import ConfigError, ConiliumError
from conilium.extract.encoder import freeze_front_end
from conilium.extract.lora import add_adapters, check_lora_modules, parse_lora_layers
from conilium.extract.upstreams import check_upstream, load_upstream
from conilium.training.losses import loss_fn, uses_weights
from conilium.training.samplers import balanced_weights
from conilium.locking import DirectoryLock, lock_directory
from conilium.metrics import score
from conilium.runs import CONFIG, METRICS, PRED_DIR, write_run_outputs
from conilium.runtime import Dist, autocast, init_distributed
from conilium.targets import class_counts, class_weights, training_set
from conilium.util import atomic_path, check_writable, output_errors, read_json, write_json

from .config import RUNTIME_FIELDS, FinetuneConfig, FinetuneError, check_config, precision_dtype
from .data import AudioClips, collate_waves, epoch_batches, rank_micro_batches
from .model import (ADAPTER_DIR, HEAD_FILE, MODEL_FILE, UPSTREAM_DIR, EndToEndModel, enable_checkpointing,
                    save_model_dir, upstream_overrides)
from .predict import min_samples, predict_clips
from .warmstart import build_model

CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"
TUNED_DIR = "tuned"


# ----------------------------------------------------------------------------- prepare

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


# ----------------------------------------------------------------------------- fit

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


def _checkpoint_paths(out: Path) -> Tuple[Path, Path]:
    return out / CHECKPOINT_DIR / LAST, out / CHECKPOINT_DIR / BEST


def _save(obj, path: Path) -> None:
    with atomic_path(path, suffix=".pt.tmp") as tmp:
        torch.save(obj, tmp)


def _cpu_state(module: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def settle_family_settings(config: FinetuneConfig) -> FinetuneConfig:
    """``config`` with the settings left to the upstream's family settled: ``normalize`` "auto"
    (none for a Whisper encoder, global otherwise) and ``whisper_input`` ("30s" for Whisper when
    not given); a ConfigError for a setting the family cannot take — the rules of extraction
    (:func:`conilium.extract.plan.resolve_for_family`). The upstream's family is read from the
    registry or its config.json, without loading weights."""
    from conilium.extract.plan import resolve_for_family
    from conilium.extract.upstreams import upstream_family

    family = upstream_family(config.upstream, random_init=config.random_init, revision=config.revision)
    return resolve_for_family(config, family == "whisper")


def finetune(config: FinetuneConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
             on_epoch_end: Optional[Callable[[dict], None]] = None, wait_for_lock=False) -> dict:
    """Fine-tune end to end and write the model directory ``config.out``; return its metrics.

    Works alone or as one process of ``torchrun`` (each rank calls it with the same
    config). ``resume`` continues from ``out/checkpoints/last.pt``; ``overwrite`` starts
    over in an ``out`` that holds a run. ``on_epoch_end(record)`` is called on every rank
    after each epoch's checkpoint is written (record: epoch, train_loss, dev scores).
    Ranks other than 0 return ``{}``. Another process writing ``out`` is a
    :class:`~conilium.errors.LockError` (``wait_for_lock``: True, or seconds, to wait for it).
    """
    d, device = init_distributed(config.device)
    lock: Optional[DirectoryLock] = None
    try:
        if config.threads:
            torch.set_num_threads(int(config.threads))
        prep = prepare(config)
        # an upstream that cannot be loaded here fails in seconds, before anything is written
        check_upstream(config.upstream, random_init=config.random_init, revision=config.revision)
        config = settle_family_settings(config)
        ckpt, lock = _claim_out_dir(Path(config.out), config, d, resume=resume, overwrite=overwrite,
                                    wait_for_lock=wait_for_lock, progress=progress)
        progress = progress and d.main
        built = build(config, prep, d, device, ckpt, progress=progress)
        _on_main(d, lambda: check_writable(config.out, what="finetune-best model directory",
                                           need_bytes=_output_bytes(built.model, resuming=ckpt is not None)))
        history, best, seconds = fit(config, built, d, device, ckpt, progress=progress, on_epoch_end=on_epoch_end)
        return export(config, prep, built, d, device, history, best, seconds, progress=progress)
    finally:
        if lock is not None:
            lock.release()
        d.close(clean=False)


def _output_bytes(model: nn.Module, *, resuming: bool) -> int:
    """About the most bytes the checkpoints and the model directory take on disk at once:
    best.pt and last.pt (the weights, and the optimizer's two moments of the trained ones)
    with a new last.pt being written beside them, then the model directory. A resumed run
    already has its checkpoints."""
    every = sum(p.numel() for p in model.parameters()) * 4
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad) * 4
    if resuming:
        return 2 * every + 2 * trained + (1 << 20)
    return 3 * every + 4 * trained + (1 << 20)


def _on_main(d: Dist, fn: Callable[[], object]):
    """Run ``fn`` on rank 0 only and return what it returns there (None elsewhere); a
    ConiliumError it raises (a full disk, say) is raised on every rank, so that no rank waits
    for rank 0 forever. Synchronises the ranks."""
    error: Optional[ConiliumError] = None
    result = None
    if d.main:
        try:
            result = fn()
        except ConiliumError as e:
            error = e
    problem = d.broadcast(None if error is None else (type(error).__name__, str(error)))
    if error is not None:
        raise error
    if problem is not None:
        raise _remote_error(*problem)
    return result


def _remote_error(kind: str, message: str) -> ConiliumError:
    """An exception of rank 0's error class (by name) with its message, for the other ranks."""
    cls = getattr(_errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, ConiliumError):
        try:
            e = cls.__new__(cls)
            Exception.__init__(e, message)
            return e
        except TypeError:  # pragma: no cover
            pass
    return ConiliumError(message)


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
        saved = FinetuneConfig.from_dict(ckpt["config"]).to_json()  # options added since: their defaults
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


def _claim_out_dir(out: Path, config: FinetuneConfig, d: Dist, *, resume: bool, overwrite: bool,
                   wait_for_lock=False, progress: bool = False) -> Tuple[Optional[dict], Optional[DirectoryLock]]:
    """Lock ``out`` on rank 0, check it (writable; clear it when starting over) and return the
    checkpoint to resume from and the lock (None on the other ranks)."""
    ckpt, clear, problem, lock = None, False, None, None
    error: Optional[ConiliumError] = None
    if d.main:
        on_wait = (lambda m: tqdm.write(m)) if progress else None
        try:
            lock = lock_directory(out, what="finetune-best model directory", wait=wait_for_lock,
                                  on_wait=on_wait).acquire()
            check_writable(out, what="finetune-best model directory")
            ckpt, clear = _check_out_dir(out, config, resume, overwrite)
        except ConiliumError as e:
            error, problem = e, (type(e).__name__, str(e))
            if lock is not None:
                lock.release()
                lock = None
    problem, resuming = d.broadcast((problem, ckpt is not None))
    if error is not None:
        raise error
    if problem:
        raise _remote_error(*problem)
    if resuming and not d.main:
        ckpt = torch.load(_checkpoint_paths(out)[0], map_location="cpu", weights_only=False)
    if d.main and not resuming:
        if clear:
            for p in (MODEL_FILE, METRICS, HEAD_FILE, CONFIG):
                (out / p).unlink(missing_ok=True)
            for p in (CHECKPOINT_DIR, PRED_DIR, UPSTREAM_DIR, ADAPTER_DIR, TUNED_DIR):
                shutil.rmtree(out / p, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
    d.barrier()
    return ckpt, lock


# ----------------------------------------------------------------------------- build

@dataclass
class Built:
    """The model and the data of a run, ready to train."""

    model: EndToEndModel
    identity: dict
    start_from: dict
    signal: SignalPath  # truncation and normalisation every split goes through
    train: AudioClips
    durations: np.ndarray  # truncated training clip durations (the batch plan sorts by them)
    targets: torch.Tensor
    weights: Optional[torch.Tensor]
    draw: Optional[np.ndarray]  # class-balanced sampler's draw weights
    eval_sets: Dict[str, Tuple[AudioClips, List[Clip]]]  # dev first
    lora: Optional[dict] = None  # the LoRA adapters' description (:func:`~conilium.extract.lora.add_adapters`)


def build(config: FinetuneConfig, prep: Prepared, d: Dist, device: torch.device, ckpt: Optional[dict], *,
          progress: bool) -> Built:
    """The upstream, the head and its starting point, the normalisation and the datasets."""
    out = Path(config.out)
    random_root = out / CHECKPOINT_DIR / "random-init"
    torch.manual_seed(config.seed)
    if config.random_init:  # rank 0 makes the random weights (in out/checkpoints), the others wait
        def make_random_weights():
            with output_errors(random_root, where=out):
                load_upstream(config.upstream, random_init=True, seed=config.random_init_seed,
                              random_root=random_root, config_overrides=upstream_overrides(config))

        _on_main(d, make_random_weights)
    else:
        d.barrier()
    upstream, identity = load_upstream(config.upstream, random_init=config.random_init,
                                       seed=config.random_init_seed, random_root=random_root,
                                       revision=config.revision, config_overrides=upstream_overrides(config))
    freeze_front_end(upstream)  # the CNN feature encoder (Whisper: its two convolutions)
    cfg = upstream.config
    spec_augment = getattr(cfg, "apply_spec_augment", True) and (
        getattr(cfg, "mask_time_prob", 0) > 0 or getattr(cfg, "mask_feature_prob", 0) > 0)
    if getattr(upstream, "masked_spec_embed", None) is not None and not spec_augment:
        upstream.masked_spec_embed.requires_grad_(False)  # SpecAugment off: the mask vector is unused
    torch.manual_seed(config.seed)
    start = build_model(config, upstream, identity)
    if progress and start.note:
        tqdm.write(start.note)
    model = start.model
    lora = None
    if config.lora_rank is not None:
        # after the starting point is loaded (the baseline's weights become the frozen base)
        torch.manual_seed(config.seed)
        lora = add_adapters(upstream, rank=config.lora_rank, alpha=config.lora_alpha,
                            dropout=config.lora_dropout or 0.0, layers=parse_lora_layers(config.lora_layers),
                            modules=check_lora_modules(config.lora_modules))
        if progress:
            trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
            total = sum(p.numel() for p in model.parameters())
            tqdm.write(f"LoRA rank {lora['rank']} (alpha {lora['alpha']:g}) on {lora['targets']} linear layers: "
                       f"{trained:,} of {total:,} parameters trained (adapters and head)")
    if config.gradient_checkpointing:
        enable_checkpointing(upstream)
    model.to(device)

    max_seconds, norm_stats = start.max_seconds, start.normalize_stats
    if ckpt is not None:
        norm_stats = ckpt["normalize"]["stats"]
    elif start.normalize == "global" and norm_stats is None:
        norm_stats = d.broadcast(_train_audio_stats(prep, config, max_seconds, progress) if d.main else None)
    signal = SignalPath(max_seconds=max_seconds, normalize=start.normalize, stats=norm_stats,
                        rescale_loud=config.rescale_loud)
    shortest = min_samples(model)
    durations = np.array([min(c.duration or 0.0, max_seconds) for c in prep.train])
    noise = None
    if config.augment_noise:
        noise = NoiseMixer(config.augment_noise, fraction=config.augment_fraction, snr_db=config.snr_db,
                           seed=config.seed)
    train = AudioClips([prep.audio_dir / c.name for c in prep.train], [c.name for c in prep.train], signal=signal,
                       noise=noise, durations=durations, min_samples=shortest)
    eval_sets: Dict[str, Tuple[AudioClips, List[Clip]]] = {}
    for split, clips in prep.splits.items():
        ds = AudioClips([prep.audio_dir / c.name for c in clips], [c.name for c in clips], signal=signal,
                        durations=[c.duration or 0.0 for c in clips], min_samples=shortest)
        eval_sets[split] = (ds, clips)
    draw = balanced_weights([c.emo_class for c in prep.train]) if config.sampler == "balanced" else None
    weights = None if prep.weights is None else torch.as_tensor(prep.weights, device=device)
    return Built(model, identity, start.info, signal, train, durations, torch.as_tensor(prep.train_targets), weights,
                 draw, eval_sets, lora)


# ----------------------------------------------------------------------------- fit

def fit(config: FinetuneConfig, b: Built, d: Dist, device: torch.device, ckpt: Optional[dict], *, progress: bool,
        on_epoch_end: Optional[Callable[[dict], None]] = None) -> Tuple[List[dict], dict, float]:
    """The epochs: train, score the development split, keep the best and the last checkpoint.

    Returns the history (one record per epoch, earlier sessions' included), the best
    epoch ``{"f1_macro", "epoch"}`` and the seconds this session trained.
    """
    out = Path(config.out)
    model = b.model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    fn = loss_fn(config.loss)
    dtype = precision_dtype(config.precision, device)
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
        find_unused = bool(getattr(model.upstream.config, "layerdrop", 0.0))  # LayerDrop leaves layers unused
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=find_unused)
    dev_ds, dev_clips = b.eval_sets[config.dev_split]

    _on_main(d, lambda: write_json(out / CONFIG, {
        **config.to_json(), "kind": "finetune", "upstream_identity": b.identity, "start_from": b.start_from,
        "normalize_stats": b.signal.stats, "world_size": d.world, "max_seconds_used": b.signal.max_seconds,
        "normalize_used": b.signal.normalize}))
    last_path, best_path = _checkpoint_paths(out)
    since_best = sum(1 for _ in _epochs_since_best(history, best))
    min_batch = d.world * config.grad_accum
    t_start = time.time()
    for epoch in range(first_epoch, config.epochs + 1):
        if config.patience is not None and since_best >= config.patience:
            break
        t0 = time.time()
        _seed_epoch(config.seed, epoch, d.rank)
        batches = epoch_batches(b.durations, batch_size=config.batch_size, seed=config.seed, epoch=epoch,
                                bucket_batches=config.bucket_batches, draw_weights=b.draw, min_batch=min_batch)
        plan = [rank_micro_batches(g, b.durations, rank=d.rank, world=d.world, grad_accum=config.grad_accum)
                for g in batches]
        flat = [[(i, epoch) for i in mb] for parts in plan for mb in parts]
        loader = DataLoader(b.train, batch_sampler=flat, collate_fn=collate_waves,
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
                    raise ConiliumError(f"training stopped: {errors[0][1]}")
                y = b.targets[idx].to(device)
                sync = contextlib.nullcontext() if (k == len(parts) - 1 or not d.on) else train_model.no_sync()
                with sync:
                    with autocast(device, dtype):
                        logits = train_model(waves.to(device, non_blocking=True), lengths.to(device))
                    loss = fn(logits.float(), y, b.weights)
                    bad = d.all_sum([0.0 if torch.isfinite(loss) else 1.0])[0] if d.on else float(
                        not torch.isfinite(loss))
                    if bad:
                        bar.close()
                        raise FinetuneError(
                            f"training stopped: the {config.loss} loss is not finite at epoch {epoch}, step {step} "
                            f"(lr {config.lr}); lower --lr, or check the audio of clips "
                            f"{', '.join(b.train.names[i] for i in idx[:5])}")
                    (loss * (len(idx) * d.world / n_global)).backward()
                loss_sum += float(loss.detach()) * len(idx)
                seen += len(idx)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / max(seen, 1):.4f}")
        bar.close()
        loss_sum, seen = d.all_sum([loss_sum, seen])
        dev, _ = _evaluate_split(model, dev_ds, dev_clips, config, d, device, progress,
                                 f"scoring {config.dev_split}")
        record = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1), "dev_f1_macro": dev["f1_macro"],
                  "dev_f1_micro": dev["f1_micro"], "seconds": round(time.time() - t0, 3)}
        history.append(record)
        improved = dev["f1_macro"] > best["f1_macro"]
        if improved:
            best = {"f1_macro": dev["f1_macro"], "epoch": epoch}
            since_best = 0
        else:
            since_best += 1
        rng_all = d.gather(_rng_state())

        def save_checkpoints():
            if improved:
                _save({"model": _cpu_state(model), "epoch": epoch}, best_path)
            _save({"config": config.to_json(), "model": _cpu_state(model), "optimizer": optimizer.state_dict(),
                   "history": history, "best": best, "rng": dict(enumerate(rng_all)),
                   "sampler": {"seed": config.seed, "next_epoch": epoch + 1, "bucket_batches": config.bucket_batches,
                               "batch_size": config.batch_size},
                   "normalize": {"mode": b.signal.normalize, "stats": b.signal.stats}}, last_path)

        _on_main(d, save_checkpoints)  # in place of a barrier: a failure to save stops every rank
        if progress:
            tqdm.write(f"epoch {epoch}: train loss {record['train_loss']:.4f}, {config.dev_split} macro-F1 "
                       f"{dev['f1_macro']:.4f} (best {best['f1_macro']:.4f} at epoch {best['epoch']}), "
                       f"{record['seconds']:.1f} s")
        if on_epoch_end is not None:
            on_epoch_end(dict(record))
    if not best_path.is_file():
        raise FinetuneError(f"{out}: no best checkpoint ({best_path}) — no epoch was completed")
    return history, best, time.time() - t_start


# ----------------------------------------------------------------------------- export

def export(config: FinetuneConfig, prep: Prepared, b: Built, d: Dist, device: torch.device, history: List[dict],
           best: dict, train_seconds: float, *, progress: bool) -> dict:
    """The best epoch's predictions of every split, metrics.json and the model directory."""
    out = Path(config.out)
    model = b.model
    _, best_path = _checkpoint_paths(out)
    model.load_state_dict(torch.load(best_path, map_location="cpu", weights_only=True)["model"])
    split_predictions = {}
    for split, (ds, clips) in b.eval_sets.items():
        _, probs = _evaluate_split(model, ds, clips, config, d, device, progress, f"predicting {split}")
        split_predictions[split] = ([c.name for c in clips], probs, [c.emo_class for c in clips])
    # rank 0 writes; the other ranks wait for it, and fail with it
    metrics = _on_main(d, lambda: _write_model_dir(config, prep, b, d, device, history, best, train_seconds,
                                                   split_predictions, out, model))
    return metrics if d.main else {}


def _write_model_dir(config: FinetuneConfig, prep: Prepared, b: Built, d: Dist, device: torch.device,
                     history: List[dict], best: dict, train_seconds: float, split_predictions: dict, out: Path,
                     model: EndToEndModel) -> dict:
    """Rank 0: predictions, metrics.json and the model directory; on a failure to write, none of
    them is left (no metrics.json, no conilium_model.json; the checkpoints stay, so that
    ``--resume`` writes them again once the problem is solved)."""
    try:
        return _write_outputs(config, prep, b, d, device, history, best, train_seconds, split_predictions, out,
                              model)
    except BaseException as e:
        for name in (METRICS, MODEL_FILE, HEAD_FILE):
            with contextlib.suppress(OSError):
                (out / name).unlink(missing_ok=True)
        for name in (PRED_DIR, UPSTREAM_DIR, ADAPTER_DIR):
            shutil.rmtree(out / name, ignore_errors=True)
        if isinstance(e, _errors.OutputError) and (out / CHECKPOINT_DIR / LAST).is_file():
            raise _errors.OutputError(e.path, e.reason, (e.hint + "; " if e.hint else "") +
                                      f"the checkpoints in {out / CHECKPOINT_DIR} are kept: finetune-best "
                                      f"--resume then writes the model directory without training again") from e
        raise


def _write_outputs(config: FinetuneConfig, prep: Prepared, b: Built, d: Dist, device: torch.device,
                   history: List[dict], best: dict, train_seconds: float, split_predictions: dict, out: Path,
                   model: EndToEndModel) -> dict:
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
        "start_from": b.start_from,
        "augment_noise": config.augment_noise,
    }
    if b.lora:
        training["lora"] = dict(b.lora, trainable_parameters=sum(p.numel() for p in model.parameters()
                                                                  if p.requires_grad))
    metrics = write_run_outputs(out, split_predictions, history, best["epoch"], dev_split=config.dev_split,
                                extra={"training": training, "kind": "finetune"})
    save_model_dir(out, model, {
        "max_seconds": b.signal.max_seconds,
        "normalize": {"mode": b.signal.normalize, "stats": b.signal.stats},
        "rescale_loud": b.signal.rescale_loud,
        "offsets": {c: 0.0 for c in CLASSES},
        "thresholds": None,
        "loss": config.loss,
        "labels": config.labels,
        "upstream": b.identity,
        "best_epoch": best["epoch"],
        "dev_f1_macro": best["f1_macro"],
        "start_from": b.start_from,
        "lora": b.lora,
    })
    if not config.keep_checkpoints:
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    return metrics


def _train_audio_stats(prep: Prepared, config: FinetuneConfig, max_seconds: float, progress: bool) -> dict:
    """Global mean/std of the Train audio, exactly as extract-features computes them."""
    stats, bad = global_stats(prep.corpus, max_seconds=max_seconds, skip_bad=config.skip_bad,
                              workers=max(1, config.num_workers), verbose=progress, rescale_loud=config.rescale_loud)
    # --skip-bad leaves out the clips it finds unreadable when the corpus is loaded; one that only
    # decoding refuses (e.g. float audio at integer scale) would stop training mid-epoch: say so now
    training = {c.name for c in prep.train}
    refused = [(name, reason) for name, reason in bad if name in training]
    if refused:
        names = ", ".join(n for n, _ in refused[:5]) + (" …" if len(refused) > 5 else "")
        raise ConfigError(f"{refused[0][1]} — {len(refused)} training clip(s) cannot be used ({names}); "
                          f"--skip-bad leaves out only files unreadable when the corpus is loaded: fix these "
                          f"files or remove them from the corpus")
    return stats


def _epochs_since_best(history: Sequence[dict], best: Mapping):
    for r in history:
        if r["epoch"] > best.get("epoch", 0):
            yield r


def _evaluate_split(model: EndToEndModel, ds: AudioClips, clips: Sequence[Clip], config: FinetuneConfig, d: Dist,
                    device: torch.device, progress: bool, desc: str) -> Tuple[dict, np.ndarray]:
    """Scores of one split's clips, computed in shares by every rank; (dev scores or {}, probs)."""
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

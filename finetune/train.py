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
point, :mod:`conilium.finetune.warmstart`), :func:`fit` (the epochs, run by the training
core's loop, :func:`conilium.training.loop.fit`, over :class:`FinetuneRecipe`) and :func:`export`
(the best epoch's predictions of every split and the model directory, see
:func:`~conilium.finetune.model.save_model_dir`). Decision thresholds are tuned after
that by the caller (``finetune-best`` chains ``conilium-eval tune-thresholds`` and
:func:`~conilium.finetune.model.set_decision_offsets`).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from conilium import CLASSES
from conilium.audio import NoiseMixer, SignalPath, global_stats
from conilium.corpus import Clip, Corpus, load_corpus
from conilium.errors import ConfigError, ConiliumError
from conilium.locking import DirectoryLock
from conilium.extract.encoder import freeze_front_end
from conilium.extract.lora import add_adapters, check_lora_modules, parse_lora_layers
from conilium.extract.upstreams import check_upstream, load_upstream
from conilium.heads.model import GenderOutput
from conilium.metrics import score, score_binary
from conilium.dirs import ModelDir
from conilium.runtime import CompiledCall, Dist, autocast, init_distributed
from conilium.targets import GENDER_CLASSES, class_weights, gender_targets, training_set
from conilium.training import loop
from conilium.training.losses import loss_fn, masked_bce, uses_weights
from conilium.training.mixup import mix, mix_mask, mix_waves, mixup_or_none
from conilium.training.samplers import balanced_weights
from conilium.training.state import Checkpoint, cpu_state, rng_state, save_atomic, seed_epoch, set_rng_state
from conilium.util import check_writable, output_errors

from conilium.runtime import precision_dtype

from .config import FinetuneConfig, FinetuneError, check_config
from .data import AudioClips, collate_waves, epoch_batches, rank_micro_batches
from .model import EndToEndModel, enable_checkpointing, upstream_overrides
from .predict import min_samples, predict_clips
from .rundir import (BEST_STAGE2, CHECKPOINT_DIR, LAST, TUNED_DIR, checkpoint_paths,  # noqa: F401 (LAST, TUNED_DIR: the run's names)
                     claim_out_dir, output_bytes, write_model_dir)
from .warmstart import build_model


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
    corpus = load_corpus(config.corpus, read_durations=True, skip_bad=config.skip_bad,
                         allow_symlinks=config.allow_symlinks)
    train_clips = corpus.split(config.train_split)
    if not train_clips:
        raise ConfigError(f"corpus {config.corpus} has no clip in split {config.train_split!r} "
                          f"(splits: {', '.join(corpus.splits)})")
    if config.labels not in ("hard",) and not any(c.annotations for c in train_clips):
        raise ConfigError(f"--labels {config.labels} needs the annotators' labels, but corpus {config.corpus} "
                          f"has none (no Labels/labels_detailed.csv); use --labels hard")
    clips, targets, counts = training_set(train_clips, config.labels, thresholds=config.thresholds,
                                          classes=corpus.classes)
    if config.max_train_clips is not None:
        clips, targets = clips[: config.max_train_clips], targets[: config.max_train_clips]
    if not clips:
        raise ConfigError(f"no training clip left for --labels {config.labels} in split {config.train_split} "
                          f"(dropped: {counts})")
    dev = corpus.split(config.dev_split)
    if not any(c.scoreable for c in dev):
        raise ConfigError(f"corpus {config.corpus} has no scoreable clip in split {config.dev_split!r} to select "
                          f"the best epoch (splits: {', '.join(corpus.splits)})")
    if config.aux == "gender" and np.isnan(gender_targets(clips)).all():
        raise ConfigError(f"--aux gender: no training clip of split {config.train_split} in corpus {config.corpus} "
                          f"has a known gender (Gender Male or Female in labels_consensus.csv)")
    labels = [c.emo_class for c in clips]
    weights = class_weights(labels, corpus.classes) if (uses_weights(config.loss) and config.sampler is None) else None
    splits = {config.dev_split: dev}
    for s in corpus.splits:
        if s not in (config.train_split, config.dev_split):
            splits[s] = corpus.split(s)
    return Prepared(Path(config.corpus), clips, targets, counts, weights, splits, corpus.audio_dir, corpus)


# ----------------------------------------------------------------------------- run

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
        ckpt, lock = claim_out_dir(Path(config.out), config, d, resume=resume, overwrite=overwrite,
                                   wait_for_lock=wait_for_lock, progress=progress)
        progress = progress and d.main
        built = build(config, prep, d, device, ckpt, progress=progress)
        d.on_main(lambda: check_writable(config.out, what="finetune-best model directory",
                                          need_bytes=output_bytes(built.model, resuming=ckpt is not None,
                                                                 balanced_stage=bool(config.balanced_stage))))
        history, best, seconds = fit(config, built, d, device, ckpt, progress=progress, on_epoch_end=on_epoch_end)
        return export(config, prep, built, d, device, history, best, seconds, progress=progress)
    finally:
        if lock is not None:
            lock.release()
        d.close(clean=False)


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
    stage_draw: Optional[np.ndarray] = None  # the balanced second stage's draw weights (--balanced-stage)
    gender: Optional[torch.Tensor] = None  # --aux gender: training targets (1 Female, 0 Male, 0 where unknown)
    gender_mask: Optional[torch.Tensor] = None  # 1 where the gender is known
    optimizer_name: Optional[str] = None  # set by :func:`fit`
    aux_scores: Optional[dict] = None  # set by :func:`export` (``--aux``: the auxiliary task's scores)


def build(config: FinetuneConfig, prep: Prepared, d: Dist, device: torch.device, ckpt: Optional[Checkpoint], *,
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

        d.on_main(make_random_weights)
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
    start = build_model(config, upstream, identity, prep.corpus.classes)
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
        norm_stats = ckpt.extra["normalize"]["stats"]
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
    draw = (balanced_weights([c.emo_class for c in prep.train], prep.corpus.classes.codes)
            if config.sampler == "balanced" else None)
    weights = None if prep.weights is None else torch.as_tensor(prep.weights, device=device)
    stage_draw = (balanced_weights([c.emo_class for c in prep.train], prep.corpus.classes.codes)
                  if config.balanced_stage else None)
    gender = gender_mask = None
    if config.aux == "gender":
        g = gender_targets(prep.train)
        gender = torch.as_tensor(np.nan_to_num(g, nan=0.0))
        gender_mask = torch.as_tensor((~np.isnan(g)).astype(np.float32))
    return Built(model, identity, start.info, signal, train, durations, torch.as_tensor(prep.train_targets), weights,
                 draw, eval_sets, lora, stage_draw=stage_draw, gender=gender, gender_mask=gender_mask)


# ----------------------------------------------------------------------------- fit

class FinetuneRecipe(loop.Recipe):
    """One end-to-end model over the audio: an epoch's batch plan (duration buckets, dealt out
    to the ranks, cut into micro-batches), the gradient averaged over the global batch, the
    Development split scored by every rank in shares, checkpoints after every epoch."""

    def __init__(self, config: FinetuneConfig, b: "Built", d: Dist, device: torch.device, train_model: nn.Module,
                 *, progress: bool, on_epoch_end: Optional[Callable[[dict], None]] = None, stage: int = 1,
                 epoch_offset: int = 0):
        self.config, self.b, self.d, self.device, self.train_model = config, b, d, device, train_model
        self.progress, self.callback = progress, on_epoch_end
        self.fn = loss_fn(config.loss)
        self.dtype = precision_dtype(config.precision, device)
        self.mixup = None
        # the balanced second stage: the balanced sampler's draws, no class weights, its epochs numbered on
        self.stage, self.epoch_offset = stage, epoch_offset
        self.draw = b.stage_draw if stage == 2 else b.draw
        self.weights = None if stage == 2 else b.weights
        self.part_hints: List[str] = []  # the last step's clips, by micro-batch (a non-finite loss names them)
        #: the training forward (``--compile``: through torch.compile; ``train_model`` keeps no_sync)
        self.forward = (CompiledCall(train_model, what="the model's training forward",
                                     without="fine-tune without --compile")
                        if config.compile else train_model)

    def epoch_batches(self, epoch: int):
        config, b, d = self.config, self.b, self.d
        epoch += self.epoch_offset
        seed_epoch(config.seed, epoch, d.rank)
        batches = epoch_batches(b.durations, batch_size=config.batch_size, seed=config.seed, epoch=epoch,
                                bucket_batches=config.bucket_batches, draw_weights=self.draw,
                                min_batch=d.world * config.grad_accum)
        plan = [rank_micro_batches(g, b.durations, rank=d.rank, world=d.world, grad_accum=config.grad_accum)
                for g in batches]
        # the epoch's mixup pairs: from (seed, epoch, rank) alone, as every other draw, so that a resume
        # goes on as an uninterrupted run
        self.mixup = mixup_or_none(config.mixup, [config.seed, epoch, d.rank])
        flat = [[(i, epoch) for i in mb] for parts in plan for mb in parts]
        loader = DataLoader(b.train, batch_sampler=flat, collate_fn=collate_waves,
                            num_workers=config.num_workers, generator=torch.Generator().manual_seed(epoch))
        it = iter(loader)
        return ((len(g), len(parts), it) for g, parts in zip(batches, plan)), len(batches)

    def fit_batch(self, trainee: loop.Trainee, batch, *, epoch: int, step: int):
        n_global, n_parts, it = batch
        d, b, config = self.d, self.b, self.config
        losses = []
        for k in range(n_parts):
            waves, lengths, idx, errors, _ = next(it)
            if errors:
                raise ConiliumError(f"training stopped: {errors[0][1]}")
            y = b.targets[idx].to(self.device)
            aux = b.gender is not None
            if aux:
                g, known = b.gender[idx].to(self.device), b.gender_mask[idx].to(self.device)
            waves, lengths = waves.to(self.device, non_blocking=True), lengths.to(self.device)
            if self.mixup is not None:  # pairs within the micro-batch, on the waveforms
                perm, lam = self.mixup.pairs(len(idx), self.device)
                waves, lengths = mix_waves(waves, lengths, perm, lam)
                y = mix(y, perm, lam)
                if aux:
                    g, known = mix(g, perm, lam), mix_mask(known, perm)
            last = k == n_parts - 1 or not d.on
            with contextlib.nullcontext() if last else self.train_model.no_sync():
                with autocast(self.device, self.dtype):
                    out = self.forward(waves, lengths, aux=True) if aux else self.forward(waves, lengths)
                logits, g_logit = out if aux else (out, None)
                loss = self.fn(logits.float(), y, self.weights)
                if aux:
                    loss = loss + config.aux_weight * masked_bce(g_logit, g, known)
                names = ", ".join(b.train.names[i] for i in idx[:5])
                # under torchrun every rank stops together (a rank alone in backward would wait for the
                # others forever): a collective per micro-batch. One process reads nothing back here: the
                # loop's one read-back of the step's losses stops the run (the step's update is then lost
                # with it, as the run ends before any checkpoint of this epoch is written)
                if d.on and d.all_sum([0.0 if torch.isfinite(loss) else 1.0])[0]:
                    error = loop.nonfinite_error(config.loss, None, epoch=epoch, step=step, lr=config.lr,
                                                 hint=f"check the audio of clips {names}")
                    raise FinetuneError(str(error))
                self.part_hints = (self.part_hints if k else []) + [f"check the audio of clips {names}"]
                (loss * (len(idx) * d.world / n_global)).backward()
            losses.append((loss.detach(), len(idx)))
        trainee.optimizer.step()
        trainee.optimizer.zero_grad(set_to_none=True)
        return losses

    def loss_name(self, trainee) -> str:
        return self.config.loss

    def hint_for(self, trainee, part: int) -> str:
        return self.part_hints[part]

    def reduce_loss(self, total: float, seen: int):
        return tuple(self.d.all_sum([total, seen]))

    def evaluate(self, trainees, epoch: int) -> List[dict]:
        config = self.config
        dev_ds, dev_clips = self.b.eval_sets[config.dev_split]
        dev, _ = _evaluate_split(self.b.model, dev_ds, dev_clips, config, self.d, self.device, self.progress,
                                 f"scoring {config.dev_split}")
        return [{"dev_f1_macro": dev["f1_macro"], "dev_f1_micro": dev["f1_micro"]}]

    def on_epoch_end(self, trainee: loop.Trainee, record: dict, improved: bool) -> None:
        config, d, model = self.config, self.d, self.b.model
        epoch, sel = record["epoch"], trainee.selection
        best = {"f1_macro": sel.best_value, "epoch": sel.best_epoch}
        last_path, best_path = checkpoint_paths(Path(config.out))
        if self.stage == 2:
            # the second stage keeps its best beside best.pt and leaves last.pt at the end of the first
            # stage: a resume redoes the second stage from the first stage's best, as it ran
            if improved:
                d.on_main(lambda: save_atomic({"model": cpu_state(model), "epoch": epoch},
                                              best_path.parent / BEST_STAGE2))
            self._report(record, best)
            return
        rng_all = d.gather(rng_state())

        def save_checkpoints():
            if improved:
                save_atomic({"model": cpu_state(model), "epoch": epoch}, best_path)
            Checkpoint(config=config.to_json(), model=cpu_state(model), optimizer=trainee.optimizer.state_dict(),
                       history=trainee.history, best=best, rng=dict(enumerate(rng_all)),
                       sampler={"seed": config.seed, "next_epoch": epoch + 1, "bucket_batches": config.bucket_batches,
                                "batch_size": config.batch_size},
                       extra={"normalize": {"mode": self.b.signal.normalize, "stats": self.b.signal.stats}}
                       ).save(last_path)

        d.on_main(save_checkpoints)  # in place of a barrier: a failure to save stops every rank
        self._report(record, best)

    def _report(self, record: dict, best: dict) -> None:
        if self.progress:
            stage = " (balanced stage)" if self.stage == 2 else ""
            tqdm.write(f"epoch {record['epoch']}{stage}: train loss {record['train_loss']:.4f}, "
                       f"{self.config.dev_split} macro-F1 {record['dev_f1_macro']:.4f} (best {best['f1_macro']:.4f} "
                       f"at epoch {best['epoch']}), {record['seconds']:.1f} s")
        if self.callback is not None:
            self.callback(dict(record))


def fit(config: FinetuneConfig, b: Built, d: Dist, device: torch.device, ckpt: Optional[Checkpoint], *, progress: bool,
        on_epoch_end: Optional[Callable[[dict], None]] = None) -> Tuple[List[dict], dict, float]:
    """The epochs: train, score the development split, keep the best and the last checkpoint.

    Returns the history (one record per epoch, earlier sessions' included), the best
    epoch ``{"f1_macro", "epoch"}`` and the seconds this session trained.
    """
    out = Path(config.out)
    model = b.model
    optimizer, optimizer_name = loop.make_optimizer((p for p in model.parameters() if p.requires_grad),
                                                    lr=config.lr, weight_decay=config.weight_decay)
    history: List[dict] = []
    best = {"f1_macro": -1.0, "epoch": 0}
    first_epoch = 1
    if ckpt is not None:
        model.load_state_dict(ckpt.model)
        optimizer.load_state_dict(ckpt.optimizer)
        history = list(ckpt.history)
        best = dict(ckpt.best)
        first_epoch = ckpt.next_epoch
        rng = ckpt.rng.get(d.rank)
        if rng is not None:
            set_rng_state(rng)
    train_model: nn.Module = model
    if d.on:
        find_unused = bool(getattr(model.upstream.config, "layerdrop", 0.0))  # LayerDrop leaves layers unused
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=find_unused)
    d.on_main(lambda: ModelDir(out).write_config({
        **config.to_json(), "kind": "finetune", "upstream_identity": b.identity, "start_from": b.start_from,
        "normalize_stats": b.signal.stats, "world_size": d.world, "max_seconds_used": b.signal.max_seconds,
        "normalize_used": b.signal.normalize}))
    selection = loop.Selection.resumed("dev_f1_macro", config.patience, history, best["f1_macro"], best["epoch"])
    trainee = loop.Trainee(out.name, model, optimizer, epochs=config.epochs, selection=selection,
                           optimizer_name=optimizer_name, history=history)
    recipe = FinetuneRecipe(config, b, d, device, train_model, progress=progress, on_epoch_end=on_epoch_end)
    t_start = time.time()
    loop.fit(recipe, [trainee], first_epoch=first_epoch, progress=progress)
    if trainee.error is not None:  # a loss that stopped being finite (one process: found by the loop)
        raise FinetuneError(str(trainee.error))
    if not checkpoint_paths(out)[1].is_file():
        raise FinetuneError(f"{out}: no best checkpoint ({checkpoint_paths(out)[1]}) — no epoch was completed")
    b.optimizer_name = optimizer_name
    best = {"f1_macro": selection.best_value, "epoch": selection.best_epoch}
    if config.balanced_stage:
        best = _balanced_stage(config, b, d, device, trainee, progress=progress, on_epoch_end=on_epoch_end)
    return trainee.history, best, time.time() - t_start


def _balanced_stage(config: FinetuneConfig, b: Built, d: Dist, device: torch.device, trainee: loop.Trainee, *,
                    progress: bool, on_epoch_end: Optional[Callable[[dict], None]]) -> dict:
    """The class-balanced second stage: from the first stage's best epoch (best.pt), the head's
    output layer alone, ``balanced_stage`` epochs of the balanced sampler's batches (no class
    weights, as with ``--sampler balanced``), scored on the development split each epoch; its
    best epoch (``best-stage2.pt``) is kept when better than the first stage's. It keeps no
    checkpoint to resume from: a resume after the first stage redoes it, with the same draws."""
    model = b.model
    _, best_path = checkpoint_paths(Path(config.out))
    d.on_main(lambda: (best_path.parent / BEST_STAGE2).unlink(missing_ok=True))  # an earlier session's
    model.load_state_dict(torch.load(best_path, map_location="cpu", weights_only=True)["model"])
    params = loop.freeze_all_but(model, model.head.classifier.out)
    optimizer, name = loop.make_optimizer(params, lr=config.lr, weight_decay=config.weight_decay)
    loop.begin_stage(trainee, optimizer, epochs=config.balanced_stage, optimizer_name=name)
    train_model: nn.Module = model
    if d.on:  # wrapped anew: the frozen parameters no longer take part in the gradient's reduction
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    recipe = FinetuneRecipe(config, b, d, device, train_model, progress=progress, on_epoch_end=on_epoch_end,
                            stage=2, epoch_offset=trainee.epoch_offset)
    loop.fit(recipe, [trainee], progress=progress, desc="balanced stage")
    if trainee.error is not None:
        raise FinetuneError(str(trainee.error))
    sel = trainee.selection
    stage = 2 if any(r.get("stage") == 2 and r["epoch"] == sel.best_epoch for r in trainee.history) else 1
    return {"f1_macro": sel.best_value, "epoch": sel.best_epoch, "stage": stage}


# ----------------------------------------------------------------------------- export

def export(config: FinetuneConfig, prep: Prepared, b: Built, d: Dist, device: torch.device, history: List[dict],
           best: dict, train_seconds: float, *, progress: bool) -> dict:
    """The best epoch's predictions of every split, metrics.json and the model directory."""
    out = Path(config.out)
    model = b.model
    _, best_path = checkpoint_paths(out)
    if best.get("stage", 1) == 2:
        best_path = best_path.parent / BEST_STAGE2
    model.load_state_dict(torch.load(best_path, map_location="cpu", weights_only=True)["model"])
    split_predictions = {}
    for split, (ds, clips) in b.eval_sets.items():
        _, probs = _evaluate_split(model, ds, clips, config, d, device, progress, f"predicting {split}")
        split_predictions[split] = ([c.name for c in clips], probs, [c.emo_class for c in clips])
    if b.gender is not None:
        b.aux_scores = {"gender": _gender_scores(model, *b.eval_sets[config.dev_split], config, d, device)}
    # rank 0 writes; the other ranks wait for it, and fail with it
    metrics = d.on_main(lambda: write_model_dir(config, prep, b, d, device, history, best, train_seconds,
                                                 split_predictions, out, model))
    return metrics if d.main else {}


def _gender_scores(model: EndToEndModel, ds: AudioClips, clips: Sequence[Clip], config: FinetuneConfig, d: Dist,
                   device: torch.device) -> dict:
    """``--aux gender``: the gender output scored on the clips of ``clips`` whose gender is known
    (each rank predicts a share)."""
    known = [i for i, c in enumerate(clips) if c.gender in GENDER_CLASSES]
    part = predict_clips(GenderOutput(model), ds, known[d.rank :: d.world], "bce", device=device,
                         batch_size=config.eval_batch_size, precision=config.precision,
                         num_workers=config.num_workers)
    merged: Dict[int, np.ndarray] = {}
    for piece in d.gather(part):
        merged.update(piece)
    probs = [float(merged[i][0]) for i in known]
    scores = score_binary(gender_targets([clips[i] for i in known]), probs, GENDER_CLASSES, threshold=0.5)
    return dict(scores, split=config.dev_split, weight=config.aux_weight)


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
    codes = clips[0].class_set.codes if clips else CLASSES
    probs = np.stack([merged[i] for i in range(len(clips))]) if clips else np.zeros((0, len(codes)))
    refs = [c.emo_class for c in clips]
    scores = score(refs, [codes[i] for i in probs.argmax(axis=1)], codes) if any(r in codes for r in refs) else {}
    return scores, probs

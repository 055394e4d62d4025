"""How a head run trains, as a :class:`~conilium.training.loop.Recipe`: batches of cached
features read once per step for every head of a data pass, each head's step under its own
random stream, the Development split scored in one pass for every head."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader

from conilium.metrics import score, score_attributes
from conilium.runs import letters
from conilium.targets import ATTRIBUTE_COLUMNS, to_unit
from conilium.training.loop import Recipe, Selection, Trainee, make_optimizer
from conilium.training.losses import ccc_loss, loss_fn, masked_bce
from conilium.training.mixup import mix, mix_mask, mixup_or_none
from conilium.training.state import GLOBAL_RNG_LOCK, RandomStream, cpu_state

from .batches import Batch, loader_batches, reader_for
from .config import TrainConfig
from .data import ClipDataset, FusionDataset, collate, length_batches
from .model import EmotionHead, LayerMix, build_head
from .predict import predict_many, stack_scores
from .prepare import PreparedData, head_configs_for
from .graphs import StepGraphs, use_graphs
from .stacked import ONE_HEAD, StackedHeads, predict_stacked, unstackable, use_stack


def read_batches(dataset: ClipDataset, index_batches: Sequence[Sequence[int]], device: torch.device, *,
             num_workers: int = 0, persistent: bool = False) -> Callable[[], Iterator[Batch]]:
    """The batches ``index_batches`` of ``dataset``: padded into reused buffers in this process
    (:class:`~conilium.heads.batches.BatchReader`), or collated by DataLoader workers when
    streaming with ``num_workers``. Call again for another pass over the same batches. A fusion
    run's batches are read in this process (:class:`~conilium.heads.batches.FusionReader`)."""
    if dataset.preloaded or num_workers == 0 or isinstance(dataset, FusionDataset):
        reader = reader_for(dataset, device, max_batch=max(len(b) for b in index_batches))
        return lambda: reader(index_batches)
    loader = DataLoader(dataset, batch_sampler=index_batches, collate_fn=collate, num_workers=num_workers,
                        persistent_workers=persistent, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(0))  # leaves the global random stream alone
    return lambda: loader_batches(loader, device)


def predict_heads(models: Sequence[Tuple[torch.nn.Module, str]], batches: Iterator[Batch], n: int, *, device,
             progress: bool = False, desc: str = "predicting", total: Optional[int] = None) -> List[np.ndarray]:
    """(n, C + A) scores of each model on ``batches`` (read once for all of them): class
    scores, then attribute values on the corpus scale for a head with attributes."""
    scores = predict_many(models, (((x, lengths), idx) for x, lengths, idx in batches), device=device,
                          progress=progress, desc=desc, total=total)
    return [stack_scores(s, n, m.output_width) for s, (m, _) in zip(scores, models)]


def predict_probs(model: EmotionHead, dataset: ClipDataset, loss: str, *, batch_size: int,
                  device: torch.device, num_workers: int = 0, progress: bool = False,
                  desc: str = "predicting") -> np.ndarray:
    """(N, C) class scores of every clip of ``dataset`` (sigmoid or softmax, as the loss sees them).

    Batches group clips of similar length; the scores do not depend on the batching
    since pooling ignores padded frames.
    """
    batches = length_batches(dataset.cache, dataset.names, batch_size, dataset.selection)
    read = read_batches(dataset, batches, device, num_workers=num_workers)
    return predict_heads([(model, loss)], read(), len(dataset), device=device, progress=progress, desc=desc,
                    total=len(batches))[0]

def _freeze_constant_mix(model: torch.nn.Module) -> None:
    """Freeze the layer weight of a ``"weighted"`` mix of one layer (a one-layer cache; each
    branch of a fusion head on its own).

    A softmax over one weight is 1 whatever the weight, so its gradient is exactly 0 and
    AdamW leaves the weight at 0: frozen, the run is bitwise the same, and the backward
    pass no longer computes the gradient of the pooling's input (a frames × dim × dim
    matmul and the pooling's elementwise gradients, about a third of a step).
    """
    for module in model.modules():
        mix = module.weights if isinstance(module, LayerMix) else None
        if mix is not None and mix.numel() == 1:
            mix.requires_grad_(False)


class HeadTrainee(Trainee):
    """One head of a data pass: model, optimizer, random stream, targets, and its best epoch."""

    def __init__(self, config: TrainConfig, out_dir: Path, data: PreparedData, device: torch.device):
        self.config, self.out_dir, self.data = config, Path(out_dir), data
        #: the head's config; a fusion head's, one per cache (the primary's first, also ``head_cfg``)
        self.head_cfgs = head_configs_for(config, data)
        self.head_cfg = self.head_cfgs[0]
        with GLOBAL_RNG_LOCK:  # no other run's thread draws in between
            torch.manual_seed(config.seed)
            model = build_head(self.head_cfgs, config.fusion).to(device)
            self.rng = RandomStream(device)  # right after the init, as a run alone goes on
        _freeze_constant_mix(model)
        optimizer, name = make_optimizer((p for p in model.parameters() if p.requires_grad), lr=config.lr,
                                         weight_decay=config.weight_decay)
        # the best epoch: by Development mean CCC for attributes only, by macro-F1 otherwise
        metric = "dev_ccc_mean" if config.task == "attributes" else "dev_f1_macro"
        super().__init__(self.out_dir.name, model, optimizer, epochs=config.epochs, optimizer_name=name,
                         selection=Selection(metric, config.patience))
        self.fn = loss_fn(config.loss)
        self.weights = None if data.weights is None else torch.as_tensor(data.weights, device=device)
        self.targets = torch.as_tensor(np.asarray(data.train_targets, dtype=np.float32)).to(device)
        self.task = config.task
        self.num_classes = self.head_cfg.num_classes
        if data.train_attributes is not None:
            known = ~np.isnan(data.train_attributes).any(axis=1)
            unit = np.where(known[:, None], to_unit(np.nan_to_num(data.train_attributes)), 0.0)
            self.attr_targets = torch.as_tensor(unit, dtype=torch.float32).to(device)
            self.attr_mask = torch.as_tensor(known, dtype=torch.float32).to(device)
        self.mixup = mixup_or_none(config.mixup, [config.seed])
        self.gender = self.gender_mask = None  # --aux gender: targets and where they are known
        if data.train_gender is not None:
            known = ~np.isnan(data.train_gender)
            self.gender = torch.as_tensor(np.where(known, data.train_gender, 0.0), dtype=torch.float32).to(device)
            self.gender_mask = torch.as_tensor(known, dtype=torch.float32).to(device)
        self.aux_scores: Optional[dict] = None
        #: the :class:`~conilium.heads.stacked.StackedHeads` the head is trained in, and its place there
        self.stack: Optional[StackedHeads] = None
        self.slot = 0
        #: what metrics.json records of the stacking: None (not asked for), or its heads (1: why not)
        self.stacking: Optional[dict] = None
        self.best_state = None
        self.split_predictions: dict = {}

    def _targets(self, idx: torch.Tensor):
        """The batch's targets: class targets, attribute values, mask of known values, gender and
        mask of known gender (each None where the head has no use for it)."""
        targets = self.targets[idx] if self.task != "attributes" else None
        attr = self.attr_targets[idx] if self.task != "categories" else None
        mask = self.attr_mask[idx] if self.task == "joint" else None
        aux = self.gender is not None
        return (targets, attr, mask, self.gender[idx] if aux else None, self.gender_mask[idx] if aux else None)

    def _loss(self, logits: torch.Tensor, gender_logit: Optional[torch.Tensor], targets, attr, mask, gender,
              known) -> torch.Tensor:
        """The head's loss of its outputs ``logits`` (and auxiliary gender logit) against the targets."""
        if self.task == "categories":
            loss = self.fn(logits, targets, self.weights)
        else:
            c = self.num_classes
            loss = ccc_loss(logits[:, c:], attr, mask)
            if self.task == "joint":
                loss = self.fn(logits[:, :c], targets, self.weights) + self.config.attribute_weight * loss
        if gender_logit is not None:
            loss = loss + self.config.aux_weight * masked_bce(gender_logit, gender, known)
        return loss

    def loss_of(self, outputs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The loss of this head's outputs on the batch of clips ``idx`` (no mixup, no auxiliary
        task: a head of a :class:`~conilium.heads.stacked.StackedHeads`)."""
        return self._loss(outputs, None, *self._targets(idx))

    def step(self, x: torch.Tensor, lengths: Optional[torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
        """One AdamW step on the batch; the loss (not yet read back from the device).

        With mixup, the pooled clip vectors are mixed before the classifier (manifold mixup),
        the class targets, attribute values and the mask of known attribute values alike."""
        with self.rng:
            targets, attr, mask, gender, known = self._targets(idx)
            aux = self.gender is not None
            if self.mixup is None:
                out = self.model(x, lengths, aux=True) if aux else self.model(x, lengths)
            else:
                perm, lam = self.mixup.pairs(len(idx), idx.device)  # x: a tuple for a fusion head
                pooled = mix(self.model.embed(x, lengths), perm, lam)
                out = self.model.classifier(pooled, aux=True) if aux else self.model.classifier(pooled)
                targets = None if targets is None else mix(targets, perm, lam)
                attr = None if attr is None else mix(attr, perm, lam)
                mask = None if mask is None else mix_mask(mask, perm)
                if aux:
                    gender, known = mix(gender, perm, lam), mix_mask(known, perm)
            logits, gender_logit = out if aux else (out, None)
            loss = self._loss(logits, gender_logit, targets, attr, mask, gender, known)
        # the backward pass and the update draw nothing: outside the random stream (and its lock)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def state(self) -> dict:
        """The head's current weights, copied to the CPU (from the stack when it is in one)."""
        return cpu_state(self.model) if self.stack is None else self.stack.head_state(self.slot)

    def dev_scores(self, scores: np.ndarray, refs: Sequence[Optional[str]], attr_refs: np.ndarray) -> dict:
        """This epoch's Development entries of the history, from the head's (n, C + A) scores."""
        out = {}
        c = self.num_classes
        if c:
            codes = self.data.classes.codes
            dev = score(refs, letters(scores[:, :c], codes), codes)
            out.update(dev_f1_macro=dev["f1_macro"], dev_f1_micro=dev["f1_micro"])
        if self.task != "categories":
            a = score_attributes(attr_refs, scores[:, c:], ATTRIBUTE_COLUMNS)
            out["dev_ccc_mean"] = a["ccc_mean"]
            out.update({f"dev_ccc_{name}": a[name]["ccc"] for name in ATTRIBUTE_COLUMNS})
        return out


class HeadRecipe(Recipe):
    """The heads of one data pass: ``train_batches()`` gives an epoch's batches (the same for
    every head), ``dev_batches()`` the Development split's."""

    nonfinite_hint = "check the cache's features with verify-cache"

    def __init__(self, train_batches: Callable[[], Iterator[Batch]], steps: int,
                 dev_batches: Callable[[], Iterator[Batch]], dev_size: int, dev_refs, dev_attr_refs,
                 device: torch.device, stack: Optional[StackedHeads] = None,
                 stack_optimizer: Optional[torch.optim.Optimizer] = None, graphs: bool = False,
                 cap_frames: Optional[int] = None):
        self.train_batches, self.steps = train_batches, steps
        self.dev_batches, self.dev_size = dev_batches, dev_size
        self.dev_refs, self.dev_attr_refs, self.device = dev_refs, dev_attr_refs, device
        #: the pass's heads as one module (:func:`stack_trainees`) and its optimiser, or None
        self.stack, self.stack_optimizer = stack, stack_optimizer
        self._by_slot: dict = {}
        #: the stack's steps on fixed shapes, captured as CUDA graphs on CUDA (``graphs``), or None
        self.graphs: Optional[StepGraphs] = None
        if graphs and stack is not None:
            self.graphs = StepGraphs(self._stack_step, capture=device.type == "cuda", cap_frames=cap_frames,
                                     state=self._step_state)

    def epoch_batches(self, epoch: int):
        def batches():
            for x, lengths, idx in self.train_batches():
                yield x, lengths, torch.as_tensor(idx, dtype=torch.long).to(self.device, non_blocking=True), len(idx)

        return batches(), self.steps

    def fit_batch(self, trainee: HeadTrainee, batch, *, epoch: int, step: int):
        x, lengths, at, n = batch
        return [(trainee.step(x, lengths, at), n)]

    def fit_step(self, trainees: Sequence[HeadTrainee], batch, *, epoch: int, step: int):
        if self.stack is None:
            return super().fit_step(trainees, batch, epoch=epoch, step=step)
        x, lengths, at, n = batch
        streams = [None] * self.stack.size
        for t in trainees:
            streams[t.slot] = t.rng
            self._by_slot[t.slot] = t
        masks = self.stack.draw_masks(streams, n, self.device)  # outside the step: a graph draws nothing
        slots = tuple(t.slot for t in trainees)
        step = self._stack_step if self.graphs is None else self.graphs
        losses = step(x, lengths, at, masks, slots)
        return [[(losses[k], n)] for k in range(len(trainees))]

    def _step_state(self) -> List[torch.Tensor]:
        """What a step of the stack updates in place: its weights, then its optimiser's state."""
        params = list(self.stack.parameters())
        state = [t for p in params for t in self.stack_optimizer.state.get(p, {}).values() if torch.is_tensor(t)]
        return params + state

    def _stack_step(self, x: torch.Tensor, lengths: Optional[torch.Tensor], at: torch.Tensor,
                    masks: Optional[Tuple[torch.Tensor, ...]], slots: Tuple[int, ...]) -> torch.Tensor:
        """One optimiser step of the stack on the batch for the heads in ``slots``: their losses."""
        out = self.stack(x, lengths, masks)
        losses = torch.stack([self._by_slot[k].loss_of(out[k], at) for k in slots])
        self.stack_optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()  # each head's gradient is its own loss's
        self.stack_optimizer.step()
        return losses.detach()

    def loss_name(self, trainee: HeadTrainee) -> str:
        return trainee.config.loss

    def evaluate(self, trainees: Sequence[HeadTrainee], epoch: int) -> List[dict]:
        if self.stack is not None:
            probs = predict_stacked(self.stack, [(t.slot, t.model, t.config.loss) for t in trainees],
                                    self.dev_batches(), self.dev_size, device=self.device)
        else:
            probs = predict_heads([(t.model, t.config.loss) for t in trainees], self.dev_batches(), self.dev_size,
                                  device=self.device)
        return [t.dev_scores(p, self.dev_refs, self.dev_attr_refs) for t, p in zip(trainees, probs)]

    def on_epoch_end(self, trainee: HeadTrainee, record: dict, improved: bool) -> None:
        if improved:
            trainee.best_state = trainee.state()


def stack_trainees(trainees: Sequence[HeadTrainee], device: torch.device) -> Tuple[Optional[StackedHeads], Optional[str]]:
    """The heads of a data pass as one :class:`~conilium.heads.stacked.StackedHeads` trained by one
    optimiser, when their runs ask for it (``stack_heads``, or ``cuda_graphs``: a graphed step is a
    stack's, of one head too) and can be stacked: (the stack, None); (None, why not) otherwise (why
    is None where stacking was not asked for)."""
    config = trainees[0].config
    graphs = use_graphs(config.cuda_graphs, device) and config.stack_heads != "off"
    if not use_stack(config.stack_heads, device) and not graphs:
        return None, None
    why = unstackable([t.config for t in trainees], [t.head_cfgs for t in trainees])
    if why == ONE_HEAD and graphs:
        why = None
    if why is not None:
        return None, why
    stack = StackedHeads([t.model for t in trainees]).to(device)
    optimizer, name = make_optimizer((p for p in stack.parameters() if p.requires_grad), lr=config.lr,
                                     weight_decay=config.weight_decay, capturable=graphs and device.type == "cuda")
    for k, t in enumerate(trainees):
        t.stack, t.slot, t.optimizer, t.optimizer_name = stack, k, optimizer, name
    return stack, None

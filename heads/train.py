"""train-head: a pooling head trained on a feature cache, every loss, target and sampler.

>>> from conilium.heads.train import TrainConfig, train_head
>>> metrics = train_head(TrainConfig(cache="cache/wavlm-large", loss="wbce", labels="S"), "runs/wbce-S")
>>> metrics["f1_macro"], metrics["best_epoch"]

One run: targets of the Train clips (``labels``: hard, P, S, P*, S*; P*/S* keep only the
high-agreement clips; noise-augmented copies in the cache train too, with their source
clip's labels, but are never scored nor predicted), AdamW, one pass over the training clips per epoch (shuffled, or
drawn by the class-balanced sampler), the development macro-F1 over *every* scoreable
Development clip after each epoch, the best epoch's weights kept, optional early
stopping. The run directory then gets (see :mod:`conilium.runs`)::

    config.json               the TrainConfig
    model.pt                  the best checkpoint (see :func:`load_head`)
    metrics.json              Development scores at top level, best_epoch, history, "splits"
    predictions/<Split>.csv   every split of the cache

**Attributes** (``task``): ``"attributes"`` trains on every Train clip with arousal,
valence and dominance values (X and O included) with the CCC loss and keeps the epoch of
the best mean CCC over the Development clips with values; ``"joint"`` trains the
categories' clips on the categories loss plus ``attribute_weight`` × the CCC loss (over
the clips of the batch with values) and keeps the best macro-F1 epoch (its history also
has the Development CCC, over the scoreable clips). metrics.json then scores the
attributes of every clip with values on every split (``attributes``, ``ccc_mean``), and
the predictions CSV has the attribute columns (:mod:`conilium.runs`).

``metrics.json`` is written last: a run directory is complete when it exists. While a
run is being trained, ``out_dir`` holds a lock (:mod:`conilium.locking`): a second
train-head on the same directory stops with a message naming the first (or waits,
``wait_for_lock``). The output directory is checked for being writable (and for room for
the checkpoint) before training; a failure to write the outputs removes what was written
of them and is an :class:`~conilium.errors.OutputError` naming the file.

**One data pass, several heads.** :func:`train_heads` trains runs that read the same
batches (same cache, input selection, training clips and clip order, batch size and
runtime options: :func:`pass_key`) in one pass: each batch is read and collated once and
fed to every head, each with its own targets, loss, class weights, optimizer, random
stream, best-epoch bookkeeping and early stopping; the Development scoring and the final
predictions read each batch once for all heads. :func:`train_head` is a pass of one head,
and every head of a pass writes exactly what its own ``train_head`` writes (the same
predictions and metrics, timings aside): a head's weights are initialised from its seed
as alone, its dropout draws from its own copy of the random stream, and the clip order
has its own generator. train-grid (:mod:`conilium.heads.grid`) groups its runs with
:func:`plan_passes`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler
from tqdm import tqdm

from conilium.cache.reader import FeatureCache
from conilium.errors import ConfigError, ConiliumError, TrainingError  # noqa: F401 (TrainingError: raised here)
from conilium.dirs import RunDir, check_cache_dir
from conilium.locking import lock_directory
from conilium.runs import is_complete
from conilium.runtime import resolve_device
from conilium.metrics import score_binary
from conilium.targets import GENDER_CLASSES, attribute_values, gender_targets
from conilium.training.config import differing_fields
from conilium.training import loop
from conilium.training.loop import fit
from conilium.training.samplers import balanced_sampler
from conilium.training.state import GLOBAL_RNG_LOCK
from conilium.util import check_writable, output_errors, seed_everything

from .batches import loader_batches, reader_for
from .config import TrainConfig
from .data import ClipDataset, check_clips, collate, length_batches  # noqa: F401 (ClipDataset: re-exported)
from .model import build_head
from .outputs import (CHECKPOINT, clear_outputs, load_config, load_head, remove_partial_outputs,  # noqa: F401
                      write_outputs)
from .prepare import (PreparedData, check_config, check_out_dir, data_bytes, head_config_for,  # noqa: F401
                      head_configs_for, make_dataset, output_bytes, pass_key, plan_passes, prepare, use_preload)
from .graphs import use_graphs
from .recipe import (HeadRecipe, HeadTrainee, predict_heads, predict_probs, read_batches,  # noqa: F401
                     stack_trainees)


def same_run(a: Mapping, b: Mapping) -> bool:
    """True when two config mappings describe the same run (runtime fields aside).

    A field missing from one of them (a config.json written before the field existed)
    reads as its default, as :meth:`TrainConfig.from_dict` reads it. The caches are compared
    as absolute paths: a run written with a relative ``cache`` is recognised from the folder
    it was written from.
    """
    def absolute(d: Mapping) -> dict:
        d = dict(d)
        if isinstance(d.get("cache"), str):
            d["cache"] = os.path.abspath(d["cache"])
        if isinstance(d.get("more_caches"), (list, tuple)):
            d["more_caches"] = [os.path.abspath(str(c)) for c in d["more_caches"]]
        return d

    return not differing_fields(TrainConfig, absolute(a), absolute(b))


def finished_run(config: TrainConfig, out_dir) -> Optional[dict]:
    """The metrics of the complete run in ``out_dir`` when ``config`` describes it (runtime
    fields aside, caches compared as absolute paths); None otherwise."""
    run = RunDir(out_dir)
    if not run.is_complete():
        return None
    old = run.config_or_none()
    if old is None:
        return None
    return run.metrics_or_none() if same_run(old, config.to_json()) else None


@contextlib.contextmanager
def _claim(config: TrainConfig, out_dir: Path, *, overwrite: bool, progress: bool, wait_for_lock,
           cache: Optional[FeatureCache] = None) -> Iterator[PreparedData]:
    """The checks before training a run into ``out_dir``, its lock held meanwhile; the prepared data."""
    check_out_dir(config, out_dir)
    if is_complete(out_dir) and not overwrite:
        raise ConfigError(f"{out_dir} already holds a complete run of other options; choose another output "
                          f"directory or overwrite it (--overwrite)")
    on_wait = (lambda m: tqdm.write(m, file=sys.stderr)) if progress else None
    with lock_directory(out_dir, what="train-head run directory", wait=wait_for_lock, on_wait=on_wait):
        if is_complete(out_dir) and not overwrite:  # finished while we waited for the lock
            raise ConfigError(f"{out_dir} already holds a complete run; choose another output directory "
                              f"or overwrite it (--overwrite)")
        check_writable(out_dir, what="train-head run directory")
        data = prepare(config, cache=cache)
        try:
            # room for the checkpoint and the predictions, before any feature is read
            predicted = sum(len(data.cache.split(s, augmented=False)) for s in data.cache.splits)
            with GLOBAL_RNG_LOCK:  # its initialisation draws from torch's global stream
                need = output_bytes(build_head(head_configs_for(config, data), config.fusion), predicted)
            check_writable(out_dir, what="train-head run directory", need_bytes=need)
            yield data
        finally:
            data.close_more()


@contextlib.contextmanager
def _threads(n: Optional[int]):
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)  # a library call leaves the process as it found it


def train_head(config: TrainConfig, out_dir, *, overwrite: bool = False, progress: bool = True,
               wait_for_lock=False) -> dict:
    """Train one head on ``config.cache`` and write the run directory ``out_dir``; return its metrics.

    Raises :class:`~conilium.errors.ConfigError` for incompatible choices (an ``out_dir``
    inside the cache among them), :class:`~conilium.errors.CacheError` for a missing or
    incomplete cache (or another kind of directory passed as one),
    :class:`~conilium.errors.LockError` when another process is writing ``out_dir``
    (``wait_for_lock``: True or seconds to wait for it instead),
    :class:`~conilium.errors.OutputError` when ``out_dir`` cannot be written (checked
    before training) and :class:`TrainingError` when the loss stops being finite. Nothing
    but the lock is written to ``out_dir`` until training is over. An ``out_dir`` holding
    a complete run of the same configuration (runtime options aside) is done: its metrics
    are returned and nothing is trained; one of another configuration is refused unless
    ``overwrite``.
    """
    out_dir = Path(out_dir)
    if not overwrite:
        done = finished_run(config, out_dir)
        if done is not None:
            return done
    with _claim(config, out_dir, overwrite=overwrite, progress=progress, wait_for_lock=wait_for_lock) as data:
        with _threads(config.threads):
            return _train(config, out_dir, data, progress=progress)


def _train(config: TrainConfig, out_dir: Path, data: PreparedData, *, progress: bool) -> dict:
    result = _fit_pass([(config, out_dir, data)], progress=progress)[0]
    if isinstance(result, BaseException):
        raise result
    return result


def train_heads(runs: Sequence[Tuple[TrainConfig, Union[str, Path]]], *, overwrite: bool = False,
                progress: bool = True, wait_for_lock=False,
                on_epoch: Optional[Callable[[int, int], None]] = None) -> List[Union[dict, BaseException]]:
    """Train ``runs`` (``(config, out_dir)`` pairs that share one data pass, see :func:`pass_key`)
    in one pass; for each run, its metrics or the error that stopped it. ``on_epoch(epoch,
    last)`` is told of each finished epoch of the pass.

    Each run is checked, locked and written as :func:`train_head` does it, and gets the
    same files; a run that fails (its checks, a non-finite loss, writing its outputs) gives
    its error and the others go on. An error of the shared part (reading the cache) is
    every run's. Runs that do not share a pass are a :class:`~conilium.errors.ConfigError`
    before anything is trained (group them with :func:`plan_passes`).
    """
    results: List[Union[dict, BaseException, None]] = [None] * len(runs)
    if not runs:
        return []
    first = runs[0][0]
    with contextlib.ExitStack() as stack:
        try:
            check_cache_dir(first.cache)
            cache = stack.enter_context(FeatureCache(first.cache, verify=first.verify))
        except ConiliumError as e:
            return [e] * len(runs)
        members, keys = [], set()
        for i, (config, out_dir) in enumerate(runs):
            try:
                if Path(config.cache).resolve() != Path(first.cache).resolve():
                    raise ConfigError(f"train_heads: run {out_dir} reads cache {config.cache}, not {first.cache}")
                data = stack.enter_context(_claim(config, Path(out_dir), overwrite=overwrite, progress=progress,
                                                  wait_for_lock=wait_for_lock, cache=cache))
            except ConiliumError as e:
                results[i] = e
                continue
            members.append((i, (config, Path(out_dir), data)))
            keys.add(pass_key(config, data))
        if len(keys) > 1:
            raise ConfigError("train_heads: the runs do not share one data pass (cache, input, training clips, "
                              "sampler, seed, batch size and runtime options must be equal); group them with "
                              "plan_passes")
        if members:
            with _threads(first.threads):
                try:
                    got = _fit_pass([m for _, m in members], progress=progress, on_epoch=on_epoch)
                except ConiliumError as e:
                    got = [e] * len(members)
            for (i, _), r in zip(members, got):
                results[i] = r
    return results



def _fit_pass(members: Sequence[Tuple[TrainConfig, Path, PreparedData]], *, progress: bool,
              on_epoch: Optional[Callable[[int, int], None]] = None) -> List[Union[dict, BaseException]]:
    """Train the heads of one data pass; each head's metrics, or the error that stopped it."""
    config, _, data = members[0]
    device = resolve_device(config.device)
    with GLOBAL_RNG_LOCK:
        seed_everything(config.seed)
    t_start = time.time()

    cache, sel = data.cache, data.selection
    nbytes = data_bytes(data, data.train_names) + data_bytes(data, data.dev_names)
    preload = use_preload(config, nbytes)
    train_ds = make_dataset(data, data.train_names, preload=preload, progress=progress,
                            desc="loading Train features")
    dev_ds = make_dataset(data, data.dev_names, preload=preload, progress=progress,
                          desc=f"loading {config.dev_split} features")
    heads = [HeadTrainee(c, out_dir, d, device) for c, out_dir, d in members]
    stack, not_stacked = stack_trainees(heads, device)
    for h in heads:
        h.stacking = {"heads": stack.size} if stack is not None else (
            None if not_stacked is None else {"heads": 1, "not_stacked": not_stacked})
    train_batches, steps = _train_batches(config, data, train_ds, device, preload)
    dev_order = length_batches(cache, data.dev_names, config.batch_size, sel)
    recipe = HeadRecipe(train_batches, steps,
                        read_batches(dev_ds, dev_order, device, num_workers=config.num_workers, persistent=True),
                        len(dev_ds), [cache.clips[n].emo_class for n in data.dev_names],
                        np.stack([attribute_values(cache.clips[n]) for n in data.dev_names]), device,
                        stack, None if stack is None else heads[0].optimizer,
                        graphs=use_graphs(config.cuda_graphs, device),
                        cap_frames=max((cache.num_frames(n) for n in data.train_names), default=None))
    names = ", ".join(h.out_dir.name for h in heads)
    what = "heads" if stack is None else "stacked heads"
    fit(recipe, heads, progress=progress, desc="epochs" if len(heads) == 1 else f"epochs ({len(heads)} {what}: {names})",
        on_epoch=on_epoch)
    if recipe.graphs is not None:
        for h in heads:
            h.stacking["cuda_graphs"] = recipe.graphs.summary()
        recipe.graphs = None  # the graphs' memory back before the best weights are scored
    for h in heads:  # from here on (best weights, a balanced stage, predictions) each head alone
        h.stack = None
    _balanced_stage(config, data, train_ds, device, preload, recipe, [h for h in heads if h.error is None],
                    progress=progress)
    done = [h for h in heads if h.error is None]
    for h in done:
        h.model.load_state_dict(h.best_state)
    train_seconds = time.time() - t_start
    _score_gender(config, data, [h for h in done if h.gender is not None], device)
    _predict_splits(config, data, done, device, progress=progress)
    return [h.error if h.error is not None else
            _write_run(h, train_seconds=train_seconds, preload=preload, nbytes=nbytes, device=device)
            for h in heads]


def _balanced_stage(config: TrainConfig, data: PreparedData, train_ds, device: torch.device,
                    preload: bool, recipe: HeadRecipe, heads: Sequence[HeadTrainee], *, progress: bool) -> None:
    """The class-balanced second stage of the ``heads`` that ask for one (``balanced_stage``): from
    their best epoch, the classifier's output layer alone, on batches of the balanced sampler
    (the loss's class weights off, as with ``--sampler balanced``), scored on the development
    split each epoch; an epoch better than the best of the first stage replaces its weights.
    The heads of a pass read the same balanced batches, drawn from the pass's seed."""
    heads = [h for h in heads if h.config.balanced_stage]
    if not heads:
        return
    for h in heads:
        h.model.load_state_dict(h.best_state)
        params = loop.freeze_all_but(h.model, h.model.classifier.out)
        optimizer, name = loop.make_optimizer(params, lr=h.config.lr, weight_decay=h.config.weight_decay)
        loop.begin_stage(h, optimizer, epochs=h.config.balanced_stage, optimizer_name=name)
        h.weights = None
    batches, steps = _train_batches(config, data, train_ds, device, preload, balanced_stage=True)
    stage = HeadRecipe(batches, steps, recipe.dev_batches, recipe.dev_size, recipe.dev_refs, recipe.dev_attr_refs,
                       device)
    fit(stage, heads, progress=progress, desc="balanced stage")


def _train_batches(config: TrainConfig, data: PreparedData, train_ds, device: torch.device,
                   preload: bool, *, balanced_stage: bool = False):
    """A callable giving an epoch's training batches (the same for every head), and their number.

    The clip order has its own generator, and so has the DataLoader (it draws worker seeds
    from it): neither touches the random streams of the heads' dropout. With or without
    worker processes, the same seed gives the same order, shared by every head.
    ``balanced_stage``: the class-balanced batches of the second stage, from a generator of their own.
    """
    order_gen = torch.Generator().manual_seed(config.seed)
    loader_gen = torch.Generator().manual_seed(config.seed + 1)
    if balanced_stage:
        order_gen = torch.Generator().manual_seed(_stage_seed(config.seed))
        sampler = balanced_sampler(data.train_labels, generator=order_gen, classes=data.classes.codes)
    elif config.sampler == "balanced":
        sampler = balanced_sampler(data.train_labels, generator=order_gen, classes=data.classes.codes)
    else:
        sampler = RandomSampler(train_ds, generator=order_gen)
    workers = 0 if preload or data.more else config.num_workers  # a fusion run reads in this process
    order = BatchSampler(sampler, config.batch_size, drop_last=False)
    if workers == 0:
        reader = reader_for(train_ds, device, max_batch=config.batch_size)
        return (lambda: reader(order)), len(order)
    loader = DataLoader(train_ds, batch_sampler=order, collate_fn=collate, num_workers=workers,
                        persistent_workers=True, generator=loader_gen, pin_memory=device.type == "cuda")
    return (lambda: loader_batches(loader, device)), len(order)


def _score_gender(config: TrainConfig, data: PreparedData, heads: Sequence[HeadTrainee], device: torch.device) -> None:
    """``--aux gender``: each head's best epoch scored on the gender of the development split's
    clips whose gender is known (accuracy and unweighted average recall)."""
    if not heads:
        return
    cache, sel = data.cache, data.selection
    names = [n for n in cache.split(config.dev_split, augmented=False) if cache.clips[n].gender in GENDER_CLASSES]
    refs = gender_targets([cache.clips[n] for n in names])
    logits = {id(h): np.zeros(len(names), dtype=np.float64) for h in heads}
    if names:
        check_clips(cache, names, sel)
        ds = make_dataset(data, names)
        read = read_batches(ds, length_batches(cache, names, config.batch_size, sel), device,
                            num_workers=config.num_workers)
        for h in heads:
            h.model.eval()
        with torch.no_grad():
            for x, lengths, idx in read():
                for h in heads:
                    logits[id(h)][np.asarray(idx)] = h.model(x, lengths, aux=True)[1].float().cpu().numpy()
    for h in heads:
        h.aux_scores = {"gender": dict(score_binary(refs, logits[id(h)], GENDER_CLASSES), split=config.dev_split,
                                       weight=h.config.aux_weight)}


def _stage_seed(seed: int) -> int:
    """The seed of the second stage's batch order, apart from the first stage's."""
    return int(np.random.SeedSequence([seed, 2, 0x737467]).generate_state(1)[0])


def _predict_splits(config: TrainConfig, data: PreparedData, done: Sequence[HeadTrainee], device: torch.device, *,
                    progress: bool) -> None:
    """Predictions of each head's best epoch on every split of the cache, Development first,
    every batch read once for all heads."""
    cache, sel = data.cache, data.selection
    splits = [config.dev_split] + [s for s in cache.splits if s != config.dev_split]
    for split in splits if done else []:
        split_names = cache.split(split, augmented=False)
        if not split_names:
            continue
        check_clips(cache, split_names, sel)
        ds = make_dataset(data, split_names)
        batches = length_batches(cache, split_names, config.batch_size, sel)
        read = read_batches(ds, batches, device, num_workers=config.num_workers)
        probs = predict_heads([(h.model, h.config.loss) for h in done], read(), len(ds), device=device,
                              progress=progress, desc=f"predicting {split}", total=len(batches))
        refs = [cache.clips[n].emo_class for n in split_names]
        attr_refs = np.stack([attribute_values(cache.clips[n]) for n in split_names])
        for h, p in zip(done, probs):
            c = h.num_classes
            h.split_predictions[split] = ((split_names, p, refs) if h.task == "categories" else
                                          (split_names, p[:, :c], refs, p[:, c:], attr_refs))


def _write_run(head: HeadTrainee, **kw) -> Union[dict, BaseException]:
    """Write a trained head's run directory; its metrics, or the error that stopped the writing
    (nothing of the outputs is then left)."""
    try:
        try:
            with output_errors(head.out_dir):
                head.out_dir.mkdir(parents=True, exist_ok=True)
                clear_outputs(head.out_dir)
            return write_outputs(head, **kw)
        except BaseException:
            remove_partial_outputs(head.out_dir)
            raise
    except ConiliumError as e:
        return e

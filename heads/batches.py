"""Batches of a :class:`~conilium.heads.data.ClipDataset` for the training and scoring loops,
padded into buffers allocated once.

:func:`conilium.heads.data.collate` allocates a zero-filled tensor for every batch and
pads it with torch's half-precision copy; the loop then converts it to float32, another
allocation. On WavLM-large-shaped frames (≈300 × 1024 float16 a clip) that is 20–60 ms
a batch of 16 on a 2-core CPU, more than reading the preloaded frames. :class:`BatchReader`
pads each batch into a buffer sized once for the largest batch of the dataset:

* on CPU, one float32 buffer, filled by numpy's float16 → float32 copy (exact, like
  ``.float()``), the padding zeroed; the batch is a contiguous view of it;
* on CUDA, two pinned buffers in the stored dtype, used in turn: the batch is copied to
  the device without blocking and converted to float32 there; a buffer is refilled only
  once its previous copy has finished (a CUDA event).

The values are exactly those of ``collate`` followed by ``.to(device).float()``, so the
scores do not depend on which of the two fed the model. On a GPU, a preloaded dataset that fits
is kept on the device instead and each batch gathered there (:class:`ResidentReader`: the same
values, no per-step host work but the indices). The batch is valid until the next
one is drawn. With DataLoader worker processes (streaming), the workers collate with
:func:`~conilium.heads.data.collate` as before: a buffer cannot be shared with them.
"""

from __future__ import annotations

from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .data import ClipDataset, FusionDataset

#: A batch as the loops use it: float32 inputs on the device, valid frame counts on the
#: device (None for pooled statistics), the clips' indices in the dataset.
Batch = Tuple[torch.Tensor, Optional[torch.Tensor], List[int]]


class BatchReader:
    """Reads index batches of ``dataset`` into reused buffers, as float32 tensors on ``device``.

    ``max_batch`` is the largest number of clips a batch will hold.
    """

    def __init__(self, dataset: ClipDataset, device: torch.device, *, max_batch: int):
        self.dataset = dataset
        self.device = device
        first = dataset[0][0]
        self.item_shape = tuple(first.shape[1:]) if first.dim() == 3 else tuple(first.shape)
        self.frames = first.dim() == 3
        self.max_frames = (max(dataset.cache.num_frames(n) for n in dataset.names) if self.frames else 1)
        self.max_batch = int(max_batch)
        per_clip = int(np.prod(self.item_shape)) * (self.max_frames if self.frames else 1)
        size = self.max_batch * per_clip
        self.cuda = device.type == "cuda"
        if self.cuda:  # stored dtype (float16: half the bytes over the bus), pinned, two in turn
            dtype = first.dtype
            self._host = [torch.empty(size, dtype=dtype, pin_memory=True) for _ in range(2)]
            self._events: List[Optional[torch.cuda.Event]] = [None, None]
            self._turn = 0
        else:
            self._host = [torch.empty(size, dtype=torch.float32)]

    def _fill(self, buf: torch.Tensor, items: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        n = len(items)
        if n > self.max_batch:
            raise ValueError(f"a batch of {n} clips, more than the {self.max_batch} the buffers hold")
        if not self.frames:
            view = buf[: n * int(np.prod(self.item_shape))].view((n,) + self.item_shape)
            arr = view.numpy()
            for i, x in enumerate(items):
                arr[i] = x.numpy()
            return view, None
        lengths = [int(x.shape[0]) for x in items]
        t_max = max(lengths)
        view = buf[: n * t_max * int(np.prod(self.item_shape))].view((n, t_max) + self.item_shape)
        arr = view.numpy()
        for i, x in enumerate(items):
            arr[i, : lengths[i]] = x.numpy()  # float16 -> float32 on CPU: exact, as .float()
            arr[i, lengths[i]:] = 0
        return view, torch.as_tensor(lengths, dtype=torch.long)

    def read(self, idx: Sequence[int]) -> Batch:
        """The batch of dataset indices ``idx``."""
        items = [self.dataset[i][0] for i in idx]
        if not self.cuda:
            x, lengths = self._fill(self._host[0], items)
            return x, lengths, list(idx)
        k = self._turn
        self._turn = 1 - k
        if self._events[k] is not None:
            self._events[k].synchronize()  # its previous batch has reached the device
        x, lengths = self._fill(self._host[k], items)
        x = x.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._events[k] = event
        lengths = None if lengths is None else lengths.to(self.device, non_blocking=True)
        return x.float(), lengths, list(idx)

    def __call__(self, index_batches: Iterable[Sequence[int]]) -> Iterator[Batch]:
        for idx in index_batches:
            yield self.read(idx)


#: Clips joined on the host per copy to the device when a dataset is made resident.
RESIDENT_CHUNK = 256


class ResidentReader:
    """Reads index batches of a preloaded :class:`~conilium.heads.data.ClipDataset` whose features
    are kept on ``device``: every clip's frames end to end in one tensor of the stored dtype
    (pooled statistics stacked), each batch gathered, padded and converted to float32 there. No
    host padding and no host-to-device copy per step, only the batch's indices.

    The values are exactly :class:`BatchReader`'s: float16 → float32 is exact on any device, and
    the padding is +0.0 (``torch.where``, not a product)."""

    def __init__(self, dataset: ClipDataset, device: torch.device):
        self.device = device
        items = [dataset[i][0] for i in range(len(dataset))]
        self.frames = items[0].dim() == 3
        if not self.frames:
            self.data = torch.stack(items).to(device)
            return
        self.lengths_host = np.asarray([int(x.shape[0]) for x in items], dtype=np.int64)
        total = int(self.lengths_host.sum())
        self.data = torch.empty((total,) + tuple(items[0].shape[1:]), dtype=items[0].dtype, device=device)
        at = 0
        for k in range(0, len(items), RESIDENT_CHUNK):  # a few hundred clips a copy: bounded host memory
            chunk = torch.cat(items[k: k + RESIDENT_CHUNK])
            self.data[at: at + len(chunk)].copy_(chunk)
            at += len(chunk)
        starts = np.concatenate([[0], np.cumsum(self.lengths_host)[:-1]])
        self.starts = torch.as_tensor(starts, dtype=torch.long).to(device)
        self.lengths = torch.as_tensor(self.lengths_host).to(device)
        self.last_row = int(self.lengths_host.sum()) - 1

    def read(self, idx: Sequence[int]) -> Batch:
        at = torch.as_tensor(list(idx), dtype=torch.long).to(self.device, non_blocking=True)
        if not self.frames:
            return self.data[at].float(), None, list(idx)
        t_max = int(self.lengths_host[np.asarray(idx, dtype=np.int64)].max())  # known here: no read-back
        pos = torch.arange(t_max, device=self.device)
        lengths = self.lengths[at]
        rows = (self.starts[at][:, None] + pos[None, :]).clamp(max=self.last_row)
        valid = (pos[None, :] < lengths[:, None])[:, :, None, None]
        return torch.where(valid, self.data[rows].float(), 0.0), lengths, list(idx)

    def __call__(self, index_batches: Iterable[Sequence[int]]) -> Iterator[Batch]:
        for idx in index_batches:
            yield self.read(idx)


#: Share of the device's free memory a preloaded dataset may take to be kept there (:func:`resident`).
RESIDENT_SHARE = 0.5


def resident(dataset, device: torch.device) -> bool:
    """Whether a preloaded dataset's features are kept on ``device`` (:class:`ResidentReader`): on
    CUDA, when they take at most :data:`RESIDENT_SHARE` of the device's free memory. On a CPU the
    host's buffers are already where the model reads (:class:`BatchReader`)."""
    if device.type != "cuda" or isinstance(dataset, FusionDataset) or not dataset.preloaded:
        return False
    need = sum(int(x.nbytes) for x in dataset._memory)
    free, _ = torch.cuda.mem_get_info(device)
    return need <= RESIDENT_SHARE * free


def loader_batches(loader: Iterable, device: torch.device) -> Iterator[Batch]:
    """The batches of a DataLoader over a ClipDataset collated by ``collate`` (worker processes),
    in the same form as :class:`BatchReader` gives them."""
    for x, lengths, _, idx in loader:
        x = x.to(device, non_blocking=True).float()
        yield x, None if lengths is None else lengths.to(device, non_blocking=True), idx.tolist()


class FusionReader:
    """Reads index batches of a :class:`~conilium.heads.data.FusionDataset`: one
    :class:`BatchReader` per cache, the batch's input a tuple of ``(frames, lengths)`` pairs (one
    per cache, in order; the batch's lengths are then None), as a fusion head takes it."""

    def __init__(self, dataset: FusionDataset, device: torch.device, *, max_batch: int):
        self.readers = [BatchReader(p, device, max_batch=max_batch) for p in dataset.parts]

    def read(self, idx: Sequence[int]) -> Batch:
        return tuple(r.read(idx)[:2] for r in self.readers), None, list(idx)

    def __call__(self, index_batches: Iterable[Sequence[int]]) -> Iterator[Batch]:
        for idx in index_batches:
            yield self.read(idx)


def reader_for(dataset, device: torch.device, *, max_batch: int):
    """The batch reader of ``dataset``: a :class:`FusionReader` for a fusion run's dataset, a
    :class:`ResidentReader` for a preloaded one that stays on the GPU (:func:`resident`), else a
    :class:`BatchReader`."""
    if isinstance(dataset, FusionDataset):
        return FusionReader(dataset, device, max_batch=max_batch)
    if resident(dataset, device):
        return ResidentReader(dataset, device)
    return BatchReader(dataset, device, max_batch=max_batch)

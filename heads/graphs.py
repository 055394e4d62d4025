"""A stacked head step on fixed shapes, captured once per shape as a CUDA graph and replayed.

At batch 16 a head's training step on a GPU is a few hundred small kernels, and launching them
from Python takes longer than running them: the same step replayed from a CUDA graph runs about
five times faster (the measurement in bench/bench_gpu.py). A graph replays the kernels it
recorded on the very tensors it recorded them on, so a step is made graph-ready by:

* **fixed shapes**: a batch's frames are padded up to a *frame bucket* (:func:`frame_bucket`:
  m·2^e frames, 8 ≤ m < 16, at most 1/8 more frames than the batch's longest clip, never more
  than the run's longest clip), so that a run sees a few dozen shapes, not hundreds; pooling
  ignores the padded frames (their attention weight is exactly 0), so only float32 rounding
  changes;
* **static inputs**: each shape has its own input tensors (frames, valid lengths, the clips'
  indices, the dropout masks) that every step of that shape is copied into, the frames a view
  of one buffer per batch size, sized for the run's longest clip; the graphs share one memory
  pool;
* **randomness outside**: the dropout masks are drawn before the step, each head's from its own
  random stream (:meth:`~conilium.heads.stacked.StackedHeads.draw_masks`), and are inputs;
* **an optimiser that stays on the device**: AdamW with ``capturable=True`` (its step counts on
  the device), so that the update is part of the graph.

:class:`StepGraphs` runs the step of a shape eagerly for its first :data:`WARMUP_STEPS` steps
(on a side stream, as CUDA graph capture asks: real steps, on the real batches), captures it on
the next and replays it from then on. The first :data:`CHECKED_REPLAYS` replays of each graph are
checked against the eager step on the same batch (the replay undone, the eager step kept): a
replay whose losses or weight updates differ, or a capture that fails (an operation a graph
cannot hold), leaves every later step eager, and metrics.json says why. A head whose training stops (patience, a
non-finite loss) leaves the stack's loss: another graph.

On a CPU nothing is captured: with ``cuda_graphs="on"`` the same fixed-shape steps run eagerly
(for tests; no gain). ``auto`` captures on CUDA only.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Hashable, Optional, Sequence, Tuple

import numpy as np
import torch

from conilium.util import bucket_length

#: Eager steps of a shape before its graph is captured (real steps, on a side stream).
WARMUP_STEPS = 2
#: Replays of each graph checked against the eager step on the same batch (the first: what was
#: captured; the second: that the graph reads the inputs refilled since).
CHECKED_REPLAYS = 2
#: A checked replay passes when its losses are within this relative difference of the eager
#: step's and its update of every weight tensor (after − before) within this relative difference
#: (norm of the difference over the norm of the eager update); float32 rounding is orders below.
CHECK_TOLERANCE = 1e-2


def use_graphs(mode: str, device: torch.device) -> bool:
    """Whether ``cuda_graphs`` (``auto``, ``on``, ``off``) asks for fixed-shape (graphed) steps on
    ``device``: ``auto`` on CUDA, ``on`` anywhere (captured on CUDA only)."""
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def frame_bucket(frames: int, cap: Optional[int] = None) -> int:
    """The padded frame count of a batch whose longest clip has ``frames`` frames: the smallest
    m·2^e ≥ ``frames`` with 8 ≤ m < 16 (``frames`` itself below 16), then at most ``cap`` (the
    run's longest clip) and at least ``frames`` (:func:`conilium.util.bucket_length`, the
    extraction's length buckets counted in frames)."""
    return bucket_length(frames, cap=cap)


@dataclass
class _Shape:
    """One shape's static inputs, its graph once captured and the output that graph writes."""

    x: torch.Tensor
    lengths: Optional[torch.Tensor]
    at: torch.Tensor
    masks: Optional[Tuple[torch.Tensor, ...]]
    steps: int = 0
    replays: int = 0
    graph: Optional["torch.cuda.CUDAGraph"] = None
    out: Optional[torch.Tensor] = None
    extra: Tuple = field(default_factory=tuple)


class StepGraphs:
    """``step(x, lengths, at, masks, *extra)`` (an optimiser step; its output: the detached losses)
    on fixed shapes, captured and replayed as CUDA graphs where ``capture`` (eager otherwise).

    ``cap_frames``: the run's longest clip in frames (a frame bucket never exceeds it). Call it
    with the batch (frames (B, T, …) and valid lengths (B,) on the device, or pooled vectors and
    None), the clips' indices ``at`` (B,) on the device, the dropout masks (or None) and ``extra``
    (hashable: part of the shape's key, passed on to ``step``: the heads still training).
    The output is valid until the next call."""

    def __init__(self, step: Callable[..., torch.Tensor], *, capture: bool, cap_frames: Optional[int] = None,
                 warmup: int = WARMUP_STEPS, state: Optional[Callable[[], Sequence[torch.Tensor]]] = None):
        self.step, self.capture, self.cap_frames, self.warmup = step, bool(capture), cap_frames, int(warmup)
        #: the tensors a step updates in place (weights first, then the optimiser's state), for the
        #: checked replays (:meth:`_checked_replay`); None: replays unchecked
        self.state = state
        #: the largest relative differences the checked replays found: losses, weight updates
        self.checked = {"replays": 0, "loss": 0.0, "update": 0.0}
        self.shapes: Dict[Hashable, _Shape] = {}
        #: why steps run eagerly where a capture was asked for (a capture that failed), else None
        self.failed: Optional[str] = None
        self._buffers: Dict[tuple, torch.Tensor] = {}
        self._side = torch.cuda.Stream() if self.capture else None
        # one memory pool for every shape's graph: a graph reads only its static inputs, the weights,
        # the optimiser's state and what it wrote itself in the same replay, and its output (the
        # losses) is read before the next replay
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None

    @property
    def captured(self) -> int:
        """The graphs captured so far."""
        return sum(1 for s in self.shapes.values() if s.graph is not None)

    def summary(self) -> dict:
        """What metrics.json records: whether steps were captured, the shapes seen, the graphs."""
        out = {"captured": self.capture and self.failed is None, "shapes": len(self.shapes), "graphs": self.captured}
        if self.checked["replays"]:
            out["checked"] = dict(self.checked)
        if not self.capture:
            out["eager"] = "no CUDA device: the fixed-shape steps ran eagerly"
        elif self.failed is not None:
            out["eager"] = self.failed
        return out

    def _input(self, size, dtype, device, frames: bool) -> torch.Tensor:
        """A zero static input of ``size``: a view of a buffer shared by every shape of the same batch
        size and clip shape, sized for the run's longest clip (one step runs at a time), so that
        a few dozen shapes of WavLM-large layers do not each hold their own."""
        if not frames or self.cap_frames is None:
            return torch.zeros(size, dtype=dtype, device=device)
        key = (size[0],) + tuple(size[2:]) + (dtype, str(device))
        flat = self._buffers.get(key)
        need = int(np.prod(size))
        if flat is None or flat.numel() < need:  # (a longer clip than cap_frames: a buffer of its own)
            flat = torch.zeros(max(need, size[0] * self.cap_frames * int(np.prod(size[2:]))), dtype=dtype,
                               device=device)
            self._buffers[key] = flat
        return flat[:need].view(size)

    def _shape(self, x: torch.Tensor, lengths: Optional[torch.Tensor], at: torch.Tensor,
               masks: Optional[Tuple[torch.Tensor, ...]], extra: Tuple) -> _Shape:
        frames = lengths is not None
        size = list(x.shape)
        if frames:
            size[1] = frame_bucket(x.shape[1], self.cap_frames)
        key = (tuple(size), frames, None if masks is None else tuple(tuple(m.shape) for m in masks), extra)
        shape = self.shapes.get(key)
        if shape is None:
            shape = _Shape(x=self._input(size, x.dtype, x.device, frames),
                           lengths=None if lengths is None else torch.zeros_like(lengths),
                           at=torch.zeros_like(at),
                           masks=None if masks is None else tuple(torch.zeros_like(m) for m in masks), extra=extra)
            self.shapes[key] = shape
        return shape

    def __call__(self, x: torch.Tensor, lengths: Optional[torch.Tensor], at: torch.Tensor,
                 masks: Optional[Tuple[torch.Tensor, ...]], *extra) -> torch.Tensor:
        s = self._shape(x, lengths, at, masks, tuple(extra))
        if lengths is not None:
            t = x.shape[1]
            s.x[:, :t].copy_(x)
            s.x[:, t:].zero_()
            s.lengths.copy_(lengths)
        else:
            s.x.copy_(x)
        s.at.copy_(at)
        if masks is not None:
            for static, m in zip(s.masks, masks):
                static.copy_(m)
        inputs = (s.x, s.lengths, s.at, s.masks) + s.extra
        if not self.capture:
            return self.step(*inputs)
        if self.failed is not None or (s.graph is None and s.steps < self.warmup):
            s.steps += 1
            return self._on_side_stream(inputs)
        if s.graph is None:
            graph = torch.cuda.CUDAGraph()
            try:
                # thread_local: a grid's other passes, in threads of this process, go on using the card
                with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                    s.out = self.step(*inputs)
            except Exception as e:  # noqa: BLE001 - any operation the graph cannot hold: eager from here on
                self.failed = f"the step could not be captured ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})"
                return self._on_side_stream(inputs)
            s.graph = graph
        if self.state is not None and s.replays < CHECKED_REPLAYS:
            return self._checked_replay(s, inputs)
        s.replays += 1
        s.graph.replay()
        return s.out

    def _checked_replay(self, s: _Shape, inputs) -> torch.Tensor:
        """Replay ``s``'s graph, then undo its update and take the same step eagerly: the step's
        outcome is the eager one's either way. Where the replay's losses or weight updates differ
        from the eager step's by more than :data:`CHECK_TOLERANCE` (a graph that did not record
        what the step computes), the graphs are dropped and every later step runs eagerly."""
        s.replays += 1
        tensors = [t.detach() for t in self.state()]
        before = [t.clone() for t in tensors]
        s.graph.replay()
        replayed_out = s.out.clone()
        replayed = [t.clone() for t in tensors]
        with torch.no_grad():
            for t, b in zip(tensors, before):
                t.copy_(b)  # in place: the graphs hold these very tensors
        out = self._on_side_stream(inputs)
        loss = float(((replayed_out - out).abs() / out.abs().clamp(min=1e-6)).max()) if out.numel() else 0.0
        update = 0.0
        for t, b, r in zip(tensors, before, replayed):
            if t.is_floating_point():
                eager = (t - b).float()
                update = max(update, float((r - t).float().norm() / eager.norm().clamp(min=1e-12)))
        self.checked["replays"] += 1
        self.checked["loss"] = max(self.checked["loss"], loss)
        self.checked["update"] = max(self.checked["update"], update)
        if not (loss <= CHECK_TOLERANCE and update <= CHECK_TOLERANCE):  # NaN fails too
            self.failed = (f"a replayed step differed from the eager step (losses {loss:.2g}, weight updates "
                           f"{update:.2g} relative): steps run eagerly")
            self.shapes.clear()
        return out

    def _on_side_stream(self, inputs) -> torch.Tensor:
        side, main = self._side, torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side), warnings.catch_warnings():
            # a capturable AdamW warns when it steps outside a graph: here it does so on purpose
            warnings.filterwarnings("ignore", message=".*capturable=True.*")
            out = self.step(*inputs)
        main.wait_stream(side)
        return out

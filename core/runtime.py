"""Where and how tensors are computed: device choice, precision, torchrun process groups.

One helper for every stage that runs a model (extraction, head training, fine-tuning,
prediction):

* :func:`resolve_device` — ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` with clear errors;
* :func:`compute_dtype` and :func:`autocast` — float32 everywhere, bfloat16/float16
  autocast on CUDA only; float32 on CUDA means full float32 (no TF32);
* :class:`ThreadInvariantLinear`, :class:`ThreadInvariantLayerNorm`,
  :func:`thread_invariant_softmax` — the operations of a head whose CPU results would
  otherwise depend on the number of threads, computed on one thread: a head trained on
  1 or 2 threads gives the same numbers, bitwise (those of one thread);
* :class:`Dist` / :func:`init_distributed` — the torchrun process group (gloo on CPU,
  NCCL on CUDA) or a single process, with the few collectives the stages use.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, TypeVar

import torch
import torch.distributed as dist

from . import errors
from .errors import ConfigError, ConiliumError

T = TypeVar("T")

#: Compute dtypes a model may run in; "auto" picks per device.
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
#: Extraction's weights in bfloat16 (no autocast: the upstream's weights and activations are
#: bfloat16 on any device; ``extract-features --compute-dtype bfloat16-weights``).
BF16_WEIGHTS = "bfloat16-weights"
#: What ``extract-features --compute-dtype`` takes.
EXTRACT_COMPUTE_DTYPES = (*COMPUTE_DTYPES, BF16_WEIGHTS)


def valid_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(batch, max_len) boolean mask, True on each clip's first ``lengths[i]`` frames."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


#: A linear layer's input of at most this many rows is multiplied on one thread (see
#: :class:`ThreadInvariantLinear`); MKL's products of a few rows depend on the thread count.
SMALL_ROWS = 64


@contextlib.contextmanager
def one_thread():
    """torch's CPU operations on one thread meanwhile (this thread's setting, restored after)."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _OneThread(torch.autograd.Function):
    """``fn(*inputs)`` and its gradients, each computed on one thread (the backward recomputes
    ``fn`` and takes torch's own gradients of it: the single-thread gradients, bitwise)."""

    @staticmethod
    def forward(ctx, fn, *inputs):
        ctx.fn = fn
        ctx.save_for_backward(*inputs)
        with one_thread():
            return fn(*inputs)

    @staticmethod
    def backward(ctx, grad):
        need = ctx.needs_input_grad[1:]
        inputs = [None if x is None else x.detach().requires_grad_(n) for x, n in zip(ctx.saved_tensors, need)]
        wanted = [i for i, (x, n) in enumerate(zip(inputs, need)) if n and x is not None]
        out = [None] * len(inputs)
        with torch.enable_grad(), one_thread():
            grads = torch.autograd.grad(ctx.fn(*inputs), [inputs[i] for i in wanted], grad)
        for i, g in zip(wanted, grads):
            out[i] = g
        return (None, *out)


def on_one_thread(fn: Callable, *inputs):
    """``fn(*inputs)`` (tensors, None allowed) computed on one thread, forward and backward, on
    CPU with more than one thread: its results and gradients are then those of one thread,
    whatever the thread count. On CUDA, with one thread or while tracing (an ONNX export),
    simply ``fn(*inputs)``."""
    first = next(x for x in inputs if x is not None)
    if first.device.type != "cpu" or torch.get_num_threads() == 1 or torch.jit.is_tracing():
        return fn(*inputs)  # an export traces torch's own operations
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs):
        return _OneThread.apply(fn, *inputs)
    with one_thread():
        return fn(*inputs)


class ThreadInvariantLayerNorm(torch.nn.LayerNorm):
    """:class:`torch.nn.LayerNorm` (the same parameters, state-dict names and outputs) whose
    CPU results do not depend on the number of threads.

    torch's CPU backward of a layer norm sums each row's share of the weight and bias
    gradients into one buffer per thread, then adds the buffers: 1 and 2 threads add the
    same numbers in another order, and after a few steps a run's weights differ in their
    last bits, then its scores. Here it runs on one thread (:func:`on_one_thread`; a head's
    layer norm is (batch, hidden), a few microseconds a step)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, eps = tuple(self.normalized_shape), self.eps
        return on_one_thread(lambda t, w, b: torch.nn.functional.layer_norm(t, shape, w, b, eps),
                             x, self.weight, self.bias)


class ThreadInvariantLinear(torch.nn.Linear):
    """:class:`torch.nn.Linear` whose CPU results do not depend on the number of threads.

    MKL multiplies a matrix of a few rows (5–7, 9–11 of them on 2 threads) differently on 1
    and on 2 threads: a head's classifier on a batch's last clips. An input of at most
    :data:`SMALL_ROWS` rows is multiplied on one thread (:func:`on_one_thread`), a larger one
    (a pooling's frames) as torch does it: its products are the same on 1 or more threads."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() > SMALL_ROWS * x.shape[-1]:
            return super().forward(x)
        return on_one_thread(torch.nn.functional.linear, x, self.weight, self.bias)


def thread_invariant_softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """:func:`torch.softmax` whose CPU results do not depend on the number of threads: torch's
    CPU backward of a softmax over the last dimension computes a row differently depending
    on how the rows are shared among the threads (1e-11 apart on 1 and 2 threads); here on
    one thread (:func:`on_one_thread`; a head's attention scores are (batch, frames))."""
    return on_one_thread(lambda t: torch.softmax(t, dim), x)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a torch device (auto, cpu, cuda, cuda:1, …)") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r}: expected auto, cpu or cuda[:N]")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return dev


def compute_dtype(name: str, device: torch.device, *, strict: bool = True) -> str:
    """The dtype a model computes in on ``device``.

    ``auto``: float32 on CPU; bfloat16 on CUDA where supported, else float16. A reduced
    precision on CPU is an error with ``strict`` (extraction), float32 without it.
    """
    if name == BF16_WEIGHTS:
        return name  # any device (slow on a CPU without bfloat16 instructions)
    if name not in COMPUTE_DTYPES:
        raise ConfigError(f"unknown compute dtype {name!r}; expected {', '.join(COMPUTE_DTYPES)}")
    if name == "auto":
        if device.type != "cuda":
            return "float32"
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if name != "float32" and device.type != "cuda":
        if strict:
            raise ConfigError(f"--compute-dtype {name} (autocast) is only used on CUDA; use float32 on CPU")
        return "float32"
    return name


@contextlib.contextmanager
def _no_tf32():
    """Full float32 on CUDA: no TF32 in matrix products and convolutions (restored after)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def autocast(device: torch.device, dtype: str = "float32"):
    """The context a forward pass runs in: nothing on CPU; on CUDA autocast to ``dtype``
    (bfloat16/float16) or full float32."""
    if device.type != "cuda" or dtype == BF16_WEIGHTS:
        return contextlib.nullcontext()
    if dtype in ("bfloat16", "float16"):
        return torch.autocast("cuda", dtype=getattr(torch, dtype))
    return _no_tf32()


@dataclass
class Dist:
    """This process's place in a torchrun job (a single process when not launched by torchrun)."""

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

    def barrier(self) -> None:
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

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.on:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.on:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_errors(self, error: Optional[str]) -> List[str]:
        """The error messages of every rank that had one."""
        return [e for e in self.gather(error) if e]

    def on_main(self, fn: Callable[[], T], *, share: bool = False) -> Optional[T]:
        """Run ``fn`` on rank 0 only and return what it returns there (None on the other ranks,
        or rank 0's result on every rank with ``share``). Synchronises the ranks.

        An exception ``fn`` raises fails every rank, so that no rank waits for rank 0 forever:
        a :class:`ConiliumError` (a full disk, say) is raised on every rank as an error of the
        same class with the same message and fields (a ConiliumError when its class is not in
        :mod:`conilium.errors`); another exception is raised as a ConiliumError naming its type. In a single process every exception propagates as it is.
        """
        result, error = None, None
        if self.main:
            try:
                result = fn()
            except Exception as e:
                if not self.on:
                    raise
                error = e
        problem = None if error is None else _describe(error)
        problem, shared = self.broadcast((problem, result if share else None))
        if isinstance(error, ConiliumError):
            raise error
        if problem is not None:
            raise _rebuild(*problem) from error
        return result if self.main else shared

    def close(self, clean: bool = True) -> None:
        """Leave the process group if this process started it (after a barrier when ``clean``)."""
        if self.initialised_here and dist.is_initialized():
            if clean:
                dist.barrier()
            dist.destroy_process_group()
            gc.collect()  # free the group (and join gloo's threads) now, not at interpreter exit
        self.initialised_here = False


def _describe(error: Exception) -> Tuple[str, str, dict]:
    """What another rank needs to raise ``error`` again: class name (ConiliumError for a
    conilium error defined outside :mod:`conilium.errors`), message, plain fields."""
    kind = type(error).__name__
    if isinstance(error, ConiliumError) and getattr(errors, kind, None) is not type(error):
        kind = ConiliumError.__name__
    fields = {k: v for k, v in vars(error).items() if isinstance(v, (str, int, float, bool, type(None)))}
    return kind, str(error), fields


def _rebuild(kind: str, message: str, fields: dict) -> ConiliumError:
    """Rank 0's error on this rank: its conilium class (by name) with its message and fields,
    else a ConiliumError naming the type."""
    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, ConiliumError):
        e = cls.__new__(cls)
        Exception.__init__(e, message)
        e.__dict__.update(fields)
        return e
    return ConiliumError(f"{kind}: {message}")


def init_distributed(device_name: str = "auto", *, backend: Optional[str] = None,
                     timeout_hours: Optional[float] = None) -> Tuple[Dist, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, NCCL on CUDA, or
    ``backend``); on CUDA each rank takes the GPU of its LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda" and world > 1 and device.index is None:
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    d = Dist(rank, world, local)
    if world > 1:
        if not dist.is_initialized():
            kw = {}
            if timeout_hours is not None:
                kw["timeout"] = datetime.timedelta(hours=timeout_hours)
            dist.init_process_group(backend=backend or ("nccl" if device.type == "cuda" else "gloo"), **kw)
            d.initialised_here = True
        d.world, d.rank = dist.get_world_size(), dist.get_rank()
    return d, device


def precision_dtype(precision: str, device) -> str:
    """The compute dtype of ``--precision`` on ``device``: bfloat16 autocast on CUDA for
    ``bfloat16`` (and for ``auto`` where supported), float32 otherwise."""
    if device.type == "cuda" and precision in ("auto", "bfloat16"):
        if precision == "bfloat16" or torch.cuda.is_bf16_supported():
            return "bfloat16"
    return "float32"


class CompiledCall:
    """``fn`` (a function or module) through ``torch.compile`` with dynamic shapes, so that
    inputs of every length share one compiled graph after a first compilation of some seconds.
    A failure of that first call (no C++ compiler on CPU, an operation the compiler does not
    take) is a :class:`~conilium.errors.ConfigError` saying what could not be compiled and
    ``without`` (what to do instead); later calls run the compiled code as it is."""

    def __init__(self, fn: Callable, *, what: str, without: str):
        import logging
        import warnings

        torch._logging.set_logs(dynamo=logging.ERROR)  # its notes on graph breaks, not errors
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\._dynamo")
        # tracing the backward of SpecAugment's masked assignment (transformers' _mask_hidden_states)
        # fails inside the compiler, which then runs that part as it is: anomaly mode's report of it
        warnings.filterwarnings("ignore", message="Error detected in IndexPutBackward", category=UserWarning)
        self.fn = torch.compile(fn, dynamic=True)
        self.what, self.without = what, without
        self.ok = False

    def __call__(self, *args, **kwargs):
        if self.ok:
            return self.fn(*args, **kwargs)
        try:
            out = self.fn(*args, **kwargs)
        except ConiliumError:
            raise
        except Exception as e:
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            raise ConfigError(f"--compile: torch.compile could not compile {self.what} ({type(e).__name__}: "
                              f"{first}); {self.without}") from None
        self.ok = True
        return out

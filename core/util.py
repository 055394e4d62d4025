"""Small helpers: atomic writes, output errors, JSON of dataclasses, seeding.

Writing output goes through :func:`atomic_path` (and :func:`write_json` on top of it):
a temporary file beside the target, renamed onto it on success, removed on failure.
A failure to write — a full disk, a read-only file system, no permission, a file where
a directory should be — becomes one :class:`~conilium.errors.OutputError` naming the
path, whatever wrote the bytes (Python, ``torch.save``, HDF5, matplotlib).
:func:`check_writable` finds such problems before a long job starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import random
import shutil
import tempfile
import traceback
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import numpy as np

from .errors import OutputError

#: errno → (what it means for the user, what to do). The errors that say "this output
#: cannot be written here", as opposed to a bug.
WRITE_ERRNOS = {
    errno.ENOSPC: ("no space left on device", "free some space or choose another output directory, then run again"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or choose another output directory, then run again"),
    errno.EFBIG: ("file too large for this file system", "choose an output directory on another file system"),
    errno.EROFS: ("read-only file system", "choose an output directory you can write to"),
    errno.EACCES: ("permission denied", "choose an output directory you can write to, or fix its permissions"),
    errno.EPERM: ("operation not permitted", "choose an output directory you can write to, or fix its permissions"),
    errno.ENOTDIR: ("a parent of it is a file, not a directory", "choose another output path"),
    errno.EEXIST: ("a file is in the way", "choose another output path, or remove that file"),
    errno.EISDIR: ("it is a directory", "choose another output path"),
    errno.ENAMETOOLONG: ("file name too long", "choose a shorter output path"),
    errno.EIO: ("input/output error", "check the disk"),
}
#: Below this many free bytes, a writer's failure that carries no errno (``torch.save``
#: reports a full disk as "RuntimeError: unexpected pos …", HDF5 as a bare OSError) is
#: taken for a full disk.
FULL_DISK_BYTES = 1 << 20


def free_bytes(path) -> Optional[int]:
    """Free bytes (for unprivileged users) on the file system holding ``path``, or None."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _format_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def output_error(exc: BaseException, path, *, where=None) -> Optional[OutputError]:
    """The :class:`OutputError` that ``exc``, raised while writing ``path``, stands for, or None
    when it is not a failure to write (a bug, a missing input file, an interrupt).

    ``where`` is a file or directory on the same file system, looked at (before any
    temporary file is removed) to tell a full disk from other failures without an errno.
    """
    if isinstance(exc, OutputError):
        return exc
    if not isinstance(exc, Exception):
        return None  # KeyboardInterrupt, SystemExit
    path = Path(path)
    code = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
    if code in WRITE_ERRNOS:
        # an OSError about another file (an input read inside the block) is not ours to explain
        named = getattr(exc, "filename", None)
        if named is not None and not _related(Path(os.fsdecode(named)), path):
            return None
        reason, hint = WRITE_ERRNOS[code]
        if named is not None and Path(os.fsdecode(named)).absolute() in path.absolute().parents:
            reason = f"{reason} ({os.fsdecode(named)})"  # the directory that could not be made
        return OutputError(path, reason, hint)
    if code is None and isinstance(exc, (OSError, RuntimeError)) or type(exc).__module__.startswith("safetensors"):
        free = free_bytes(where if where is not None else path.parent)
        if free is not None and free < FULL_DISK_BYTES:
            reason, hint = WRITE_ERRNOS[errno.ENOSPC]
            return OutputError(path, f"{reason} ({_format_bytes(free)} free; the writer said: {exc})", hint)
    return None


def _release(exc: BaseException) -> None:
    """Drop the local variables of the finished frames of ``exc``'s traceback: a writer that
    failed (``torch.save``'s zip writer, say) then closes its file now, so that the space of
    the removed temporary file is given back at once (the traceback's lines stay)."""
    seen = set()
    while exc is not None and id(exc) not in seen:  # the exceptions it was raised while handling, too
        seen.add(id(exc))
        with contextlib.suppress(Exception):
            traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__


def _related(named: Path, path: Path) -> bool:
    """True when ``named`` is ``path``, one of its parents, or a file beside it (a temporary one)."""
    try:
        named, path = named.absolute(), path.absolute()
    except OSError:  # pragma: no cover - no current directory
        return True
    return named == path or named in path.parents or named.parent == path.parent or path in named.parents


@contextlib.contextmanager
def output_errors(path, *, where=None) -> Iterator[None]:
    """Turn a failure to write ``path`` inside the block into an :class:`OutputError` naming it."""
    try:
        yield
    except Exception as e:
        err = output_error(e, path, where=where)
        if err is None or err is e:
            raise
        _release(e)
        raise err from e


#: The prefix of the probe file :func:`check_writable` writes and removes (one left behind is a
#: process killed in between).
WRITE_CHECK_PREFIX = ".conilium-write-check."


def check_writable(directory, *, what: str = "output directory", need_bytes: Optional[int] = None) -> Path:
    """Create ``directory`` (and its parents) and make sure a file can be written in it.

    An :class:`OutputError` naming it when it cannot be created or written (read-only file
    system, no permission, a file in the way, a full disk), or when ``need_bytes`` are
    given and fewer are free. Leaves nothing behind but the directory itself. Returns it.
    """
    directory = Path(directory)
    with output_errors(directory):
        if directory.exists() and not directory.is_dir():
            raise OutputError(directory, f"the {what} is a file, not a directory", "choose another output path")
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=WRITE_CHECK_PREFIX, dir=directory)
        try:
            try:
                os.write(fd, b"conilium")
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(probe)
    if need_bytes is not None:
        free = free_bytes(directory)
        if free is not None and free < need_bytes:
            raise OutputError(directory, f"the {what} needs about {_format_bytes(need_bytes)} but only "
                                         f"{_format_bytes(free)} are free on its file system",
                              "free some space or choose another output directory")
    return directory


@contextlib.contextmanager
def atomic_path(path, *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    Nothing half-written is ever left under the final name: on error the temporary
    file is removed. A failure to write (full disk, read-only, no permission, …) is an
    :class:`~conilium.errors.OutputError` naming ``path``.
    """
    path = Path(path)
    with output_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
        os.close(fd)
    tmp = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        if tmp.exists():  # mkstemp makes owner-only files; give the usual permissions
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as e:
        err = output_error(e, path, where=path.parent)  # looked at before the temporary file goes
        if err is not None and err is not e:
            _release(e)
        with contextlib.suppress(OSError):
            tmp.unlink()
        if err is None or err is e:
            raise
        raise err from e


def _default(o: Any):
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(path, obj: Any) -> None:
    """Write ``obj`` (dataclasses, numpy values and paths allowed) as JSON, atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, default=_default)
            f.write("\n")


def read_json(path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def reject_unknown_fields(cls, mapping, what: str) -> None:
    """ConfigError naming every key of ``mapping`` that is not a field of dataclass ``cls``."""
    from .errors import ConfigError

    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - names)
    if unknown:
        raise ConfigError(f"unknown {what} option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")


def read_json_object(path, what: str) -> dict:
    """A JSON file that must hold an object; ConfigError naming the file otherwise."""
    from .errors import ConfigError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        data = read_json(path)
    except ValueError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: {what} must be a JSON object")
    return data


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


#: length buckets: per doubling of a length, this many bucket lengths (so a bucket holds at most
#: 1/BUCKET_STEPS more than the longest length padded to it)
BUCKET_STEPS = 8


def bucket_length(n: int, *, unit: int = 1, cap: Optional[int] = None) -> int:
    """The length a batch whose longest item is ``n`` long is padded to, so that a run sees few
    distinct shapes: the smallest ``m · 2^e`` units of ``unit`` with ``BUCKET_STEPS <= m <
    2·BUCKET_STEPS`` that holds ``n`` (below ``2·BUCKET_STEPS`` units: the next whole unit),
    then at most ``cap`` (the run's longest item, which needs no longer bucket) and at least ``n``.
    Used for the audio samples of an extraction batch (units of one output frame) and for the
    frames of a head's training batch (units of one frame)."""
    n = int(n)
    units = -(-n // int(unit))
    e = max(0, units.bit_length() - BUCKET_STEPS.bit_length())
    out = (-(-units // (1 << e)) << e) * int(unit)
    if cap is not None:
        out = min(out, int(cap))
    return max(n, out)


def lazy_exports(package: str, exports: Mapping[str, str], namespace: dict):
    """PEP 562 ``__getattr__`` and ``__dir__`` for a package whose names (``exports``: name →
    module, relative to ``package``) load their module on first use, so that importing one
    light module of the package does not import the heavy ones."""
    import importlib

    def __getattr__(name):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name], package), name)
        namespace[name] = value
        return value

    def __dir__():
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__

"""One writer per output directory: a lock file that names its holder.

>>> with DirectoryLock("runs/wbce-S", what="train-head run directory"):
...     ...  # write the run

A second process that wants to write the same directory stops at once with a
:class:`~conilium.errors.LockError` naming the holder (pid, host, since when, command),
or, with ``wait``, waits until the directory is free (``wait=True``: as long as it takes,
a number: that many seconds at most).

The lock is the file ``<directory>/.conilium.lock``, created atomically (a complete
file written under a temporary name and hard-linked onto the lock name, which fails when
it exists; ``O_CREAT | O_EXCL`` where the file system has no hard links), holding JSON:
pid, host, boot id, the process's start time, since when, the command and a random
token. It works across processes and hosts that share the directory (NFS included), and
needs no package beyond the standard library.

A lock left behind by a process that died (killed, out of memory, power cut) is *stale*:
its host is this host and its pid is gone — or is now another process (the start time
differs), or the machine has rebooted since (another boot id). A stale lock is taken over:
under an exclusive ``flock`` on the directory, the lock file is read again and removed
only if it is still the very file found stale (same token), so that two processes
taking over at the same time cannot remove a fresh lock. A lock held on another host
cannot be checked from here; the error says which file to remove when that process is
known to be gone. The holder then removes the lock's temporary files a process killed while
writing its lock left (``.conilium.lock.*.tmp`` older than :data:`DAMAGED_STALE_SECONDS`: a
live writer renames its own within microseconds).

The same lock guards train-head run directories, finetune-best model directories and
extraction caches.

A process stopped by a signal releases its locks: :func:`stop_on_signals` turns SIGTERM
(and SIGHUP) into :class:`Stopped`, a ``KeyboardInterrupt``, so that a command stopped by
``kill`` or a batch scheduler takes the same way out as one stopped by Ctrl-C — every
``with`` block ends, locks are released and temporary files removed.
"""

from __future__ import annotations

import _thread
import contextlib
import datetime
import errno
import json
import os
import secrets
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

from .errors import LockError, OutputError
from .util import output_errors

LOCK_FILE = ".conilium.lock"
#: Seconds between two looks at a held lock while waiting.
POLL_SECONDS = 0.5
#: A lock file naming no holder (damaged, or a crash while a file system without hard links
#: was writing it) is taken over once it is this old.
DAMAGED_STALE_SECONDS = 60.0


@dataclass(frozen=True)
class LockHolder:
    """Who holds a lock, as its lock file says."""

    pid: int
    host: str
    since: str  # ISO 8601, local time with offset
    command: str = ""
    token: str = ""
    boot_id: Optional[str] = None
    start_ticks: Optional[int] = None  # the process's start time (Linux /proc/<pid>/stat field 22)

    def describe(self) -> str:
        text = f"process {self.pid} on host {self.host}, since {self.since}"
        return text + (f" ({self.command})" if self.command else "")


def _boot_id() -> Optional[str]:
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return None


def _start_ticks(pid: int) -> Optional[int]:
    """Start time of process ``pid`` in clock ticks since boot (Linux), None elsewhere or when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:  # the command name (field 2) may hold spaces and parentheses: split after the last ")"
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (ValueError, IndexError):
        return None


def _command() -> str:
    argv = [os.path.basename(sys.argv[0])] + sys.argv[1:] if sys.argv and sys.argv[0] else []
    text = " ".join(argv)
    return text if len(text) <= 200 else text[:197] + "..."


def this_process() -> LockHolder:
    pid = os.getpid()
    return LockHolder(pid=pid, host=socket.gethostname(),
                      since=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                      command=_command(), token=secrets.token_hex(8), boot_id=_boot_id(),
                      start_ticks=_start_ticks(pid))


def read_holder(lock_path) -> Optional[LockHolder]:
    """The holder a lock file names; None when it is gone or unreadable."""
    try:
        data = json.loads(Path(lock_path).read_text(encoding="utf-8"))
        fields = {k: data[k] for k in LockHolder.__dataclass_fields__ if k in data}
        return LockHolder(**fields)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:  # pragma: no cover - cannot tell
        return True
    return True


def is_stale(holder: LockHolder) -> bool:
    """True when ``holder`` certainly no longer runs: same host, and its process is gone
    (or its pid now belongs to another process, or the host has rebooted since)."""
    if holder.host != socket.gethostname():
        return False  # cannot be checked from here
    boot = _boot_id()
    if holder.boot_id and boot and holder.boot_id != boot:
        return True
    if not _pid_alive(holder.pid):
        return True
    if holder.start_ticks is not None:
        now = _start_ticks(holder.pid)
        if now is not None and now != holder.start_ticks:
            return True  # the pid was reused
    return False


@contextlib.contextmanager
def _directory_flock(directory: Path):
    """An exclusive flock on ``directory`` itself (best effort: nothing where unsupported)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # pragma: no cover - file system without flock
            pass
        yield
    finally:
        os.close(fd)  # closing releases the flock


class DirectoryLock:
    """The lock of one output directory (see the module docstring); a context manager.

    ``what`` names the directory in messages ("train-head run directory", ...).
    ``wait``: False (stop at once when held), True (wait as long as it takes) or seconds.
    ``on_wait(message)`` is called once when the lock is held and we wait for it.
    The directory is created when missing and, when it is still empty after release,
    removed again.
    """

    def __init__(self, directory, *, what: str = "directory", wait: Union[bool, float] = False,
                 on_wait: Optional[Callable[[str], None]] = None):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self.what = what
        self.wait = wait
        self.on_wait = on_wait
        self.holder: Optional[LockHolder] = None
        self._created: Optional[Path] = None  # the topmost directory this lock created

    # ------------------------------------------------------------------ acquire / release

    def acquire(self) -> "DirectoryLock":
        if self.holder is not None:
            raise LockError(f"{self.directory}: lock already held by this object")
        with output_errors(self.directory):
            if self.directory.exists() and not self.directory.is_dir():
                raise OutputError(self.directory, f"the {self.what} is a file, not a directory",
                                  "choose another output path")
            try:
                self._make_directory()
            except BaseException:
                self._forget_dir()
                raise
        deadline = None if self.wait is True or self.wait is False else time.monotonic() + float(self.wait)
        told = False
        me = this_process()
        while True:
            try:
                created = self._create(me)
                if created:
                    self._remove_dead_temporaries()
            except BaseException:  # cannot write here (full disk, read-only, ...), or a signal
                self.release()  # a lock file already ours (a signal just after it was made) goes too
                self._forget_dir()
                raise
            if created:
                return self
            other = read_holder(self.path)
            if other is None:  # released meanwhile, or a lock file that names no holder
                try:
                    age = time.time() - self.path.stat().st_mtime
                except FileNotFoundError:
                    continue
                if age > DAMAGED_STALE_SECONDS:
                    self._take_over(None)
                    continue
                problem = (f"{self.directory}: its lock file {self.path} names no holder (being written, or "
                           f"damaged); if no other process writes this {self.what}, remove it")
                who = "an unknown process"
            elif is_stale(other):
                self._take_over(other)
                continue
            else:
                problem, who = self._held_message(other), other.describe()
            if self.wait is False or (deadline is not None and time.monotonic() >= deadline):
                self._forget_dir()
                raise LockError(problem)
            if not told and self.on_wait is not None:
                self.on_wait(f"{self.directory}: waiting for {who} to finish writing this {self.what}")
                told = True
            time.sleep(POLL_SECONDS)

    def release(self) -> None:
        if self.holder is None:
            return
        with contextlib.suppress(OSError):
            current = read_holder(self.path)
            if current is not None and current.token == self.holder.token:
                self.path.unlink()
        self.holder = None
        self._forget_dir()

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # ------------------------------------------------------------------ internals

    def _create(self, me: LockHolder) -> bool:
        """Create the lock file holding ``me``; False when it exists already."""
        data = (json.dumps(asdict(me), indent=1) + "\n").encode("utf-8")
        tmp = self.directory / f"{LOCK_FILE}.{me.token}.{secrets.token_hex(4)}.tmp"
        with output_errors(self.directory, where=self.directory):
            try:
                while True:
                    if not self.directory.is_dir():  # the previous holder made it, and removed it empty
                        self._make_directory()
                    try:
                        f = open(tmp, "wb")
                        break
                    except FileNotFoundError:
                        continue
                with f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                # ours before it exists: a signal between the link and the return still finds the file
                # to remove (release() removes only a lock file holding our token)
                self.holder = me
                try:
                    os.link(tmp, self.path)  # atomic, and fails when the lock exists (NFS too)
                    return True
                except FileExistsError:
                    self.holder = None
                    return False
                except OSError as e:
                    if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                        raise
                # a file system without hard links: O_EXCL, then the content
                try:
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    self.holder = None
                    return False
                try:
                    os.write(fd, data)
                    os.fsync(fd)
                except BaseException:
                    os.close(fd)
                    with contextlib.suppress(OSError):
                        self.path.unlink()
                    raise
                os.close(fd)
                return True
            finally:
                with contextlib.suppress(OSError):
                    tmp.unlink()

    def _remove_dead_temporaries(self) -> None:
        """Remove the temporary lock files that processes killed while writing their lock left here."""
        with contextlib.suppress(OSError):
            for tmp in self.directory.glob(f"{LOCK_FILE}.*.tmp"):
                with contextlib.suppress(OSError):
                    if tmp.is_file() and time.time() - tmp.stat().st_mtime > DAMAGED_STALE_SECONDS:
                        tmp.unlink()

    def _take_over(self, stale: Optional[LockHolder]) -> None:
        """Remove the lock file of a dead holder (None: a lock file naming no holder, older than
        :data:`DAMAGED_STALE_SECONDS`), if it is still that one (see the module docstring)."""
        with _directory_flock(self.directory):
            current = read_holder(self.path)
            if stale is None:
                try:
                    if current is not None or time.time() - self.path.stat().st_mtime <= DAMAGED_STALE_SECONDS:
                        return  # replaced meanwhile
                except FileNotFoundError:
                    return
            elif current is None or current.token != stale.token:
                return  # someone else took it over, or it was released
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def _held_message(self, other: LockHolder) -> str:
        here = socket.gethostname()
        text = (f"{self.directory}: this {self.what} is being written by another process: {other.describe()} "
                f"(lock file {self.path}). Wait for it to finish (--wait-for-lock waits for it), or choose "
                f"another output directory")
        if other.host != here:
            text += (f". The lock was taken on another host ({other.host}), so it cannot be checked from "
                     f"{here}; if that process is gone, remove {self.path}")
        return text

    def _make_directory(self) -> None:
        """Create the directory (and its missing parents), remembering the topmost one made."""
        top = None
        for d in [self.directory, *self.directory.parents]:
            if d.exists():
                break
            top = d
        if top is not None and self._created is None:
            self._created = top
        self.directory.mkdir(parents=True, exist_ok=True)

    def _forget_dir(self) -> None:
        """Remove the directories this lock created, when they are (still) empty."""
        if self._created is None:
            return
        for d in [self.directory, *self.directory.parents]:
            try:
                d.rmdir()
            except OSError:
                break
            if d == self._created:
                break
        self._created = None


def lock_directory(directory, *, what: str = "directory", wait: Union[bool, float] = False,
                   on_wait: Optional[Callable[[str], None]] = None) -> DirectoryLock:
    """A :class:`DirectoryLock` on ``directory`` (use it in a ``with`` statement)."""
    return DirectoryLock(directory, what=what, wait=wait, on_wait=on_wait)


# ----------------------------------------------------------------------------- signals

#: The signals :func:`stop_on_signals` turns into :class:`Stopped` (SIGINT is Python's own
#: ``KeyboardInterrupt`` already).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Stopped(KeyboardInterrupt):
    """A command stopped by a signal (``signum``); a ``KeyboardInterrupt``, so that it takes the
    same way out as Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    def __reduce__(self):
        # rebuilt from its number, not its message: a grid worker's Stopped travels back to the
        # grid pickled, and one that cannot be rebuilt there marks the worker pool broken (its
        # other workers are killed before they release their locks)
        return type(self), (self.signum,)


def signal_name(exc: BaseException) -> str:
    """The signal that stopped a command: SIGTERM, SIGHUP, … for :class:`Stopped`, else SIGINT."""
    return signal.Signals(exc.signum).name if isinstance(exc, Stopped) else "SIGINT"


def exit_status(exc: BaseException) -> int:
    """The shell's status of a process stopped by the signal behind ``exc``: 128 + its number."""
    return 128 + (exc.signum if isinstance(exc, Stopped) else int(signal.SIGINT))


#: Seconds after which a signal whose :class:`Stopped` Python swallowed is delivered again.
REDELIVER_SECONDS = 0.02


@contextlib.contextmanager
def stop_on_signals(signals=STOP_SIGNALS, *, before: Optional[Callable[[int], None]] = None) -> Iterator[None]:
    """Within the block, ``signals`` (SIGTERM and SIGHUP) raise :class:`Stopped` in the main thread
    (once: a repeated signal does not interrupt the clean-up it started), after ``before(signum)``
    when given (called once); the previous handlers are restored after. A signal ignored before
    (``nohup``) stays ignored. Nothing changes outside the main thread, where Python cannot install
    handlers.

    A signal that lands while the main thread runs a garbage-collection callback or a ``__del__``
    (an import's module-lock callback, say) raises where Python only prints "Exception ignored"
    and carries on: that :class:`Stopped` is caught by ``sys.unraisablehook`` (nothing printed) and
    the signal delivered again :data:`REDELIVER_SECONDS` later, until it stops the block; a block
    that ends before that raises :class:`Stopped` as it ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    state = {"raised": None, "before": False, "redeliver": None, "swallowed": None}

    def handler(signum, frame):
        if state["raised"] is not None:
            return
        if before is not None and not state["before"]:
            state["before"] = True
            before(signum)
        state["swallowed"] = None
        state["raised"] = Stopped(signum)
        raise state["raised"]

    previous_hook = sys.unraisablehook

    def hook(unraisable):
        exc = state["raised"]
        if exc is None or unraisable.exc_value is not exc:
            return previous_hook(unraisable)
        state["raised"] = None  # swallowed: the block goes on, so stop it again a moment later
        state["swallowed"] = exc.signum
        # the handler is run again in the main thread, as for a signal (no real one is sent: one
        # arriving after the block would meet the handler restored then, the default's included)
        redeliver = threading.Timer(REDELIVER_SECONDS, _thread.interrupt_main, (exc.signum,))
        redeliver.daemon = True
        state["redeliver"] = redeliver
        redeliver.start()

    previous = {}
    for s in signals:
        if signal.getsignal(s) is not signal.SIG_IGN:
            previous[s] = signal.signal(s, handler)
    sys.unraisablehook = hook
    try:
        yield
    finally:
        if state["redeliver"] is not None:
            state["redeliver"].cancel()
            state["redeliver"].join()
        if sys.unraisablehook is hook:
            sys.unraisablehook = previous_hook
        for s, old in previous.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)
        if state["swallowed"] is not None:  # the block ended before the signal could stop it: it stops here
            raise Stopped(state["swallowed"])

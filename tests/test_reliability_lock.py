"""One writer per output directory: a second train-head / finetune-best on the same directory
stops with a message naming the holder (or waits), a dead process's lock is taken over."""

import json
import multiprocessing as mp
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import replace

import pytest

from conilium.errors import LockError, OutputError
from conilium.heads.train import TrainConfig, train_head
from conilium.locking import LOCK_FILE, DirectoryLock, LockHolder, is_stale, lock_directory, read_holder, this_process
from conilium.testing import write_synthetic_cache

HOLD = textwrap.dedent("""
    import sys
    from conilium.locking import lock_directory
    lock = lock_directory(sys.argv[1], what="train-head run directory").acquire()
    print("locked", flush=True)
    sys.stdin.read()  # hold until the test closes our stdin
    lock.release()
""")


class Holder:
    """Another process holding the lock of ``directory`` until ``release()``."""

    def __init__(self, directory):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "locked"

    @property
    def pid(self):
        return self.proc.pid

    def release(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


@pytest.fixture
def holder_of(tmp_path):
    held = []

    def make(directory):
        h = Holder(directory)
        held.append(h)
        return h

    yield make
    for h in held:
        h.release()


@pytest.fixture(scope="module")
def syn_cache(tmp_path_factory):
    return write_synthetic_cache(tmp_path_factory.mktemp("syn") / "cache", clips=60, dim=8, seed=2, signal=0.4)


def _config(cache, **kw):
    kw.setdefault("epochs", 2)
    kw.setdefault("hidden", 16)
    return TrainConfig(cache=str(cache.path), device="cpu", **kw)


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_lock(directory, **fields):
    directory.mkdir(parents=True, exist_ok=True)
    info = {"pid": 1, "host": socket.gethostname(), "since": "2024-01-01T00:00:00+00:00", "command": "train-head",
            "token": "feedc0de", "boot_id": None, "start_ticks": None}
    info.update(fields)
    (directory / LOCK_FILE).write_text(json.dumps(info))


def test_a_second_writer_gets_an_error_naming_the_holder(tmp_path, holder_of):
    run = tmp_path / "run"
    h = holder_of(run)
    with pytest.raises(LockError) as e:
        lock_directory(run, what="train-head run directory").acquire()
    msg = str(e.value)
    assert f"process {h.pid} on host {socket.gethostname()}, since 20" in msg
    assert str(run) in msg and "being written by another process" in msg and "-c" in msg  # holder's command
    with pytest.raises(LockError, match=f"process {h.pid}"):
        lock_directory(run, wait=0.6).acquire()  # waited, still held
    h.release()
    assert not (run / LOCK_FILE).exists()
    with lock_directory(run):
        assert read_holder(run / LOCK_FILE).pid == os.getpid()
    assert not (run / LOCK_FILE).exists()


def test_train_head_refuses_a_run_directory_another_process_writes(syn_cache, tmp_path, holder_of):
    run = tmp_path / "run"
    h = holder_of(run)
    with pytest.raises(LockError, match=rf"{re.escape(str(run))}: this train-head run directory is being written "
                                        rf"by another process: process {h.pid}"):
        train_head(_config(syn_cache), run, progress=False)
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]  # nothing of ours written
    h.release()
    train_head(_config(syn_cache), run, progress=False)
    assert (run / "metrics.json").is_file() and not (run / LOCK_FILE).exists()


def test_waiting_for_the_lock_starts_when_the_holder_finishes(tmp_path, holder_of):
    run = tmp_path / "run"
    h = holder_of(run)
    messages = []
    t0 = time.monotonic()
    threading.Timer(1.0, h.release).start()
    with lock_directory(run, wait=True, on_wait=messages.append) as lock:
        assert lock.holder.pid == os.getpid()
    assert time.monotonic() - t0 >= 0.9
    assert len(messages) == 1 and f"waiting for process {h.pid}" in messages[0]


def test_a_stale_lock_of_a_dead_process_is_taken_over(syn_cache, tmp_path):
    run = tmp_path / "run"
    dead = _dead_pid()
    _write_lock(run, pid=dead)
    assert is_stale(read_holder(run / LOCK_FILE))
    train_head(_config(syn_cache), run, progress=False)
    assert (run / "metrics.json").is_file() and not (run / LOCK_FILE).exists()


def test_a_reused_pid_or_a_reboot_makes_a_lock_stale_a_live_holder_does_not(tmp_path):
    me = this_process()
    assert not is_stale(me)
    if me.start_ticks is not None:  # Linux: the pid now runs another process than the one that locked
        assert is_stale(replace(me, start_ticks=me.start_ticks + 1))
    if me.boot_id is not None:
        assert is_stale(replace(me, boot_id="another-boot"))
    parent = LockHolder(pid=os.getppid(), host=socket.gethostname(), since="now")
    assert not is_stale(parent)
    assert not is_stale(replace(parent, pid=_dead_pid(), host="elsewhere"))  # cannot be checked from here


def test_a_lock_from_another_host_is_reported_with_the_file_to_remove(tmp_path):
    run = tmp_path / "run"
    _write_lock(run, pid=_dead_pid(), host="gpu-node-7")
    with pytest.raises(LockError) as e:
        lock_directory(run, what="finetune-best model directory").acquire()
    msg = str(e.value)
    assert "host gpu-node-7" in msg and "another host" in msg and f"remove {run / LOCK_FILE}" in msg
    assert read_holder(run / LOCK_FILE).host == "gpu-node-7"  # left alone


def _race(directory, barrier, results):
    barrier.wait()
    lock = DirectoryLock(directory)
    try:
        lock.acquire()
    except LockError:
        results.put("refused")
        return
    results.put("locked")
    time.sleep(2.0)  # hold while the others try
    lock.release()


def test_simultaneous_takeovers_of_a_stale_lock_let_exactly_one_writer_in(tmp_path):
    run = tmp_path / "run"
    _write_lock(run, pid=_dead_pid())
    ctx = mp.get_context("spawn")
    n = 4
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(run, barrier, results)) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    outcomes = sorted(results.get(timeout=5) for _ in range(n))
    assert outcomes == ["locked"] + ["refused"] * (n - 1)
    assert not (run / LOCK_FILE).exists()


def test_an_empty_new_directory_is_removed_again_and_a_file_in_the_way_is_an_error(tmp_path):
    new = tmp_path / "a" / "b"
    with lock_directory(new):
        assert new.is_dir()
    assert not new.exists()  # created for the lock, left empty: removed
    (tmp_path / "file").write_text("x")
    from conilium.errors import OutputError

    with pytest.raises(OutputError, match="is a file, not a directory"):
        lock_directory(tmp_path / "file").acquire()


def test_finetune_best_refuses_a_model_directory_another_process_writes(small_demo_corpus, tmp_path, holder_of):
    from conilium.finetune import FinetuneConfig, finetune

    out = tmp_path / "model"
    h = holder_of(out)
    config = FinetuneConfig(corpus=str(small_demo_corpus), out=str(out), upstream="demo-wavlm", random_init=True,
                            max_seconds=1.0, epochs=1, max_train_clips=8, hidden=16, num_workers=0)
    with pytest.raises(LockError, match=rf"finetune-best model directory is being written by another process: "
                                        rf"process {h.pid}"):
        finetune(config, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]


def test_a_damaged_lock_file_is_reported_then_taken_over_when_old(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text("{garbage")
    with pytest.raises(LockError, match="names no holder .*remove it"):
        lock_directory(run).acquire()
    old = time.time() - 3600
    os.utime(run / LOCK_FILE, (old, old))
    with lock_directory(run) as lock:
        assert read_holder(run / LOCK_FILE).token == lock.holder.token


@pytest.mark.parametrize("where", ["after the link", "removing dead temporaries"])
def test_a_signal_while_the_lock_is_being_taken_leaves_no_lock_file(tmp_path, monkeypatch, where):
    """A stop (SIGTERM's Stopped, Ctrl-C) that lands after the lock file exists but before acquire()
    returns (so no ``with`` block will release it) still removes the lock file and the directory."""
    import conilium.locking as locking

    run = tmp_path / "run"
    if where == "after the link":
        real_link = os.link

        def link_then_stop(src, dst, *a, **k):
            real_link(src, dst, *a, **k)
            raise KeyboardInterrupt
        monkeypatch.setattr(locking.os, "link", link_then_stop)
    else:
        def stop(self):
            assert (run / LOCK_FILE).exists()
            raise KeyboardInterrupt
        monkeypatch.setattr(DirectoryLock, "_remove_dead_temporaries", stop)
    with pytest.raises(KeyboardInterrupt):
        with lock_directory(run):
            pytest.fail("the block must not run")
    assert not run.exists()  # neither the lock file nor its temporary, nor the directory made for it
    monkeypatch.undo()
    with lock_directory(run) as lock:  # and the next writer gets in
        assert read_holder(run / LOCK_FILE).token == lock.holder.token


def test_a_failed_link_does_not_remove_another_holders_lock(tmp_path, monkeypatch, holder_of):
    """An error while trying a held lock leaves the holder's lock file alone."""
    import errno

    import conilium.locking as locking

    run = tmp_path / "run"
    holder_of(run)
    token = read_holder(run / LOCK_FILE).token

    def broken_link(src, dst, *a, **k):
        raise OSError(errno.EIO, "I/O error")
    monkeypatch.setattr(locking.os, "link", broken_link)
    with pytest.raises(OutputError, match="input/output error"):
        lock_directory(run).acquire()
    assert read_holder(run / LOCK_FILE).token == token

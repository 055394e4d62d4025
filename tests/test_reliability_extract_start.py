"""extract-features killed at its start (SIGKILL: nothing is cleaned up) leaves the directory in one
of a few states, each reproduced here exactly; a rerun resumes and writes the very cache an
uninterrupted run writes. A directory holding the user's own files is never taken for one."""

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conilium.demo import make_demo_corpus
from conilium.errors import CacheError
from conilium.extract import ExtractConfig, extract_features
from conilium.extract.upstreams import build_random_upstream
from conilium.locking import LOCK_FILE, this_process

RUNTIME = dict(batch_seconds=0.0, device="cpu", workers=1, verbose=False)


def _extract(config, corpus, out, **kw):
    """One torch thread, as the reference: the same bytes whatever the machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return extract_features(config, corpus, out, **RUNTIME, **kw)
    finally:
        torch.set_num_threads(old)


def _files(root: Path):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A corpus, a local upstream (nothing but the cache's own files in the cache) and the cache an
    uninterrupted run writes."""
    root = tmp_path_factory.mktemp("start")
    corpus = make_demo_corpus(root / "corpus", clips=12, seed=5)
    upstream = build_random_upstream("demo-wav2vec2-base", root / "upstream", seed=3)
    config = ExtractConfig(str(upstream), max_seconds=2.0, shard_size=4)
    return corpus, config, _extract(config, corpus, root / "reference")


def _dead_holder_lock(directory: Path) -> None:
    """The lock file of a process that is gone, as its killed holder left it."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    holder = dataclasses.replace(this_process(), pid=int(proc.stdout), start_ticks=None)
    (directory / LOCK_FILE).write_text(json.dumps(dataclasses.asdict(holder)))


def _old(path: Path) -> None:
    then = time.time() - 3600
    os.utime(path, (then, then))


def _lock_temporary(directory: Path) -> None:
    """Killed between writing its lock under a temporary name and linking it."""
    tmp = directory / f"{LOCK_FILE}.0123456789abcdef.01234567.tmp"
    tmp.write_text(json.dumps(dataclasses.asdict(this_process()))[:40])
    _old(tmp)


def state_empty(d: Path) -> None:  # killed right after creating the directory
    pass


def state_lock_being_written(d: Path) -> None:
    _lock_temporary(d)


def state_lock_linked(d: Path) -> None:  # the lock linked, its temporary name not yet removed
    _dead_holder_lock(d)
    _lock_temporary(d)


def state_write_check(d: Path) -> None:  # killed while checking that the directory can be written
    _dead_holder_lock(d)
    (d / ".conilium-write-check.k2x9_q1z").write_bytes(b"conilium")


def state_settings_half_written(d: Path) -> None:  # killed while writing extraction.json
    _dead_holder_lock(d)
    (d / ".extraction.json.a8d3kq0v.tmp").write_text('{\n  "format": 2,\n  "upst')


@pytest.mark.parametrize("leave", [state_empty, state_lock_being_written, state_lock_linked, state_write_check,
                                   state_settings_half_written], ids=lambda f: f.__name__[6:])
def test_a_rerun_after_a_kill_at_start_writes_the_uninterrupted_cache(setup, tmp_path, leave):
    corpus, config, reference = setup
    out = tmp_path / "cache"
    out.mkdir()
    leave(out)
    _extract(config, corpus, out)
    got, want = _files(out), _files(reference)
    assert sorted(got) == sorted(want)  # the leftovers are gone, nothing else is there
    for name in want:
        assert got[name] == want[name], f"{name} differs from the uninterrupted run"


def test_the_users_files_beside_the_leftovers_are_refused_and_kept_until_they_are_gone(setup, tmp_path):
    corpus, config, reference = setup
    out = tmp_path / "mine"
    out.mkdir()
    state_settings_half_written(out)
    (out / "notes.txt").write_text("mine")

    def kept():  # everything but the dead process's lock, taken over and released
        return {k: v for k, v in _files(out).items() if k != LOCK_FILE}

    before = kept()
    for overwrite in (False, True):
        with pytest.raises(CacheError, match="not empty and is not a feature cache"):
            _extract(config, corpus, out, overwrite=overwrite)
        assert kept() == before
    (out / "notes.txt").unlink()  # the user moves their file away: the killed start is resumed
    _extract(config, corpus, out)
    assert _files(out) == _files(reference)

"""A complete feature cache on storage this process cannot write (a shared read-only copy) stays
usable by every command that only reads it: extract-features reports it complete and writes
nothing (no lock file, no temporary file), verify-cache and train-head read it. A read-only cache
that would need writing is one error naming it. The read-only storage is ``chmod -R a-w``."""

import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from conilium.cli import main
from conilium.demo import make_demo_corpus

pytestmark = pytest.mark.usefixtures("two_torch_threads")

EXTRACT = ["extract", "features", "--upstream", "demo-wav2vec2-base", "--random-init", "--max-seconds", "2",
           "--shard-size", "4", "--device", "cpu", "--threads", "1", "--workers", "1"]


def _chmod_stops_writing(where: Path) -> bool:
    """False when running as root (or with the capability to override permissions): chmod then
    does not stop this process from writing."""
    probe = where / "probe"
    probe.mkdir()
    probe.chmod(0o555)
    try:
        (probe / "x").write_text("")
        return False
    except PermissionError:
        return True
    finally:
        probe.chmod(0o755)
        shutil.rmtree(probe)


def _chmod_tree(root: Path, writable: bool) -> None:
    for p in [root, *root.rglob("*")]:
        mode = p.stat().st_mode
        p.chmod(mode | 0o200 if writable else mode & ~0o222)


def _snapshot(root: Path):
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(root.rglob("*"))}


def _invoke(args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), (args, repr(r.exception), r.output)
    assert "Traceback" not in r.output
    return r


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("ro")
    if os.geteuid() == 0 and not _chmod_stops_writing(root):
        pytest.skip("running as root: chmod does not make a directory read-only")
    corpus = make_demo_corpus(root / "corpus", clips=12, seed=4)
    cache = root / "cache"
    r = _invoke(EXTRACT + ["--corpus", corpus, "--out", cache, "-q"])
    assert r.exit_code == 0, r.output
    return corpus, cache


@pytest.fixture
def read_only(built, tmp_path):
    """A read-only copy of the cache, made writable again after the test (to be removed)."""
    corpus, cache = built
    copy = tmp_path / "shared" / "cache"
    shutil.copytree(cache, copy)
    yield corpus, copy
    _chmod_tree(copy, writable=True)


def test_every_reading_command_uses_a_complete_read_only_cache_and_writes_nothing(read_only, tmp_path):
    corpus, cache = read_only
    _chmod_tree(cache, writable=False)
    before = _snapshot(cache)

    r = _invoke(EXTRACT + ["--corpus", corpus, "--out", cache])  # the rerun: done
    assert r.exit_code == 0, r.output
    assert "already complete" in r.output and "read-only" in r.output
    r = _invoke(["extract", "verify", cache])
    assert r.exit_code == 0 and "OK" in r.output, r.output
    run = tmp_path / "run"
    r = _invoke(["heads", "train", "--cache", cache, "--out", run, "--epochs", "1", "--hidden", "8", "--device",
                 "cpu", "-q"])
    assert r.exit_code == 0, r.output
    assert (run / "metrics.json").is_file()

    assert _snapshot(cache) == before  # no lock file, no temporary file, nothing rewritten


def test_a_read_only_cache_that_needs_writing_is_one_error_naming_it(read_only):
    corpus, cache = read_only
    shard = cache / "shards" / "shard-00001.h5"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF  # a damaged frame: the shard is to be written again
    shard.write_bytes(bytes(data))
    _chmod_tree(cache, writable=False)
    before = _snapshot(cache)

    r = _invoke(EXTRACT + ["--corpus", corpus, "--out", cache, "-q"])
    assert r.exit_code != 0
    assert f"cannot write {cache}" in r.output and "read-only" in r.output, r.output
    assert _snapshot(cache) == before

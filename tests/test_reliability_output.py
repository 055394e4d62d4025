"""Full disks and read-only output paths: one clear OutputError naming the path, found before
the long work where it can be, no temporary file left, nothing half-written that passes for
a finished run, report or model directory.

Read-only directories are made with chmod 0o555, or, as root (who ignores permissions),
with a read-only tmpfs; full disks with a small tmpfs, which needs root (skipped otherwise).
"""

import contextlib
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conilium.describe import describe_corpus
from conilium.errors import OutputError
from conilium.heads import train as head_train
from conilium.heads.train import TrainConfig, train_head
from conilium.runs import write_run_outputs
from conilium.testing import write_synthetic_cache
from conilium.util import atomic_path, check_writable, write_json

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@contextlib.contextmanager
def _tmpfs(where: Path, options: str):
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB file system (root only): room for a lock file and a small JSON, not for a model."""
    if not IS_ROOT:
        pytest.skip("mounting a small tmpfs needs root")
    with _tmpfs(tmp_path / "small", "size=64k,mode=0755") as d:
        yield d


@pytest.fixture
def read_only(tmp_path):
    """A directory nobody (root included) can write in."""
    if IS_ROOT:
        with _tmpfs(tmp_path / "ro", "ro,size=64k") as d:
            yield d
    else:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o555)
        yield d
        d.chmod(0o755)


@pytest.fixture(scope="module")
def syn_cache(tmp_path_factory):
    return write_synthetic_cache(tmp_path_factory.mktemp("syn") / "cache", clips=60, dim=8, seed=3, signal=0.4)


def _config(cache, **kw):
    kw.setdefault("epochs", 2)
    return TrainConfig(cache=str(cache.path), device="cpu", **kw)


def _no_training(monkeypatch):
    def trained(*a, **k):
        raise AssertionError("training started although the output directory cannot be written")

    monkeypatch.setattr(head_train, "_train", trained)


def _leftovers(d: Path):
    return sorted(p.name for p in d.rglob("*"))


# ----------------------------------------------------------------------------- the central pieces

def test_atomic_writes_on_a_full_disk_are_an_output_error_and_leave_nothing(full_disk):
    with pytest.raises(OutputError, match=rf"cannot write {full_disk}/big\.json: no space left on device"):
        write_json(full_disk / "big.json", list(range(100_000)))
    with pytest.raises(OutputError, match=r"model\.pt: no space left on device \(\d+ bytes free; the writer said"):
        with atomic_path(full_disk / "model.pt", suffix=".pt.tmp") as tmp:  # torch says RuntimeError, no errno
            torch.save({"w": torch.zeros(100_000)}, tmp)
    names = [f"C{i:05d}" for i in range(3000)]
    with pytest.raises(OutputError, match=r"predictions/.*\.csv: no space left"):
        write_run_outputs(full_disk / "run", {"Development": (names, np.full((3000, 8), 0.125), ["N"] * 3000),
                                              "Test3": (names, np.full((3000, 8), 0.125), [None] * 3000)})
    assert not (full_disk / "run" / "metrics.json").exists()
    assert [p for p in _leftovers(full_disk) if p.endswith("tmp")] == []
    with pytest.raises(OSError), open(full_disk / "filler", "wb") as f:  # whatever room is left
        f.write(b"x" * (1 << 20))
    with pytest.raises(OutputError, match=rf"cannot write {full_disk}: no space left"):
        check_writable(full_disk)


def test_check_writable_wants_the_room_asked_for(tmp_path):
    with pytest.raises(OutputError, match=rf"cannot write {tmp_path}: the run needs about 8.0 EiB|needs about"):
        check_writable(tmp_path, what="run", need_bytes=1 << 63)
    assert check_writable(tmp_path / "new", need_bytes=1) == tmp_path / "new"
    assert _leftovers(tmp_path) == ["new"]


def test_read_only_and_file_in_the_way_are_output_errors(read_only, tmp_path):
    with pytest.raises(OutputError, match=rf"cannot write {read_only}/a\.json: (read-only file system|permission)"):
        write_json(read_only / "a.json", {})
    with pytest.raises(OutputError, match=rf"cannot write {read_only}/sub: "):
        check_writable(read_only / "sub")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match=r"a file is in the way|parent of it is a file"):
        write_json(tmp_path / "file" / "x" / "a.json", {})
    with pytest.raises(OutputError, match="is a file, not a directory"):
        check_writable(tmp_path / "file")
    assert _leftovers(read_only) == []


# ----------------------------------------------------------------------------- train-head

def test_train_head_into_a_read_only_directory_fails_before_training(syn_cache, read_only, tmp_path, monkeypatch):
    _no_training(monkeypatch)
    with pytest.raises(OutputError, match=rf"cannot write {read_only}/run"):
        train_head(_config(syn_cache), read_only / "run", progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match=rf"{tmp_path}/file/run"):
        train_head(_config(syn_cache), tmp_path / "file" / "run", progress=False)


def test_train_head_on_a_full_disk_fails_before_training(syn_cache, full_disk, monkeypatch):
    _no_training(monkeypatch)
    with pytest.raises(OutputError, match=r"train-head run directory needs about .* free|no space left"):
        train_head(_config(syn_cache), full_disk / "run", progress=False)
    assert _leftovers(full_disk) == []  # the directory it made for the lock is gone again


def test_train_head_running_out_of_space_while_writing_leaves_no_half_run(syn_cache, full_disk, monkeypatch):
    monkeypatch.setattr(head_train, "output_bytes", lambda model, clips: 0)  # as if the disk filled meanwhile
    run = full_disk / "run"
    with pytest.raises(OutputError, match=rf"cannot write {run}/model\.pt: no space left on device"):
        train_head(_config(syn_cache, hidden=1024), run, progress=False)
    assert _leftovers(full_disk) == []  # no config.json, no temporary file, no lock, no empty directory


# ----------------------------------------------------------------------------- describe-corpus

def test_describe_corpus_into_a_read_only_directory(small_demo_corpus, read_only, monkeypatch):
    import conilium.describe as describe

    monkeypatch.setattr(describe, "load_corpus", lambda *a, **k: pytest.fail("read the corpus first"))
    with pytest.raises(OutputError, match=rf"cannot write {read_only}/report"):
        describe_corpus(small_demo_corpus, read_only / "report")


def test_describe_corpus_on_a_full_disk_leaves_no_partial_report(small_demo_corpus, full_disk):
    out = full_disk / "report"
    with pytest.raises(OutputError, match=rf"cannot write {out}/\w+\.(png|md|json): no space left on device"):
        describe_corpus(small_demo_corpus, out)
    assert _leftovers(out) == []


# ----------------------------------------------------------------------------- finetune-best

def test_finetune_best_into_a_read_only_directory_fails_before_training(small_demo_corpus, read_only, monkeypatch):
    from conilium.finetune import FinetuneConfig, finetune
    from conilium.finetune import train as ft

    monkeypatch.setattr(ft, "build", lambda *a, **k: pytest.fail("built the model before checking --out"))
    config = FinetuneConfig(corpus=str(small_demo_corpus), out=str(read_only / "model"), upstream="demo-wavlm",
                            random_init=True, epochs=1, max_train_clips=8, hidden=16, num_workers=0)
    with pytest.raises(OutputError, match=rf"cannot write {read_only}/model"):
        finetune(config, progress=False)


def test_model_directory_and_checkpoints_on_a_full_disk(full_disk, tmp_path):
    from conilium.extract.upstreams import load_upstream
    from conilium.finetune import EndToEndModel
    from conilium.finetune.model import MODEL_FILE, save_model_dir
    from conilium.training.state import save_atomic
    from conilium.heads.model import EmotionHead, HeadConfig

    upstream, _ = load_upstream("demo-wavlm", random_init=True, random_root=tmp_path / "weights")
    head = EmotionHead(HeadConfig(dim=upstream.config.hidden_size, num_layers=1, layers=0, hidden=16))
    model = EndToEndModel(upstream, head)
    out = full_disk / "model"
    with pytest.raises(OutputError, match=rf"cannot write {out}/upstream: no space left on device"):
        save_model_dir(out, model, {"max_seconds": 8.0, "normalize": {"mode": "none", "stats": None},
                                    "offsets": {}, "loss": "wbce"})
    assert not (out / MODEL_FILE).exists() and _leftovers(out) == []
    with pytest.raises(OutputError, match=r"checkpoints/last\.pt: no space left on device"):
        save_atomic({"model": model.state_dict()}, out / "checkpoints" / "last.pt")
    assert [p for p in _leftovers(out) if p != "checkpoints"] == []


def test_finetune_best_failing_to_write_its_model_directory_leaves_no_finished_run_and_resumes(
        small_demo_corpus, tmp_path, monkeypatch):
    import json

    from conilium.finetune import FinetuneConfig, finetune
    from conilium.finetune import rundir as ft
    from conilium.finetune.model import MODEL_FILE

    config = FinetuneConfig(corpus=str(small_demo_corpus), out=str(tmp_path / "model"), upstream="demo-wavlm",
                            random_init=True, max_seconds=1.0, epochs=1, max_train_clips=8, hidden=16,
                            num_workers=0, dropout=0.0, upstream_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0)
    real = ft.save_model_dir

    def disk_full(out, model, info):
        (Path(out) / "upstream").mkdir(exist_ok=True)
        (Path(out) / "upstream" / "config.json").write_text("{}")
        raise OutputError(Path(out) / "head.pt", "no space left on device", "free some space")

    monkeypatch.setattr(ft, "save_model_dir", disk_full)
    with pytest.raises(OutputError, match=r"head\.pt: no space left on device; free some space; the checkpoints "
                                          r"in .* are kept: finetune-best --resume"):
        finetune(config, progress=False)
    out = Path(config.out)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.json"]  # no metrics, model, lock
    monkeypatch.setattr(ft, "save_model_dir", real)
    metrics = finetune(config, resume=True, progress=False)  # no training again: the outputs only
    assert (out / MODEL_FILE).is_file() and json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["training"]["epochs_run"] == 1

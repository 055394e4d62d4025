"""train-head --cache given another kind of directory says what it is and what to pass;
--out inside the cache is refused."""

import json
import re

import pytest

from conilium.errors import CacheError, ConfigError
from conilium.dirs import not_a_cache
from conilium.heads.train import TrainConfig, train_head
from conilium.testing import write_synthetic_cache


@pytest.fixture(scope="module")
def syn_cache(tmp_path_factory):
    return write_synthetic_cache(tmp_path_factory.mktemp("syn") / "cache", clips=60, dim=8, seed=4, signal=0.4)


@pytest.fixture(scope="module")
def head_run(syn_cache, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "wbce-S"
    train_head(TrainConfig(cache=str(syn_cache.path), device="cpu", epochs=1, hidden=16), run, progress=False)
    return run


def _train(cache, out):
    return train_head(TrainConfig(cache=str(cache), device="cpu", epochs=1, hidden=16), out, progress=False)


def _refused(cache, out, *fragments):
    with pytest.raises(CacheError) as e:
        _train(cache, out)
    msg = str(e.value)
    assert "extraction did not finish" not in msg
    for f in fragments:
        assert f in msg, msg
    assert not out.exists()  # refused before anything was written
    return msg


def test_a_train_head_run_directory(head_run, syn_cache, tmp_path):
    _refused(head_run, tmp_path / "out", f"{head_run} is a train-head run directory",
             f"this run was trained on --cache {syn_cache.path}")


def test_a_finetune_best_model_directory(tmp_path):
    model = tmp_path / "model"
    (model / "upstream").mkdir(parents=True)
    (model / "conilium_model.json").write_text("{}")
    (model / "config.json").write_text(json.dumps({"kind": "finetune"}))
    (model / "metrics.json").write_text("{}")
    _refused(model, tmp_path / "out", f"{model} is a finetune-best model directory", f"--upstream {model}",
             f"predict --model {model}")
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints").mkdir(parents=True)
    (unfinished / "checkpoints" / "last.pt").write_bytes(b"")
    _refused(unfinished, tmp_path / "out", "finetune-best model directory (unfinished)")


def test_a_corpus_root(small_demo_corpus, tmp_path):
    _refused(small_demo_corpus, tmp_path / "out", f"{small_demo_corpus} is a corpus (Audios/, Labels/)",
             f"extract-features --corpus {small_demo_corpus}")


def test_a_folder_of_caches_and_an_unrelated_folder(syn_cache, tmp_path):
    _refused(syn_cache.path.parent, tmp_path / "out", "folder of caches", str(syn_cache.path))
    (tmp_path / "empty").mkdir()
    _refused(tmp_path / "empty", tmp_path / "out", "is not a feature cache (no manifest.json")


def test_an_unfinished_extraction_still_says_to_resume_it(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "extraction.json").write_text("{}")
    assert not_a_cache(cache) is None
    with pytest.raises(CacheError, match="extraction did not finish"):
        _train(cache, tmp_path / "out")


@pytest.mark.parametrize("inside", ["", "runs/a"])
def test_out_in_the_cache_is_refused(syn_cache, inside):
    before = sorted(p.name for p in syn_cache.path.rglob("*"))
    out = syn_cache.path / inside if inside else syn_cache.path
    with pytest.raises(ConfigError, match=re.escape(f"--out {out} ") + "(is the cache directory|lies inside)"):
        _train(syn_cache.path, out)
    assert sorted(p.name for p in syn_cache.path.rglob("*")) == before


def test_a_file_or_the_manifest_itself(syn_cache, tmp_path):
    manifest = syn_cache.path / "manifest.json"
    with pytest.raises(CacheError, match=re.escape(f"pass its directory to --cache: {syn_cache.path}")):
        _train(manifest, tmp_path / "out")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CacheError, match="is a file, not a feature cache directory"):
        _train(tmp_path / "notes.txt", tmp_path / "out")

"""finetune-best --compile: the training forward and backward through torch.compile give the
eager run's losses (without random draws), and a compiler that fails is a clear error."""

import json

import pytest
import torch

from conilium.errors import ConfigError
from conilium.finetune import FinetuneConfig, finetune
from conilium.finetune.model import MODEL_FILE
from conilium.finetune.rundir import checkpoint_paths

pytestmark = pytest.mark.usefixtures("two_torch_threads")


def _config(corpus, out, **kw):
    # no dropout, LayerDrop or SpecAugment: compiled kernels make their own random draws
    return FinetuneConfig(corpus=str(corpus), out=str(out), upstream="demo-wavlm", random_init=True, max_seconds=2.0,
                          epochs=2, max_train_clips=24, batch_size=8, hidden=16, num_workers=0, dropout=0.0,
                          upstream_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0, **kw)


def test_a_compiled_fine_tuning_trains_as_the_eager_one(small_demo_corpus, tmp_path):
    eager = finetune(_config(small_demo_corpus, tmp_path / "eager"), progress=False)
    compiled = finetune(_config(small_demo_corpus, tmp_path / "compiled", compile=True), progress=False)
    a, b = eager["history"], compiled["history"]
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert y["train_loss"] == pytest.approx(x["train_loss"], rel=1e-5)
        assert y["dev_f1_macro"] == pytest.approx(x["dev_f1_macro"], abs=1e-6)
    assert json.loads((tmp_path / "compiled" / "config.json").read_text())["compile"] is True


def test_a_compiler_that_fails_is_an_error_saying_to_run_without_it(small_demo_corpus, tmp_path, monkeypatch):
    def broken(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("no C++ compiler found\nmore detail")
        return run
    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(ConfigError, match=r"--compile: torch.compile could not compile the model's training "
                                          r"forward \(RuntimeError: no C\+\+ compiler found\); fine-tune without "
                                          r"--compile"):
        finetune(_config(small_demo_corpus, tmp_path / "m", compile=True), progress=False)
    out = tmp_path / "m"
    assert not (out / MODEL_FILE).exists() and not any(p.exists() for p in checkpoint_paths(out))

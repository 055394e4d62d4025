"""Warm start from a head that train-head trained on the same upstream's frozen cache."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conilium.audio import normalize, read_audio
from conilium.cache.reader import FeatureCache
from conilium.errors import ConfigError
from conilium.runs import prediction_path, read_predictions
from conilium.extract.upstreams import load_upstream
from conilium.finetune import EndToEndModel, FinetuneConfig, finetune
from conilium.finetune.warmstart import head_from_run
from conilium.training.losses import probabilities
from conilium.heads.train import TrainConfig, train_head


@pytest.fixture(scope="module")
def small_cache(small_demo_corpus, tmp_path_factory):
    """Every layer of demo-wavlm (random init, seed 0) over the small demo corpus, clips cut at 1.5 s."""
    from conilium.extract import ExtractConfig, extract_features

    config = ExtractConfig("demo-wavlm", random_init=True, seed=0, layers="all", pooled_stats=True, max_seconds=1.5)
    return extract_features(config, small_demo_corpus, tmp_path_factory.mktemp("cache") / "c", device="cpu",
                            verbose=False)


@pytest.fixture(scope="module")
def head_runs(small_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("head_runs")
    runs = {}
    for name, kw in {"weighted": dict(layers="weighted"), "layer1": dict(layers=1),
                     "pooled": dict(pooled_stats=True)}.items():
        runs[name] = root / name
        train_head(TrainConfig(cache=str(small_cache), epochs=1, hidden=64, device="cpu", **kw), runs[name],
                   progress=False)
    return runs


def test_warm_started_model_reproduces_the_head_run(head_runs, small_cache, small_demo_corpus, tmp_path):
    cache = FeatureCache(small_cache)
    upstream, identity = load_upstream("demo-wavlm", random_init=True, seed=0, random_root=tmp_path)
    head, layers, settings = head_from_run(head_runs["weighted"], upstream, identity)
    assert layers == cache.layers == [0, 1, 2, 3] and head.config.layers == "weighted"
    assert settings["normalize"] == "global" and settings["max_seconds"] == 1.5
    model = EndToEndModel(upstream, head, layers).eval()
    run = read_predictions(prediction_path(head_runs["weighted"], "Development"))
    for k in (0, 5, 9):
        x = read_audio(Path(small_demo_corpus) / "Audios" / run.names[k], max_seconds=1.5)
        x = normalize(x, "global", settings["normalize_stats"])
        with torch.no_grad():
            p = probabilities(model(torch.from_numpy(x)[None], torch.tensor([len(x)])), settings["loss"])[0]
        np.testing.assert_allclose(p.numpy(), run.probs[k], atol=2e-3)  # cached frames are float16


def test_finetune_starts_from_the_head_with_the_cache_settings(head_runs, small_demo_corpus, tmp_path):
    """With a vanishing learning rate the model still gives the head run's development predictions,
    which needs the cache's truncation (1.5 s, not the default 8) and normalisation statistics."""
    out = tmp_path / "m"
    finetune(FinetuneConfig(corpus=str(small_demo_corpus), out=str(out), upstream="demo-wavlm", random_init=True,
                            init_head=str(head_runs["weighted"]), lr=1e-12, weight_decay=0.0, epochs=1,
                            batch_size=8, max_train_clips=8, num_workers=0, tune_thresholds=False), progress=False)
    ours = read_predictions(prediction_path(out, "Development"))
    theirs = read_predictions(prediction_path(head_runs["weighted"], "Development"))
    assert ours.names == theirs.names
    np.testing.assert_allclose(ours.probs, theirs.probs, atol=2e-3)


def test_heads_that_cannot_be_fine_tuned_are_clear_errors(head_runs, small_demo_corpus, tmp_path):
    config = FinetuneConfig(corpus=str(small_demo_corpus), out=str(tmp_path / "m"), upstream="demo-wavlm",
                            random_init=True, epochs=1, num_workers=0)
    with pytest.raises(ConfigError, match="pooled per-layer statistics"):
        finetune(replace(config, init_head=str(head_runs["pooled"])), progress=False)
    with pytest.raises(ConfigError, match="hidden state 1 only, not the last one"):
        finetune(replace(config, init_head=str(head_runs["layer1"])), progress=False, overwrite=True)
    with pytest.raises(ConfigError, match="trained on features of upstream"):
        finetune(replace(config, init_head=str(head_runs["weighted"]), random_init_seed=1), progress=False,
                 overwrite=True)

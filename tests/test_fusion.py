"""Fusion heads: train-head --cache AUDIO --cache TEXT, one pooling branch per cache, one classifier."""

import filecmp
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conilium.cli.evaluate import eval_group
from conilium.cli.heads import train_head_cmd
from conilium.errors import ConfigError
from conilium.heads.config import TrainConfig
from conilium.heads.grid import expand_spec, run_grid
from conilium.heads.model import EmotionHead, FusionHead
from conilium.heads.prepare import make_dataset, prepare
from conilium.heads.recipe import predict_heads, read_batches
from conilium.heads.train import load_head, plan_passes, train_head
from conilium.heads.data import length_batches
from conilium.runs import prediction_path, read_predictions
from conilium.testing import write_synthetic_cache

TIMING_HISTORY = ("seconds", "train_seconds")
TIMING_TRAINING = ("seconds", "clips_per_second")


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """Two synthetic caches of the same 80 clips (the names are the clip numbers): 'audio' (dim 8,
    stored layers 1 and 3) and 'text' (dim 6, three stored layers), and a 'short' one of 50 clips."""
    base = tmp_path_factory.mktemp("fusion")
    audio = write_synthetic_cache(base / "audio", clips=80, dim=8, seed=1, signal=0.4)
    text = write_synthetic_cache(base / "text", clips=80, dim=6, seed=2, signal=0.4, stored_layers=(0, 1, 2),
                                 frames=(5, 15))
    short = write_synthetic_cache(base / "short", clips=50, dim=6, seed=2, frames=(5, 15))
    return {"audio": audio.path, "text": text.path, "short": short.path}


def _config(caches, more=("text",), **kw):
    kw.setdefault("epochs", 3)
    kw.setdefault("hidden", 16)
    kw.setdefault("batch_size", 8)
    return TrainConfig(cache=str(caches["audio"]), more_caches=tuple(str(caches[m]) for m in more), device="cpu",
                       threads=1, **kw)


def _untimed(metrics):
    m = dict(metrics)
    m["history"] = [{k: v for k, v in h.items() if k not in TIMING_HISTORY} for h in m["history"]]
    m["training"] = {k: v for k, v in m["training"].items() if k not in TIMING_TRAINING}
    return m


def assert_same_run(a, b):
    preds = sorted(p.name for p in (a / "predictions").iterdir())
    assert preds == sorted(p.name for p in (b / "predictions").iterdir()) and preds
    for name in preds:
        assert filecmp.cmp(a / "predictions" / name, b / "predictions" / name, shallow=False), name
    assert _untimed(json.loads((a / "metrics.json").read_text())) == _untimed(json.loads((b / "metrics.json").read_text()))
    sa, sb = load_head(a, fusion=True)[1].state_dict, load_head(b, fusion=True)[1].state_dict
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("fusion", ["concat", "cross-attention"])
def test_cli_trains_a_fusion_head_and_writes_a_run_read_back_as_written(caches, tmp_path, fusion):
    out = tmp_path / "fusion"
    args = ["--cache", str(caches["audio"]), "--cache", str(caches["text"]), "--out", str(out), "--epochs", "3",
            "--hidden", "16", "--device", "cpu", "--fusion", fusion, "-q"]
    r = CliRunner().invoke(train_head_cmd, args)
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["f1_macro"] <= 1.0 and metrics["n"] > 0
    assert metrics["training"]["fusion"]["combine"] == fusion
    assert [b["input"]["dim"] for b in metrics["training"]["fusion"]["caches"]] == [8, 6]
    config = json.loads((out / "config.json").read_text())
    assert config["more_caches"] == [str(caches["text"].resolve())]
    assert TrainConfig.from_dict(config).more_caches == (str(caches["text"].resolve()),)
    # the checkpoint rebuilds the fusion head: each branch its own layer mix over its cache's layers
    model, ckpt = load_head(out, fusion=True)
    assert isinstance(model, FusionHead) and len(ckpt.branches) == 2 and ckpt.fusion == fusion
    assert (model.cross is not None) == (fusion == "cross-attention")
    assert [b.layer_mix.num_layers for b in model.branches] == [2, 3]
    assert [b["cache"] for b in ckpt.branches] == [str(caches["audio"].resolve()), str(caches["text"].resolve())]
    # its Development predictions are what the rebuilt head gives on the two caches' features
    written = read_predictions(prediction_path(out, "Development"))
    data = prepare(TrainConfig.from_dict(config))
    try:
        ds = make_dataset(data, written.names)
        read = read_batches(ds, length_batches(data.cache, written.names, 5, data.selection), torch.device("cpu"))
        probs = predict_heads([(model, "wbce")], read(), len(ds), device=torch.device("cpu"))[0]
    finally:
        data.close_more()
        data.cache.close()
    np.testing.assert_allclose(written.probs, probs, atol=6e-7)  # written with 6 decimals
    # rerun: done already, nothing trained
    r = CliRunner().invoke(train_head_cmd, args)
    assert r.exit_code == 0 and "complete already" in r.output, r.output
    # the other readers of a head run on new audio say why a fusion head is not theirs
    with pytest.raises(ConfigError, match="fusion head.*2 caches"):
        load_head(out)


def test_a_one_cache_config_json_has_no_fusion_key_and_old_ones_read_as_one_cache(caches, tmp_path):
    config = _config(caches, more=())
    assert "more_caches" not in config.to_json()
    train_head(config, tmp_path / "run", progress=False)
    written = json.loads((tmp_path / "run" / "config.json").read_text())
    assert "more_caches" not in written and TrainConfig.from_dict(written).more_caches == ()
    model, ckpt = load_head(tmp_path / "run")
    assert isinstance(model, EmotionHead) and ckpt.branches is None
    assert "branches" not in torch.load(tmp_path / "run" / "model.pt", weights_only=False)
    assert "fusion" not in json.loads((tmp_path / "run" / "metrics.json").read_text())["training"]


def test_missing_clips_are_named_with_their_count(caches, tmp_path):
    alone = prepare(_config(caches, more=()))
    alone.cache.close()
    short = {f"SYN_{i:05d}.wav" for i in range(50)}
    missing = [n for n in alone.train_names + alone.dev_names if n not in short]
    assert missing
    with pytest.raises(ConfigError, match=rf"lacks {len(missing)} Train/Development clip\(s\)") as e:
        train_head(_config(caches, more=("short",)), tmp_path / "run", progress=False)
    assert ", ".join(missing[:5]) in str(e.value) and str(caches["short"]) in str(e.value)
    assert not (tmp_path / "run" / "metrics.json").exists()
    # the CLI says it the same way
    r = CliRunner().invoke(train_head_cmd, ["--cache", str(caches["audio"]), "--cache", str(caches["short"]),
                                            "--out", str(tmp_path / "cli"), "--device", "cpu", "-q"])
    assert r.exit_code != 0 and "lacks" in r.output and "SYN_000" in r.output, r.output


@pytest.mark.parametrize("kw, match", [(dict(pooled_stats=True), "--pooled-stats"),
                                       (dict(more=("audio",)), "given more than once"),
                                       (dict(more=(), fusion="cross-attention"), "give --cache more than once")])
def test_what_a_fusion_run_cannot_do_is_refused(caches, tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        train_head(_config(caches, **kw), tmp_path / "run", progress=False)


def test_noise_augmented_copies_read_their_source_clips_text(caches, tmp_path):
    audio = write_synthetic_cache(tmp_path / "aug", clips=80, dim=8, seed=1, signal=0.4, augmented_copies=6)
    config = TrainConfig(cache=str(audio.path), more_caches=(str(caches["text"]),), epochs=2, hidden=16,
                         device="cpu")
    data = prepare(config, cache=audio)
    try:
        copies = [n for n in data.train_names if "#aug" in n]
        assert copies  # the augmented copies of the X and O clips do not train
        ds = make_dataset(data, copies)
        assert ds.parts[1].names == [audio.source(n) for n in copies]
    finally:
        data.close_more()
    m = train_head(config, tmp_path / "run", progress=False)
    assert m["training"]["clips"] == len(data.train_names)


def test_the_out_dir_may_not_lie_in_any_of_the_caches(caches):
    with pytest.raises(ConfigError, match="inside the cache directory"):
        train_head(_config(caches), caches["text"] / "run", progress=False)


def test_fusion_runs_of_one_grid_pass_equal_their_solo_runs(caches, tmp_path):
    spec = {"common": {"cache": str(caches["audio"]), "more_caches": [str(caches["text"])], "epochs": 3,
                       "hidden": 16, "batch_size": 8, "device": "cpu", "threads": 1},
            "runs": [{"name": "wbce-S"},
                     {"name": "kld-P-mixup", "loss": "kld", "labels": "P", "mixup": 0.4, "pooling": "mean"},
                     {"name": "wbce-S-gender-balanced", "aux": "gender", "balanced_stage": 2},
                     {"name": "cross", "fusion": "cross-attention", "mixup": 0.4},
                     {"name": "audio-only", "more_caches": []}]}
    runs = expand_spec(spec)
    passes = plan_passes([c for _, c, _ in runs])
    assert passes == [[0, 1, 2, 3], [4]]  # fusion runs share a pass; the one-cache run reads other batches
    run_grid(runs, tmp_path / "grid", progress=False)
    for name, config, _ in runs[:4]:
        train_head(config, tmp_path / "solo" / name, progress=False)
        assert_same_run(tmp_path / "grid" / name, tmp_path / "solo" / name)
    gender = json.loads((tmp_path / "grid" / "wbce-S-gender-balanced" / "metrics.json").read_text())
    assert "gender" in gender["aux"] and "balanced_stage" in gender["training"]


def test_evaluate_and_tune_thresholds_read_a_fusion_run(caches, tmp_path):
    run = tmp_path / "run"
    train_head(_config(caches), run, progress=False)
    r = CliRunner().invoke(eval_group, ["metrics", str(run), "--draws", "0", "-q"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(eval_group, ["tune-thresholds", str(run), str(tmp_path / "tuned"), "-q"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "tuned" / "metrics.json").is_file()


@pytest.fixture(scope="module")
def demo_text_cache(demo_corpus, tmp_path_factory):
    """demo-text token states of the demo corpus's transcripts (every layer, float32)."""
    from conilium.extract import ExtractConfig, extract_features

    out = tmp_path_factory.mktemp("demo_text") / "demo-text"
    return extract_features(ExtractConfig("demo-text", random_init=True, layers="all"), demo_corpus, out,
                            device="cpu", verbose=False)


def test_demo_audio_and_text_caches_fuse_and_predict_run_refuses_the_fusion_run(demo_cache, demo_text_cache,
                                                                                demo_corpus, tmp_path):
    from conilium.cli.finetune import predict_cmd

    out = tmp_path / "fusion"
    r = CliRunner().invoke(train_head_cmd, ["--cache", str(demo_cache), "--cache", str(demo_text_cache),
                                            "--out", str(out), "--epochs", "2", "--hidden", "16", "--device", "cpu",
                                            "-q"])
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert [b["upstream"] for b in metrics["training"]["fusion"]["caches"]] == ["demo-wavlm", "demo-text"]
    assert metrics["n"] > 0 and 0.0 <= metrics["f1_macro"] <= 1.0
    # predict --run runs a head on one upstream over audio: a fusion head needs each clip's text too
    wav = sorted((demo_corpus / "Audios").iterdir())[0]
    r = CliRunner().invoke(predict_cmd, ["--run", str(out), str(wav), "--out", str(tmp_path / "p.csv"), "-q"])
    assert r.exit_code == 1 and "a fusion head" in r.output and not (tmp_path / "p.csv").exists(), r.output

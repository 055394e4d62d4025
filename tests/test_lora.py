"""finetune-best --lora-rank: LoRA adapters on a frozen upstream (demo-wavlm, random init, small demo corpus).

One reference LoRA run is shared: its model directory is loaded, predicted with and extracted
from; an interrupted-and-resumed run and a two-process torchrun run are compared with it.
"""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from conilium.audio import normalize, read_audio
from conilium.cache.reader import FeatureCache
from conilium.errors import ConfigError
from conilium.extract.encoder import UpstreamRunner
from conilium.extract.lora import ADAPTER_WEIGHTS, add_adapters, lora_targets, parse_lora_layers
from conilium.extract.upstreams import load_upstream, weights_hash
from conilium.finetune import EndToEndModel, FinetuneConfig, finetune, load_model_dir
from conilium.finetune.config import check_config
from conilium.finetune.model import HEAD_FILE, MODEL_FILE
from conilium.finetune.predict import Predictor
from conilium.finetune.train import CHECKPOINT_DIR, LAST
from conilium.heads.model import EmotionHead, HeadConfig
from conilium.runs import prediction_path, read_predictions
from test_finetune_baseline import baseline, reference_logits  # noqa: F401 (fixture: a baseline checkpoint folder)
from test_reliability_output import full_disk  # noqa: F401 (fixture: a 64 KiB file system)

# Deterministic forward (no dropout, LayerDrop or SpecAugment) so that runs can be compared.
BASE = dict(upstream="demo-wavlm", random_init=True, max_seconds=1.5, batch_size=8, epochs=2, lr=1e-2,
            max_train_clips=16, hidden=64, dropout=0.0, upstream_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0,
            num_workers=0, lora_rank=4, lora_layers="1-2", tune_thresholds=False)

pytestmark = pytest.mark.usefixtures("two_torch_threads")


@pytest.fixture(scope="module")
def base_config(small_demo_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return FinetuneConfig(corpus=str(small_demo_corpus), out=str(root / "ref"), keep_checkpoints=True, **BASE)


@pytest.fixture(scope="module")
def reference(base_config):
    metrics = finetune(base_config, progress=False)
    return Path(base_config.out), metrics


def _random_base_dir(out: Path) -> Path:
    """The random-init weights the run started from (kept in its checkpoints folder)."""
    return out / CHECKPOINT_DIR / "random-init" / "demo-wavlm-random-seed0"


def _clip(corpus, name, seconds=1.5):
    return read_audio(Path(corpus) / "Audios" / name, max_seconds=seconds)


# ----------------------------------------------------------------------------- options

def test_lora_options_are_checked(small_demo_corpus, tmp_path):
    c = FinetuneConfig(corpus=str(small_demo_corpus), out=str(tmp_path / "m"), upstream="demo-wavlm",
                       random_init=True)
    check_config(c)  # full fine-tuning: the lora_* fields stay None
    assert c.lora_rank is None and c.to_json()["lora_rank"] is None
    check_config(replace(c, lora_rank=8, lora_alpha=16.0, lora_dropout=0.1, lora_layers="0-2", lora_modules="q,v"))
    for bad, match in [(dict(lora_alpha=8.0), "--lora-alpha without --lora-rank"),
                       (dict(lora_layers="0-1", lora_modules="q"), "--lora-layers, --lora-modules without"),
                       (dict(lora_rank=0), "--lora-rank must be a whole number of at least 1"),
                       (dict(lora_rank=4, lora_alpha=0.0), "--lora-alpha must be a positive"),
                       (dict(lora_rank=4, lora_dropout=1.0), r"--lora-dropout must be in \[0, 1\)"),
                       (dict(lora_rank=4, lora_layers="2-1"), "runs backwards"),
                       (dict(lora_rank=4, lora_layers="x"), "not a layer index"),
                       (dict(lora_rank=4, lora_layers="0-3"), "demo-wavlm has transformer layers 0..2"),
                       (dict(lora_rank=4, lora_modules=" , "), "names no module")]:
        with pytest.raises(ConfigError, match=match):
            check_config(replace(c, **bad))
    assert parse_lora_layers("0-2,8, 10-11") == (0, 1, 2, 8, 10, 11) and parse_lora_layers(None) is None
    # the command line says the same, before anything is written
    from conilium.cli.finetune import finetune_best_cmd

    r = CliRunner().invoke(finetune_best_cmd, ["--corpus", str(small_demo_corpus), "--out", str(tmp_path / "cli"),
                                               "--upstream", "demo-wavlm", "--random-init", "--lora-layers", "0"])
    assert r.exit_code != 0 and "--lora-layers without --lora-rank" in r.output
    assert not (tmp_path / "cli").exists()


def test_targets_per_family_and_targets_that_match_nothing(tmp_path):
    wavlm, _ = load_upstream("demo-wavlm", random_init=True, random_root=tmp_path)
    assert lora_targets(wavlm, ["q", "o"], [2]) == ["encoder.layers.2.attention.q_proj",
                                                   "encoder.layers.2.attention.out_proj"]
    assert lora_targets(wavlm, ["fc2"], None) == [f"encoder.layers.{i}.feed_forward.output_dense" for i in range(3)]
    whisper, _ = load_upstream("demo-whisper", random_init=True, random_root=tmp_path)
    assert lora_targets(whisper, ["k", "fc1"], [0]) == ["layers.0.self_attn.k_proj", "layers.0.fc1"]
    with pytest.raises(ConfigError, match="'qkv' matches no linear layer.*attention.q_proj"):
        lora_targets(wavlm, ["qkv"])
    with pytest.raises(ConfigError, match=r"layer\(s\) 5 out of range.*0..2"):
        lora_targets(wavlm, ["q"], [0, 5])


def test_lora_on_every_family_trains_adapters_only_and_changes_the_output(tmp_path):
    """Adapters start as a no-op (lora_B = 0), get gradients, and the upstream's own weights get none;
    WavLM's fused attention and Whisper's attention both route through the adapters."""
    x = torch.from_numpy(np.random.default_rng(0).standard_normal(9000).astype(np.float32))[None]
    n = torch.tensor([9000])
    for name in ("demo-wavlm", "demo-hubert", "demo-whisper"):
        upstream, _ = load_upstream(name, random_init=True, random_root=tmp_path)
        torch.manual_seed(0)
        model = EndToEndModel(upstream, EmotionHead(HeadConfig(dim=96, layers=0, hidden=16, dropout=0.0))).eval()
        with torch.no_grad():
            before = model(x, n)
        info = add_adapters(upstream, rank=2, modules=("q", "k", "v", "o"))
        assert info["targets"] == 12 and info["alpha"] == 4.0
        with torch.no_grad():
            torch.testing.assert_close(model(x, n), before)  # lora_B starts at zero
        trainable = [k for k, p in model.named_parameters() if p.requires_grad]
        assert trainable and all(".lora_" in k or k.startswith("head.") for k in trainable), name
        assert sum(".lora_" in k for k in trainable) == 24
        model(x, n).sum().backward()
        assert all(p.grad is None for k, p in model.named_parameters() if not p.requires_grad)
        # every adapter takes part in the forward (none skipped by an attention that reads the weights)
        lora_b = {k: p.grad for k, p in model.named_parameters() if ".lora_B" in k}
        assert len(lora_b) == 12 and all(g is not None and float(g.abs().max()) > 0 for g in lora_b.values()), \
            [k for k, g in lora_b.items() if g is None or float(g.abs().max()) == 0]
        for k, p in model.named_parameters():
            if ".lora_B" in k:
                with torch.no_grad():
                    p.normal_(0, 0.5)
        with torch.no_grad():
            assert (model(x, n) - before).abs().max() > 1e-3, name


# ----------------------------------------------------------------------------- the reference run

def test_only_the_adapters_and_the_head_are_trained(reference):
    out, metrics = reference
    losses = [h["train_loss"] for h in metrics["history"]]
    assert len(losses) == 2 and losses[1] < losses[0], losses
    info = json.loads((out / MODEL_FILE).read_text())
    assert info["format"] == 2
    lora = info["lora"]
    assert lora["rank"] == 4 and lora["alpha"] == 8.0 and lora["layers"] == [1, 2] and lora["targets"] == 8
    assert lora["adapter"] == "adapter" and lora["base"] == "upstream"
    adapter = load_file(out / "adapter" / ADAPTER_WEIGHTS)
    assert len(adapter) == 16 and all(k.startswith("base_model.model.encoder.layers.") for k in adapter)
    assert all(".layers.0." not in k for k in adapter)  # --lora-layers 1-2
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)  # trained away from zero
    head = torch.load(out / HEAD_FILE, weights_only=True)["state_dict"]
    assert metrics["training"]["lora"]["trainable_parameters"] == (
        sum(v.numel() for v in adapter.values()) + sum(v.numel() for v in head.values()))
    # upstream/ holds the base weights as they were before training, bitwise, under their own names
    saved = load_file(out / "upstream" / "model.safetensors")
    start = load_file(_random_base_dir(out) / "model.safetensors")
    assert saved.keys() == start.keys()
    for k in start:
        assert torch.equal(saved[k], start[k]), k
    config = json.loads((out / "config.json").read_text())
    assert config["lora_rank"] == 4 and config["lora_layers"] == "1-2" and config["lora_alpha"] is None


def _training_model(out: Path) -> EndToEndModel:
    """The model as training left it at its best epoch: base upstream, unmerged adapters, head."""
    info = json.loads((out / MODEL_FILE).read_text())
    upstream, _ = load_upstream(str(_random_base_dir(out)))
    head = EmotionHead(HeadConfig(**info["head_config"]))
    model = EndToEndModel(upstream, head, info["layers"])
    add_adapters(upstream, rank=4, layers=[1, 2])
    model.load_state_dict(torch.load(out / CHECKPOINT_DIR / "best.pt", weights_only=True)["model"])
    return model.eval()


def test_the_model_directory_gives_the_trained_model_s_logits(reference, small_demo_corpus):
    out, _ = reference
    loaded, info = load_model_dir(out)
    assert not any(".lora_" in k for k in loaded.state_dict())  # merged: a plain transformers model
    trained = _training_model(out)
    base = EndToEndModel(load_upstream(str(out / "upstream"))[0], trained.head, info["layers"]).eval()
    dev = read_predictions(prediction_path(out, "Development"))
    waves = [normalize(_clip(small_demo_corpus, name), "global", info["normalize"]["stats"])
             for name in dev.names[:4]]
    for w in waves:
        x, n = torch.from_numpy(w)[None], torch.tensor([len(w)])
        with torch.no_grad():
            a, b, c = loaded(x, n), trained(x, n), base(x, n)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        assert (a - c).abs().max() > 1e-3  # the adapter is part of the loaded model


def test_predict_with_a_lora_model_directory(reference, small_demo_corpus):
    """predict gives the probabilities training wrote for the development clips."""
    out, _ = reference
    dev = read_predictions(prediction_path(out, "Development"))
    files = [str(Path(small_demo_corpus) / "Audios" / name) for name in dev.names[:6]]
    results = Predictor(out, device="cpu").predict(files)
    assert all(r.ok for r in results)
    np.testing.assert_allclose(np.stack([r.probabilities for r in results]), dev.probs[:6], atol=1e-5)


def test_extract_features_on_a_lora_model_directory_uses_the_merged_model(reference, small_demo_corpus, tmp_path):
    from conilium.extract import ExtractConfig, extract_features

    out, _ = reference
    config = ExtractConfig(str(out), layers="last", max_seconds=1.5, normalize="utterance", splits=["Test3"],
                           dtype="float32")
    cache = FeatureCache(extract_features(config, small_demo_corpus, tmp_path / "cache", device="cpu",
                                          verbose=False))
    ident = cache.manifest["upstream"]
    assert ident["adapter"] == str((out / "adapter").resolve())
    assert ident["weights_sha256"] == weights_hash(out / "upstream", out / "adapter") != weights_hash(out / "upstream")
    # the identity's path loads the same merged model again (predict --run on a head trained on this cache)
    assert load_upstream(ident["path"])[1]["weights_sha256"] == ident["weights_sha256"]
    merged, _ = load_model_dir(out)
    base = UpstreamRunner(load_upstream(str(out / "upstream"))[0], device=torch.device("cpu"), layers=[3])
    for name in cache.names[:3]:
        x = normalize(_clip(small_demo_corpus, name), "utterance")
        with torch.no_grad():
            h, frames = merged.hidden_states(torch.from_numpy(x)[None], torch.tensor([len(x)]))
        feats = cache.frames(name)[:, 0]
        assert cache.num_frames(name) == int(frames[0])
        np.testing.assert_allclose(feats, h[0, :, 0].numpy(), atol=1e-5, rtol=1e-5)
        assert np.abs(feats - base([x])[0][0][:, 0]).max() > 1e-2  # not the bare base upstream
    base.close()


def test_resume_equals_an_uninterrupted_lora_run(reference, base_config, tmp_path):
    ref_out, ref_metrics = reference
    config = replace(base_config, out=str(tmp_path / "resumed"))

    def stop(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(config, progress=False, on_epoch_end=stop)
    out = Path(config.out)
    assert (out / CHECKPOINT_DIR / LAST).is_file() and not (out / MODEL_FILE).exists()
    with pytest.raises(ConfigError, match="lora_rank was 4, now 8"):
        finetune(replace(config, lora_rank=8), resume=True, progress=False)
    metrics = finetune(config, resume=True, progress=False)
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    np.testing.assert_allclose([h["train_loss"] for h in metrics["history"]],
                               [h["train_loss"] for h in ref_metrics["history"]], rtol=1e-6)
    a, b = load_file(ref_out / "adapter" / ADAPTER_WEIGHTS), load_file(out / "adapter" / ADAPTER_WEIGHTS)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    p_ref = read_predictions(prediction_path(ref_out, "Development"))
    p_res = read_predictions(prediction_path(out, "Development"))
    np.testing.assert_allclose(p_res.probs, p_ref.probs, atol=2e-6)


def test_torchrun_with_two_processes_matches_one_process(reference, base_config, tmp_path):
    ref_out, ref_metrics = reference
    out = tmp_path / "ddp"
    c = base_config
    args = ["--corpus", c.corpus, "--out", str(out), "--upstream", c.upstream, "--random-init",
            "--max-seconds", str(c.max_seconds), "--batch-size", str(c.batch_size), "--epochs", str(c.epochs),
            "--lr", str(c.lr), "--max-train-clips", str(c.max_train_clips), "--hidden", str(c.hidden),
            "--dropout", "0", "--upstream-dropout", "0", "--layerdrop", "0", "--mask-time-prob", "0",
            "--num-workers", "0", "--lora-rank", str(c.lora_rank), "--lora-layers", c.lora_layers,
            "--no-thresholds", "--threads", "1", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "conilium.cli.finetune", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    metrics = json.loads((out / "metrics.json").read_text())
    np.testing.assert_allclose([h["train_loss"] for h in metrics["history"]],
                               [h["train_loss"] for h in ref_metrics["history"]], rtol=1e-4)
    p_ref = read_predictions(prediction_path(ref_out, "Development"))
    p_ddp = read_predictions(prediction_path(out, "Development"))
    assert p_ddp.names == p_ref.names
    np.testing.assert_allclose(p_ddp.probs, p_ref.probs, atol=1e-4)
    assert (out / "adapter" / ADAPTER_WEIGHTS).is_file()


# ----------------------------------------------------------------------------- starting points

@pytest.fixture(scope="module")
def weighted_head_run(small_demo_corpus, tmp_path_factory):
    """A head on a weighted mix of every demo-wavlm layer, trained by train-head on a 1.5 s cache."""
    from conilium.extract import ExtractConfig, extract_features
    from conilium.heads.train import TrainConfig, train_head

    root = tmp_path_factory.mktemp("lora_init_head")
    config = ExtractConfig("demo-wavlm", random_init=True, seed=0, layers="all", max_seconds=1.5)
    cache = extract_features(config, small_demo_corpus, root / "cache", device="cpu", verbose=False)
    train_head(TrainConfig(cache=str(cache), epochs=1, hidden=32, layers="weighted", device="cpu"), root / "run",
               progress=False)
    return root / "run"


def test_lora_starts_from_a_train_head_run(weighted_head_run, small_demo_corpus, tmp_path):
    """The adapters start as a no-op: with a vanishing learning rate the LoRA model gives the head
    run's development predictions, and the head's layer mix is among the trained parameters."""
    out = tmp_path / "m"
    metrics = finetune(FinetuneConfig(corpus=str(small_demo_corpus), out=str(out), upstream="demo-wavlm",
                                      random_init=True, init_head=str(weighted_head_run), lr=1e-12,
                                      weight_decay=0.0, epochs=1, batch_size=8, max_train_clips=8, num_workers=0,
                                      tune_thresholds=False, lora_rank=2), progress=False)
    ours = read_predictions(prediction_path(out, "Development"))
    theirs = read_predictions(prediction_path(weighted_head_run, "Development"))
    assert ours.names == theirs.names
    np.testing.assert_allclose(ours.probs, theirs.probs, atol=2e-3)  # cached frames are float16
    head = torch.load(out / HEAD_FILE, weights_only=True)
    assert head["head_config"]["layers"] == "weighted" and head["layers"] == [0, 1, 2, 3]
    adapter = load_file(out / "adapter" / ADAPTER_WEIGHTS)
    assert metrics["training"]["lora"]["trainable_parameters"] == (
        sum(v.numel() for v in adapter.values()) + sum(v.numel() for v in head["state_dict"].values()))
    assert any("layer_weights" in k or "mix" in k for k in head["state_dict"])


@pytest.mark.parametrize("name", ["demo-wavlm", "demo-whisper"])
def test_saved_base_and_adapter_merge_into_the_trained_upstream(name, tmp_path):
    """upstream/ (base weights under their own names) + adapter/ load back, merged, as the upstream
    with its adapters; a damaged adapter is a clear error naming the file."""
    from conilium.extract.encoder import UpstreamEncoder
    from conilium.extract.lora import base_state_dict, merge_adapter, save_adapter

    upstream, _ = load_upstream(name, random_init=True, random_root=tmp_path)
    torch.manual_seed(0)
    add_adapters(upstream, rank=2, modules=("q", "v", "fc1"), layers=[0, 2])
    with torch.no_grad():
        for k, p in upstream.named_parameters():
            if ".lora_B" in k:
                p.normal_(0, 0.2)
    upstream.save_pretrained(tmp_path / "base", state_dict=base_state_dict(upstream))
    save_adapter(upstream, tmp_path / "adapter")
    merged = merge_adapter(load_upstream(str(tmp_path / "base"))[0], tmp_path / "adapter")
    assert not any(".lora_" in k or "base_layer" in k for k in merged.state_dict())
    x = torch.from_numpy(np.random.default_rng(1).standard_normal(12000).astype(np.float32))[None]
    n = torch.tensor([12000])
    with torch.no_grad():
        a, _ = UpstreamEncoder(upstream.eval()).hidden_states(x, n, [1, 2, 3])
        b, _ = UpstreamEncoder(merged.eval()).hidden_states(x, n, [1, 2, 3])
        c, _ = UpstreamEncoder(load_upstream(str(tmp_path / "base"))[0].eval()).hidden_states(x, n, [1, 2, 3])
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert (c - a).abs().max() > 1e-2
    (tmp_path / "adapter" / ADAPTER_WEIGHTS).write_bytes(b"damaged")
    with pytest.raises(ConfigError, match="unreadable LoRA adapter"):
        merge_adapter(load_upstream(str(tmp_path / "base"))[0], tmp_path / "adapter")
    (tmp_path / "adapter" / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(ConfigError, match="adapter_model.safetensors missing"):
        merge_adapter(load_upstream(str(tmp_path / "base"))[0], tmp_path / "adapter")


def test_lora_starts_from_the_challenge_baseline(baseline, small_demo_corpus, tmp_path):
    """The baseline's upstream becomes the frozen base: upstream/ holds its weights, and with a vanishing
    learning rate the LoRA model's development predictions are the baseline's outputs."""
    from conilium.finetune.baseline import read_norm_stats

    folder, upstream = baseline[0], baseline[1]
    out = tmp_path / "m"
    finetune(FinetuneConfig(corpus=str(small_demo_corpus), out=str(out), upstream="demo-wavlm", random_init=True,
                            baseline_ckpt=str(folder), lr=1e-12, weight_decay=0.0, epochs=1, batch_size=8,
                            max_train_clips=8, max_seconds=1.5, num_workers=0, tune_thresholds=False, lora_rank=2),
             progress=False)
    saved = load_upstream(str(out / "upstream"))[0].state_dict()
    theirs = upstream.state_dict()
    assert saved.keys() == theirs.keys()
    for k in theirs:
        assert torch.equal(saved[k], theirs[k]), k
    dev = read_predictions(prediction_path(out, "Development"))
    stats = read_norm_stats(folder)
    for k in (0, 7):
        x = normalize(_clip(small_demo_corpus, dev.names[k]), "global", stats)
        expected = torch.sigmoid(reference_logits(baseline, x)).numpy()
        np.testing.assert_allclose(dev.probs[k], expected, atol=5e-6)


def test_a_lora_model_directory_on_a_full_disk_leaves_nothing(full_disk, tmp_path):
    from conilium.errors import OutputError
    from conilium.finetune.model import save_model_dir

    upstream, _ = load_upstream("demo-wavlm", random_init=True, random_root=tmp_path / "weights")
    model = EndToEndModel(upstream, EmotionHead(HeadConfig(dim=96, layers=0, hidden=16)))
    lora = add_adapters(upstream, rank=2)
    info = {"max_seconds": 8.0, "normalize": {"mode": "none", "stats": None}, "offsets": {}, "loss": "wbce"}
    out = full_disk / "model"
    with pytest.raises(OutputError, match=rf"cannot write {out}/upstream: no space left on device"):
        save_model_dir(out, model, dict(info, lora=lora))
    assert sorted(p.name for p in out.rglob("*")) == []
    with pytest.raises(ConfigError, match="info\\['lora'\\] must describe"):
        save_model_dir(tmp_path / "m", model, info)  # adapters, but no description of them


def test_gradient_checkpointing_gives_the_same_adapter_gradients(tmp_path):
    from conilium.finetune.model import enable_checkpointing

    x = torch.from_numpy(np.random.default_rng(2).standard_normal(8000).astype(np.float32))[None]
    grads, calls = [], []
    for checkpointing in (False, True):
        upstream, _ = load_upstream("demo-wavlm", random_init=True, random_root=tmp_path,
                                    config_overrides={"hidden_dropout": 0.0, "attention_dropout": 0.0,
                                                      "activation_dropout": 0.0, "feat_proj_dropout": 0.0,
                                                      "layerdrop": 0.0, "apply_spec_augment": False})
        torch.manual_seed(0)
        head = EmotionHead(HeadConfig(dim=96, num_layers=4, layers="weighted", hidden=32, dropout=0.0))
        model = EndToEndModel(upstream, head, layers=[0, 1, 2, 3]).train()
        add_adapters(upstream, rank=2)
        with torch.no_grad():
            for k, p in upstream.named_parameters():
                if ".lora_B" in k:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(k)))
        if checkpointing:
            enable_checkpointing(upstream)
        n = [0]
        upstream.encoder.layers[1].feed_forward.register_forward_pre_hook(lambda *a: n.__setitem__(0, n[0] + 1))
        model(x, torch.tensor([8000])).sum().backward()
        calls.append(n[0])
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    assert calls == [1, 2]  # the layers were recomputed in the backward pass
    assert grads[0].keys() == grads[1].keys() and sum(".lora_A" in k for k in grads[0]) == 12
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=1e-6, rtol=1e-4)

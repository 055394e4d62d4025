"""finetune-best on the small demo corpus with the demo-wavlm upstream (random init).

One uninterrupted reference run is shared: its loss history, its model directory (used
by extract-features here), an interrupted-and-resumed run and a two-process torchrun
run are compared with it.
"""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from conilium import CLASSES
from conilium.audio import normalize, read_audio
from conilium.cache.reader import FeatureCache
from conilium.errors import ConfigError
from conilium.runs import prediction_path, read_predictions
from conilium.extract.encoder import UpstreamRunner
from conilium.extract.upstreams import load_upstream
from conilium.audio import NoiseMixer
from conilium.finetune import EndToEndModel, FinetuneConfig, finetune, load_model_dir
from conilium.cli.finetune import tune_model_thresholds
from conilium.finetune.data import epoch_batches, rank_micro_batches
from conilium.finetune.model import HEAD_FILE, MODEL_FILE
from conilium.finetune.train import CHECKPOINT_DIR, LAST
from conilium.heads.model import EmotionHead, HeadConfig

# Deterministic forward (no dropout, LayerDrop or SpecAugment) so that runs can be compared.
BASE = dict(upstream="demo-wavlm", random_init=True, max_seconds=1.5, batch_size=8, epochs=2, lr=1e-3,
            max_train_clips=16, hidden=64, dropout=0.0, upstream_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0,
            num_workers=0, augment_fraction=0.5)


pytestmark = pytest.mark.usefixtures("two_torch_threads")


@pytest.fixture(scope="module")
def noise_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(0)
    sf.write(d / "white.wav", 0.05 * rng.standard_normal(16000).astype(np.float32), 16000)
    sf.write(d / "brown.flac", 0.02 * np.cumsum(rng.standard_normal(3 * 22050)).astype(np.float32) / 50, 22050)
    return d


@pytest.fixture(scope="module")
def base_config(small_demo_corpus, noise_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    return FinetuneConfig(corpus=str(small_demo_corpus), out=str(root / "ref"), augment_noise=str(noise_dir), **BASE)


@pytest.fixture(scope="module")
def reference(base_config):
    metrics = finetune(base_config, progress=False)
    metrics["thresholds"] = tune_model_thresholds(base_config)  # as finetune-best chains it
    return Path(base_config.out), metrics


def _head_state(model_dir):
    return torch.load(Path(model_dir) / HEAD_FILE, weights_only=True)["state_dict"]


def test_training_lowers_the_loss_and_writes_a_model_and_run_directory(reference, small_demo_corpus):
    out, metrics = reference
    losses = [h["train_loss"] for h in metrics["history"]]
    assert len(losses) == 2 and losses[1] < 0.8 * losses[0], losses
    # model directory
    info = json.loads((out / MODEL_FILE).read_text())
    assert info["classes"] == list(CLASSES) and info["max_seconds"] == 1.5
    assert info["normalize"]["mode"] == "global" and info["normalize"]["stats"]["std"] > 0
    assert info["loss"] == "wbce" and info["activation"] == "sigmoid" and info["labels"] == "S"
    assert set(info["offsets"]) == set(CLASSES) and info["upstream"]["name"] == "demo-wavlm"
    assert (out / "upstream" / "config.json").is_file() and (out / HEAD_FILE).is_file()
    assert not (out / CHECKPOINT_DIR).exists()  # removed after success unless --keep-checkpoints
    # run directory: every Development clip predicted, best epoch recorded, thresholds tuned on Development
    dev = read_predictions(prediction_path(out, "Development"))
    assert len(dev) == 15 and np.all((dev.probs >= 0) & (dev.probs <= 1))
    assert read_predictions(prediction_path(out, "Test3")).reference == [None] * 9
    assert metrics["best_epoch"] in (1, 2) and "f1_macro" in metrics
    th = metrics["thresholds"]
    assert th["f1_macro_tuned"] >= th["f1_macro_untuned"]
    tuned = read_predictions(prediction_path(out / "tuned", "Development"))
    offsets = np.array([info["offsets"][c] for c in CLASSES])
    assert tuned.prediction == [CLASSES[i] for i in np.argmax(dev.probs + offsets, axis=1)]


def test_resume_equals_an_uninterrupted_run(reference, base_config, tmp_path):
    ref_out, ref_metrics = reference
    config = replace(base_config, out=str(tmp_path / "resumed"), keep_checkpoints=True)

    def stop(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(config, progress=False, on_epoch_end=stop)
    out = Path(config.out)
    assert (out / CHECKPOINT_DIR / LAST).is_file() and not (out / MODEL_FILE).exists()
    with pytest.raises(ConfigError, match="--resume"):
        finetune(config, progress=False)
    metrics = finetune(config, resume=True, progress=False)
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    np.testing.assert_allclose([h["train_loss"] for h in metrics["history"]],
                               [h["train_loss"] for h in ref_metrics["history"]], rtol=1e-6)
    a, b = _head_state(ref_out), _head_state(out)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    p_ref = read_predictions(prediction_path(ref_out, "Development"))
    p_res = read_predictions(prediction_path(out, "Development"))
    np.testing.assert_allclose(p_res.probs, p_ref.probs, atol=2e-6)
    # a resume must use the settings the run started with
    with pytest.raises(ConfigError, match="lr was 0.001"):
        finetune(replace(config, lr=1e-4), resume=True, progress=False)


def test_torchrun_with_two_processes_matches_one_process(reference, base_config, tmp_path):
    ref_out, ref_metrics = reference
    out = tmp_path / "ddp"
    c = base_config
    args = ["--corpus", c.corpus, "--out", str(out), "--upstream", c.upstream, "--random-init",
            "--max-seconds", str(c.max_seconds), "--batch-size", str(c.batch_size), "--epochs", str(c.epochs),
            "--lr", str(c.lr), "--max-train-clips", str(c.max_train_clips), "--hidden", str(c.hidden),
            "--dropout", "0", "--upstream-dropout", "0", "--layerdrop", "0", "--mask-time-prob", "0",
            "--num-workers", "0", "--augment-noise", c.augment_noise, "--augment-fraction", str(c.augment_fraction),
            "--threads", "1", "--quiet", "--resume"]  # --resume with nothing to resume starts afresh
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "conilium.cli.finetune", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2
    metrics = json.loads((out / "metrics.json").read_text())
    np.testing.assert_allclose([h["train_loss"] for h in metrics["history"]],
                               [h["train_loss"] for h in ref_metrics["history"]], rtol=1e-4)
    p_ref = read_predictions(prediction_path(ref_out, "Development"))
    p_ddp = read_predictions(prediction_path(out, "Development"))
    assert p_ddp.names == p_ref.names
    np.testing.assert_allclose(p_ddp.probs, p_ref.probs, atol=1e-4)


def test_extract_features_accepts_the_model_directory(reference, small_demo_corpus, tmp_path):
    from conilium.extract import ExtractConfig, extract_features

    out, _ = reference
    config = ExtractConfig(str(out), layers="last", max_seconds=1.5, normalize="utterance", splits=["Test3"])
    cache_dir = extract_features(config, small_demo_corpus, tmp_path / "cache", device="cpu", verbose=False)
    cache = FeatureCache(cache_dir)
    model, info = load_model_dir(out)
    name = cache.names[0]
    x = normalize(read_audio(Path(small_demo_corpus) / "Audios" / name, max_seconds=1.5), "utterance")
    with torch.no_grad():
        h, frames = model.hidden_states(torch.from_numpy(x)[None], torch.tensor([len(x)]))
    assert cache.num_frames(name) == int(frames[0])
    # the fine-tuned upstream's last hidden state, not the random-init one's
    np.testing.assert_allclose(cache.frames(name)[:, 0], h[0, :, 0].numpy(), atol=2e-2, rtol=1e-2)


def test_refuses_an_existing_run_and_checks_options(reference, base_config, tmp_path):
    with pytest.raises(ConfigError, match="--resume"):
        finetune(base_config, progress=False)
    with pytest.raises(ConfigError, match="finished model"):  # its checkpoints were removed
        finetune(base_config, resume=True, progress=False)
    other = tmp_path / "head_run"
    other.mkdir()
    (other / "config.json").write_text('{"cache": "c", "loss": "wbce"}')
    with pytest.raises(ConfigError, match="did not write"):
        finetune(replace(base_config, out=str(other)), resume=True, progress=False)
    with pytest.raises(ConfigError, match="needs --labels"):
        finetune(replace(base_config, loss="wce"), progress=False)
    with pytest.raises(ConfigError, match="--init-head and --baseline-ckpt"):
        finetune(replace(base_config, init_head="a", baseline_ckpt="b"), progress=False)


# ----------------------------------------------------------------------------- model and data pieces

@pytest.fixture(scope="module")
def weights_root(tmp_path_factory):
    return tmp_path_factory.mktemp("weights")


@pytest.mark.parametrize("name", ["demo-wavlm", "demo-wav2vec2-base"])
def test_a_clip_s_logits_do_not_depend_on_its_batch(name, weights_root):
    upstream, _ = load_upstream(name, random_init=True, random_root=weights_root)
    torch.manual_seed(0)
    model = EndToEndModel(upstream, EmotionHead(HeadConfig(dim=96, layers=0, hidden=32))).eval()
    rng = np.random.default_rng(0)
    short, long = rng.standard_normal(9000).astype(np.float32), rng.standard_normal(20000).astype(np.float32)
    waves = torch.zeros(2, 20000)
    waves[0, :9000], waves[1] = torch.from_numpy(short), torch.from_numpy(long)
    with torch.no_grad():
        both = model(waves, torch.tensor([9000, 20000]))
        alone = model(torch.from_numpy(short)[None], torch.tensor([9000]))
    torch.testing.assert_close(both[0], alone[0], atol=1e-5, rtol=1e-4)


def test_hidden_states_are_numbered_as_in_the_cache(weights_root):
    """A head trained on cached layers sees the same layers in the end-to-end model."""
    upstream, _ = load_upstream("demo-wavlm", random_init=True, random_root=weights_root)
    head = EmotionHead(HeadConfig(dim=96, num_layers=4, layers="weighted", hidden=32))
    model = EndToEndModel(upstream, head, layers=[0, 1, 2, 3]).eval()
    x = np.random.default_rng(1).standard_normal(12000).astype(np.float32)
    with torch.no_grad():
        h, frames = model.hidden_states(torch.from_numpy(x)[None], torch.tensor([len(x)]))
    runner = UpstreamRunner(upstream, device=torch.device("cpu"), layers=[0, 1, 2, 3])
    cached, _ = runner([x])[0]
    runner.close()
    np.testing.assert_allclose(h[0].numpy(), cached, atol=1e-5, rtol=1e-4)
    with pytest.raises(ConfigError, match="last hidden state"):
        EndToEndModel(upstream, EmotionHead(HeadConfig(dim=96, layers=0, hidden=32)), layers=[1])


def test_length_bucketed_batches_cover_every_clip_and_do_not_depend_on_processes():
    rng = np.random.default_rng(0)
    durations = rng.uniform(1, 12, size=203)
    batches = epoch_batches(durations, batch_size=16, seed=3, epoch=2, bucket_batches=4)
    assert sorted(i for b in batches for i in b) == list(range(203))
    assert all(8 <= len(b) <= 23 for b in batches)
    assert batches == epoch_batches(durations, batch_size=16, seed=3, epoch=2, bucket_batches=4, min_batch=4)
    assert batches != epoch_batches(durations, batch_size=16, seed=3, epoch=3, bucket_batches=4)
    # within a pool of 4 batches, clips are sorted by length: batches spread less than the epoch
    spread = np.mean([np.ptp(durations[b]) for b in batches])
    assert spread < 0.5 * np.ptp(durations)
    # ranks and micro-batches share each global batch out, every clip once
    b = batches[0]
    parts = [rank_micro_batches(b, durations, rank=r, world=2, grad_accum=2) for r in range(2)]
    assert sorted(i for p in parts for mb in p for i in mb) == sorted(b)
    assert all(len(p) == 2 for p in parts)


def test_noise_mixing_is_deterministic_and_hits_the_snr(noise_dir):
    mixer = NoiseMixer(noise_dir, fraction=0.5, snr_db=(5.0, 20.0), seed=7)
    x = (0.1 * np.sin(np.arange(24000) / 7)).astype(np.float32)
    a, b = mixer(x, epoch=1, index=3), mixer(x, epoch=1, index=3)
    np.testing.assert_array_equal(a, b)
    noisy = [i for i in range(200) if not np.array_equal(mixer(x, epoch=1, index=i), x)]
    assert 70 < len(noisy) < 130  # about half
    assert noisy != [i for i in range(200) if not np.array_equal(mixer(x, epoch=2, index=i), x)]
    fixed = NoiseMixer(noise_dir, fraction=1.0, snr_db=(10.0, 10.0), seed=0)
    y = fixed(x, epoch=0, index=0)
    snr = 10 * np.log10(np.mean(x.astype(np.float64) ** 2) / np.mean((y - x).astype(np.float64) ** 2))
    assert abs(snr - 10.0) < 0.05


def test_gradient_checkpointing_gives_the_same_gradients(weights_root):
    """Layers are recomputed in the backward pass (their feed-forward block runs twice), and the
    layers captured for the weighted mix are still the forward's."""
    from conilium.finetune.model import enable_checkpointing

    x = torch.from_numpy(np.random.default_rng(2).standard_normal(8000).astype(np.float32))[None]
    grads, calls = [], []
    for checkpointing in (False, True):
        upstream, _ = load_upstream("demo-wavlm", random_init=True, random_root=weights_root,
                                    config_overrides={"hidden_dropout": 0.0, "attention_dropout": 0.0,
                                                      "activation_dropout": 0.0, "feat_proj_dropout": 0.0,
                                                      "layerdrop": 0.0, "apply_spec_augment": False})
        upstream.freeze_feature_encoder()
        torch.manual_seed(0)
        head = EmotionHead(HeadConfig(dim=96, num_layers=4, layers="weighted", hidden=32, dropout=0.0))
        model = EndToEndModel(upstream, head, layers=[0, 1, 2, 3]).train()
        if checkpointing:
            enable_checkpointing(upstream)
        n = [0]
        upstream.encoder.layers[1].feed_forward.register_forward_pre_hook(lambda *a: n.__setitem__(0, n[0] + 1))
        model(x, torch.tensor([8000])).sum().backward()
        calls.append(n[0])
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    assert calls == [1, 2]
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=1e-6, rtol=1e-4)


def test_a_loss_that_stops_being_finite_stops_the_run_naming_its_clips(base_config, tmp_path):
    """One process reads the loss back once per step (no check before the backward pass): a loss
    that is not finite still stops the run at that step, naming the step's clips, and no model is
    written."""
    from conilium.finetune.config import FinetuneError

    out = tmp_path / "nan"
    with pytest.raises(FinetuneError, match=r"loss is (nan|inf) at epoch 1, step 2 \(lr 1e\+30\); lower --lr, "
                                            r"or check the audio of clips \w"):
        finetune(replace(base_config, out=str(out), lr=1e30), progress=False)
    from conilium.finetune.rundir import checkpoint_paths

    assert not (out / MODEL_FILE).exists() and not any(p.exists() for p in checkpoint_paths(out))

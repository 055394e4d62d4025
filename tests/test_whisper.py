"""The Whisper encoder upstream: mel front end, frame counts, batch independence, the 30 s and
clip-length inputs, extraction into a cache, train-head, finetune-best and predict.

Whisper models here are tiny and seeded (``demo-whisper``, or a full Whisper model built
from a transformers config), saved with ``save_pretrained`` and loaded through
:func:`~conilium.extract.upstreams.load_upstream`, as a real ``openai/whisper-*`` would be.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

from conilium import CLASSES, SAMPLE_RATE
from conilium.audio import read_audio
from conilium.cache import FeatureCache
from conilium.corpus import load_corpus
from conilium.demo import make_demo_corpus
from conilium.errors import ConfigError
from conilium.extract import ExtractConfig, extract_features
from conilium.extract import whisper
from conilium.extract.encoder import UpstreamEncoder, UpstreamRunner, pad_waves
from conilium.extract.registry import UPSTREAMS
from conilium.extract.upstreams import load_upstream

pytestmark = pytest.mark.usefixtures("two_torch_threads")

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def weights_root(tmp_path_factory):
    return tmp_path_factory.mktemp("whisper-weights")


@pytest.fixture(scope="module")
def demo(weights_root):
    model, identity = load_upstream("demo-whisper", random_init=True, seed=0, random_root=weights_root)
    return model.eval(), identity


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    """24 demo clips (Train 14, Development 6, Test3 4)."""
    return make_demo_corpus(tmp_path_factory.mktemp("whisper-tiny24") / "corpus", clips=24, seed=3)


def _waves(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in lengths]


def _stock(model, mel):
    """transformers' own encoder forward on a (B, bins, 3000) mel: hidden states 0..L-1 and the last."""
    with torch.inference_mode():
        out = model(mel, output_hidden_states=True)
    return torch.stack(list(out.hidden_states[:-1]) + [out.last_hidden_state], dim=2)


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(a)))


# ----------------------------------------------------------------------------- registry and loading

def test_registry_and_a_full_whisper_model_loads_as_its_encoder(demo, tmp_path):
    assert UPSTREAMS["whisper-large-v3"].model_id == "openai/whisper-large-v3"
    assert UPSTREAMS["whisper-large-v3"].config["num_mel_bins"] == 128
    assert {"whisper-base", "whisper-small", "demo-whisper"} <= set(UPSTREAMS)
    model, identity = demo
    assert type(model).__name__ == "WhisperEncoder" and identity["family"] == "whisper"
    # a whole Whisper model (encoder + decoder, as released on the hub) in a local directory
    cfg = WhisperConfig(d_model=64, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128)
    torch.manual_seed(0)
    full = WhisperForConditionalGeneration(cfg)
    full.save_pretrained(tmp_path / "whisper-full")
    enc, identity = load_upstream(str(tmp_path / "whisper-full"),
                                  config_overrides={"hidden_dropout": 0.1, "layerdrop": 0.2, "feat_proj_dropout": 0.0,
                                                    "mask_time_prob": 0.3, "apply_spec_augment": True})
    assert type(enc).__name__ == "WhisperEncoder" and identity["family"] == "whisper"
    assert not any(n.startswith("decoder") for n, _ in enc.named_parameters())
    want = full.model.encoder.state_dict()
    for k, v in enc.state_dict().items():
        assert torch.equal(v, want[k]), k
    # fine-tuning's (wav2vec 2.0) option names land on Whisper's configuration values
    assert enc.config.dropout == 0.1 and enc.config.encoder_layerdrop == 0.2 and enc.layerdrop == 0.2
    assert enc.config.mask_time_prob == 0.3 and enc.config.apply_spec_augment is True
    # its encoder alone, saved (as finetune-best saves upstream/), loads back the same
    enc.save_pretrained(tmp_path / "encoder-only")
    again, _ = load_upstream(str(tmp_path / "encoder-only"))
    for k, v in again.state_dict().items():
        assert torch.equal(v, want[k]), k
    with pytest.raises(ConfigError, match="no configuration value"):
        load_upstream(str(tmp_path / "encoder-only"), config_overrides={"no_such_thing": 1})


def test_hidden_shape_reads_the_encoders_layers_and_width(demo):
    from conilium.extract.encoder import UpstreamEncoder, hidden_shape

    model, _ = demo
    enc = UpstreamEncoder(model)
    try:
        assert hidden_shape(model) == (enc.num_hidden_states, enc.dim)
        assert hidden_shape(model) == (model.config.encoder_layers + 1, model.config.d_model)
    finally:
        enc.close()


def test_the_mel_is_the_feature_extractors_as_released(demo):
    model, _ = demo
    enc = UpstreamEncoder(model)
    fe = enc.family.features
    # the released preprocessor_config.json of openai/whisper-large-v3 (128 bins; the others: 80)
    released = dict(feature_size=128, sampling_rate=16000, hop_length=160, chunk_length=30, n_fft=400,
                    n_samples=480000, nb_max_frames=3000, padding_value=0.0, dither=0.0)
    large = whisper.feature_extractor(WhisperConfig(num_mel_bins=128))
    assert {k: getattr(large, k) for k in released} == released
    assert large.mel_filters.shape == (201, 128) and fe.mel_filters.shape == (201, 80)
    waves = _waves((16000, 9123, 33000))
    x, lengths = pad_waves(waves)
    mel = enc.family.log_mel(x, lengths).numpy()
    assert mel.shape == (3, 80, 3000)
    ref = WhisperFeatureExtractor(feature_size=80)
    for i, w in enumerate(waves):
        one = ref(w, sampling_rate=16000, return_tensors="np")["input_features"][0]
        np.testing.assert_array_equal(mel[i], one)  # the clip padded to 30 s, alone: the same mel exactly
        padded = np.zeros(480000, np.float32)
        padded[: len(w)] = w
        numpy_path = ref._np_extract_fbank_features(padded[None], "cpu")[0]  # torch-free path: within its 1e-5
        np.testing.assert_allclose(mel[i], numpy_path, atol=2e-4, rtol=0)


def test_a_hub_whisper_offline_names_its_download(monkeypatch, tmp_path):
    import huggingface_hub.constants as constants

    import conilium.extract.upstreams as upstreams

    monkeypatch.setattr(upstreams, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    with pytest.raises(ConfigError, match="download openai/whisper-large-v3"):
        load_upstream("whisper-large-v3")


# ----------------------------------------------------------------------------- frames

def test_frame_counts_follow_the_models_conv_arithmetic(demo):
    model, _ = demo
    enc = UpstreamEncoder(model)
    assert enc.frame_rate == 50.0 and enc.max_samples == 480000 and enc.last == 3 and enc.dim == 96
    fe = WhisperFeatureExtractor(feature_size=80)
    ns = [1, 159, 160, 161, 319, 320, 321, 16000, 16001, 16160, 16161, 80000, 479999, 480000]
    lengths = torch.tensor(ns)
    got = enc.frame_lengths(lengths).tolist()
    for n, t in zip(ns, got):
        # mel frames of the clip: the feature extractor's own attention mask for the padded input
        m = int(fe(np.zeros(n, np.float32), sampling_rate=16000, return_attention_mask=True,
                   return_tensors="np")["attention_mask"].sum())
        assert t == int(model._get_feat_extract_output_lengths(torch.tensor(m))) == enc.frames_for(n)
        assert t == -(-n // 320)  # ceil(n / 320): 50 frames a second
    assert enc.frames_for(16000) == 50 and enc.frames_for(0) == 0 and enc.frames_for(480000) == 1500
    x, lengths = pad_waves(_waves((16000, 161)))
    with torch.inference_mode():
        states, frames = enc.hidden_states(x, lengths, [0, 3])
    assert frames.tolist() == [50, 1] and states.shape == (2, 50, 2, 96)
    with pytest.raises(ConfigError, match="longer than Whisper's 30 s"):
        enc.hidden_states(*pad_waves(_waves((480001,))))


# ----------------------------------------------------------------------------- the forward

def test_30s_input_is_transformers_own_forward(demo):
    """Every hidden state of every clip equals transformers' WhisperEncoder on the feature
    extractor's mel (the model's own 30 s input), valid frames only."""
    model, _ = demo
    enc = UpstreamEncoder(model)
    waves = _waves((16000, 9123, 23000))
    x, lengths = pad_waves(waves)
    with torch.inference_mode():
        states, frames = enc.hidden_states(x, lengths, range(4))
    mel = WhisperFeatureExtractor(feature_size=80)(waves, sampling_rate=16000, return_tensors="pt")["input_features"]
    want = _stock(model, mel)
    for i, t in enumerate(frames.tolist()):
        torch.testing.assert_close(states[i, :t], want[i, :t], rtol=0, atol=1e-5 * float(want[i, :t].abs().max()))
    assert states.shape[1] == int(frames.max())


def test_clip_input_is_the_cut_mel_through_the_same_layers(demo):
    """whisper_input="clip": the mel cut to the clip's frames, positional embeddings cut to its
    encoder frames, the same layers."""
    model, _ = demo
    enc = UpstreamEncoder(model, whisper_input="clip")
    (w,) = _waves((16000 + 123,))
    x, lengths = pad_waves([w])
    with torch.inference_mode():
        states, frames = enc.hidden_states(x, lengths, range(4))
        m = whisper.mel_frames(len(w))
        mel = enc.family.log_mel(x, lengths)[:, :, :m]
        h = torch.nn.functional.gelu(model.conv2(torch.nn.functional.gelu(model.conv1(mel)))).transpose(1, 2)
        h = h + model.embed_positions.weight[: h.shape[1]]
        want = [h]
        for layer in model.layers:
            h = layer(h, None)
            want.append(h)
        want[-1] = model.layer_norm(h)
    assert m == 101 and int(frames[0]) == 51 == h.shape[1]
    torch.testing.assert_close(states[0], torch.stack(want, dim=2)[0], rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="whisper_input"):
        UpstreamEncoder(model, whisper_input="10s")


@pytest.mark.parametrize("mode", whisper.WHISPER_INPUTS)
def test_a_clips_features_do_not_depend_on_its_batch(demo, mode):
    model, _ = demo
    runner = UpstreamRunner(model, device=CPU, pooled_stats=True, whisper_input=mode)
    waves = _waves((16000, 9123, 23000, 5000 + 7), seed=1)
    batch = runner(waves)
    assert runner.computed_frames == 4 * (1500 if mode == "30s" else 72) and runner.useful_frames == 50 + 29 + 72 + 16
    for w, (frames, pooled) in zip(waves, batch):
        (alone, alone_pooled), = runner([w])
        assert frames.shape == alone.shape == (runner.frames_for(len(w)), 4, 96)
        scale = np.abs(alone).max()
        np.testing.assert_allclose(frames, alone, atol=1e-5 * scale, rtol=0)
        np.testing.assert_allclose(pooled, alone_pooled, atol=1e-5 * scale, rtol=0)
    runner.close()


def test_clip_input_differs_from_the_30s_input_and_computes_fewer_frames(demo):
    """The figures of bench/bench_extract.py --forward, on the tiny model: the features of
    a clip-length input are close to but not those of the 30 s input."""
    model, _ = demo
    waves = _waves((16000, 40000, 80000), seed=2)
    full = UpstreamRunner(model, device=CPU, layers=[0, 1, 2, 3])
    clip = UpstreamRunner(model, device=CPU, layers=[0, 1, 2, 3], whisper_input="clip")
    a, b = full(waves), clip(waves)
    diffs = [_rel(x[:, 3], y[:, 3]) for (x, _), (y, _) in zip(a, b)]
    assert all(1e-3 < d < 0.5 for d in diffs), diffs
    # index 0 (convolutions + positions) differs only where the conv sees past the clip's end
    for (x, _), (y, _) in zip(a, b):
        np.testing.assert_allclose(x[:-1, 0], y[:-1, 0], atol=1e-5 * np.abs(x[:, 0]).max(), rtol=0)
    assert clip.computed_frames == 3 * 250 < full.computed_frames == 3 * 1500


def test_training_mode_spec_augment_and_frozen_front_end(demo):
    import copy

    model = copy.deepcopy(demo[0]).train()
    model.config.apply_spec_augment, model.config.mask_time_prob = True, 0.5
    enc = UpstreamEncoder(model)
    enc.freeze_front_end()
    assert not any(p.requires_grad for p in (*model.conv1.parameters(), *model.conv2.parameters()))
    x, lengths = pad_waves(_waves((16000, 8000)))
    np.random.seed(0)
    states, frames = enc.hidden_states(x, lengths)
    states.pow(2).sum().backward()
    assert model.conv1.weight.grad is None and model.layers[0].fc1.weight.grad.abs().sum() > 0
    with torch.no_grad():
        clean, _ = UpstreamEncoder(model.eval()).hidden_states(x, lengths)
    assert not torch.allclose(states.detach(), clean)  # SpecAugment masked some mel frames


def test_gradient_checkpointing_gives_the_same_gradients(demo):
    import copy

    from conilium.finetune.model import enable_checkpointing

    x, lengths = pad_waves(_waves((16000, 8000), seed=3))
    grads = []
    for checkpointing in (False, True):
        model = copy.deepcopy(demo[0]).train()
        if checkpointing:
            enable_checkpointing(model)
        enc = UpstreamEncoder(model, whisper_input="clip")
        enc.freeze_front_end()
        states, _ = enc.hidden_states(x, lengths, [1, 3])
        states.pow(2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.layers.parameters()]))
    assert grads[0].norm() > 0
    assert float((grads[0] - grads[1]).norm() / grads[0].norm()) < 1e-5


# ----------------------------------------------------------------------------- the pipeline

@pytest.fixture(scope="module")
def whisper_cache(tiny_corpus, tmp_path_factory):
    config = ExtractConfig("demo-whisper", random_init=True, seed=0, layers="all", normalize="none", max_seconds=4.0,
                           dtype="float32")
    return extract_features(config, tiny_corpus, tmp_path_factory.mktemp("whisper-cache") / "cache", device="cpu",
                            verbose=False)


def test_extraction_into_a_cache_then_a_head(whisper_cache, tiny_corpus, demo, tmp_path):
    from conilium.heads.train import TrainConfig, train_head

    manifest = json.loads((Path(whisper_cache) / "manifest.json").read_text())
    assert manifest["frame_rate"] == 50.0 and manifest["num_hidden_states"] == 4 and manifest["dim"] == 96
    assert manifest["upstream"]["family"] == "whisper" and manifest["upstream"]["name"] == "demo-whisper"
    cache = FeatureCache(whisper_cache)
    corpus = load_corpus(tiny_corpus)
    assert sorted(cache.names) == sorted(corpus.clips)
    model, _ = demo
    runner = UpstreamRunner(model, device=CPU, layers=[3])
    for name in cache.names[:3]:  # the cached frames are the encoder's, clip by clip
        x = read_audio(corpus.audio_path(name), max_seconds=4.0)
        assert cache.num_frames(name) == whisper.frames_for(len(x))
        (frames, _), = runner([x])
        np.testing.assert_allclose(cache.frames(name)[:, -1], frames[:, 0], atol=1e-5 * np.abs(frames).max(), rtol=0)
    cache.close()
    metrics = train_head(TrainConfig(cache=str(whisper_cache), device="cpu", epochs=3, hidden=32, batch_size=8),
                         tmp_path / "head", progress=False)
    assert np.isfinite(metrics["f1_macro"])
    # finetune-best --init-head takes that head onto the same upstream, with the cache's settings
    from conilium.finetune import FinetuneConfig
    from conilium.finetune.warmstart import build_model

    upstream, identity = load_upstream("demo-whisper", random_init=True, seed=0, random_root=tmp_path / "weights")
    config = FinetuneConfig(corpus=str(tiny_corpus), out=str(tmp_path / "ft"), upstream="demo-whisper",
                            random_init=True, init_head=str(tmp_path / "head"))
    start = build_model(config, upstream, identity)
    assert start.model.layers == (0, 1, 2, 3) and start.max_seconds == 4.0 and start.normalize == "none"
    assert start.model.encoder.whisper_input == "30s"


def test_extract_features_settles_whisper_settings_and_compares_them(whisper_cache, tiny_corpus, tmp_path):
    """On the command line a Whisper cache gets no waveform normalisation and the 30 s input by
    default (both recorded); a rerun asking for the clip-length input is refused, naming it."""
    from click.testing import CliRunner

    from conilium.cli.extract import extract_features_cmd

    out = tmp_path / "cli-cache"
    base = ["--corpus", str(tiny_corpus), "--upstream", "demo-whisper", "--random-init", "--max-seconds", "4",
            "--layers", "last", "--splits", "Development", "--out", str(out), "--quiet"]
    r = CliRunner().invoke(extract_features_cmd, base)
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["normalize"] == "none" and m["normalize_stats"] is None
    assert m["config"]["normalize"] == "none" and m["config"]["whisper_input"] == "30s"
    r = CliRunner().invoke(extract_features_cmd, base + ["--whisper-input", "clip"])
    assert r.exit_code != 0 and "whisper_input: cache has 30s, requested clip" in r.output, r.output
    r = CliRunner().invoke(extract_features_cmd, base + ["--whisper-input", "30s"])  # the same settings: kept
    assert r.exit_code == 0, r.output
    # the library's cache fixture asked for the 30 s input by leaving it out: recorded resolved
    assert json.loads((Path(whisper_cache) / "manifest.json").read_text())["config"]["whisper_input"] == "30s"


@pytest.mark.parametrize("upstream, extra, message", [
    ("demo-whisper", ["--max-seconds", "40"], "takes at most 30 s of audio"),
    ("demo-wavlm", ["--whisper-input", "clip"], "--whisper-input applies to Whisper encoders only"),
])
def test_settings_a_family_cannot_take_are_refused(tiny_corpus, tmp_path, upstream, extra, message):
    from click.testing import CliRunner

    from conilium.cli.extract import extract_features_cmd

    out = tmp_path / "cache"
    r = CliRunner().invoke(extract_features_cmd, ["--corpus", str(tiny_corpus), "--upstream", upstream,
                                                  "--random-init", "--out", str(out), "--quiet", *extra])
    assert r.exit_code != 0 and message in r.output, r.output
    assert not out.exists()  # nothing left behind


def test_batches_count_the_30s_input_of_every_clip(demo):
    """On CUDA, batches are bounded by padded audio: a Whisper encoder on its 30 s input computes
    30 s per clip, so a 300 s bound holds 10 clips whatever their length."""
    from conilium.corpus import Clip
    from conilium.extract.plan import Job, plan_batches

    jobs = [Job(f"c{i}", f"c{i}", Clip(f"c{i}", "Train", "N", None, "Unknown", 3.0), 3 * SAMPLE_RATE)
            for i in range(25)]
    assert max(len(b) for b in plan_batches(jobs, 300.0)) > 10
    sizes = [len(b) for b in plan_batches(jobs, 300.0, min_samples=whisper.MAX_SAMPLES)]
    assert sum(sizes) == 25 and max(sizes) <= 10
    model, _ = demo
    assert UpstreamRunner(model, device=CPU).min_samples == whisper.MAX_SAMPLES
    assert UpstreamRunner(model, device=CPU, whisper_input="clip").min_samples == 0


def test_finetune_best_and_predict_with_demo_whisper(small_demo_corpus, tmp_path):
    from conilium.finetune import FinetuneConfig, finetune
    from conilium.finetune.model import MODEL_FILE, load_model_dir
    from conilium.finetune.predict import Predictor

    config = FinetuneConfig(corpus=str(small_demo_corpus), out=str(tmp_path / "ft"), upstream="demo-whisper",
                            random_init=True, max_seconds=1.5, batch_size=8, epochs=2, lr=1e-3, max_train_clips=16,
                            hidden=64, dropout=0.0, upstream_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0,
                            num_workers=0, normalize="none")
    metrics = finetune(config, progress=False)
    losses = [h["train_loss"] for h in metrics["history"]]
    assert len(losses) == 2 and all(np.isfinite(losses))
    out = Path(config.out)
    info = json.loads((out / MODEL_FILE).read_text())
    assert info["upstream_family"] == "whisper" and info["whisper_input"] == "30s"
    model, _ = load_model_dir(out)
    assert model.encoder.whisper_input == "30s"
    # the convolutions stayed frozen, the transformer layers trained
    start, _ = load_upstream("demo-whisper", random_init=True, seed=config.random_init_seed,
                             random_root=tmp_path / "fresh")
    assert torch.equal(model.upstream.conv1.weight, start.conv1.weight)
    assert torch.equal(model.upstream.conv2.weight, start.conv2.weight)
    assert not torch.equal(model.upstream.layers[-1].fc1.weight, start.layers[-1].fc1.weight)
    # predict on the model directory: the same probabilities as the run's own Development predictions
    from conilium.runs import prediction_path, read_predictions

    dev = read_predictions(prediction_path(out, "Development"))
    files = [Path(small_demo_corpus) / "Audios" / n for n in dev.names[:3]]
    results = Predictor(out, device="cpu", batch_size=2).predict(files)
    assert all(r.ok and r.prediction in CLASSES for r in results)
    np.testing.assert_allclose(np.stack([r.probabilities for r in results]), dev.probs[:3], atol=1e-4)


def test_finetune_settles_normalisation_and_input_per_family(small_demo_corpus, tmp_path):
    """finetune-best's defaults: no waveform normalisation and the 30 s input for a Whisper
    encoder, global normalisation for WavLM; settings a family cannot take are refused before
    anything is written."""
    from click.testing import CliRunner

    from conilium.cli.finetune import finetune_best_cmd
    from conilium.finetune import FinetuneConfig
    from conilium.finetune.train import settle_family_settings

    whisper_cfg = settle_family_settings(FinetuneConfig(corpus="c", out="o", upstream="demo-whisper", random_init=True))
    assert (whisper_cfg.normalize, whisper_cfg.whisper_input) == ("none", "30s")
    clip = settle_family_settings(FinetuneConfig(corpus="c", out="o", upstream="demo-whisper", random_init=True,
                                                 whisper_input="clip", normalize="utterance"))
    assert (clip.normalize, clip.whisper_input) == ("utterance", "clip")
    wavlm = settle_family_settings(FinetuneConfig(corpus="c", out="o", upstream="demo-wavlm", random_init=True))
    assert (wavlm.normalize, wavlm.whisper_input) == ("global", None)
    for upstream, extra, message in [("demo-wavlm", ["--whisper-input", "30s"], "applies to Whisper encoders only"),
                                     ("demo-whisper", ["--max-seconds", "31"], "takes at most 30 s of audio")]:
        out = tmp_path / upstream
        r = CliRunner().invoke(finetune_best_cmd, ["--corpus", str(small_demo_corpus), "--out", str(out),
                                                   "--upstream", upstream, "--random-init", "--epochs", "1",
                                                   "--quiet", *extra])
        assert r.exit_code != 0 and message in r.output, r.output
        assert not out.exists()

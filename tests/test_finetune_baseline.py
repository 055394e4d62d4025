"""Starting from the challenge baseline's checkpoint files (final_ssl.pt, final_pool.pt, final_ser.pt).

The files are built here from a demo upstream with perturbed weights and a randomly
initialised pooling and classifier written the way the baseline's code writes them; the
reference outputs come from an independent forward of the baseline's architecture.
"""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conilium.audio import normalize, read_audio
from conilium.errors import ConfigError
from conilium.runs import prediction_path, read_predictions
from conilium.extract.upstreams import load_upstream
from conilium.finetune.baseline import load_baseline, read_norm_stats
from conilium.finetune import EndToEndModel, FinetuneConfig, finetune

HIDDEN = 48


class RefPooling(nn.Module):
    """The baseline's attentive statistics pooling: one clip at a time, over its frames."""

    def __init__(self, dim):
        super().__init__()
        self.sap_linear = nn.Linear(dim, dim)
        self.attention = nn.Parameter(torch.randn(dim, 1))

    def forward(self, x):  # (1, T, D), every frame valid
        h = torch.tanh(self.sap_linear(x))
        w = torch.softmax((h @ self.attention).squeeze(2), dim=1).unsqueeze(2)
        mu = (x * w).sum(dim=1)
        rh = torch.sqrt((((x ** 2) * w).sum(dim=1) - mu ** 2).clamp(min=1e-5))
        return torch.cat([mu, rh], dim=1)


class RefClassifier(nn.Module):
    def __init__(self, in_dim, hidden, classes=8):
        super().__init__()
        self.fc = nn.ModuleList([nn.Sequential(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.ReLU(),
                                               nn.Dropout(0.5))])
        self.out = nn.Sequential(nn.Linear(hidden, classes))
        self.inp_drop = nn.Dropout(0.5)

    def forward(self, x):
        h = self.inp_drop(x)
        for block in self.fc:
            h = block(h)
        return self.out(h)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """A baseline checkpoint folder and the modules that made it (eval mode)."""
    root = tmp_path_factory.mktemp("baseline")
    upstream, _ = load_upstream("demo-wavlm", random_init=True, random_root=root / "weights")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in upstream.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    torch.manual_seed(6)
    pool, ser = RefPooling(96), RefClassifier(192, HIDDEN)
    for m in (pool, ser):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    folder = root / "ckpt"
    folder.mkdir()
    # the positional convolution's weight norm in the older transformers spelling
    ssl = {k.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1",
                                                                                 "weight_v"): v
           for k, v in upstream.state_dict().items()}
    torch.save(ssl, folder / "final_ssl.pt")
    torch.save(pool.state_dict(), folder / "final_pool.pt")
    torch.save(ser.state_dict(), folder / "final_ser.pt")
    with open(folder / "train_norm_stat.pkl", "wb") as f:
        pickle.dump((np.float64(0.001), np.float64(0.04)), f)
    for m in (upstream, pool, ser):
        m.eval()
    return folder, upstream, pool, ser


def reference_logits(baseline, wave: np.ndarray) -> torch.Tensor:
    _, upstream, pool, ser = baseline
    with torch.no_grad():
        h = upstream(torch.from_numpy(wave)[None]).last_hidden_state
        return ser(pool(h))[0]


def test_loaded_baseline_gives_the_baseline_logits(baseline, tmp_path):
    folder = baseline[0]
    fresh, _ = load_upstream("demo-wavlm", random_init=True, random_root=tmp_path)  # other weights until loaded
    head, layers, info = load_baseline(folder, fresh)
    assert head.config.hidden == HIDDEN and head.config.dim == 96 and layers is None
    model = EndToEndModel(fresh, head, layers).eval()
    rng = np.random.default_rng(0)
    waves = [rng.standard_normal(n).astype(np.float32) for n in (7000, 16000, 11000)]
    batch = torch.zeros(3, 16000)
    for i, w in enumerate(waves):
        batch[i, : len(w)] = torch.from_numpy(w)
    with torch.no_grad():
        ours = model(batch, torch.tensor([len(w) for w in waves]))
    for i, w in enumerate(waves):
        torch.testing.assert_close(ours[i], reference_logits(baseline, w), atol=2e-5, rtol=1e-4)
    # the normalisation statistics: (x - mean) / (std + 1e-6), as the baseline computes them
    stats = info["normalize_stats"]
    x = waves[0]
    np.testing.assert_allclose(normalize(x, "global", stats), (x - 0.001) / (0.04 + 1e-6), rtol=1e-6)
    assert read_norm_stats(tmp_path) is None


def test_finetune_starts_from_the_baseline(baseline, small_demo_corpus, tmp_path):
    """With a vanishing learning rate the fine-tuned model is still the baseline: its
    development predictions equal the baseline's outputs on the normalised, truncated audio."""
    folder = baseline[0]
    config = FinetuneConfig(corpus=str(small_demo_corpus), out=str(tmp_path / "m"), upstream="demo-wavlm",
                            random_init=True, baseline_ckpt=str(folder), lr=1e-12, weight_decay=0.0, epochs=1,
                            batch_size=8, max_train_clips=8, max_seconds=1.5, num_workers=0, tune_thresholds=False)
    finetune(config, progress=False)
    dev = read_predictions(prediction_path(tmp_path / "m", "Development"))
    stats = read_norm_stats(folder)
    for k in (0, 7):
        x = read_audio(Path(small_demo_corpus) / "Audios" / dev.names[k], max_seconds=1.5)
        expected = torch.sigmoid(reference_logits(baseline, normalize(x, "global", stats))).numpy()
        np.testing.assert_allclose(dev.probs[k], expected, atol=5e-6)


def test_checkpoint_files_that_do_not_fit_are_clear_errors(baseline, tmp_path):
    folder = baseline[0]
    other, _ = load_upstream("demo-wav2vec2-base", random_init=True, random_root=tmp_path / "w")
    with pytest.raises(ConfigError, match="final_ssl.pt does not fit"):
        load_baseline(folder, other)
    empty = tmp_path / "empty"
    empty.mkdir()
    torch.save({}, empty / "final_ssl.pt")
    with pytest.raises(ConfigError, match="final_pool.pt"):
        load_baseline(empty, other)
    with pytest.raises(ConfigError, match="directory not found"):
        load_baseline(tmp_path / "missing", other)


def test_the_baseline_keeps_its_12_second_truncation_unless_told_otherwise():
    base = dict(corpus="c", out="o")
    assert FinetuneConfig(**base).max_seconds == 8.0
    assert FinetuneConfig(**base, baseline_ckpt="ckpt").max_seconds == 12.0
    assert FinetuneConfig(**base, baseline_ckpt="ckpt", max_seconds=8.0).max_seconds == 8.0  # given: it wins
    assert FinetuneConfig(**base, init_head="run").max_seconds == 8.0
    saved = FinetuneConfig(**base, baseline_ckpt="ckpt").to_json()
    assert saved["max_seconds"] == 12.0 and FinetuneConfig.from_dict(saved).max_seconds == 12.0


def test_finetune_best_from_the_baseline_scores_12_second_clips(baseline, small_demo_corpus, tmp_path):
    """finetune-best --baseline-ckpt without --max-seconds reads 12 s of each clip, as the baseline,
    says so in config.json, and its predictions on a clip longer than 8 s are the baseline's on
    12 s of it; an explicit --max-seconds wins."""
    import json

    from click.testing import CliRunner

    from conilium.cli.finetune import finetune_best_cmd
    from conilium.corpus import load_corpus

    folder = baseline[0]
    args = ["--corpus", str(small_demo_corpus), "--upstream", "demo-wavlm", "--random-init", "--baseline-ckpt",
            str(folder), "--lr", "1e-12", "--weight-decay", "0", "--epochs", "1", "--batch-size", "8",
            "--max-train-clips", "8", "--num-workers", "0", "--no-thresholds", "--device", "cpu"]
    r = CliRunner().invoke(finetune_best_cmd, [*args, "--out", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    assert "truncated at 12 s, as the challenge baseline" in r.stderr
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["max_seconds"] == config["max_seconds_used"] == 12.0
    assert config["start_from"]["kind"] == "challenge baseline"
    assert config["start_from"]["baseline_max_seconds"] == 12.0
    dev = read_predictions(prediction_path(tmp_path / "m", "Development"))
    durations = {c.name: c.duration for c in load_corpus(small_demo_corpus)}
    k = max(range(len(dev.names)), key=lambda i: durations[dev.names[i]])
    assert durations[dev.names[k]] > 9.0  # well over 8 s: 12 s and 8 s of it differ
    stats = read_norm_stats(folder)
    x = read_audio(Path(small_demo_corpus) / "Audios" / dev.names[k], max_seconds=12.0)
    expected = torch.sigmoid(reference_logits(baseline, normalize(x, "global", stats))).numpy()
    np.testing.assert_allclose(dev.probs[k], expected, atol=5e-6)
    x8 = read_audio(Path(small_demo_corpus) / "Audios" / dev.names[k], max_seconds=8.0)
    at8 = torch.sigmoid(reference_logits(baseline, normalize(x8, "global", stats))).numpy()
    assert np.abs(at8 - expected).max() > 1e-4
    # an explicit --max-seconds wins
    r = CliRunner().invoke(finetune_best_cmd, [*args, "--out", str(tmp_path / "m8"), "--max-seconds", "8", "-q"])
    assert r.exit_code == 0, r.output
    config = json.loads((tmp_path / "m8" / "config.json").read_text())
    assert config["max_seconds"] == config["max_seconds_used"] == 8.0

"""Heads without training: pooling vs hand computation, layer selection, the balanced sampler,
P*/S* filtering, the cache dataset and every incompatible-choice / bad-cache error."""

import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conilium.dirs import Manifest
from conilium.errors import CacheError, ConfigError
from conilium.cli.heads import train_head_cmd
from conilium.heads.data import ClipDataset, collate, feature_bytes, select_input
from conilium.heads.model import AttentiveStatsPooling, EmotionHead, HeadConfig, LayerMix, MeanPooling, valid_mask
from conilium.training.samplers import balanced_sampler, balanced_weights
from conilium.heads.train import TrainConfig, prepare
from conilium.targets import passes_agreement, primary_target, secondary_target
from conilium.testing import write_synthetic_cache


@pytest.fixture(scope="module")
def syn_cache(tmp_path_factory):
    """60 clips, frames of upstream layers 1 and 3 stored, pooled stats of 4 layers, annotations."""
    return write_synthetic_cache(tmp_path_factory.mktemp("syn") / "cache", clips=60, dim=8, clips_per_shard=25)


# ---- pooling and layer mixing ----------------------------------------------------------

def _hand_attentive(pool, x):
    """Attentive statistics of one clip's valid frames x (T, D), computed with numpy."""
    W = pool.sap_linear.weight.detach().numpy().astype(np.float64)
    b = pool.sap_linear.bias.detach().numpy().astype(np.float64)
    a = pool.attention.detach().numpy().astype(np.float64)[:, 0]
    x = x.astype(np.float64)
    h = np.tanh(x @ W.T + b)
    s = h @ a
    w = np.exp(s - s.max())
    w /= w.sum()
    mu = (w[:, None] * x).sum(0)
    var = (w[:, None] * x * x).sum(0) - mu * mu
    return np.concatenate([mu, np.sqrt(np.maximum(var, 1e-5))])


def test_attentive_pooling_matches_hand_computation_on_valid_frames_only():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    pool = AttentiveStatsPooling(6).double()
    lengths = [7, 3, 1]
    clips = [rng.normal(size=(t, 6)) for t in lengths]
    batch = np.full((3, 7, 6), 1e3)  # huge values in the padding: must be ignored
    for i, x in enumerate(clips):
        batch[i, : len(x)] = x
    lens = torch.tensor(lengths)
    out = pool(torch.tensor(batch), valid_mask(lens, 7)).detach().numpy()
    for i, x in enumerate(clips):
        assert np.allclose(out[i], _hand_attentive(pool, x), atol=1e-10)
    # a one-frame clip: mean is the frame, std the clamp floor sqrt(1e-5)
    assert np.allclose(out[2, :6], clips[2][0])
    assert np.allclose(out[2, 6:], np.sqrt(1e-5))
    # each clip alone (no padding) gives the same vector
    for i, x in enumerate(clips):
        alone = pool(torch.tensor(x[None]), valid_mask(torch.tensor([len(x)]), len(x))).detach().numpy()[0]
        assert np.allclose(alone, out[i], atol=1e-12)


def test_mean_pooling_ignores_padding():
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    out = MeanPooling(2)(x, valid_mask(torch.tensor([2]), 3))
    assert torch.allclose(out, torch.tensor([[2.0, 3.0]]))


def test_layer_mix_weighted_is_a_softmax_sum_and_an_index_selects():
    x = torch.randn(2, 5, 3, 4)
    mix = LayerMix(3, "weighted")
    with torch.no_grad():
        mix.weights.copy_(torch.tensor([0.0, 1.0, -1.0]))
    w = torch.softmax(torch.tensor([0.0, 1.0, -1.0]), 0)
    assert torch.allclose(mix(x), (x * w.view(1, 1, 3, 1)).sum(2), atol=1e-6)
    assert torch.equal(LayerMix(3, 1)(x), x[:, :, 1])
    assert torch.equal(LayerMix(3, -1)(x), x[:, :, 2])


def test_head_output_does_not_depend_on_batch_padding():
    torch.manual_seed(0)
    head = EmotionHead(HeadConfig(dim=4, num_layers=2)).eval()
    a, b = torch.randn(9, 2, 4), torch.randn(4, 2, 4)
    x, lengths, _, _ = collate([(a, torch.empty(0), 0), (b, torch.empty(0), 1)])
    assert x.dtype == torch.float32  # float32 items stay float32
    both = head(x, lengths)
    alone = head(b[None], torch.tensor([4]))
    assert torch.allclose(both[1], alone[0], atol=1e-6)


def test_attentive_head_keeps_the_challenge_baseline_parameter_names():
    keys = set(EmotionHead(HeadConfig(dim=4)).state_dict())
    assert {"pooling.sap_linear.weight", "pooling.attention", "classifier.fc.0.0.weight",
            "classifier.fc.0.1.weight", "classifier.out.0.weight"} <= keys


# ---- balanced sampler -------------------------------------------------------------------

def test_balanced_sampler_draws_classes_equally_often():
    labels = ["N"] * 600 + ["H"] * 250 + ["A"] * 100 + ["S"] * 40 + ["F"] * 10
    w = balanced_weights(labels)
    assert w[0] == pytest.approx(1 / 600) and w[-1] == pytest.approx(1 / 10)
    gen = torch.Generator().manual_seed(0)
    sampler = balanced_sampler(labels, generator=gen)
    draws = []
    for _ in range(20):  # 20 epochs of N draws each
        epoch = list(sampler)
        assert len(epoch) == len(labels)
        draws += epoch
    freq = Counter(labels[i] for i in draws)
    share = {c: freq[c] / len(draws) for c in set(labels)}
    for c, s in share.items():
        assert s == pytest.approx(1 / 5, abs=0.015), share
    # with replacement: the 10 Fear clips are drawn ~ 20·1000/5 = 4000 times in all
    assert freq["F"] > 3000


def test_balanced_sampler_is_repeatable_with_a_seed():
    labels = ["N"] * 50 + ["A"] * 5
    a = list(balanced_sampler(labels, generator=torch.Generator().manual_seed(3)))
    b = list(balanced_sampler(labels, generator=torch.Generator().manual_seed(3)))
    assert a == b


def test_balanced_sampler_refuses_non_target_labels():
    with pytest.raises(ConfigError, match="not target classes"):
        balanced_weights(["N", "X"])


# ---- targets and filtering against a cache ----------------------------------------------

def test_p_star_and_s_star_filter_training_clips_only(syn_cache):
    train = [syn_cache.clips[n] for n in syn_cache.split("Train")]
    full = prepare(TrainConfig(cache=str(syn_cache.path), loss="wbce", labels="P"))
    assert full.train_names == [c.name for c in train if c.scoreable]
    for kind, th in (("P*", 0.6), ("S*", 0.5), ("P*", 0.8)):
        cfg = TrainConfig(cache=str(syn_cache.path), loss="kld", labels=kind,
                          **({"p_threshold": th} if kind == "P*" else {"s_threshold": th}))
        data = prepare(cfg)
        expected = [c for c in train if c.scoreable and passes_agreement(c, kind, {kind: th})]
        assert data.train_names == [c.name for c in expected]
        assert 0 < len(expected) < len(full.train_names)
        tfn = primary_target if kind == "P*" else secondary_target
        for c, y in zip(expected, data.train_targets):
            assert np.allclose(y, tfn(c.annotations)) and y.max() >= th - 1e-6
        # development scoring is never filtered: every scoreable Development clip
        assert data.dev_names == [n for n in syn_cache.split("Development") if syn_cache.clips[n].scoreable]


def test_class_weights_are_off_with_the_sampler_and_for_unweighted_losses(syn_cache):
    path = str(syn_cache.path)
    assert prepare(TrainConfig(cache=path, loss="wbce", labels="S")).weights is not None
    assert prepare(TrainConfig(cache=path, loss="wbce", labels="S", sampler="balanced")).weights is None
    assert prepare(TrainConfig(cache=path, loss="bce", labels="S")).weights is None
    assert prepare(TrainConfig(cache=path, loss="kld", labels="S")).weights is None


# ---- layer selection and the dataset ---------------------------------------------------

def test_layer_selection_reads_upstream_layer_numbers(syn_cache):
    assert syn_cache.layers == [1, 3]
    sel = select_input(syn_cache, "weighted")
    assert sel.positions is None and sel.upstream_layers == (1, 3)
    sel = select_input(syn_cache, 3)
    assert sel.positions == (1,) and sel.upstream_layers == (3,)
    assert select_input(syn_cache, -1).upstream_layers == (3,)
    # pooled statistics cover every layer of the upstream
    assert select_input(syn_cache, 2, pooled_stats=True).upstream_layers == (2,)
    assert select_input(syn_cache, "weighted", pooled_stats=True).upstream_layers == (0, 1, 2, 3)


def test_dataset_reads_the_selected_layer_and_pads_per_batch(syn_cache):
    names = syn_cache.split("Train")[:3]
    ds = ClipDataset(syn_cache, names, select_input(syn_cache, 3))
    x, y, i = ds[1]
    assert x.shape == (syn_cache.num_frames(names[1]), 1, 8) and i == 1 and y.numel() == 0
    assert np.array_equal(x.numpy(), syn_cache.frames(names[1])[:, 1:2].astype(np.float16))
    xb, lengths, _, idx = collate([ds[k] for k in range(3)])
    assert xb.dtype == torch.float16 and xb.shape[1] == max(syn_cache.num_frames(n) for n in names)
    assert lengths.tolist() == [syn_cache.num_frames(n) for n in names]
    for k in range(3):
        assert float(xb[k, lengths[k]:].abs().sum()) == 0.0
    pre = ClipDataset(syn_cache, names, select_input(syn_cache, 3), preload=True)
    assert pre.preloaded and all(torch.equal(pre[k][0], ds[k][0]) for k in range(3))
    assert feature_bytes(syn_cache, names, select_input(syn_cache, 3)) == sum(
        syn_cache.num_frames(n) for n in names) * 8 * 2
    p = ClipDataset(syn_cache, names, select_input(syn_cache, "weighted", pooled_stats=True))
    assert p[0][0].shape == (4, 16)


# ---- errors ------------------------------------------------------------------------------

def _cfg(cache, **kw):
    return TrainConfig(cache=str(cache.path if hasattr(cache, "path") else cache), **kw)


@pytest.mark.parametrize("kw, message", [
    (dict(loss="wce", labels="S"), "--loss wce needs --labels hard"),
    (dict(loss="wce", labels="P*"), "--loss wce needs --labels hard"),
    (dict(layers=2), "--layers 2: the cache holds frames of upstream layer"),
    (dict(layers=7, pooled_stats=True), "--layers 7: the cache holds pooled statistics of layers 0..3"),
    (dict(layers=-3), "--layers -3: out of range"),
    (dict(layers="last"), "--layers must be 'weighted' or a layer number"),
    (dict(sampler="uniform"), "unknown --sampler"),
    (dict(pooling="max"), "unknown --pooling"),
    (dict(labels="Q"), "unknown --labels"),
    (dict(lr=0.0), "--lr must be a positive"),
    (dict(batch_size=0), "--batch-size must be at least 1"),
    (dict(p_threshold=1.5, labels="P*"), "--p-threshold must be in"),
    (dict(train_split="Train2"), "no clip in split 'Train2'"),
    (dict(dev_split="Test3"), "no scoreable clip in split 'Test3'"),
])
def test_incompatible_choices_are_clear_errors(syn_cache, kw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("*", r"\*")):
        prepare(_cfg(syn_cache, **kw))


def test_soft_targets_need_annotations_and_pooled_stats_need_a_pooled_cache(tmp_path):
    bare = write_synthetic_cache(tmp_path / "bare", clips=30, dim=4, annotations=False)
    for labels in ("P", "S", "P*", "S*"):
        with pytest.raises(ConfigError, match=f"--labels {labels.replace('*', '[*]')} needs the annotators' labels"):
            prepare(_cfg(bare, loss="wbce", labels=labels))
    prepare(_cfg(bare, loss="wce", labels="hard"))  # hard labels need no annotation
    manifest = json.loads((bare.path / "manifest.json").read_text())
    manifest["pooled_stats"] = False
    manifest["manifest_sha256"] = Manifest(manifest).checksum()  # as if extracted without --pooled-stats
    (bare.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="no pooled statistics, so --pooled-stats cannot be used"):
        prepare(_cfg(bare, loss="wce", labels="hard", pooled_stats=True))


def test_weighted_layers_on_a_one_layer_cache_are_allowed(tmp_path):
    one = write_synthetic_cache(tmp_path / "one", clips=30, dim=4, stored_layers=(2,), all_layers=3)
    data = prepare(_cfg(one, loss="wce", labels="hard", layers="weighted"))
    assert data.selection.upstream_layers == (2,)


def test_missing_or_incomplete_cache_is_a_cache_error(syn_cache, tmp_path):
    with pytest.raises(CacheError, match="cache directory not found"):
        prepare(_cfg(tmp_path / "nope"))
    broken = tmp_path / "broken"
    shutil.copytree(syn_cache.path, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps(dict(manifest, complete=False)))
    with pytest.raises(CacheError, match="incomplete"):
        prepare(_cfg(broken))
    (broken / "manifest.json").unlink()
    with pytest.raises(CacheError, match="no manifest.json"):
        prepare(_cfg(broken))
    (broken / "manifest.json").write_text(json.dumps(manifest))
    (broken / manifest["shards"][1]["file"]).unlink()
    with pytest.raises(CacheError, match="shard file"):
        prepare(_cfg(broken))


def test_cli_reports_errors_in_one_line_without_traceback(syn_cache, tmp_path):
    runner = CliRunner()
    r = runner.invoke(train_head_cmd, ["--cache", str(syn_cache.path), "--out", str(tmp_path / "run"),
                                       "--loss", "wce", "--labels", "S"])
    assert r.exit_code == 1 and r.output.startswith("Error: --loss wce needs --labels hard")
    assert "Traceback" not in r.output
    r = runner.invoke(train_head_cmd, ["--cache", str(tmp_path / "missing"), "--out", str(tmp_path / "run")])
    assert r.exit_code == 1 and "Error:" in r.output and "cache directory not found" in r.output
    assert not (tmp_path / "run").exists()

"""Mixup and the class-balanced second stage, for head runs and end-to-end fine-tuning."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conilium.errors import ConfigError
from conilium.heads.train import TrainConfig, load_head, train_head
from conilium.runs import read_predictions
from conilium.testing import write_synthetic_cache
from conilium.training.mixup import Mixup, mix, mix_mask, mix_waves, mixup_or_none


@pytest.fixture(scope="module")
def syn_cache(tmp_path_factory):
    return write_synthetic_cache(tmp_path_factory.mktemp("syn") / "cache", clips=80, dim=8, seed=1, signal=0.4)


def _train(cache, out, **kw):
    kw.setdefault("epochs", 3)
    kw.setdefault("hidden", 32)
    return train_head(TrainConfig(cache=str(cache.path), device="cpu", **kw), out, progress=False)


def _losses(m):
    return [h["train_loss"] for h in m["history"]]


# ----------------------------------------------------------------------------- the mixing itself

def test_mixed_inputs_and_targets_are_convex_combinations_of_two_clips():
    m = Mixup(0.4, [7])
    perm, lam = m.pairs(6, "cpu")
    assert sorted(perm.tolist()) == list(range(6)) and bool(((lam >= 0) & (lam <= 1)).all())
    y = torch.softmax(torch.randn(6, 8), dim=1)
    mixed = mix(y, perm, lam)
    for i in range(6):
        expect = lam[i] * y[i] + (1 - lam[i]) * y[perm[i]]
        torch.testing.assert_close(mixed[i], expect)
    # still a distribution: each mixed target sums to 1 and lies between its two clips' targets
    torch.testing.assert_close(mixed.sum(dim=1), torch.ones(6))
    lo, hi = torch.minimum(y, y[perm]), torch.maximum(y, y[perm])
    assert bool(((mixed >= lo - 1e-7) & (mixed <= hi + 1e-7)).all())
    # an attribute value is known for a mixed clip only where both of its clips have it
    known = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    assert mix_mask(known, perm).tolist() == (known * known[perm]).tolist()
    # waveforms: the mixed clip lasts as long as the longer of its two
    waves, lengths = torch.zeros(6, 10), torch.tensor([3, 10, 5, 7, 2, 9])
    for i, n in enumerate(lengths.tolist()):
        waves[i, :n] = 1.0 + i
    mw, ml = mix_waves(waves, lengths, perm, lam)
    assert ml.tolist() == torch.maximum(lengths, lengths[perm]).tolist()
    assert bool((mw[torch.arange(10)[None, :] >= ml[:, None]] == 0).all())  # padding stays silent


def test_draws_are_repeatable_from_the_seed_and_alpha_zero_draws_nothing():
    a, b, c = Mixup(0.2, [3, 1]), Mixup(0.2, [3, 1]), Mixup(0.2, [3, 2])
    for _ in range(3):
        pa, la = a.draw(16)
        pb, lb = b.draw(16)
        pc, lc = c.draw(16)
        assert pa.tolist() == pb.tolist() and la.tolist() == lb.tolist()
    assert la.tolist() != lc.tolist()
    assert mixup_or_none(0.0, [3]) is None
    # a small alpha puts lambda near 0 or 1 (little mixing), alpha 1 draws it uniformly
    _, small = Mixup(0.05, [0]).draw(4000)
    _, one = Mixup(1.0, [0]).draw(4000)
    assert np.mean(np.minimum(small, 1 - small) < 0.05) > 0.7
    assert abs(np.mean(one) - 0.5) < 0.02 and abs(np.var(one) - 1 / 12) < 0.01


# ----------------------------------------------------------------------------- heads

def test_head_mixup_zero_is_the_run_without_the_option(syn_cache, tmp_path):
    plain = _train(syn_cache, tmp_path / "plain")
    # a config.json written before the option existed reads as mixup 0 and is the same run
    cfg = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert cfg["mixup"] == 0 and cfg["balanced_stage"] == 0
    old = {k: v for k, v in cfg.items() if k not in ("mixup", "balanced_stage")}
    again = train_head(TrainConfig.from_dict(dict(old, device="cpu")), tmp_path / "old", progress=False)
    assert _losses(again) == _losses(plain) and again["f1_macro"] == plain["f1_macro"]
    a = read_predictions(tmp_path / "plain" / "predictions" / "Development.csv").probs
    b = read_predictions(tmp_path / "old" / "predictions" / "Development.csv").probs
    assert np.array_equal(a, b)


def _mixup_runs(cache, tmp_path, **kw):
    plain = _train(cache, tmp_path / "plain", **kw)
    m1 = _train(cache, tmp_path / "m1", mixup=0.4, **kw)
    m2 = _train(cache, tmp_path / "m2", mixup=0.4, **kw)
    assert _losses(m1) == _losses(m2)
    assert np.array_equal(read_predictions(tmp_path / "m1" / "predictions" / "Development.csv").probs,
                          read_predictions(tmp_path / "m2" / "predictions" / "Development.csv").probs)
    assert _losses(m1) != _losses(plain)
    assert all(np.isfinite(_losses(m1)))
    return plain, m1


def test_head_mixup_changes_training_and_is_repeatable(syn_cache, tmp_path):
    _mixup_runs(syn_cache, tmp_path)


def test_joint_head_mixup_mixes_the_attributes_too(demo_cache, tmp_path):
    from conilium.cache.reader import FeatureCache

    with FeatureCache(demo_cache) as cache:
        _, m = _mixup_runs(cache, tmp_path, task="joint", pooled_stats=True, epochs=2)
    assert np.isfinite(m["ccc_mean"]) and all(np.isfinite(h["dev_ccc_mean"]) for h in m["history"])


# ----------------------------------------------------------------------------- the balanced second stage

def _state(run):
    model, ckpt = load_head(run)
    return {k: v.clone() for k, v in model.state_dict().items()}, ckpt


def _two_stages(cache, tmp_path, **kw):
    first = _train(cache, tmp_path / "first", epochs=2, **kw)
    both = _train(cache, tmp_path / "both", epochs=2, balanced_stage=4, **kw)
    h = both["history"]
    # the first stage is the run without the option, epoch for epoch
    assert h[:2] == [dict(r, train_seconds=h[i]["train_seconds"], seconds=h[i]["seconds"])
                     for i, r in enumerate(first["history"])]
    assert [r["epoch"] for r in h] == [1, 2, 3, 4, 5, 6] and [r.get("stage", 1) for r in h] == [1, 1, 2, 2, 2, 2]
    stage = both["training"]["balanced_stage"]
    best1 = max(r["dev_f1_macro"] for r in h[:2])
    best2 = max(r["dev_f1_macro"] for r in h[2:])
    assert stage["stage1_best"] == best1 and stage["stage2_best"] == best2 and stage["epochs_run"] == 4
    # never worse than the first stage: the kept epoch is the best of both, the first stage's on a tie
    assert both["f1_macro"] == pytest.approx(max(best1, best2), abs=1e-4) and both["f1_macro"] >= best1 - 1e-4
    assert stage["best_stage"] == (2 if best2 > best1 else 1) and both["best_epoch"] == stage["best_epoch"]
    a, _ = _state(tmp_path / "first")
    b, ckpt = _state(tmp_path / "both")
    assert ckpt.best_epoch == both["best_epoch"]
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    if stage["best_stage"] == 1:
        assert changed == set()
    else:
        assert changed == {"classifier.out.0.weight", "classifier.out.0.bias"}
    return stage["best_stage"]


@pytest.mark.parametrize("kw", [dict(), dict(mixup=0.3)])
def test_balanced_stage_keeps_the_better_stage_and_trains_only_the_output_layer(syn_cache, tmp_path, kw):
    _two_stages(syn_cache, tmp_path, **kw)


def test_balanced_stage_wins_when_it_helps(syn_cache, tmp_path):
    """A run where the second stage is better: its weights are kept (the output layer alone moved)."""
    assert _two_stages(syn_cache, tmp_path, loss="wce", labels="hard") == 2


def test_balanced_stage_refuses_what_it_cannot_balance():
    with pytest.raises(ConfigError, match="--task attributes"):
        TrainConfig(cache="c", task="attributes", balanced_stage=2).check()
    with pytest.raises(ConfigError, match="--train-on-xo with --balanced-stage"):
        TrainConfig(cache="c", train_on_xo=True, balanced_stage=2).check()
    with pytest.raises(ConfigError, match="--balanced-stage must be"):
        TrainConfig(cache="c", balanced_stage=-1).check()
    with pytest.raises(ConfigError, match="--mixup must be"):
        TrainConfig(cache="c", mixup=-0.5).check()


# ----------------------------------------------------------------------------- end-to-end fine-tuning

FT = dict(upstream="demo-wavlm", random_init=True, max_seconds=1.5, batch_size=8, epochs=1, lr=1e-3,
          max_train_clips=16, hidden=64, dropout=0.0, upstream_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0,
          num_workers=0, loss="wce", labels="hard", seed=1)


def test_fine_tuning_with_mixup_and_a_balanced_stage(small_demo_corpus, tmp_path, two_torch_threads):
    # seed 1: a run whose second stage beats the first on the tiny corpus (so that its weights are kept)
    from dataclasses import replace

    from conilium.finetune import FinetuneConfig, finetune, load_model_dir
    from conilium.finetune.rundir import BEST, BEST_STAGE2, CHECKPOINT_DIR

    plain_cfg = FinetuneConfig(corpus=str(small_demo_corpus), out=str(tmp_path / "plain"), **FT)
    cfg = replace(plain_cfg, out=str(tmp_path / "both"), mixup=0.4, balanced_stage=2, keep_checkpoints=True)
    plain = finetune(plain_cfg, progress=False)
    both = finetune(cfg, progress=False)
    h = both["history"]
    assert [(r["epoch"], r.get("stage", 1)) for r in h] == [(1, 1), (2, 2), (3, 2)]
    assert h[0]["train_loss"] != plain["history"][0]["train_loss"]  # the waveforms were mixed
    stage = both["training"]["balanced_stage"]
    assert stage["stage1_best"] == h[0]["dev_f1_macro"] and both["training"]["mixup"] == 0.4
    assert both["f1_macro"] >= h[0]["dev_f1_macro"] and both["f1_macro"] == pytest.approx(
        max(r["dev_f1_macro"] for r in h), abs=1e-6)
    assert stage["best_stage"] == 2 and both["best_epoch"] in (2, 3)
    # the second stage moved the head's output layer alone, and the model directory holds its best epoch
    ckpt = Path(cfg.out) / CHECKPOINT_DIR
    first = torch.load(ckpt / BEST, weights_only=True)["model"]
    second = torch.load(ckpt / BEST_STAGE2, weights_only=True)["model"]
    assert {k for k in first if not torch.equal(first[k], second[k])} == {"head.classifier.out.0.weight",
                                                                          "head.classifier.out.0.bias"}
    saved = load_model_dir(cfg.out)[0].state_dict()
    for k in ("head.classifier.out.0.weight", "head.classifier.out.0.bias"):
        torch.testing.assert_close(saved[k], second[k])

    # interrupted inside the second stage, a resume redoes it from the first stage's best: the same run
    resumed = replace(cfg, out=str(tmp_path / "resumed"))

    def stop(record):
        if record.get("stage") == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(resumed, progress=False, on_epoch_end=stop)
    again = finetune(resumed, resume=True, progress=False)
    strip = lambda hist: [{k: v for k, v in r.items() if "seconds" not in k} for r in hist]  # noqa: E731
    assert strip(again["history"]) == strip(h)
    assert again["training"]["balanced_stage"] == stage
    a = read_predictions(Path(cfg.out) / "predictions" / "Development.csv").probs
    b = read_predictions(Path(resumed.out) / "predictions" / "Development.csv").probs
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_heads_of_one_pass_with_and_without_the_options_equal_their_own_runs(syn_cache, tmp_path):
    """train-grid trains a pass's heads together: each writes what its own train-head run writes."""
    from test_grid_pass import assert_same_run  # the tests' folder is on the path (pytest's prepend mode)

    from conilium.heads.train import plan_passes, train_heads

    configs = {"plain": dict(), "mixup": dict(mixup=0.3), "stage": dict(balanced_stage=2, epochs=3),
               "both": dict(mixup=0.3, balanced_stage=3, loss="wce", labels="hard", patience=1)}
    configs = {k: TrainConfig(cache=str(syn_cache.path), device="cpu", hidden=16, **dict(dict(epochs=2), **kw))
               for k, kw in configs.items()}
    assert len(plan_passes(list(configs.values()))) == 1
    results = train_heads([(c, tmp_path / "pass" / k) for k, c in configs.items()], progress=False)
    assert all(isinstance(r, dict) for r in results), results
    for name, config in configs.items():
        train_head(config, tmp_path / "solo" / name, progress=False)
        assert_same_run(tmp_path / "pass" / name, tmp_path / "solo" / name)

"""The heads of a data pass as one stacked module (``--stack-heads``): the same dropout draws,
the same outputs and, trained, each head's numbers those of its own train-head run to float32
rounding; heads that cannot be stacked are trained one by one, as without stacking."""

import csv
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from conilium.heads.model import EmotionHead, HeadConfig, MaskDropout
from conilium.heads.stacked import StackedHeads, unstackable
from conilium.heads.train import TrainConfig, train_head, train_heads
from conilium.testing import write_synthetic_cache
from conilium.training.state import RandomStream

TABLE2 = [("wce-hard", "wce", "hard"), ("wbce-P", "wbce", "P"), ("wbce-S", "wbce", "S"), ("kld-P", "kld", "P"),
          ("kld-S", "kld", "S")]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_synthetic_cache(tmp_path_factory.mktemp("stacked") / "cache", clips=90, dim=8, seed=3, signal=0.5)


def _config(cache, **kw):
    kw.setdefault("epochs", 4)
    kw.setdefault("hidden", 16)
    kw.setdefault("batch_size", 8)
    kw.setdefault("threads", 1)
    return TrainConfig(cache=str(cache.path), device="cpu", **kw)


def _scores(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cols = [k for k in rows[0] if k not in ("FileName", "Prediction", "Reference")]
    return [r["FileName"] for r in rows], np.array([[float(r[k]) for k in cols] for r in rows])


@pytest.mark.parametrize("p", [0.5, 0.1, 0.0, 1.0])
def test_mask_dropout_draws_what_torch_dropout_draws_on_cpu(p):
    x = torch.randn(6, 40, requires_grad=True)
    grad = torch.randn(6, 40)
    out = []
    for layer in (torch.nn.Dropout(p), MaskDropout(p)):
        torch.manual_seed(11)
        y = layer.train()(x)
        (g,) = torch.autograd.grad(y, x, grad)
        out.append((y.detach(), g, torch.get_rng_state()))
    assert all(torch.equal(a, b) for a, b in zip(*out))
    assert torch.equal(MaskDropout(p).eval()(x), x)


def _heads(config, n=3):
    heads = []
    for k in range(n):
        torch.manual_seed(100 + k)
        head = EmotionHead(config)
        for prm in head.parameters():  # away from the initial zeros/ones, as after training
            prm.data.add_(0.05 * torch.randn_like(prm))
        heads.append(head)
    return heads


@pytest.mark.parametrize("config", [
    HeadConfig(dim=8, num_layers=3, layers="weighted", hidden=16),  # each head its own layer mix
    HeadConfig(dim=8, num_layers=3, layers=1, hidden=16),  # one layer, shared by every head
    HeadConfig(dim=8, num_layers=3, layers="weighted", pooling="mean", hidden=16, attributes=3),
    HeadConfig(dim=8, num_layers=4, layers="weighted", pooling="stats", hidden=16, num_classes=0, attributes=3),
])
def test_a_stack_computes_what_each_head_computes(config):
    heads = _heads(config)
    stack = StackedHeads(heads)
    g = torch.Generator().manual_seed(5)
    lengths = torch.tensor([7, 3, 9, 1, 9])
    if config.pooling == "stats":
        x, lengths = torch.randn(5, config.num_layers, 2 * config.dim, generator=g), None
    else:
        x = torch.randn(5, 9, config.num_layers, config.dim, generator=g)
    with torch.no_grad():
        got = stack.eval()(x, lengths)
        for k, head in enumerate(heads):
            assert torch.allclose(got[k], head.eval()(x, lengths), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layers", [0, "weighted"], ids=["shared-input", "own-mix"])
def test_at_wavlm_width_a_stack_gives_each_head_its_own_gradients_to_float_rounding(layers):
    """At the width of real caches (1024) the stacked products sum in another order than each
    head's own: every head's loss gradient agrees with its own run's to float32 rounding
    (within 1e-3 of the largest: sums over 1024-wide products cancel), the same masks drawn. (Over many AdamW steps these differences grow
    as any rounding difference does: a stacked run follows its own trajectory, see the README.)"""
    config = HeadConfig(dim=1024, num_layers=1 if layers == 0 else 3, layers=layers, hidden=256)
    heads = []
    for k in range(3):
        torch.manual_seed(100 + k)
        heads.append(EmotionHead(config))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(12, 60, config.num_layers, 1024, generator=g)
    lengths = torch.randint(10, 61, (12,), generator=g)
    y = torch.randint(0, 8, (12,), generator=g)
    stack = StackedHeads(heads).train()
    ss = []
    for k in range(3):
        torch.manual_seed(42 + k)
        ss.append(RandomStream(torch.device("cpu")))
    out = stack(x, lengths, stack.draw_masks(ss, 12, torch.device("cpu")))
    sum(torch.nn.functional.cross_entropy(out[k], y) for k in range(3)).backward()
    for k, head in enumerate(heads):
        torch.manual_seed(42 + k)
        with RandomStream(torch.device("cpu")):
            torch.nn.functional.cross_entropy(head.train()(x, lengths), y).backward()
        for i, (name, prm) in enumerate(head.named_parameters()):
            assert stack.names[i] == name
            if prm.grad is None:
                continue
            scale = float(prm.grad.abs().max())
            assert float((stack.weights[i].grad[k] - prm.grad).abs().max()) <= 1e-3 * scale + 1e-9, name


def test_stacked_dropout_draws_each_heads_masks_from_its_own_stream():
    config = HeadConfig(dim=8, num_layers=3, layers="weighted", hidden=16)
    heads = _heads(config)
    x = torch.randn(4, 6, 3, 8)
    lengths = torch.tensor([6, 2, 5, 6])

    def streams():
        out = []
        for k in range(len(heads)):  # each head's own stream, apart from the others'
            torch.manual_seed(42 + k)
            out.append(RandomStream(torch.device("cpu")))
        return out

    alone = []
    for head, s in zip(heads, streams()):
        with s:
            alone.append(head.train()(x, lengths))
    stack = StackedHeads(heads).train()
    ss = streams()
    ss[1] = None  # a head that no longer trains: its mask is ones, its stream untouched
    masks = stack.draw_masks(ss, 4, torch.device("cpu"))
    got = stack(x, lengths, masks)
    for k in (0, 2):
        assert torch.allclose(got[k], alone[k], rtol=1e-5, atol=1e-6)
    assert torch.equal(masks[0][1], torch.ones_like(masks[0][1])) and torch.equal(masks[1][1], torch.ones_like(masks[1][1]))


def test_head_state_loads_into_a_head():
    config = HeadConfig(dim=8, num_layers=3, layers="weighted", hidden=16, attributes=3)
    heads = _heads(config)
    stack = StackedHeads(heads)
    for k, head in enumerate(heads):
        fresh = EmotionHead(config)
        fresh.load_state_dict(stack.head_state(k))
        assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), head.state_dict().values()))


def test_unstackable_names_what_stands_against_it(cache):
    a, b = _config(cache, loss="wbce", labels="S"), _config(cache, loss="kld", labels="P")
    cfg = HeadConfig(dim=8, num_layers=3)
    assert unstackable([a, b], [[cfg], [cfg]]) is None
    assert "one head" in unstackable([a], [[cfg]])
    assert "architecture" in unstackable([a, b], [[cfg], [replace(cfg, hidden=32)]])
    assert "mixup" in unstackable([a, replace(b, mixup=0.2)], [[cfg], [cfg]])
    assert "learning rate" in unstackable([a, replace(b, lr=3e-3)], [[cfg], [cfg]])
    assert "fusion" in unstackable([a, b], [[cfg, cfg], [cfg, cfg]])


def test_a_stacked_pass_matches_each_heads_own_run(cache, tmp_path):
    """Table 2's five heads (one with a balanced second stage) and a head that stops early, as one
    stacked module: each run's scores of every split within 1e-5 of its own train-head run (scores
    written to 6 decimals), the same macro-F1 and best epoch, training losses within 1e-5 relative;
    on 2 threads the same, bitwise."""
    configs = {name: _config(cache, loss=loss, labels=labels, stack_heads="on") for name, loss, labels in TABLE2}
    configs["bce-S-patience"] = _config(cache, loss="bce", labels="S", epochs=8, patience=1, stack_heads="on")
    # a balanced second stage: from its stacked best epoch, alone
    configs["wbce-S"] = replace(configs["wbce-S"], balanced_stage=2)
    results = train_heads([(c, tmp_path / "stacked" / n) for n, c in configs.items()], progress=False)
    assert all(isinstance(r, dict) for r in results), results
    for (name, config), stacked in zip(configs.items(), results):
        assert stacked["training"]["stacking"] == {"heads": 6}
        solo = train_head(replace(config, stack_heads="auto"), tmp_path / "solo" / name, progress=False)
        assert "stacking" not in solo["training"]  # auto: not on a CPU
        assert stacked["best_epoch"] == solo["best_epoch"] and stacked["f1_macro"] == solo["f1_macro"], name
        assert len(stacked["history"]) == len(solo["history"])
        np.testing.assert_allclose([h["train_loss"] for h in stacked["history"]],
                                   [h["train_loss"] for h in solo["history"]], rtol=1e-5)
        for split in ("Development", "Train", "Test3"):
            files = [d / name / "predictions" / f"{split}.csv" for d in (tmp_path / "stacked", tmp_path / "solo")]
            (na, a), (nb, b) = _scores(files[0]), _scores(files[1])
            assert na == nb
            assert np.abs(a - b).max() <= 1e-5, (name, split, np.abs(a - b).max())
    assert len(results[-1]["history"]) < 8  # stopped early while the others went on
    two = train_heads([(replace(c, threads=2), tmp_path / "two" / n) for n, c in configs.items()], progress=False)
    for name, r in zip(configs, two):
        for split in ("Development", "Test3"):
            assert _scores(tmp_path / "two" / name / "predictions" / f"{split}.csv") is not None
            assert (tmp_path / "two" / name / "predictions" / f"{split}.csv").read_bytes() == \
                (tmp_path / "stacked" / name / "predictions" / f"{split}.csv").read_bytes(), (name, split)


def test_heads_that_cannot_be_stacked_train_one_by_one(cache, tmp_path):
    """--stack-heads on over a pass with a --mixup head: trained as without stacking (bitwise), and
    metrics.json says why."""
    configs = {"wbce-S": _config(cache, loss="wbce", labels="S", epochs=2),
               "kld-P-mixup": _config(cache, loss="kld", labels="P", epochs=2, mixup=0.4)}
    on = train_heads([(replace(c, stack_heads="on"), tmp_path / "on" / n) for n, c in configs.items()],
                     progress=False)
    off = train_heads([(replace(c, stack_heads="off"), tmp_path / "off" / n) for n, c in configs.items()],
                      progress=False)
    for name, a, b in zip(configs, on, off):
        assert a["training"]["stacking"]["heads"] == 1 and "mixup" in a["training"]["stacking"]["not_stacked"]
        assert "stacking" not in b["training"]
        assert (tmp_path / "on" / name / "predictions" / "Development.csv").read_bytes() == \
            (tmp_path / "off" / name / "predictions" / "Development.csv").read_bytes()
        assert json.loads((tmp_path / "on" / name / "config.json").read_text())["stack_heads"] == "on"


def test_train_grid_stack_heads_option(cache, tmp_path):
    from click.testing import CliRunner

    from conilium.cli.heads import train_grid_cmd

    args = ["--preset", "table2", "--cache", str(cache.path), "--out", str(tmp_path / "grid"), "--set", "epochs=1",
            "--set", "hidden=16", "--set", "threads=1", "-q"]
    r = CliRunner().invoke(train_grid_cmd, args + ["--stack-heads", "on"])
    assert r.exit_code == 0, r.output
    for name, _, _ in TABLE2:
        metrics = json.loads((tmp_path / "grid" / name / "metrics.json").read_text())
        assert metrics["training"]["stacking"] == {"heads": 5}
    r = CliRunner().invoke(train_grid_cmd, args + ["--stack-heads", "on", "--set", "stack_heads=off"])
    assert r.exit_code != 0 and "both name it" in r.output

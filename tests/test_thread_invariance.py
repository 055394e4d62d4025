"""A run's numbers depend on its configuration and seed only: not on the other runs or seeds
of its grid, nor on how many threads its data pass was given (a grid shares the cores among
its parallel passes, so a seed of a grid with several seeds trains on fewer threads than the
same run in a grid of one seed)."""

import pytest
import torch

from conilium.heads.grid import expand_spec, run_grid
from conilium.heads.model import EmotionHead, HeadConfig
from conilium.heads.train import train_head
from conilium.runtime import ThreadInvariantLayerNorm, ThreadInvariantLinear, on_one_thread, thread_invariant_softmax
from conilium.testing import write_synthetic_cache

from test_grid_pass import assert_same_run


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_synthetic_cache(tmp_path_factory.mktemp("threads") / "cache", clips=90, dim=8, seed=3, signal=0.5)


def _spec(cache):
    return {"common": {"cache": str(cache.path), "epochs": 3, "hidden": 16, "batch_size": 8, "device": "cpu"},
            "product": {"loss": ["wbce", "kld"], "labels": ["P", "S"]}}


def test_a_seed_of_a_grid_with_seeds_equals_the_grid_without_seeds_and_the_run_alone(cache, tmp_path):
    spec = _spec(cache)
    # two passes (one a seed) on 1 thread each, as a grid of 2 jobs on 2 cores gives them
    seeded = run_grid(expand_spec(spec, seeds=[0, 1]), tmp_path / "seeds", n_jobs=2, backend="threading",
                      threads_per_job=1, progress=False)
    # one pass on 2 threads, as the same grid without seeds gives it
    plain = run_grid(expand_spec(spec), tmp_path / "plain", n_jobs=2, backend="threading", threads_per_job=2,
                     progress=False)
    assert {r["status"] for r in seeded + plain} == {"trained"}
    assert len({r["pass"] for r in seeded}) == 2 and {r["pass"] for r in plain} == {1}
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for name, config, _ in expand_spec(spec):
            assert_same_run(tmp_path / "seeds" / f"{name}-seed0", tmp_path / "plain" / name)
            train_head(config, tmp_path / "alone" / name, progress=False)  # torch's threads: 2
            assert_same_run(tmp_path / "alone" / name, tmp_path / "plain" / name)
    finally:
        torch.set_num_threads(before)
    # the seeds are different runs
    by_name = {r["name"]: r for r in seeded}
    assert any(by_name[f"{n}-seed0"]["f1_macro"] != by_name[f"{n}-seed1"]["f1_macro"]
               or by_name[f"{n}-seed0"]["best_epoch"] != by_name[f"{n}-seed1"]["best_epoch"]
               for n in ("wbce-P", "wbce-S", "kld-P", "kld-S"))


def _step(threads: int, rows: int):
    """A head's outputs, loss gradient and updated weights after one step on ``rows`` clips,
    computed with ``threads`` torch threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(1)
        model = EmotionHead(HeadConfig(dim=24, num_layers=2, hidden=64, dropout=0.0))
        g = torch.Generator().manual_seed(0)
        x = torch.randn(rows, 40, 2, 24, generator=g)
        lengths = torch.randint(5, 41, (rows,), generator=g)
        out = model(x, lengths)
        out.square().sum().backward()
        return out.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("rows", [5, 7, 11, 16])
def test_a_heads_outputs_and_gradients_are_those_of_one_thread(rows):
    out1, grads1 = _step(1, rows)
    out2, grads2 = _step(2, rows)
    assert torch.equal(out1, out2)
    assert grads1.keys() == grads2.keys()
    for k in grads1:
        assert torch.equal(grads1[k], grads2[k]), k


def test_the_thread_invariant_layers_are_torchs_layers_on_one_thread():
    """Same parameters (state-dict names, initial draws) and, on one thread, the same numbers
    as torch's own layers: a run on one thread is what it was before."""
    torch.manual_seed(0)
    ours = torch.nn.Sequential(ThreadInvariantLinear(6, 4), ThreadInvariantLayerNorm(4))
    torch.manual_seed(0)
    theirs = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.LayerNorm(4))
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # ours compute on one thread: torch's layers on one thread
    try:
        x = torch.randn(7, 6, requires_grad=True)
        y = thread_invariant_softmax(ours(x), 1)
        y[:, 0].sum().backward()
        ours_grads = [x.grad.clone()] + [p.grad.clone() for p in ours.parameters()]
        x.grad = None
        torch.set_num_threads(1)
        z = torch.softmax(theirs(x), 1)
        z[:, 0].sum().backward()
        theirs_grads = [x.grad.clone()] + [p.grad.clone() for p in theirs.parameters()]
    finally:
        torch.set_num_threads(before)
    assert torch.equal(y.detach(), z.detach())
    assert all(torch.equal(a, b) for a, b in zip(ours_grads, theirs_grads))
    # no gradient wanted: computed on one thread all the same, the thread count restored
    with torch.no_grad():
        assert torch.equal(on_one_thread(torch.nn.functional.linear, x, ours[0].weight, None),
                           torch.nn.functional.linear(x, ours[0].weight))
    assert torch.get_num_threads() == before



def _cross_attention_step(threads: int):
    """A cross-attention fusion head's outputs and gradients after one backward pass on 16 clips,
    with ``threads`` torch threads."""
    from conilium.heads.model import FusionHead

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(1)
        model = FusionHead([HeadConfig(dim=96, num_layers=2, hidden=64, dropout=0.0),
                            HeadConfig(dim=64, num_layers=1, hidden=64, dropout=0.0)], "cross-attention")
        g = torch.Generator().manual_seed(0)
        audio = (torch.randn(16, 200, 2, 96, generator=g), torch.randint(50, 201, (16,), generator=g))
        text = (torch.randn(16, 20, 1, 64, generator=g), torch.randint(2, 21, (16,), generator=g))
        out = model((audio, text))
        out.square().sum().backward()
        return out.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}
    finally:
        torch.set_num_threads(before)


def test_a_cross_attention_fusion_heads_outputs_and_gradients_do_not_depend_on_the_threads():
    """The cross-attention (torch's own attention layer between thread-invariant ones) gives a
    fusion run the same numbers on 1 and 2 threads, as the heads' other layers do."""
    out1, grads1 = _cross_attention_step(1)
    out2, grads2 = _cross_attention_step(2)
    assert torch.equal(out1, out2)
    assert grads1.keys() == grads2.keys() and any(k.startswith("cross.attention.") for k in grads1)
    for k in grads1:
        assert torch.equal(grads1[k], grads2[k]), k

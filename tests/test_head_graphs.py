"""Head steps on fixed shapes (``cuda_graphs``): frame buckets, static inputs refilled every step,
and runs whose numbers match the eager runs' to float32 rounding. On a CPU the fixed-shape steps
run eagerly; the capture itself is checked where a CUDA device exists."""

import csv
from dataclasses import replace

import numpy as np
import pytest
import torch

from conilium.extract.plan import BUCKET_HOP, bucket_samples
from conilium.heads.graphs import StepGraphs, frame_bucket, use_graphs
from conilium.heads.train import TrainConfig, train_head, train_heads
from conilium.testing import write_synthetic_cache


def test_frame_buckets_are_few_tight_and_capped():
    buckets = [frame_bucket(t) for t in range(1, 4097)]
    assert all(b >= t for t, b in zip(range(1, 4097), buckets))
    assert all(b <= t * 9 / 8 for t, b in zip(range(16, 4097), buckets[15:]))  # at most 1/8 more frames
    assert len(set(buckets)) <= 15 + 8 * 9  # exact below 16, then 8 a doubling
    assert frame_bucket(401) == 416 and frame_bucket(401, cap=410) == 410 and frame_bucket(401, cap=300) == 401
    assert [frame_bucket(t) for t in (15, 16, 17, 33, 35)] == [15, 16, 18, 36, 36]
    # the extraction's length buckets, counted in frames instead of 320-sample hops
    assert all(bucket_samples(t * BUCKET_HOP) == b * BUCKET_HOP for t, b in zip(range(1, 4097), buckets))
    assert use_graphs("auto", torch.device("cpu")) is False and use_graphs("on", torch.device("cpu")) is True
    assert use_graphs("off", torch.device("cpu")) is False


def test_static_inputs_are_refilled_and_padded_with_zeros_each_step():
    seen = []

    def step(x, lengths, at, masks, slots):
        seen.append((x.clone(), lengths.clone(), at.clone(), masks[0].clone(), slots))
        return x.sum(dim=(1, 2))

    graphs = StepGraphs(step, capture=False, cap_frames=500)
    for t, fill in ((35, 1.0), (33, 2.0), (36, 3.0)):  # one bucket: 36 frames
        x = torch.full((4, t, 3), fill)
        lengths = torch.tensor([t, t - 1, 5, 1])
        at = torch.arange(4) + int(fill)
        mask = torch.full((4, 2), fill)
        out = graphs(x, lengths, at, (mask,), (0, 1))
        assert torch.equal(out, torch.full((4,), fill * t * 3))
    assert len(graphs.shapes) == 1 and graphs.summary() == {
        "captured": False, "shapes": 1, "graphs": 0, "eager": "no CUDA device: the fixed-shape steps ran eagerly"}
    for (x, lengths, at, mask, slots), (t, fill) in zip(seen, ((35, 1.0), (33, 2.0), (36, 3.0))):
        assert x.shape == (4, 36, 3) and torch.all(x[:, :t] == fill) and torch.all(x[:, t:] == 0)
        assert lengths[0] == t and torch.equal(at, torch.arange(4) + int(fill)) and torch.all(mask == fill)
        assert slots == (0, 1)
    graphs(torch.ones(2, 35, 3), torch.tensor([35, 2]), torch.arange(2), (torch.ones(2, 2),), (0, 1))
    graphs(torch.ones(4, 35, 3), torch.tensor([35, 2, 1, 1]), torch.arange(4), (torch.ones(4, 2),), (1,))
    assert len(graphs.shapes) == 3  # another batch size, other heads training: shapes of their own


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    # clip lengths spread over many buckets (20-140 frames)
    return write_synthetic_cache(tmp_path_factory.mktemp("graphs") / "cache", clips=90, dim=8, seed=5, signal=0.5,
                                 frames=(20, 140))


def _config(cache, **kw):
    kw = {"epochs": 4, "hidden": 16, "batch_size": 8, "threads": 1, **kw}
    return TrainConfig(cache=str(cache.path), device="cpu", **kw)


def _scores(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cols = [k for k in rows[0] if k not in ("FileName", "Prediction", "Reference")]
    return np.array([[float(r[k]) for k in cols] for r in rows])


def _close(a_dir, b_dir, a, b, *, atol):
    assert a["best_epoch"] == b["best_epoch"] and abs(a["f1_macro"] - b["f1_macro"]) <= 1e-9
    np.testing.assert_allclose([h["train_loss"] for h in a["history"]], [h["train_loss"] for h in b["history"]],
                               rtol=1e-5)
    for split in ("Development", "Test3"):
        d = np.abs(_scores(a_dir / "predictions" / f"{split}.csv") - _scores(b_dir / "predictions" / f"{split}.csv"))
        assert d.max() <= atol, (split, d.max())


def test_a_head_alone_on_fixed_shapes_matches_its_eager_run(cache, tmp_path):
    """train-head with cuda_graphs on (a stack of one head, frames padded to buckets; eager on a
    CPU): the eager run's best epoch, macro-F1 and losses, its scores within 1e-5."""
    config = _config(cache, loss="wbce", labels="S")
    eager = train_head(config, tmp_path / "eager", progress=False)
    fixed = train_head(replace(config, cuda_graphs="on"), tmp_path / "fixed", progress=False)
    assert "stacking" not in eager["training"]
    graphs = fixed["training"]["stacking"]["cuda_graphs"]
    assert fixed["training"]["stacking"]["heads"] == 1 and graphs["captured"] is False
    assert graphs["shapes"] >= 5  # the batches' many lengths fell into several buckets
    _close(tmp_path / "fixed", tmp_path / "eager", fixed, eager, atol=1e-5)


def test_a_stacked_pass_on_fixed_shapes_matches_the_stacked_pass(cache, tmp_path):
    """Three heads, one stopping early: on fixed shapes as stacked eagerly, each head within 1e-5;
    --stack-heads off turns the fixed shapes off too (they need the stack), bitwise the eager runs."""
    configs = {"wbce-S": _config(cache, loss="wbce", labels="S"), "kld-P": _config(cache, loss="kld", labels="P"),
               "bce-S-patience": _config(cache, loss="bce", labels="S", epochs=8, patience=1)}
    stacked = train_heads([(replace(c, stack_heads="on"), tmp_path / "stacked" / n) for n, c in configs.items()],
                          progress=False)
    fixed = train_heads([(replace(c, stack_heads="on", cuda_graphs="on"), tmp_path / "fixed" / n)
                         for n, c in configs.items()], progress=False)
    for name, a, b in zip(configs, fixed, stacked):
        assert a["training"]["stacking"]["heads"] == 3 and "cuda_graphs" in a["training"]["stacking"]
        _close(tmp_path / "fixed" / name, tmp_path / "stacked" / name, a, b, atol=1e-5)
    off = train_heads([(replace(c, stack_heads="off", cuda_graphs="on"), tmp_path / "off" / n)
                       for n, c in configs.items()], progress=False)
    eager = train_heads([(c, tmp_path / "eager" / n) for n, c in configs.items()], progress=False)
    for name, a, b in zip(configs, off, eager):
        assert "stacking" not in a["training"]
        assert (tmp_path / "off" / name / "predictions" / "Development.csv").read_bytes() == \
            (tmp_path / "eager" / name / "predictions" / "Development.csv").read_bytes()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_captured_steps_match_the_eager_steps_on_cuda(cache, tmp_path):
    configs = {"wbce-S": _config(cache, loss="wbce", labels="S"), "kld-P": _config(cache, loss="kld", labels="P")}
    runs = {}
    for mode in ("on", "off"):
        runs[mode] = train_heads([(replace(c, device="cuda", stack_heads="on", cuda_graphs=mode),
                                   tmp_path / mode / n) for n, c in configs.items()], progress=False)
    for name, a, b in zip(configs, runs["on"], runs["off"]):
        graphs = a["training"]["stacking"]["cuda_graphs"]
        assert graphs["captured"] is True and graphs["graphs"] >= 1, graphs
        assert graphs["checked"]["replays"] >= 2 and graphs["checked"]["update"] <= 1e-3, graphs
        _close(tmp_path / "on" / name, tmp_path / "off" / name, a, b, atol=1e-4)


def test_shapes_of_one_batch_size_share_one_frames_buffer():
    graphs = StepGraphs(lambda x, lengths, at, masks: x.sum(), capture=False, cap_frames=100)
    for t in (20, 40, 80, 100):
        graphs(torch.ones(4, t, 2, 3), torch.full((4,), t), torch.arange(4), None)
    graphs(torch.ones(2, 30, 2, 3), torch.full((2,), 30), torch.arange(2), None)
    bases = {s.x.untyped_storage().data_ptr() for s in graphs.shapes.values()}
    assert len(graphs.shapes) == 5 and len(bases) == 2  # batch sizes 4 and 2
    assert sum(b.numel() for b in graphs._buffers.values()) == (4 + 2) * 100 * 6


class _Capture:
    """Stands in for torch.cuda's graph capture on a CPU: a step called while "capturing" records
    what it would compute on its static inputs (as a graph records kernels) and computes nothing;
    ``replay`` computes it, on whatever the static inputs hold then."""

    def __init__(self, fail: bool = False):
        self.capturing, self.fail, self.recorded, self.replays = False, fail, None, 0
        capture = self

        class Graph:
            def replay(self):
                capture.replays += 1
                self.recorded()

        class GraphContext:
            def __init__(self, graph, **kw):
                self.graph = graph

            def __enter__(self):
                if capture.fail:
                    raise RuntimeError("operation not permitted when stream is capturing")
                capture.capturing = True

            def __exit__(self, *exc):
                capture.capturing = False
                self.graph.recorded = capture.recorded

        self.Graph, self.GraphContext = Graph, GraphContext


def _stand_in(monkeypatch, cap):
    import contextlib

    from conilium.heads import graphs as module

    class Stream:
        def wait_stream(self, other):
            pass

    for name, value in (("CUDAGraph", cap.Graph), ("graph", cap.GraphContext), ("Stream", Stream),
                        ("current_stream", lambda: Stream()), ("stream", lambda s: contextlib.nullcontext()),
                        ("graph_pool_handle", lambda: None)):
        monkeypatch.setattr(module.torch.cuda, name, value)


@pytest.mark.parametrize("stale", [False, True], ids=["reads-its-inputs", "stale-inputs"])
def test_shapes_replay_their_graph_after_warm_up_and_checked_replays(monkeypatch, stale):
    """Each shape: two eager warm-up steps, a capture, two replays checked against the eager step
    (undone and taken eagerly), then plain replays; a graph that does not read the refilled inputs
    (``stale``: it kept the captured batch) is caught by the second check, and every step from
    there on runs eagerly. Either way each step's losses and the weight are those of eager steps."""
    cap = _Capture()
    _stand_in(monkeypatch, cap)
    weight = torch.zeros(2)
    eager = []

    def step(x, lengths, at, masks):
        out = torch.zeros(x.shape[0])

        def compute(src):
            out.copy_(src.sum(dim=(1, 2)) + at)
            weight.add_(0.5 * out)

        if cap.capturing:
            cap.recorded = (lambda kept=x.clone(): compute(kept)) if stale else (lambda: compute(x))
        else:
            eager.append(1)
            compute(x)
        return out

    graphs = StepGraphs(step, capture=True, cap_frames=64, state=lambda: [weight])
    expected_weight = torch.zeros(2)
    for k in range(6):
        t = 33 + k % 3  # one bucket (36 frames)
        out = graphs(torch.full((2, t, 1), float(k)), torch.tensor([t, 1]), torch.tensor([k, 2 * k]), None)
        want = torch.tensor([k * t + k, k * t + 2 * k], dtype=torch.float32)
        expected_weight += 0.5 * want
        assert torch.equal(out, want) and torch.equal(weight, expected_weight), k
    summary = graphs.summary()
    if not stale:
        assert len(eager) == 2 + 2 and cap.replays == 4
        assert summary == {"captured": True, "shapes": 1, "graphs": 1,
                           "checked": {"replays": 2, "loss": 0.0, "update": 0.0}}
    else:
        assert len(eager) == 2 + 2 + 2 and cap.replays == 2
        assert summary["captured"] is False and "a replayed step differed from the eager step" in summary["eager"]


def test_a_failed_capture_leaves_the_steps_eager_and_says_why(monkeypatch):
    failing = _Capture(fail=True)
    _stand_in(monkeypatch, failing)
    calls = []

    def step(x, lengths, at, masks):
        calls.append(1)
        return x.sum(dim=(1, 2)) + at

    graphs = StepGraphs(step, capture=True, cap_frames=64)
    for k in range(4):
        out = graphs(torch.ones(2, 30, 1), torch.tensor([30, 1]), torch.tensor([k, k]), None)
        assert torch.equal(out, torch.full((2,), 30.0 + k))
    assert len(calls) == 4 and failing.replays == 0
    summary = graphs.summary()
    assert summary["captured"] is False and "could not be captured (RuntimeError: operation not permitted" in \
        summary["eager"]

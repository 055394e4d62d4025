"""The one upstream forward: fused attention equals transformers' own forward."""

import copy

import numpy as np
import pytest
import torch

from conilium.extract.encoder import UpstreamEncoder, hidden_shape, pad_waves, use_fused_attention
from conilium.extract.upstreams import load_upstream

FAMILIES = ["demo-wavlm", "demo-hubert", "demo-wav2vec2-base", "demo-wav2vec2-large"]

pytestmark = pytest.mark.usefixtures("two_torch_threads")


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory):
    root = tmp_path_factory.mktemp("upstreams")
    return {name: load_upstream(name, random_init=True, seed=0, random_root=root)[0].eval() for name in FAMILIES}


def _waves(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return pad_waves([rng.standard_normal(n).astype(np.float32) for n in lengths])


def _rel(a, b):
    return float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("lengths", [(16000,), (16000, 9000, 23000)], ids=["unpadded", "padded"])
def test_fused_attention_equals_the_stock_forward(upstreams, name, lengths):
    model = upstreams[name]
    stock = UpstreamEncoder(copy.deepcopy(model), fused_attention=False)
    fused = UpstreamEncoder(copy.deepcopy(model))
    assert fused.fused_attention == (3 if name == "demo-wavlm" else 0)  # the others run SDPA in transformers
    x, lengths = _waves(lengths)
    every = range(stock.num_hidden_states)
    with torch.inference_mode():
        a, frames = stock.hidden_states(x, lengths, every)
        b, _ = fused.hidden_states(x, lengths, every)
    for i, n in enumerate(frames.tolist()):
        assert _rel(a[i, :n], b[i, :n]) < 1e-5


def test_fused_attention_gives_the_same_gradients(upstreams):
    model = copy.deepcopy(upstreams["demo-wavlm"])
    for m in model.modules():  # no dropout, so that both forwards are deterministic
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model.config.layerdrop = 0.0
    model.config.mask_time_prob = 0.0  # no SpecAugment draws
    stock = UpstreamEncoder(copy.deepcopy(model).train(), fused_attention=False)
    fused = UpstreamEncoder(copy.deepcopy(model).train())
    for enc in (stock, fused):
        enc.model.encoder.layerdrop = 0.0
        for layer in enc.model.encoder.layers:
            layer.attention.dropout = 0.0
    x, lengths = _waves((12000, 8000), seed=1)
    grads = []
    for enc in (stock, fused):
        states, frames = enc.hidden_states(x, lengths)
        (states ** 2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in enc.model.encoder.parameters() if p.grad is not None]))
    assert grads[0].norm() > 0
    assert float((grads[0] - grads[1]).norm() / grads[0].norm()) < 1e-5


def test_modules_without_the_expected_attributes_keep_their_forward(upstreams):
    model = copy.deepcopy(upstreams["demo-wavlm"])
    for layer in model.encoder.layers:
        del layer.attention.head_dim  # as a transformers version that names it otherwise
    assert use_fused_attention(model) == 0


@pytest.mark.parametrize("name", FAMILIES)
def test_hidden_shape_is_what_the_encoder_reports(upstreams, name):
    model = upstreams[name]
    enc = UpstreamEncoder(model)
    try:
        assert hidden_shape(model) == (enc.num_hidden_states, enc.dim) == (4, 96)  # the demo: 3 layers, 96 wide
    finally:
        enc.close()

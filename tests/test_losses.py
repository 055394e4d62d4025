"""Each loss against a direct computation of the paper's equation on a small batch."""

import math

import numpy as np
import pytest
import torch

from conilium.errors import ConfigError
from conilium.training.config import check_loss
from conilium.training.losses import LOSSES, loss_fn, probabilities, uses_weights

RNG = np.random.default_rng(7)
N, C = 5, 8
LOGITS = RNG.normal(scale=2.0, size=(N, C))
# soft targets with exact zeros (as P and S have), rows summing to 1
SOFT = np.array([
    [0, 0, 0, 0, 0, 0, 0, 1.0],
    [0, 1 / 4, 0, 0, 0, 0, 0, 3 / 4],
    [0, 3 / 7, 0, 1 / 7, 0, 0, 0, 3 / 7],
    [0.5, 0, 0, 0, 0, 0.25, 0.25, 0],
    [0, 0, 0.6, 0.4, 0, 0, 0, 0],
])
HARD = np.eye(C)[[7, 7, 1, 0, 2]]
WEIGHTS = np.array([2.0, 1.5, 0.5, 3.0, 4.0, 4.0, 2.0, 0.3])


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def _torch(fn, logits, targets, weights):
    w = None if weights is None else torch.tensor(weights)
    return float(fn(torch.tensor(logits), torch.tensor(targets), w))


def eq1_wce(z, y, w):
    p = _softmax(z)
    return -sum(w[c] * y[i, c] * math.log(p[i, c]) for i in range(len(z)) for c in range(C)) / len(z)


def eq2_wbce(z, y, w):
    p = _sigmoid(z)
    total = 0.0
    for i in range(len(z)):
        for c in range(C):
            total += w[c] * (y[i, c] * math.log(p[i, c]) + (1 - y[i, c]) * math.log(1 - p[i, c]))
    return -total / len(z)


def eq3_kld(z, y):
    p = _softmax(z)
    total = 0.0
    for i in range(len(z)):
        for c in range(C):
            if y[i, c] > 0:  # 0 · log 0 = 0
                total += y[i, c] * math.log(y[i, c] / p[i, c])
    return total / (len(z) * C)


def focal_direct(z, y, w, gamma=2.0):
    p = _softmax(z)
    return -sum(w[c] * y[i, c] * (1 - p[i, c]) ** gamma * math.log(p[i, c])
                for i in range(len(z)) for c in range(C)) / len(z)


def test_wce_is_equation_1_divided_by_n():
    got = _torch(loss_fn("wce"), LOGITS, HARD, WEIGHTS)
    assert got == pytest.approx(eq1_wce(LOGITS, HARD, WEIGHTS), rel=1e-9)
    # and not torch's weighted mean (which divides by the sum of the targets' weights)
    torch_mean = float(torch.nn.functional.cross_entropy(torch.tensor(LOGITS), torch.tensor(HARD.argmax(1)),
                                                         weight=torch.tensor(WEIGHTS)))
    assert got != pytest.approx(torch_mean, rel=1e-3)


@pytest.mark.parametrize("targets", [HARD, SOFT], ids=["hard", "soft"])
def test_wbce_is_equation_2(targets):
    got = _torch(loss_fn("wbce"), LOGITS, targets, WEIGHTS)
    assert got == pytest.approx(eq2_wbce(LOGITS, targets, WEIGHTS), rel=1e-9)


def test_bce_is_equation_2_with_unit_weights():
    got = _torch(loss_fn("bce"), LOGITS, SOFT, None)
    assert got == pytest.approx(eq2_wbce(LOGITS, SOFT, np.ones(C)), rel=1e-9)


def test_kld_is_equation_3_averaged_over_n_times_c():
    got = _torch(loss_fn("kld"), LOGITS, SOFT, None)
    assert got == pytest.approx(eq3_kld(LOGITS, SOFT), rel=1e-9)
    # zero when the prediction equals the target distribution (strictly positive one)
    y = _softmax(LOGITS)
    assert _torch(loss_fn("kld"), LOGITS, y, None) == pytest.approx(0.0, abs=1e-12)


def test_focal_loss_with_class_weights():
    got = _torch(loss_fn("focal"), LOGITS, SOFT, WEIGHTS)
    assert got == pytest.approx(focal_direct(LOGITS, SOFT, WEIGHTS), rel=1e-9)
    # gamma = 0 gives back weighted cross-entropy
    got0 = float(loss_fn("focal")(torch.tensor(LOGITS), torch.tensor(HARD), torch.tensor(WEIGHTS), gamma=0.0))
    assert got0 == pytest.approx(eq1_wce(LOGITS, HARD, WEIGHTS), rel=1e-9)


def test_which_losses_use_class_weights():
    assert [name for name in LOSSES if uses_weights(name)] == ["wce", "wbce", "focal"]


def test_probabilities_follow_the_loss_activation():
    z = torch.tensor(LOGITS)
    assert np.allclose(probabilities(z, "wbce").numpy(), _sigmoid(LOGITS))
    assert np.allclose(probabilities(z, "bce").numpy(), _sigmoid(LOGITS))
    for name in ("wce", "kld", "focal"):
        assert np.allclose(probabilities(z, name).numpy(), _softmax(LOGITS))


@pytest.mark.parametrize("labels", ["P", "S", "P*", "S*"])
def test_wce_refuses_soft_targets(labels):
    with pytest.raises(ConfigError, match="--loss wce needs --labels hard"):
        check_loss("wce", labels)


def test_unknown_loss_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown loss 'mse'"):
        check_loss("mse", "hard")
    for name in ("bce", "wbce", "kld", "focal"):
        for labels in ("hard", "P", "S", "P*", "S*"):
            check_loss(name, labels)

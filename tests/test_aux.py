"""The auxiliary gender task (--aux gender): the masked loss, the head's extra output, head
runs and fine-tuning with it, and runs without it unchanged."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score

from conilium.errors import ConfigError
from conilium.heads.model import EmotionHead, HeadConfig
from conilium.heads.train import TrainConfig, load_head, train_head
from conilium.runs import read_predictions
from conilium.targets import gender_targets
from conilium.testing import write_synthetic_cache
from conilium.training.losses import masked_bce


@pytest.fixture(scope="module")
def syn_cache(tmp_path_factory):
    return write_synthetic_cache(tmp_path_factory.mktemp("syn-aux") / "cache", clips=80, dim=8, seed=1, signal=0.4)


def _train(cache, out, **kw):
    kw.setdefault("epochs", 3)
    kw.setdefault("hidden", 32)
    return train_head(TrainConfig(cache=str(getattr(cache, "path", cache)), device="cpu", **kw), out, progress=False)


# ----------------------------------------------------------------------------- the loss and the output

def test_the_masked_loss_counts_only_clips_with_a_known_gender():
    logits = torch.tensor([0.3, -1.2, 2.0, 0.7], requires_grad=True)
    targets = torch.tensor([1.0, 0.0, float("nan"), 1.0])
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0])
    loss = masked_bce(logits, targets, mask)
    expect = F.binary_cross_entropy_with_logits(logits[[0, 1, 3]], targets[[0, 1, 3]])
    torch.testing.assert_close(loss, expect)
    loss.backward()
    assert logits.grad[2] == 0 and torch.isfinite(logits.grad).all()
    # what an unknown clip's logit or target is changes nothing
    other = masked_bce(torch.tensor([0.3, -1.2, -9.0, 0.7]), torch.tensor([1.0, 0.0, 1.0, 1.0]), mask)
    torch.testing.assert_close(other, expect.detach())
    # a batch where no clip has a gender: 0, finite zero gradients
    z = torch.tensor([0.5, -0.5], requires_grad=True)
    none = masked_bce(z, torch.tensor([float("nan")] * 2), torch.zeros(2))
    none.backward()
    assert none.item() == 0.0 and torch.equal(z.grad, torch.zeros(2))


def test_gender_targets_and_the_head_without_aux_output_is_unchanged():
    from conilium.corpus import Clip

    clips = [Clip(name=str(i), split="Train", emo_class="N", speaker=None, gender=g, duration=1.0)
             for i, g in enumerate(["Female", "Male", "Unknown"])]
    t = gender_targets(clips)
    assert t[0] == 1.0 and t[1] == 0.0 and np.isnan(t[2])
    torch.manual_seed(0)
    plain = EmotionHead(HeadConfig(dim=8, hidden=16))
    torch.manual_seed(0)
    aux = EmotionHead(HeadConfig(dim=8, hidden=16, gender=1))
    # the gender output is created last: every other weight is drawn as without it
    assert set(aux.state_dict()) - set(plain.state_dict()) == {"classifier.gender.weight", "classifier.gender.bias"}
    for k, v in plain.state_dict().items():
        assert torch.equal(v, aux.state_dict()[k])
    x, lengths = torch.randn(3, 5, 1, 8), torch.tensor([5, 3, 4])
    plain.eval(), aux.eval()
    y, g = aux(x, lengths, aux=True)
    assert torch.equal(y, plain(x, lengths)) and torch.equal(aux(x, lengths), y) and g.shape == (3,)
    with pytest.raises(ValueError, match="no auxiliary gender output"):
        plain(x, lengths, aux=True)


# ----------------------------------------------------------------------------- head runs

def test_head_with_aux_gender_trains_and_scores_gender(syn_cache, tmp_path):
    plain = _train(syn_cache, tmp_path / "plain")
    m = _train(syn_cache, tmp_path / "aux", aux="gender", aux_weight=0.5)
    assert [h["train_loss"] for h in m["history"]] != [h["train_loss"] for h in plain["history"]]
    g = m["aux"]["gender"]
    dev = [syn_cache.clips[n] for n in syn_cache.split("Development", augmented=False)]
    assert g["n"] == len(dev) and g["split"] == "Development" and g["weight"] == 0.5
    assert 0 <= g["accuracy"] <= 1 and 0 <= g["uar"] <= 1
    # the scores are those of the saved head's gender output on the Development clips
    model, ckpt = load_head(tmp_path / "aux")
    assert ckpt.head_config["gender"] == 1 and "aux" not in plain
    from conilium.heads.data import ClipDataset

    ds = ClipDataset(syn_cache, [c.name for c in dev], model_selection(syn_cache), None)
    with torch.no_grad():
        logits = np.concatenate([model(x[None].float(), torch.tensor([x.shape[0]]), aux=True)[1].numpy()
                                 for x, *_ in (ds[i] for i in range(len(ds)))])
    refs = gender_targets(dev).astype(int)
    assert g["uar"] == pytest.approx(balanced_accuracy_score(refs, (logits > 0).astype(int)))
    # the class predictions are written as for any run
    assert read_predictions(tmp_path / "aux" / "predictions" / "Development.csv").probs.shape[1] == 8


def model_selection(cache):
    from conilium.heads.data import select_input

    return select_input(cache, "weighted", False)


def test_a_run_without_aux_reads_old_configs_as_the_same_run(syn_cache, tmp_path):
    plain = _train(syn_cache, tmp_path / "plain")
    cfg = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert cfg["aux"] is None
    old = {k: v for k, v in cfg.items() if k not in ("aux", "aux_weight")}
    again = train_head(TrainConfig.from_dict(dict(old, device="cpu")), tmp_path / "old", progress=False)
    assert again["history"][0]["train_loss"] == plain["history"][0]["train_loss"]
    assert np.array_equal(read_predictions(tmp_path / "plain" / "predictions" / "Development.csv").probs,
                          read_predictions(tmp_path / "old" / "predictions" / "Development.csv").probs)


def test_aux_gender_masks_unknown_genders_on_the_demo_cache(demo_cache, tmp_path):
    from conilium.cache.reader import FeatureCache

    with FeatureCache(demo_cache) as cache:
        genders = {cache.clips[n].gender for n in cache.split("Train")}
        assert "Unknown" in genders and {"Male", "Female"} <= genders  # the masking is exercised
        m = _train(cache, tmp_path / "aux", aux="gender", pooled_stats=True, epochs=2, mixup=0.3)
        dev = [cache.clips[n] for n in cache.split("Development", augmented=False)]
    assert all(np.isfinite(h["train_loss"]) for h in m["history"])
    assert m["aux"]["gender"]["n"] == sum(c.gender in ("Male", "Female") for c in dev) > 0


def test_aux_gender_needs_known_genders(tmp_path):
    """A cache whose clips all read Unknown (one extracted before genders were recorded) is refused."""
    from dataclasses import replace

    from conilium.cache.reader import FeatureCache
    from conilium.heads.prepare import prepare

    cache = write_synthetic_cache(tmp_path / "cache", clips=20, dim=4, seed=0, signal=0.4)
    with FeatureCache(cache.path) as c:
        for name, clip in list(c.clips.items()):
            c.clips[name] = replace(clip, gender="Unknown")
        config = TrainConfig(cache=str(cache.path), device="cpu", aux="gender")
        with pytest.raises(ConfigError, match="--aux gender: no training clip .* has a known gender"):
            prepare(config, cache=c)
        prepare(TrainConfig(cache=str(cache.path), device="cpu"), cache=c)  # without --aux: as before
    with pytest.raises(ConfigError, match="unknown --aux 'age'"):
        TrainConfig(cache="c", aux="age").check()
    from conilium.finetune import FinetuneConfig

    with pytest.raises(ConfigError, match="--aux gender adds an output to a new head"):
        FinetuneConfig(corpus="c", out="o", aux="gender", init_head="run").check()


def test_fine_tuning_with_aux_gender(small_demo_corpus, tmp_path, two_torch_threads):
    from conilium.finetune import FinetuneConfig, finetune, load_model_dir

    config = FinetuneConfig(corpus=str(small_demo_corpus), out=str(tmp_path / "aux"), upstream="demo-wavlm",
                            random_init=True, max_seconds=1.5, batch_size=8, epochs=1, lr=1e-3, max_train_clips=16,
                            hidden=64, dropout=0.0, upstream_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0,
                            num_workers=0, aux="gender", aux_weight=0.5)
    m = finetune(config, progress=False)
    assert np.isfinite(m["history"][0]["train_loss"])
    model, _ = load_model_dir(config.out)
    assert model.head.config.gender == 1 and model.head.classifier.gender is not None
    waves, lengths = torch.zeros(2, 16000), torch.tensor([16000, 12000])
    waves[0].normal_()
    waves[1, :12000].normal_()
    with torch.no_grad():
        logits, g = model(waves, lengths, aux=True)
    assert logits.shape == (2, 8) and g.shape == (2,) and torch.isfinite(g).all()
    dev = read_predictions(Path(config.out) / "predictions" / "Development.csv")
    assert dev.probs.shape == (15, 8)
    # the gender output scored on the Development clips of known gender, as the saved model predicts it
    from conilium.corpus import load_corpus

    clips = [c for c in load_corpus(small_demo_corpus).split("Development") if c.gender in ("Male", "Female")]
    g = m["aux"]["gender"]
    assert g["n"] == len(clips) > 0 and 0 <= g["uar"] <= 1 and g["weight"] == 0.5
    assert json.loads((Path(config.out) / "metrics.json").read_text())["aux"] == m["aux"]

"""train-head end to end on small caches: the run directory, repeatability, streaming vs
preloading, NaN stop, early stopping."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conilium import CLASSES
from conilium.errors import ConfigError
from conilium.metrics import score
from conilium.runs import load_run_config, read_predictions, run_splits
from conilium.cli.heads import train_head_cmd
from conilium.heads.data import ClipDataset, select_input
from conilium.heads.train import TrainConfig, TrainingError, load_config, load_head, predict_probs, train_head
from conilium.runs import is_complete, write_run_outputs
from conilium.testing import write_synthetic_cache


@pytest.fixture(scope="module")
def syn_cache(tmp_path_factory):
    return write_synthetic_cache(tmp_path_factory.mktemp("syn") / "cache", clips=80, dim=8, seed=1, signal=0.4)


def _path(cache):
    return str(getattr(cache, "path", cache))


def _train(cache, out, **kw):
    kw.setdefault("epochs", 4)
    kw.setdefault("hidden", 32)
    return train_head(TrainConfig(cache=_path(cache), device="cpu", **kw), out, progress=False)


def test_run_directory_holds_config_checkpoint_metrics_and_predictions(syn_cache, tmp_path):
    out = tmp_path / "run"
    m = _train(syn_cache, out, loss="wbce", labels="S", layers=3)
    # config.json round-trips
    assert load_config(out) == TrainConfig(cache=str(syn_cache.path), device="cpu", epochs=4, hidden=32,
                                           loss="wbce", labels="S", layers=3)
    assert load_run_config(out)["loss"] == "wbce"
    # predictions for every split of the cache, Reference = consensus letter incl. O/X, empty when unknown
    assert sorted(run_splits(out)) == sorted(syn_cache.splits)
    for split in syn_cache.splits:
        p = read_predictions(out / "predictions" / f"{split}.csv")
        assert p.names == syn_cache.split(split)
        assert p.reference == [syn_cache.clips[n].emo_class for n in p.names]
        assert p.prediction == [CLASSES[i] for i in p.probs.argmax(1)]
        assert np.all((p.probs >= 0) & (p.probs <= 1))
    assert any(r in ("O", "X") for r in read_predictions(out / "predictions" / "Development.csv").reference)
    assert all(r is None for r in read_predictions(out / "predictions" / "Test3.csv").reference)
    # metrics: Development at top level, scored on every scoreable Development clip
    dev = read_predictions(out / "predictions" / "Development.csv")
    assert m == json.loads((out / "metrics.json").read_text())
    assert m["split"] == "Development"
    assert m["n"] == sum(r in CLASSES for r in dev.reference)
    assert m["f1_macro"] == pytest.approx(score(dev.reference, dev.prediction)["f1_macro"])
    assert set(m["per_class"]) == set(CLASSES) and {"precision", "recall", "f1"} <= set(m["per_class"]["N"])
    assert np.array(m["confusion"]).shape == (8, 8)
    assert set(m["splits"]) == {"Train", "Development"}  # Test3 has no labels
    assert [h["epoch"] for h in m["history"]] == [1, 2, 3, 4]
    assert {"train_loss", "dev_f1_macro"} <= set(m["history"][0])
    assert m["best_epoch"] == 1 + int(np.argmax([h["dev_f1_macro"] for h in m["history"]]))
    assert m["f1_macro"] == pytest.approx(max(h["dev_f1_macro"] for h in m["history"]), abs=1e-4)
    # the checkpoint is the best epoch: reloaded, it gives the Development scores written
    model, ckpt = load_head(out)
    assert ckpt.loss == "wbce" and ckpt.labels == "S" and ckpt.upstream_layers == [3]
    assert ckpt.cache_manifest["layers"] == [1, 3] and "shards" not in ckpt.cache_manifest
    assert ckpt.head_config["num_layers"] == 1
    sel = select_input(syn_cache, ckpt.upstream_layers[0])
    probs = predict_probs(model, ClipDataset(syn_cache, dev.names, sel), "wbce", batch_size=5,
                          device=torch.device("cpu"))
    assert np.allclose(probs, dev.probs, atol=2e-6)
    # a checkpoint cut short (a full disk, a copy interrupted) is an error naming it, not a torch traceback
    path = out / "model.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ConfigError, match=rf"{path}: cannot read the head checkpoint"):
        load_head(out)


def test_same_seed_same_metrics_and_streaming_equals_preloading(demo_cache, tmp_path):
    threads = torch.get_num_threads()
    # one torch thread: the loader worker of run b then does not fight the training threads for the CPU
    kw = dict(loss="kld", labels="P", sampler="balanced", epochs=2, hidden=64, threads=1)
    a = _train(demo_cache, tmp_path / "a", seed=5, preload="yes", **kw)
    b = _train(demo_cache, tmp_path / "b", seed=5, preload="no", num_workers=1, **kw)
    c = _train(demo_cache, tmp_path / "c", seed=6, preload="yes", **kw)
    assert a["training"]["preloaded"] and not b["training"]["preloaded"]
    strip = lambda m: {k: v for k, v in m.items() if k != "training"}
    for h in a["history"] + b["history"] + c["history"]:
        h.pop("seconds"), h.pop("train_seconds")
    assert strip(a) == strip(b)
    pa = read_predictions(tmp_path / "a" / "predictions" / "Test3.csv")
    pb = read_predictions(tmp_path / "b" / "predictions" / "Test3.csv")
    pc = read_predictions(tmp_path / "c" / "predictions" / "Test3.csv")
    assert np.array_equal(pa.probs, pb.probs)
    assert not np.array_equal(pa.probs, pc.probs)
    assert a["training"]["class_weights"] is None  # sampler on: loss weights off
    assert torch.get_num_threads() == threads  # train_head restores the thread count


def test_pooled_statistics_head_and_weighted_layers(syn_cache, tmp_path):
    m = _train(syn_cache, tmp_path / "p", loss="wce", labels="hard", pooled_stats=True, epochs=2)
    model, ckpt = load_head(tmp_path / "p")
    assert ckpt.head_config["pooling"] == "stats" and ckpt.head_config["num_layers"] == 4
    assert model.layer_mix.weights.shape == (4,)
    assert m["training"]["class_weights"] is not None


def test_nan_loss_stops_with_a_message_and_leaves_no_complete_run(syn_cache, tmp_path):
    with pytest.raises(TrainingError, match=r"loss is (nan|inf).*lower --lr"):
        _train(syn_cache, tmp_path / "nan", loss="wce", labels="hard", lr=1e30, epochs=3)
    assert not is_complete(tmp_path / "nan")


def test_patience_stops_training_early(syn_cache, tmp_path):
    m = _train(syn_cache, tmp_path / "pat", loss="wbce", labels="P", epochs=30, patience=2, lr=1e-5)
    assert len(m["history"]) == m["best_epoch"] + 2 < 30


def test_a_complete_run_is_done_when_rerun_and_not_overwritten_unless_asked(syn_cache, tmp_path):
    out = tmp_path / "run"
    first = _train(syn_cache, out, loss="bce", labels="hard", epochs=1)
    stamp = (out / "metrics.json").stat().st_mtime_ns
    # the same options (runtime ones aside): done, nothing trained or written again
    assert _train(syn_cache, out, loss="bce", labels="hard", epochs=1, num_workers=1) == first
    assert (out / "metrics.json").stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match="already holds a complete run of other options"):
        _train(syn_cache, out, loss="bce", labels="hard", epochs=2)
    r = CliRunner().invoke(train_head_cmd, ["--cache", str(syn_cache.path), "--out", str(out), "--loss", "focal",
                                            "--labels", "hard", "--epochs", "1", "--hidden", "16", "--device", "cpu",
                                            "--quiet", "--overwrite"])
    assert r.exit_code == 0, r.output
    assert "Development macro-F1" in r.output and load_config(out).loss == "focal"
    r = CliRunner().invoke(train_head_cmd, ["--cache", str(syn_cache.path), "--out", str(out), "--loss", "focal",
                                            "--labels", "hard", "--epochs", "1", "--hidden", "16", "--quiet"])
    assert r.exit_code == 0 and "complete already with these options: nothing trained" in r.output


def test_write_run_outputs_scores_every_labelled_split(tmp_path):
    probs = np.eye(8)[[7, 7, 2, 0]] * 0.9 + 0.01
    m = write_run_outputs(tmp_path, {"Development": (["a", "b", "c", "d"], probs, ["N", "H", "H", "X"]),
                                     "Test3": (["e"], probs[:1], [None])}, [{"epoch": 1}], 1)
    assert m["n"] == 3 and m["f1_micro"] == pytest.approx(2 / 3) and set(m["splits"]) == {"Development"}
    assert read_predictions(tmp_path / "predictions" / "Test3.csv").reference == [None]
    assert is_complete(tmp_path)


def test_noise_augmented_copies_train_but_are_never_scored_or_predicted(tmp_path):
    cache = write_synthetic_cache(tmp_path / "aug", clips=40, dim=4, seed=2, augmented_copies=6)
    copies = [n for n in cache.names if cache.is_augmented(n)]
    assert len(copies) == 6
    m = _train(cache, tmp_path / "run", loss="wbce", labels="P", epochs=1, hidden=8)
    originals = [n for n in cache.split("Train", augmented=False) if cache.clips[n].scoreable]
    scoreable_copies = [n for n in copies if cache.clips[n].scoreable]
    assert scoreable_copies and m["training"]["clips"] == len(originals) + len(scoreable_copies)
    for split in cache.splits:
        names = read_predictions(tmp_path / "run" / "predictions" / f"{split}.csv").names
        assert names == cache.split(split, augmented=False)
    assert m["splits"]["Train"]["n"] == len(originals)

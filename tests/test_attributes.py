"""Arousal, valence, dominance: targets, CCC loss and metric, train-head --task attributes|joint,
predictions CSV, predict --run, and a categories run left exactly as it was."""

import csv
import json
import math

import numpy as np
import pytest
import torch

from conilium.corpus import Annotation, Clip
from conilium.metrics import ccc_parts, score_attributes
from conilium.runs import RunError, read_predictions, read_run
from conilium.targets import attribute_set, attribute_target, attribute_values, from_unit, to_unit

ATTRS = ["EmoAct", "EmoVal", "EmoDom"]
REFS = ["Ref_EmoAct", "Ref_EmoVal", "Ref_EmoDom"]
CLASS_HEADER = ["FileName", "A", "S", "H", "U", "F", "D", "C", "N", "Prediction", "Reference"]
# the demo heads' size (as the study trains them on the demo corpus)
SMALL = dict(hidden=256, dropout=0.2, device="cpu")


def _ccc_by_hand(p, t):
    p, t = np.asarray(p, float), np.asarray(t, float)
    mp, mt = p.mean(), t.mean()
    cov = ((p - mp) * (t - mt)).mean()
    return 2 * cov / (((p - mp) ** 2).mean() + ((t - mt) ** 2).mean() + (mp - mt) ** 2)


# --------------------------------------------------------------------------- loss and metric

def test_ccc_loss_is_one_minus_ccc_averaged_over_attributes():
    from conilium.training.losses import ccc_loss

    pred = np.array([[0.1, 0.9, 0.5], [0.4, 0.2, 0.5], [0.8, 0.4, 0.7], [0.3, 0.6, 0.2]])
    target = np.array([[0.0, 1.0, 0.3], [0.5, 0.1, 0.6], [1.0, 0.5, 0.9], [0.2, 0.4, 0.1]])
    expected = np.mean([1 - _ccc_by_hand(pred[:, k], target[:, k]) for k in range(3)])
    got = ccc_loss(torch.tensor(pred), torch.tensor(target)).item()
    assert got == pytest.approx(expected, abs=1e-6)
    assert ccc_loss(torch.tensor(target), torch.tensor(target)).item() == pytest.approx(0.0, abs=1e-6)


def test_ccc_loss_batch_of_one_and_mask():
    from conilium.training.losses import ccc_loss

    one = ccc_loss(torch.tensor([[0.3, 0.2, 0.1]], requires_grad=True), torch.tensor([[0.5, 0.5, 0.5]]))
    assert math.isfinite(one.item()) and one.item() == pytest.approx(1.0)
    # a masked clip (unknown targets, NaN) changes nothing: the loss is that of the other clips
    pred = torch.tensor([[0.1, 0.9, 0.5], [0.4, 0.2, 0.5], [0.8, 0.4, 0.7], [0.9, 0.9, 0.9]], requires_grad=True)
    target = torch.tensor([[0.0, 1.0, 0.3], [0.5, 0.1, 0.6], [1.0, 0.5, 0.9], [float("nan")] * 3])
    masked = ccc_loss(pred, target, torch.tensor([1.0, 1.0, 1.0, 0.0]))
    assert masked.item() == pytest.approx(ccc_loss(pred[:3], target[:3]).item(), abs=1e-6)
    masked.backward()
    assert torch.isfinite(pred.grad).all() and (pred.grad[3] == 0).all()
    # no clip with targets: loss 1, no gradient, no NaN
    none = ccc_loss(pred, target, torch.zeros(4))
    assert none.item() == pytest.approx(1.0)


def test_ccc_metric_against_numpy():
    rng = np.random.default_rng(0)
    ref = rng.uniform(1, 7, 50)
    pred = 0.5 * ref + rng.normal(0, 0.8, 50) + 1.0
    parts = ccc_parts(pred, ref)
    assert parts["ccc"] == pytest.approx(_ccc_by_hand(pred, ref), abs=1e-12)
    assert parts["pearson"] == pytest.approx(np.corrcoef(pred, ref)[0, 1], abs=1e-12)
    assert parts["pred_mean"] == pytest.approx(pred.mean()) and parts["ref_std"] == pytest.approx(ref.std())
    assert ccc_parts(ref, ref)["ccc"] == pytest.approx(1.0)
    # unknown references are left out
    ref2 = ref.copy()
    ref2[:5] = np.nan
    assert ccc_parts(pred, ref2)["n"] == 45
    assert ccc_parts(pred, ref2)["ccc"] == pytest.approx(_ccc_by_hand(pred[5:], ref[5:]))
    three = score_attributes(np.stack([ref, ref2, ref], 1), np.stack([pred, pred, ref], 1))
    assert three["EmoDom"]["ccc"] == pytest.approx(1.0)
    assert three["ccc_mean"] == pytest.approx(np.mean([three[a]["ccc"] for a in ATTRS]))


# --------------------------------------------------------------------------- targets

def _clip(name, emo="N", act=None, val=None, dom=None, annotators=()):
    anns = tuple(Annotation(worker=f"W{i}", primary="Neutral", secondary=(), act=a, val=v, dom=d)
                 for i, (a, v, d) in enumerate(annotators))
    return Clip(name=name, split="Train", emo_class=emo, speaker=None, gender="Unknown", duration=1.0,
                act=act, val=val, dom=dom, annotations=anns)


def test_attribute_targets_consensus_fallback_and_missing():
    consensus = _clip("a", act=4.0, val=2.0, dom=6.0, annotators=[(1, 1, 1)])
    assert attribute_target(consensus).tolist() == [4.0, 2.0, 6.0]
    # no consensus values: the annotators' mean, attribute by attribute (None values skipped)
    fallback = _clip("b", emo="X", act=5.0, annotators=[(3, 2, 7), (5, 4, None), (None, 6, 5)])
    assert attribute_target(fallback).tolist() == [5.0, 4.0, 6.0]
    missing = _clip("c", act=4.0, val=2.0, annotators=[(3, 2, None)])
    assert attribute_target(missing) is None and np.isnan(attribute_values(missing)[2])
    kept, values, counts = attribute_set([consensus, fallback, missing])
    assert [c.name for c in kept] == ["a", "b"] and counts == {"no_attributes": 1}  # X clips included
    assert values.shape == (2, 3)
    assert to_unit([1.0, 4.0, 7.0]).tolist() == [0.0, 0.5, 1.0] and from_unit(np.array(0.5)) == 4.0


def test_demo_attributes_are_not_trivial(demo_cache):
    from conilium.cache.reader import FeatureCache

    with FeatureCache(demo_cache) as cache:
        train = [cache.clips[n] for n in cache.split("Train")]
        _, values, counts = attribute_set(train)
    assert len(values) == len(train) and counts["no_attributes"] == 0
    assert values.min() >= 1 and values.max() <= 7
    assert (values.std(axis=0) > 0.3).all()  # each attribute varies over clips
    # arousal follows the emotions: angry clips above sad ones
    emo = np.array([c.emo_class for c in train])
    assert values[emo == "A", 0].mean() > values[emo == "S", 0].mean() + 1


# --------------------------------------------------------------------------- train-head

@pytest.fixture(scope="module")
def attribute_runs(demo_cache, tmp_path_factory):
    from conilium.heads.train import TrainConfig, train_head

    base = tmp_path_factory.mktemp("attr-runs")
    out = {}
    for name, kw in {"attributes": dict(task="attributes"),
                     "joint": dict(task="joint", loss="wbce", labels="S", attribute_weight=1.0)}.items():
        cfg = TrainConfig(cache=str(demo_cache), epochs=15, seed=0, **SMALL, **kw)
        out[name] = (base / name, train_head(cfg, base / name, progress=False))
    return out


def test_attributes_task_learns_arousal(attribute_runs, demo_cache):
    from conilium.cache.reader import FeatureCache

    run, m = attribute_runs["attributes"]
    dev = m["attributes"]["Development"]
    # measured on the demo cache: arousal CCC 0.20-0.49, mean CCC 0.18-0.38 over seeds 0-3
    assert dev["EmoAct"]["ccc"] > 0.1 and dev["ccc_mean"] > 0.1
    assert m["ccc_mean"] == dev["ccc_mean"] and "f1_macro" not in m and m["splits"] == {}
    # the best epoch is the one of the best Development mean CCC
    best = max(m["history"], key=lambda h: h["dev_ccc_mean"])
    assert m["best_epoch"] == best["epoch"] and best["dev_ccc_mean"] == pytest.approx(dev["ccc_mean"], abs=1e-9)
    # trained on every Train clip with attribute values, X and O included
    with FeatureCache(demo_cache) as cache:
        train = [cache.clips[n] for n in cache.split("Train")]
    assert m["training"]["clips"] == len(train) and m["training"]["task"] == "attributes"
    assert any(c.emo_class in ("X", "O") for c in train)
    # predictions CSV: FileName and the attribute columns only; Development includes X/O clips
    with open(run / "predictions" / "Development.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["FileName", *ATTRS, *REFS]
    p = read_predictions(run / "predictions" / "Development.csv")
    assert p.attributes_only and p.attributes.shape == (len(p), 3)
    assert dev["n"] == len(p)
    # unlabelled split: references empty
    test = read_predictions(run / "predictions" / "Test3.csv")
    assert np.isnan(test.attribute_refs).all() and not np.isnan(test.attributes).any()
    assert "Test3" not in m["attributes"]


def test_attributes_only_run_is_refused_by_class_score_readers(attribute_runs, tmp_path):
    from conilium.evaluate.thresholds import tune_run

    run, _ = attribute_runs["attributes"]
    with pytest.raises(RunError, match="attributes-only run"):
        read_run(run)
    assert read_run(run, attributes_only_ok=True)["Development"].attributes is not None
    with pytest.raises(RunError, match=str(run)):
        tune_run(run, tmp_path / "tuned")


def test_joint_task_writes_both_metrics(attribute_runs):
    run, m = attribute_runs["joint"]
    assert 0 <= m["f1_macro"] <= 1 and m["split"] == "Development"
    assert set(m["attributes"]["Development"]) >= {*ATTRS, "ccc_mean", "n"}
    assert "dev_f1_macro" in m["history"][0] and "dev_ccc_mean" in m["history"][0]
    assert m["best_epoch"] == max(m["history"], key=lambda h: h["dev_f1_macro"])["epoch"]
    with open(run / "predictions" / "Development.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header == CLASS_HEADER + ATTRS + REFS
    p = read_run(run)["Development"]
    assert p.probs.shape[1] == 8 and p.attributes.shape == (len(p), 3)
    assert m["training"]["attribute_clips"] == m["training"]["clips"]  # every demo clip has values
    assert json.loads((run / "config.json").read_text())["task"] == "joint"


def test_categories_head_is_unchanged_and_shares_a_pass_with_joint(demo_cache, tmp_path):
    """The default head has the parameters it always had; a joint head reading the same clips
    shares the data pass and leaves the categories head bitwise as trained alone."""
    from conilium.heads.model import EmotionHead, HeadConfig
    from conilium.heads.train import TrainConfig, plan_passes, train_head, train_heads

    torch.manual_seed(0)
    plain = EmotionHead(HeadConfig(dim=8))
    assert list(plain.state_dict()) == [
        "layer_mix.weights", "pooling.attention", "pooling.sap_linear.weight", "pooling.sap_linear.bias",
        "classifier.fc.0.0.weight", "classifier.fc.0.0.bias", "classifier.fc.0.1.weight", "classifier.fc.0.1.bias",
        "classifier.out.0.weight", "classifier.out.0.bias"]
    after_plain = torch.rand(1)
    torch.manual_seed(0)
    joint = EmotionHead(HeadConfig(dim=8, attributes=3))
    for k, v in plain.state_dict().items():  # same initial class weights: the attribute layer is drawn last
        assert torch.equal(v, joint.state_dict()[k])
    assert set(joint.state_dict()) - set(plain.state_dict()) == {"classifier.attributes.weight",
                                                                  "classifier.attributes.bias"}
    torch.manual_seed(0)
    EmotionHead(HeadConfig(dim=8, attributes=0))
    assert torch.equal(torch.rand(1), after_plain)  # the random stream after a default head is as it was

    cat = TrainConfig(cache=str(demo_cache), loss="wbce", labels="S", epochs=3, **SMALL)
    jnt = TrainConfig(cache=str(demo_cache), loss="wbce", labels="S", epochs=3, task="joint", **SMALL)
    att = TrainConfig(cache=str(demo_cache), epochs=3, task="attributes", **SMALL)
    assert plan_passes([cat, jnt, att]) == [[0, 1], [2]]
    solo = train_head(cat, tmp_path / "solo", progress=False)
    both = train_heads([(cat, tmp_path / "cat"), (jnt, tmp_path / "joint")], progress=False)
    assert all(isinstance(r, dict) for r in both)
    for split in ("Development", "Train", "Test3"):
        assert ((tmp_path / "solo" / "predictions" / f"{split}.csv").read_bytes()
                == (tmp_path / "cat" / "predictions" / f"{split}.csv").read_bytes())
    assert "attributes" not in solo and "ccc_mean" not in solo
    with open(tmp_path / "solo" / "predictions" / "Development.csv", newline="") as f:
        assert next(csv.reader(f)) == CLASS_HEADER
    ckpt = torch.load(tmp_path / "solo" / "model.pt", weights_only=False)
    assert "task" not in ckpt and list(ckpt["state_dict"]) == list(
        torch.load(tmp_path / "cat" / "model.pt", weights_only=False)["state_dict"])


def test_config_written_before_the_task_fields_reads_and_matches(demo_cache):
    from conilium.heads.train import TrainConfig, same_run

    new = TrainConfig(cache=str(demo_cache)).to_json()
    old = {k: v for k, v in new.items() if k not in ("task", "attribute_weight", "train_on_xo")}
    assert TrainConfig.from_dict(old) == TrainConfig(cache=str(demo_cache))
    assert same_run(old, new) and same_run(new, old)
    assert not same_run(old, {**new, "task": "joint"})


def test_bad_task_options_are_refused(demo_cache, tmp_path):
    from conilium.errors import ConfigError
    from conilium.heads.train import TrainConfig, train_head

    with pytest.raises(ConfigError, match="--task"):
        train_head(TrainConfig(cache=str(demo_cache), task="valence"), tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="--sampler balanced"):
        train_head(TrainConfig(cache=str(demo_cache), task="attributes", sampler="balanced"), tmp_path / "b",
                   progress=False)
    with pytest.raises(ConfigError, match="--attribute-weight"):
        train_head(TrainConfig(cache=str(demo_cache), task="joint", attribute_weight=-1.0), tmp_path / "c",
                   progress=False)


def test_cli_task_attributes_summary_and_grid_spec(demo_cache, tmp_path):
    from click.testing import CliRunner

    from conilium.cli.heads import train_grid_cmd, train_head_cmd

    r = CliRunner().invoke(train_head_cmd, ["--cache", str(demo_cache), "--out", str(tmp_path / "avd"), "--task",
                                            "attributes", "--epochs", "2", "--hidden", "64", "--device", "cpu", "-q"])
    assert r.exit_code == 0, r.output
    assert "Development CCC mean" in r.output and "EmoAct" in r.output and "macro-F1" not in r.output
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"common": {"epochs": 2, "hidden": 64, "device": "cpu"},
                                "runs": [{"name": "avd", "task": "attributes"},
                                         {"name": "joint", "task": "joint", "attribute_weight": 0.5}]}))
    r = CliRunner().invoke(train_grid_cmd, ["--spec", str(spec), "--cache", str(demo_cache),
                                            "--out", str(tmp_path / "grid"), "-q"])
    assert r.exit_code == 0, r.output
    with open(tmp_path / "grid" / "results.csv", newline="") as f:
        rows = {row["name"]: row for row in csv.DictReader(f)}
    assert rows["avd"]["task"] == "attributes" and float(rows["avd"]["ccc_mean"]) > -1
    assert rows["avd"]["f1_macro"] == "" and float(rows["joint"]["f1_macro"]) >= 0
    assert "dev CCC mean" in (tmp_path / "grid" / "results.md").read_text()


def test_predict_run_outputs_attributes(attribute_runs, demo_corpus, tmp_path):
    from click.testing import CliRunner

    from conilium.cli.finetune import predict_cmd
    from conilium.finetune.predict import Predictor

    files = sorted((demo_corpus / "Audios").glob("*.wav"))[:3]
    joint, _ = attribute_runs["joint"]
    results = Predictor(run=joint, device="cpu").predict(files)
    assert all(r.ok and r.attributes.shape == (3,) and r.probabilities.shape == (8,) for r in results)
    # the same numbers as train-head wrote for these clips (up to the cache's float16 frames)
    written = {}
    for split in ("Train", "Development", "Test3"):
        p = read_predictions(joint / "predictions" / f"{split}.csv")
        written.update(zip(p.names, p.attributes))
    for f, r in zip(files, results):
        assert np.allclose(r.attributes, written[f.name], atol=0.02)

    avd, _ = attribute_runs["attributes"]
    out = tmp_path / "avd.csv"
    r = CliRunner().invoke(predict_cmd, ["--run", str(avd), *map(str, files), "--out", str(out), "--device", "cpu",
                                         "-q"])
    assert r.exit_code == 0, r.output
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["FileName", *ATTRS, "Seconds", "Warning", "Error"]
    assert len(rows) == 4 and all(1 <= float(v) <= 7 for row in rows[1:] for v in row[1:4])
    out_json = tmp_path / "joint.json"
    r = CliRunner().invoke(predict_cmd, ["--run", str(joint), str(files[0]), "--out", str(out_json), "--device",
                                         "cpu", "-q"])
    assert r.exit_code == 0, r.output
    item = json.loads(out_json.read_text())[0]
    assert set(item["attributes"]) == set(ATTRS) and item["prediction"] in "ASHUFDCN"


def test_report_attribute_table(attribute_runs, tmp_path):
    from conilium.evaluate.report import build_report

    avd, _ = attribute_runs["attributes"]
    joint, m = attribute_runs["joint"]
    md = build_report({"tables": {"attributes": {"Attributes": str(avd), "WBCE(S) + attributes": str(joint)}}},
                      tmp_path / "r").read_text()
    section = md.split("## Arousal, valence, dominance", 1)[1]
    row = next(ln for ln in section.splitlines() if ln.startswith("| WBCE(S) + attributes"))
    assert f"{m['attributes']['Development']['EmoAct']['ccc']:.3f}" in row and f"{m['f1_macro']:.3f}" in row
    none = build_report({"tables": {}}, tmp_path / "none").read_text()
    assert "No attribute run in this report" in none
    categories = tmp_path / "categories"
    categories.mkdir()
    (categories / "metrics.json").write_text(json.dumps({"f1_macro": 0.2, "splits": {}}))
    with pytest.raises(RunError, match="predicts no attributes"):
        build_report({"tables": {"attributes": {"x": str(categories)}}}, tmp_path / "bad")


def test_grid_reuses_a_run_written_before_the_task_fields(demo_cache, tmp_path):
    from conilium.heads.grid import expand_spec, run_grid

    spec = {"common": {"epochs": 2, "hidden": 64, "device": "cpu"}, "runs": [{"name": "wbce-S"}]}
    runs = expand_spec(spec, cache=str(demo_cache))
    run_grid(runs, tmp_path / "grid", progress=False)
    config = tmp_path / "grid" / "wbce-S" / "config.json"
    old = {k: v for k, v in json.loads(config.read_text()).items()
           if k not in ("task", "attribute_weight", "train_on_xo")}
    config.write_text(json.dumps(old))  # as written before these fields existed
    rows = run_grid(expand_spec(spec, cache=str(demo_cache)), tmp_path / "grid", progress=False)
    assert rows[0]["status"] == "skipped (complete)"


def test_attribute_predictions_stay_on_the_scale(attribute_runs):
    """The CCC loss trains raw outputs that may leave [0, 1]; every reported value is on 1-7."""
    from conilium.heads.predict import scores_of

    class Joint(torch.nn.Module):
        attribute_outputs = 3

    # unit outputs below 0, inside and above 1 -> 1, the corpus value, 7 (class scores untouched)
    logits = torch.tensor([[0.3, -0.2, -0.5, 0.5, 1.7]])
    s = scores_of(Joint(), logits, "wbce")
    assert torch.allclose(s[0, :2], torch.sigmoid(logits[0, :2]))
    assert torch.allclose(s[0, 2:], torch.tensor([1.0, 4.0, 7.0]))
    for run, _ in attribute_runs.values():
        for split in ("Train", "Development", "Test3"):
            p = read_predictions(run / "predictions" / f"{split}.csv")
            assert ((p.attributes >= 1) & (p.attributes <= 7)).all()

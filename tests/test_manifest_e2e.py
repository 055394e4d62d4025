"""A manifest corpus with its own 4-class set, end to end: extract-features from the manifest,
train-head on the cache, predict with CSV columns named by the corpus's classes; the class set
is recorded in the cache, the run and the model, and a mismatch is a clear error."""

import csv
import io
import json

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from conilium.cache.reader import FeatureCache
from conilium.classes import ClassSet
from conilium.cli.extract import extract_features_cmd
from conilium.cli.finetune import predict_cmd
from conilium.heads.outputs import HeadCheckpoint
from conilium.heads.train import TrainConfig, train_head
from conilium.runs import prediction_path, read_predictions

CODES = ("ang", "hap", "sad", "neu")
CLASSES4 = {"classes": [{"code": "ang", "name": "Angry"}, {"code": "hap", "name": "Happy", "aliases": ["excited"]},
                        {"code": "sad", "name": "Sad"}, {"code": "neu", "name": "Neutral"}]}
PITCH = {"ang": 300.0, "hap": 220.0, "sad": 120.0, "neu": 160.0}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """28 clips of 1 s: a tone whose pitch follows the class, 4 annotators each."""
    root = tmp_path_factory.mktemp("manifest") / "corpus"
    rng = np.random.default_rng(0)
    rows = []
    sr = 16000
    for i in range(28):
        code = CODES[i % 4]
        split = "Train" if i < 16 else ("Development" if i < 24 else "Test1")
        t = np.arange(sr) / sr
        x = 0.2 * np.sin(2 * np.pi * PITCH[code] * t) + 0.01 * rng.standard_normal(sr)
        audio = f"wav/spk{i % 3}/clip{i:02d}.wav"
        (root / audio).parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(root / audio), x, sr, subtype="PCM_16")
        anns = [{"annotator": f"w{k}", "primary": code if k < 3 else CODES[(i + 1) % 4],
                 "secondary": ["Other-bored"] if k == 0 else []} for k in range(4)]
        rows.append({"audio": audio, "split": split, "speaker": f"spk{i % 3}", "gender": "F" if i % 2 else "M",
                     "annotations": anns, "arousal": 3.0 + (i % 4), "valence": 4.0, "dominance": 3.5})
    (root / "classes.json").write_text(json.dumps(CLASSES4))
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def cache(corpus, tmp_path_factory, two_torch_threads):
    out = tmp_path_factory.mktemp("cache") / "c"
    r = CliRunner().invoke(extract_features_cmd, ["--corpus", str(corpus), "--upstream", "demo-wavlm", "--random-init",
                                                  "--layers", "all", "--max-seconds", "1", "--out", str(out),
                                                  "--device", "cpu", "--quiet"])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def run(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "wbce-S"
    train_head(TrainConfig(cache=str(cache), loss="wbce", labels="S", epochs=2, hidden=16, device="cpu"), out,
               progress=False)
    return out


def test_the_cache_records_the_class_set(cache):
    c = FeatureCache(cache)
    assert c.classes.codes == CODES and c.manifest["classes"] == c.classes.to_json()
    clip = c.clips["wav/spk0/clip00.wav"]
    assert clip.emo_class == "ang" and clip.scoreable
    assert [a.primary_class for a in clip.annotations] == ["ang", "ang", "ang", "hap"]


def test_a_head_trains_and_its_run_speaks_in_the_corpus_classes(run):
    m = json.loads((run / "metrics.json").read_text())
    assert ClassSet.from_json(m["classes"]) == ClassSet.from_json(CLASSES4)
    assert list(m["per_class"]) == list(CODES) and m["confusion_labels"] == list(CODES)
    assert list(m["training"]["class_counts"]) == list(CODES) and sum(m["training"]["class_counts"].values()) == 16
    preds = read_predictions(prediction_path(run, "Development"))
    assert preds.classes == CODES and preds.probs.shape == (8, 4)
    assert set(preds.prediction) <= set(CODES) and set(preds.reference) <= set(CODES)
    ck = HeadCheckpoint.load(run / "model.pt")
    assert ck.classes == list(CODES) and ck.head_config["num_classes"] == 4


def test_predict_writes_columns_named_by_the_classes(run, corpus, tmp_path):
    files = [corpus / "wav" / "spk1" / "clip25.wav", corpus / "wav" / "spk2" / "clip26.wav"]
    out = tmp_path / "pred.csv"
    r = CliRunner().invoke(predict_cmd, ["--run", str(run), *map(str, files), "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    header = out.read_text().splitlines()[0].split(",")
    assert [h for h in header if h in CODES] == list(CODES)
    for row in rows:
        p = np.array([float(row[c]) for c in CODES])
        assert p.shape == (4,) and np.all((p >= 0) & (p <= 1))
    assert {row["Prediction"] for row in rows} <= set(CODES)


NAMES = {c["code"]: c["name"] for c in CLASSES4["classes"]}


def test_predictions_name_the_corpus_classes_in_python_and_onnx(run, corpus, tmp_path):
    # a prediction's label is the corpus's own name of its class, from the run (its cache's class
    # set), from an ONNX export of it, and from a model directory (below)
    from conilium.finetune.onnx import export_onnx
    from conilium.finetune.onnx_predict import OnnxPredictor
    from conilium.finetune.predict import Predictor

    files = [corpus / "wav" / "spk1" / "clip25.wav", corpus / "wav" / "spk2" / "clip26.wav"]
    predictor = Predictor(run=run, device="cpu")
    assert predictor.class_names == tuple(NAMES[c] for c in CODES)
    onnx_file = tmp_path / "run.onnx"
    export_onnx(onnx_file, run=run)
    for res in (predictor.predict(files), OnnxPredictor(onnx_file, device="cpu").predict(files)):
        assert [r.label for r in res] == [NAMES[r.prediction] for r in res]
        assert all(r.names == tuple(NAMES[c] for c in CODES) for r in res)


def test_balanced_sampler_and_bce_on_the_class_set(cache, tmp_path):
    out = tmp_path / "bal"
    train_head(TrainConfig(cache=str(cache), loss="bce", labels="P", sampler="balanced", epochs=1, hidden=8,
                           device="cpu"), out, progress=False)
    preds = read_predictions(prediction_path(out, "Train"))
    assert preds.classes == CODES and preds.probs.shape == (16, 4)


def test_finetune_on_the_manifest_and_a_head_of_another_class_set_is_refused(corpus, run, tmp_path, small_demo_corpus):
    from conilium.errors import ConfigError
    from conilium.finetune import FinetuneConfig, finetune, load_model_dir

    base = dict(upstream="demo-wavlm", random_init=True, max_seconds=1.0, batch_size=8, epochs=1, lr=1e-3,
                hidden=16, num_workers=0)
    out = tmp_path / "model"
    finetune(FinetuneConfig(corpus=str(corpus), out=str(out), **base), progress=False)
    info = json.loads((out / "conilium_model.json").read_text())
    assert info["classes"] == list(CODES) and list(info["offsets"]) == list(CODES)
    assert load_model_dir(out)[0].head.config.num_classes == 4
    assert read_predictions(prediction_path(out, "Development")).classes == CODES
    pred = tmp_path / "pred.csv"
    r = CliRunner().invoke(predict_cmd, ["--model", str(out), str(corpus / "wav/spk0/clip24.wav"), "--out", str(pred),
                                         "--quiet"])
    assert r.exit_code == 0, r.output
    header = pred.read_text().splitlines()[0].split(",")
    assert [h for h in header if h in CODES] == list(CODES)
    from conilium.finetune.predict import Predictor

    res = Predictor(out, device="cpu").predict([corpus / "wav/spk0/clip24.wav"])
    assert res[0].label == NAMES[res[0].prediction]
    # a train-head run on this corpus's cache cannot start fine-tuning on MSP-Podcast's eight classes
    with pytest.raises(ConfigError, match=r"the head predicts the classes ang,hap,sad,neu, the corpus has the "
                                          r"class set A,S,H,U,F,D,C,N"):
        finetune(FinetuneConfig(corpus=str(small_demo_corpus), out=str(tmp_path / "m2"), init_head=str(run), **base),
                 progress=False)
    base_dir = tmp_path / "baseline"
    base_dir.mkdir()
    with pytest.raises(ConfigError, match=r"the challenge baseline predicts MSP-Podcast's eight classes, the corpus "
                                          r"has its own class set \(ang = Angry"):
        finetune(FinetuneConfig(corpus=str(corpus), out=str(tmp_path / "m3"), baseline_ckpt=str(base_dir), **base),
                 progress=False)


def test_a_cache_of_another_class_set_is_a_clear_error(corpus, cache, tmp_path):
    import shutil

    from conilium.errors import CacheError
    from conilium.extract import ExtractConfig, extract_features

    other = tmp_path / "corpus"
    shutil.copytree(corpus, other)
    cl = json.loads((other / "classes.json").read_text())
    cl["classes"] = cl["classes"][::-1]  # the same classes in another column order
    (other / "classes.json").write_text(json.dumps(cl))
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    config = ExtractConfig("demo-wavlm", random_init=True, seed=0, layers="all", max_seconds=1.0)
    with pytest.raises(CacheError, match=r"(?s)other settings than requested.*classes: cache has .*'ang'.*requested"):
        extract_features(config, other, copy, device="cpu", verbose=False)


def test_easy_difficult_refuses_clip_metadata_of_another_class_set(run, tmp_path, small_demo_corpus):
    import shutil

    from conilium.runs import RunError
    from conilium.evaluate.difficulty import easy_difficult, load_clips

    twin = tmp_path / "twin"
    shutil.copytree(run, twin)
    clips = load_clips(corpus=small_demo_corpus)
    with pytest.raises(RunError, match=r"scores the classes ang,hap,sad,neu but the clip metadata .* has the class "
                                       r"set A,S,H,U,F,D,C,N"):
        easy_difficult([run, twin], {n: clips[next(iter(clips))] for n in
                                     read_predictions(prediction_path(run, "Development")).names})
    result = easy_difficult([run, twin], load_clips(cache=json.loads((run / "config.json").read_text())["cache"]))
    assert result["groups"]["all"]["clips"] == 8 and set(result["groups"]["all"]["classes"]) <= set(CODES)


def test_thresholds_ensemble_and_intervals_follow_the_class_set(run, cache, corpus, tmp_path):
    from conilium.evaluate.bootstrap import intervals
    from conilium.evaluate.ensemble import ensemble_runs
    from conilium.evaluate.thresholds import tune_run
    from conilium.metrics import score

    tuned = tmp_path / "tuned"
    tune_run(run, tuned, k=0)
    meta = json.loads((tuned / "thresholds.json").read_text())
    assert list(meta["offsets"]) == list(CODES)
    files = [corpus / "wav" / "spk1" / "clip25.wav"]
    out = tmp_path / "pred.csv"
    r = CliRunner().invoke(predict_cmd, ["--run", str(tuned), *map(str, files), "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    other = tmp_path / "other"
    train_head(TrainConfig(cache=str(cache), loss="bce", labels="P", epochs=1, hidden=8, device="cpu"), other,
               progress=False)
    m = ensemble_runs([run, other], tmp_path / "ens")
    ens = read_predictions(prediction_path(tmp_path / "ens", "Development"))
    assert ens.classes == CODES and set(ens.prediction) <= set(CODES)
    assert m["splits"]["Development"]["f1_macro"] == pytest.approx(
        score(ens.reference, ens.prediction, CODES)["f1_macro"])
    dev = read_predictions(prediction_path(run, "Development"))
    ci = intervals(dev, draws=200)["f1_macro"]  # draws scored over the 4 classes, as the observed value
    assert ci["value"] == pytest.approx(score(dev.reference, dev.prediction, CODES)["f1_macro"])
    assert ci["low"] <= ci["value"] <= ci["high"] and ci["n"] == 8

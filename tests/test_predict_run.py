"""predict --run: a train-head run's head on new audio, through the upstream its cache names.

The head runs on the same upstream forward (extraction's :class:`UpstreamRunner`), signal
path (the cache's truncation and normalisation) and prediction loop as in train-head, so
on clips of the corpus it gives the run's own predictions, up to the float16 rounding of
the frames the cache stores.
"""

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conilium import CLASSES
from conilium.cli.finetune import predict_cmd
from conilium.errors import ConfigError, ConiliumError
from conilium.finetune.predict import Predictor
from conilium.heads.audio import find_head_run
from conilium.heads.train import TrainConfig, train_head
from conilium.runs import prediction_path, read_predictions

OFFSETS = {"A": 0.0, "S": 0.05, "H": -0.02, "U": 0.0, "F": 0.3, "D": 0.0, "C": 0.0, "N": -0.1}
RUN_KINDS = {"layer2": dict(layers=2), "weighted": dict(layers="weighted"), "pooled": dict(pooled_stats=True),
             "pooled-layer1": dict(pooled_stats=True, layers=1)}


@pytest.fixture(scope="module")
def cache(small_demo_corpus, tmp_path_factory, two_torch_threads):
    """Every hidden state of demo-wavlm (random init, seed 0) with pooled statistics over the small
    demo corpus, clips cut at 3 s (most are longer), float16 frames, global normalisation."""
    from conilium.extract import ExtractConfig, extract_features

    config = ExtractConfig("demo-wavlm", random_init=True, seed=0, layers="all", pooled_stats=True, max_seconds=3.0)
    return extract_features(config, small_demo_corpus, tmp_path_factory.mktemp("cache") / "c", device="cpu",
                            verbose=False)


@pytest.fixture(scope="module")
def runs(cache, tmp_path_factory):
    """One run per kind of head: one hidden state (not the last), a weighted mix of all, pooled
    statistics of all hidden states (weighted) and of one."""
    root = tmp_path_factory.mktemp("runs")
    for name, kw in RUN_KINDS.items():
        train_head(TrainConfig(cache=str(cache), epochs=2, hidden=64, device="cpu", **kw), root / name,
                   progress=False)
    return {name: root / name for name in RUN_KINDS}


def _dev(run, corpus):
    preds = read_predictions(prediction_path(run, "Development"))
    return preds, [Path(corpus) / "Audios" / n for n in preds.names]


def _probs(rows):
    return np.array([[float(r[c]) for c in CLASSES] for r in rows])


@pytest.mark.parametrize("kind", list(RUN_KINDS))
def test_predict_run_gives_the_runs_own_predictions(kind, runs, small_demo_corpus):
    run, files = _dev(runs[kind], small_demo_corpus)
    res = Predictor(run=runs[kind], batch_size=4).predict(files)
    assert all(r.ok for r in res)
    probs = np.stack([r.probabilities for r in res])
    # the cache stores float16 frames; the rest is the same computation
    np.testing.assert_allclose(probs, run.probs, atol=1e-2)
    same = np.mean([r.prediction == p for r, p in zip(res, run.prediction)])
    assert same >= 0.8, same


def test_predict_run_from_the_command_line(runs, small_demo_corpus, tmp_path):
    run, files = _dev(runs["weighted"], small_demo_corpus)
    out = tmp_path / "pred.csv"
    r = CliRunner().invoke(predict_cmd, ["--run", str(runs["weighted"]), *map(str, files[:6]), "--out", str(out),
                                         "--quiet", "--batch-size", "3"])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [row["FileName"] for row in rows] == [str(f) for f in files[:6]]
    np.testing.assert_allclose(_probs(rows), run.probs[:6], atol=1e-2)
    assert "6 file(s) predicted, 0 failed" in r.stderr


def test_a_tuned_run_applies_its_decision_offsets(runs, small_demo_corpus, tmp_path):
    """The output of conilium-eval tune-thresholds: the head of the run it was tuned from, with the
    offsets of its thresholds.json before the argmax."""
    from conilium.evaluate.thresholds import tune_run

    tuned = tmp_path / "tuned"
    tune_run(runs["weighted"], tuned, k=0)
    meta = json.loads((tuned / "thresholds.json").read_text())
    assert find_head_run(tuned) == (runs["weighted"], tuned / "thresholds.json")
    run, files = _dev(runs["weighted"], small_demo_corpus)
    res = Predictor(run=tuned).predict(files)
    offsets = np.array([meta["offsets"][c] for c in CLASSES])
    probs = np.stack([r.probabilities for r in res])
    np.testing.assert_allclose(probs, run.probs, atol=1e-2)
    assert [r.prediction for r in res] == [CLASSES[i] for i in np.argmax(probs + offsets, axis=1)]
    tuned_preds = read_predictions(prediction_path(tuned, "Development"))
    assert np.mean([r.prediction == p for r, p in zip(res, tuned_preds.prediction)]) >= 0.8
    # offsets that change decisions: the ones in thresholds.json are those applied
    meta["offsets"] = OFFSETS
    (tuned / "thresholds.json").write_text(json.dumps(meta))
    p = Predictor(run=tuned)
    np.testing.assert_array_equal(p.offsets, [OFFSETS[c] for c in CLASSES])
    res = p.predict(files[:4])
    assert [r.prediction for r in res] == [CLASSES[int(np.argmax(r.probabilities + p.offsets))] for r in res]
    # an untuned run has none
    assert not Predictor(run=runs["weighted"]).offsets.any()


def test_the_random_init_upstream_comes_from_the_cache_and_its_weights_are_checked(cache, small_demo_corpus,
                                                                                   tmp_path):
    from conilium.extract.upstreams import load_upstream

    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    run = tmp_path / "run"
    train_head(TrainConfig(cache=str(copy), epochs=1, hidden=16, device="cpu", pooled_stats=True, layers=1), run,
               progress=False)
    manifest = json.loads((copy / "manifest.json").read_text())
    folder = copy / manifest["upstream"]["path"]
    assert folder.parent.name == "upstream" and Predictor(run=run).info["upstream"]["loaded_from"] == str(folder)
    # other weights in the cache's upstream/ folder than those the features came from
    model, _ = load_upstream(str(folder))
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    model.save_pretrained(folder)
    with pytest.raises(ConfigError, match="not those the cache was extracted with"):
        Predictor(run=run)
    # the cache moved away: its upstream/ folder cannot be found
    copy.rename(tmp_path / "moved")
    with pytest.raises(ConfigError, match=r"randomly initialised demo-wavlm .* is not there"):
        Predictor(run=run)


def test_model_or_run_and_directories_of_another_kind(runs, cache, tmp_path):
    audio = "a.wav"
    r = CliRunner().invoke(predict_cmd, [audio])
    assert r.exit_code == 2 and "--model MODEL_DIR (finetune-best) or --run RUN" in r.output
    r = CliRunner().invoke(predict_cmd, ["--model", str(runs["weighted"]), "--run", str(runs["weighted"]), audio])
    assert r.exit_code == 2 and "one of the three" in r.output
    r = CliRunner().invoke(predict_cmd, ["--run", str(cache), audio])
    assert r.exit_code == 1 and "is a feature cache, not a train-head run directory" in r.output
    r = CliRunner().invoke(predict_cmd, ["--model", str(runs["weighted"]), audio])
    assert r.exit_code == 1 and "or a train-head run to --run" in r.output
    with pytest.raises(ConfigError, match="give one of the two"):
        Predictor()
    ensemble = tmp_path / "ensemble"
    ensemble.mkdir()
    (ensemble / "config.json").write_text(json.dumps({"kind": "ensemble", "runs": []}))
    with pytest.raises(ConfigError, match="ensemble of runs"):
        Predictor(run=ensemble)
    tuned = tmp_path / "tuned"
    tuned.mkdir()
    (tuned / "config.json").write_text(json.dumps({"kind": "thresholds", "source_run": str(tmp_path / "gone")}))
    with pytest.raises(ConfigError, match="not there any more"):
        Predictor(run=tuned)
    with pytest.raises(ConiliumError, match="no config.json"):
        Predictor(run=tmp_path)


def test_waveforms_in_memory_are_predicted_as_their_files(runs, small_demo_corpus):
    import soundfile as sf
    import soxr

    _, files = _dev(runs["weighted"], small_demo_corpus)
    predictor = Predictor(run=runs["weighted"], batch_size=4)
    x, sr = sf.read(str(files[0]), dtype="float32")
    x44 = soxr.resample(x, sr, 44100).astype(np.float32)
    res = predictor.predict([files[0], x, (x44, 44100), np.stack([x, x], axis=1), "missing.wav"])
    assert [r.file for r in res[:4]] == [str(files[0]), "<waveform 1>", "<waveform 2>", "<waveform 3>"]
    # the same signal path (batched with other inputs: float rounding apart)
    np.testing.assert_allclose(res[1].probabilities, res[0].probabilities, atol=1e-6)
    np.testing.assert_allclose(res[3].probabilities, res[0].probabilities, atol=1e-6)  # channels averaged
    np.testing.assert_allclose(res[2].probabilities, res[0].probabilities, atol=2e-2)  # resampled
    assert res[0].label == {"A": "Angry", "S": "Sad", "H": "Happy", "U": "Surprise", "F": "Fear", "D": "Disgust",
                            "C": "Contempt", "N": "Neutral"}[res[0].prediction]
    assert list(res[0].scores) == list(CLASSES) and res[0].scores[res[0].prediction] >= 0
    assert not res[4].ok and "audio file not found" in res[4].error and res[4].scores == {}
    with pytest.raises(ConfigError, match="an input must be an audio file path, a waveform"):
        predictor.predict([{"samples": x}])


def test_predict_a_folder_recursively_into_parquet(runs, small_demo_corpus, tmp_path):
    import pyarrow.parquet as pq

    run, files = _dev(runs["weighted"], small_demo_corpus)
    folder = tmp_path / "recordings"
    (folder / "day2").mkdir(parents=True)
    shutil.copy(files[0], folder / "a.wav")
    shutil.copy(files[1], folder / "day2" / "b.wav")
    (folder / "notes.txt").write_text("not audio")
    out = tmp_path / "pred.parquet"
    r = CliRunner().invoke(predict_cmd, ["--run", str(runs["weighted"]), str(folder), "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    table = pq.read_table(out).to_pydict()
    assert table["FileName"] == [str(folder / "a.wav"), str(folder / "day2" / "b.wav")]
    assert table["Error"] == [None, None] and set(CLASSES) <= set(table)
    np.testing.assert_allclose([table[c][0] for c in CLASSES], run.probs[0], atol=1e-2)
    r = CliRunner().invoke(predict_cmd, ["--run", str(runs["weighted"]), str(folder), "--glob", "b*.wav", "-q"])
    assert r.exit_code == 0 and r.output.count(".wav") == 1 and "b.wav" in r.output
    r = CliRunner().invoke(predict_cmd, ["--run", str(runs["weighted"]), str(folder), "--glob", "*.flac", "-q"])
    assert r.exit_code == 1 and "no audio file matching '*.flac'" in r.output


def test_predict_run_refuses_non_finite_output(runs, small_demo_corpus, tmp_path):
    """A head whose weights hold NaN (trained on non-finite features) predicts nothing: each
    file is an error, and the command fails."""
    run = tmp_path / "nan-run"
    shutil.copytree(runs["layer2"], run)
    ckpt = torch.load(run / "model.pt", map_location="cpu", weights_only=False)
    first = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
    ckpt["state_dict"][first] = torch.full_like(ckpt["state_dict"][first], float("nan"))
    torch.save(ckpt, run / "model.pt")
    _, files = _dev(runs["layer2"], small_demo_corpus)
    out = tmp_path / "pred.csv"
    r = CliRunner().invoke(predict_cmd, ["--run", str(run), *map(str, files[:2]), "--out", str(out), "--quiet"])
    assert r.exit_code == 1
    assert f"predict: {files[0]}: the model's output is NaN or infinite" in r.output
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 2 and all(r[c] == "" and r["Prediction"] == "" for r in rows for c in CLASSES)

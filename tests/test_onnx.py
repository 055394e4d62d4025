"""ONNX export (conilium finetune export) and predict --onnx: one graph from padded waveforms to
probabilities and attributes, run by onnxruntime without torch, giving what the PyTorch model gives.

Tolerance: onnxruntime's probabilities are within 1e-4 of PyTorch's (the export checks it; the
float32 graphs here differ by ~1e-6), attributes (1-7 scale) within 1e-3.
"""

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner

pytest.importorskip("onnxruntime")
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from conilium import CLASSES  # noqa: E402
from conilium.cli import main  # noqa: E402
from conilium.cli.finetune import predict_cmd  # noqa: E402
from conilium.errors import ConfigError, ConiliumError  # noqa: E402
from conilium.extract.upstreams import load_upstream  # noqa: E402
from conilium.finetune.model import EndToEndModel, save_model_dir  # noqa: E402
from conilium.finetune.onnx import export_onnx  # noqa: E402
from conilium.finetune.onnx_predict import META_KEY, OnnxPredictor  # noqa: E402
from conilium.finetune.predict import Predictor  # noqa: E402
from conilium.heads.model import EmotionHead, HeadConfig  # noqa: E402
from conilium.heads.train import TrainConfig, train_head  # noqa: E402

PROB_TOL, ATTR_TOL = 1e-4, 1e-3
OFFSETS = {"A": 0.0, "S": 0.05, "H": -0.02, "U": 0.0, "F": 0.3, "D": 0.0, "C": 0.0, "N": -0.1}
RUN_KINDS = {"weighted": dict(layers="weighted"), "pooled": dict(pooled_stats=True, layers=1),
             "joint": dict(layers="weighted", task="joint"), "attributes": dict(layers=2, task="attributes")}


@pytest.fixture(scope="module")
def models(tmp_path_factory, two_torch_threads):
    """Untrained model directories written as finetune-best writes them: WavLM-style (layer-normalised
    CNN, batched) and wav2vec 2.0 base-style (group-normalised CNN, run clip by clip in PyTorch)."""
    root = tmp_path_factory.mktemp("onnx-models")
    out = {}
    for name, layers in (("demo-wavlm", None), ("demo-wav2vec2-base", (1, 3))):
        upstream, identity = load_upstream(name, random_init=True, random_root=root / "weights")
        torch.manual_seed(0)
        head = EmotionHead(HeadConfig(dim=96, num_layers=1 if layers is None else len(layers),
                                      layers=0 if layers is None else "weighted", hidden=32, dropout=0.0))
        model = EndToEndModel(upstream, head, layers)
        out[name] = save_model_dir(root / name, model, {
            "max_seconds": 3.0, "normalize": {"mode": "global", "stats": {"mean": 0.0, "std": 0.05}},
            "offsets": OFFSETS, "loss": "wbce", "labels": "S", "upstream": identity})
    return out


@pytest.fixture(scope="module")
def runs(small_demo_corpus, tmp_path_factory, two_torch_threads):
    """train-head runs on a demo-wavlm cache (every hidden state, pooled statistics, 3 s clips): a
    weighted mix of all hidden states, pooled statistics of one, and a joint classes + attributes head."""
    from conilium.extract import ExtractConfig, extract_features

    root = tmp_path_factory.mktemp("onnx-runs")
    config = ExtractConfig("demo-wavlm", random_init=True, seed=0, layers="all", pooled_stats=True, max_seconds=3.0)
    cache = extract_features(config, small_demo_corpus, root / "cache", device="cpu", verbose=False)
    for name, kw in RUN_KINDS.items():
        train_head(TrainConfig(cache=str(cache), epochs=1, hidden=32, device="cpu", **kw), root / name,
                   progress=False)
    return {name: root / name for name in RUN_KINDS}


@pytest.fixture(scope="module")
def wavs(small_demo_corpus):
    """Real WAV files of the demo corpus, of different lengths (some over the 3 s truncation)."""
    files = sorted((Path(small_demo_corpus) / "Audios").glob("*.wav"))[:7]
    assert len({sf.info(f).frames for f in files}) > 3
    return [str(f) for f in files]


def _export(tmp_path, **source):
    out = tmp_path / "model.onnx"
    r = CliRunner().invoke(main, ["finetune", "export", *(["--run", str(source["run"])] if "run" in source else
                                                          [str(source["model"])]), "--onnx", str(out)])
    assert r.exit_code == 0, r.output
    assert "exported" in r.stderr and "of PyTorch's probabilities" in r.stderr
    return out


def _same_predictions(onnx_res, torch_res):
    assert [r.file for r in onnx_res] == [r.file for r in torch_res]
    assert all(r.ok for r in torch_res) and all(r.ok for r in onnx_res)
    got = np.stack([r.probabilities for r in onnx_res]) if onnx_res[0].classes else None
    if got is not None:
        want = np.stack([r.probabilities for r in torch_res])
        assert np.max(np.abs(got - want)) <= PROB_TOL
        assert [r.prediction for r in onnx_res] == [r.prediction for r in torch_res]
    if torch_res[0].attributes is not None:
        a, b = np.stack([r.attributes for r in onnx_res]), np.stack([r.attributes for r in torch_res])
        assert np.max(np.abs(a - b)) <= ATTR_TOL
    assert [r.seconds for r in onnx_res] == [r.seconds for r in torch_res]
    assert [r.peak for r in onnx_res] == [r.peak for r in torch_res]


@pytest.mark.parametrize("name", ["demo-wavlm", "demo-wav2vec2-base"])
def test_exported_model_predicts_real_files_as_pytorch(name, models, wavs, tmp_path):
    out = _export(tmp_path, model=models[name])
    meta = json.loads(onnx.load(str(out)).metadata_props[0].value)
    assert meta["classes"] == list(CLASSES) and meta["offsets"] == [OFFSETS[c] for c in CLASSES]
    assert meta["signal"] == {"max_seconds": 3.0, "normalize": "global", "stats": {"mean": 0.0, "std": 0.05},
                              "rescale_loud": False}
    assert meta["check"]["max_abs_diff_probabilities"] <= PROB_TOL
    # batches of 3 clips of different lengths, zero-padded: dynamic batch and length
    got = OnnxPredictor(out, batch_size=3).predict(wavs)
    _same_predictions(got, Predictor(models[name], batch_size=3).predict(wavs))
    # whole files (no truncation) and one clip per batch: other lengths, other batch sizes
    whole = OnnxPredictor(out, batch_size=1, max_seconds=0).predict(wavs[:3])
    _same_predictions(whole, Predictor(models[name], batch_size=1, max_seconds=0).predict(wavs[:3]))


@pytest.mark.parametrize("kind", list(RUN_KINDS))
def test_exported_run_predicts_real_files_as_pytorch(kind, runs, wavs, tmp_path):
    out = _export(tmp_path, run=runs[kind])
    onnx_p, torch_p = OnnxPredictor(out, batch_size=4), Predictor(run=runs[kind], batch_size=4)
    assert onnx_p.classes == torch_p.classes and onnx_p.attributes == torch_p.attributes
    assert bool(onnx_p.attributes) == (kind in ("joint", "attributes"))
    assert bool(onnx_p.classes) == (kind != "attributes")
    _same_predictions(onnx_p.predict(wavs), torch_p.predict(wavs))


def test_a_clip_padded_in_a_batch_gives_what_it_gives_alone(models, wavs, tmp_path):
    out = _export(tmp_path, model=models["demo-wav2vec2-base"])
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    a, _ = sf.read(wavs[0], dtype="float32")
    b, _ = sf.read(wavs[1], dtype="float32")
    a, b = a[:40000] / 0.05, b[:17000] / 0.05
    waves = np.zeros((2, 40000), dtype=np.float32)
    waves[0], waves[1, :17000] = a, b
    both = session.run(["probabilities"], {"waves": waves, "lengths": np.array([40000, 17000])})[0]
    alone = [session.run(["probabilities"], {"waves": x[None].astype(np.float32),
                                             "lengths": np.array([len(x)])})[0][0] for x in (a, b)]
    np.testing.assert_allclose(both, np.stack(alone), atol=1e-5)
    # more padding than the longest clip needs changes nothing either
    wider = np.pad(waves, ((0, 0), (0, 5000)))
    more = session.run(["probabilities"], {"waves": wider, "lengths": np.array([40000, 17000])})[0]
    np.testing.assert_allclose(more, both, atol=1e-5)


def _rows(path):
    return list(csv.DictReader(io.StringIO(Path(path).read_text())))


def test_predict_onnx_csv_equals_predict_model_csv(models, wavs, tmp_path):
    out = _export(tmp_path, model=models["demo-wavlm"])
    (tmp_path / "broken.wav").write_bytes(b"RIFF....not really audio")
    x, _ = sf.read(wavs[0], dtype="float32")
    sf.write(tmp_path / "short.wav", x[:100], 16000)
    files = [*wavs[:4], str(tmp_path / "broken.wav"), str(tmp_path / "short.wav"), str(tmp_path / "missing.wav")]
    csvs = {}
    for flag, source in (("--onnx", out), ("--model", models["demo-wavlm"])):
        csvs[flag] = tmp_path / f"{flag[2:]}.csv"
        r = CliRunner().invoke(predict_cmd, [flag, str(source), *files, "--out", str(csvs[flag]), "--quiet",
                                             "--batch-size", "3"])
        assert r.exit_code == 0, r.output
        assert "4 file(s) predicted, 3 failed" in r.stderr
    a, b = _rows(csvs["--onnx"]), _rows(csvs["--model"])
    assert list(a[0]) == list(b[0])  # same columns, same order
    for ra, rb in zip(a, b):
        for col in ra:
            if col in CLASSES and rb[col]:
                assert abs(float(ra[col]) - float(rb[col])) <= PROB_TOL
            else:
                assert ra[col] == rb[col], col
    assert [r["Error"] != "" for r in a] == [False] * 4 + [True] * 3


def test_predict_onnx_does_not_import_torch(models, wavs, tmp_path):
    out = _export(tmp_path, model=models["demo-wavlm"])
    csv_out = tmp_path / "pred.csv"
    code = ("import sys\n"
            "from conilium.cli.finetune import predict_cmd\n"
            f"predict_cmd({['--onnx', str(out), *wavs[:3], '--out', str(csv_out), '--quiet']!r}, "
            "standalone_mode=False)\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "assert 'transformers' not in sys.modules, 'transformers was imported'\n")
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = _rows(csv_out)
    assert len(rows) == 3 and all(row["Prediction"] in CLASSES for row in rows)


def test_damaged_file_and_file_without_metadata_are_named(models, wavs, tmp_path):
    out = _export(tmp_path, model=models["demo-wavlm"])
    damaged = tmp_path / "damaged.onnx"
    damaged.write_bytes(out.read_bytes()[:5000])
    r = CliRunner().invoke(predict_cmd, ["--onnx", str(damaged), wavs[0]])
    assert r.exit_code == 1 and f"--onnx {damaged}: not a readable ONNX model" in r.output
    bare = onnx.load(str(out))
    del bare.metadata_props[:]
    plain = tmp_path / "plain.onnx"
    onnx.save(bare, str(plain))
    r = CliRunner().invoke(predict_cmd, ["--onnx", str(plain), wavs[0]])
    assert r.exit_code == 1 and f"--onnx {plain}: no '{META_KEY}' metadata" in r.output
    with pytest.raises(ConfigError, match="file not found"):
        OnnxPredictor(tmp_path / "missing.onnx")


def test_export_that_misses_the_tolerance_writes_nothing(models, tmp_path):
    out = tmp_path / "strict.onnx"
    with pytest.raises(ConiliumError, match=r"does not reproduce the PyTorch model.*nothing written"):
        export_onnx(out, model_dir=models["demo-wavlm"], tolerance=1e-12)
    assert list(tmp_path.iterdir()) == []


def test_export_usage_errors(models, runs, tmp_path):
    r = CliRunner().invoke(main, ["finetune", "export", "--onnx", str(tmp_path / "m.onnx")])
    assert r.exit_code == 2 and "one of the two" in r.output
    r = CliRunner().invoke(main, ["finetune", "export", str(models["demo-wavlm"]), "--onnx", str(tmp_path / "m.pt")])
    assert r.exit_code == 2 and "must end in .onnx" in r.output
    r = CliRunner().invoke(main, ["finetune", "export", str(runs["weighted"]), "--onnx", str(tmp_path / "m.onnx")])
    assert r.exit_code == 1 and "not a finetune-best model directory" in r.output
    assert not (tmp_path / "m.onnx").exists()


def test_a_whisper_upstream_is_refused_by_name(tmp_path):
    from conilium.extract.encoder import hidden_shape

    upstream, identity = load_upstream("demo-whisper", random_init=True, random_root=tmp_path / "weights")
    head = EmotionHead(HeadConfig(dim=hidden_shape(upstream)[1], layers=0, hidden=16, dropout=0.0))
    model_dir = save_model_dir(tmp_path / "whisper", EndToEndModel(upstream, head), {
        "max_seconds": 3.0, "normalize": {"mode": "none"}, "offsets": {}, "loss": "wbce", "labels": "S",
        "upstream": identity})
    with pytest.raises(ConfigError, match="Whisper encoder, which is not exported"):
        export_onnx(tmp_path / "w.onnx", model_dir=model_dir)
    assert not (tmp_path / "w.onnx").exists()

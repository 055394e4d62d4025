"""predict: a finetune-best model directory over audio files of any rate and channel count."""

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch
from click.testing import CliRunner

from conilium import CLASSES
from conilium.cli.finetune import predict_cmd
from conilium.finetune.predict import Predictor
from conilium.testing import write_demo_model_dir

OFFSETS = {"A": 0.0, "S": 0.05, "H": -0.02, "U": 0.0, "F": 0.3, "D": 0.0, "C": 0.0, "N": -0.1}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An (untrained) model directory written by the same code as finetune-best's."""
    return write_demo_model_dir(tmp_path_factory.mktemp("predict"), max_seconds=3.0,
                                normalize={"mode": "global", "stats": {"mean": 0.0, "std": 0.05}}, offsets=OFFSETS)


@pytest.fixture(scope="module")
def audio(small_demo_corpus, tmp_path_factory):
    """The first 2 s of a demo clip as 44.1 kHz stereo FLAC (left and right differ, their mean is
    the clip), the same downmixed and resampled to 16 kHz mono WAV, and broken or too short files."""
    d = tmp_path_factory.mktemp("audio")
    src = sorted((Path(small_demo_corpus) / "Audios").glob("*.wav"))[0]
    x, sr = sf.read(src, dtype="float32", frames=32000)
    assert sr == 16000
    s44 = soxr.resample(x, 16000, 44100, quality="VHQ").astype(np.float64)
    side = 0.01 * np.sin(np.arange(len(s44)) / 3.0)
    sf.write(d / "stereo44k.flac", np.stack([s44 + side, s44 - side], axis=1), 44100, subtype="PCM_24")
    mono = soxr.resample(s44, 44100, 16000, quality="HQ").astype(np.float32)
    sf.write(d / "mono16k.wav", mono, 16000, subtype="FLOAT")
    sf.write(d / "short.wav", x[:100], 16000)  # fewer samples than the CNN encoder's receptive field
    (d / "broken.wav").write_bytes(b"RIFF....not really audio")
    return d


def _rows(text):
    return list(csv.DictReader(io.StringIO(text)))


def test_predicts_other_rates_and_channels_and_reports_unreadable_files(model_dir, audio, tmp_path):
    files = [audio / "mono16k.wav", audio / "stereo44k.flac", audio / "broken.wav", audio / "missing.wav",
             audio / "short.wav"]
    out = tmp_path / "pred.csv"
    r = CliRunner().invoke(predict_cmd, ["--model", str(model_dir), *map(str, files), "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    rows = _rows(out.read_text())
    assert [row["FileName"] for row in rows] == [str(f) for f in files]
    mono, stereo = rows[0], rows[1]
    p_mono = np.array([float(mono[c]) for c in CLASSES])
    p_stereo = np.array([float(stereo[c]) for c in CLASSES])
    # the 44.1 kHz stereo file is downmixed and resampled to the 16 kHz mono file's samples
    np.testing.assert_allclose(p_stereo, p_mono, atol=1e-4)
    assert mono["Error"] == "" and mono["Prediction"] in CLASSES
    offsets = np.array([OFFSETS[c] for c in CLASSES])
    assert mono["Prediction"] == CLASSES[int(np.argmax(p_mono + offsets))]
    for row, reason in zip(rows[2:], ("unreadable", "not found", "too short")):
        assert reason in row["Error"] and row["Prediction"] == "" and row["A"] == ""
    for name in ("broken.wav", "missing.wav", "short.wav"):
        assert name in r.stderr
    assert "2 file(s) predicted, 3 failed" in r.stderr


def test_library_predictions_match_a_direct_forward(model_dir, audio):
    from conilium.audio import normalize, read_audio
    from conilium.finetune.model import load_model_dir

    model, info = load_model_dir(model_dir)
    x = normalize(read_audio(audio / "mono16k.wav", max_seconds=3.0), "global", info["normalize"]["stats"])
    with torch.no_grad():
        direct = torch.sigmoid(model(torch.from_numpy(x)[None], torch.tensor([len(x)])))[0].numpy()
    res = Predictor(model_dir, batch_size=2).predict([audio / "mono16k.wav", audio / "stereo44k.flac"])
    np.testing.assert_allclose(res[0].probabilities, direct, atol=1e-5)


def test_truncated_and_too_long_inputs_are_said(model_dir, audio, tmp_path):
    """The model reads 3 s; a 2 s file is used whole, a 9 s one is cut and says so; read whole, an
    input beyond --max-whole-seconds gets an error instead of exhausting the memory."""
    x, sr = sf.read(str(audio / "mono16k.wav"), dtype="float32")
    long = tmp_path / "long.wav"
    sf.write(long, np.concatenate([x] * 5)[: 9 * sr], sr)
    out = tmp_path / "pred.csv"
    r = CliRunner().invoke(predict_cmd, ["--model", str(model_dir), str(audio / "mono16k.wav"), str(long), "--out",
                                         str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    short_row, long_row = _rows(out.read_text())
    assert float(short_row["Seconds"]) == pytest.approx(len(x) / sr, abs=1e-3) and short_row["Warning"] == ""
    assert float(long_row["Seconds"]) == 3.0 and "the first 3 s of 9.0 s were used" in long_row["Warning"]
    assert "1 file(s) longer than 3 s: only their beginning was used" in r.stderr
    whole = Predictor(model_dir, max_seconds=0, max_whole_seconds=5).predict([audio / "mono16k.wav", long])
    assert whole[0].ok and whole[0].warning is None and whole[0].seconds == pytest.approx(len(x) / sr, abs=1e-3)
    assert not whole[1].ok and "9 s is too long to run whole" in whole[1].error


def test_json_output_list_file_and_exit_status(model_dir, audio, tmp_path):
    lst = tmp_path / "files.txt"
    lst.write_text(f"# clips\n{audio / 'mono16k.wav'}\n\n{audio / 'broken.wav'}\n")
    out = tmp_path / "pred.json"
    r = CliRunner().invoke(predict_cmd, ["--model", str(model_dir), "--list", str(lst), "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert [d["file"] for d in data] == [str(audio / "mono16k.wav"), str(audio / "broken.wav")]
    assert set(data[0]["probabilities"]) == set(CLASSES) and data[0]["error"] is None
    assert data[1]["probabilities"] is None and "unreadable" in data[1]["error"]
    # every file failed: exit status 1; CSV on standard output without --out
    r = CliRunner().invoke(predict_cmd, ["--model", str(model_dir), str(audio / "broken.wav"), "--quiet"])
    assert r.exit_code == 1 and r.stdout.startswith("FileName,A,S,H,U,F,D,C,N,Prediction,Seconds,Warning,Error")
    r = CliRunner().invoke(predict_cmd, ["--model", str(model_dir), str(audio / "mono16k.wav"), "--out",
                                         str(tmp_path / "x.txt")])
    assert r.exit_code == 2 and ".csv, .json or .parquet" in r.output
    r = CliRunner().invoke(predict_cmd, ["--model", str(tmp_path), str(audio / "mono16k.wav")])
    assert r.exit_code == 1 and "not a finetune-best model directory" in r.output


def test_silent_and_very_short_inputs_are_said(model_dir, audio, tmp_path):
    """Digital silence, a near-silent recording (-70 dBFS noise) and a 0.4 s clip still get
    scores, each with a warning in the Warning column and a line on stderr; a clip at speech
    level, quiet or not, gets none (the level is measured before normalisation)."""
    x, sr = sf.read(str(audio / "mono16k.wav"), dtype="float32")
    rng = np.random.default_rng(0)
    files = {"zeros.wav": np.zeros(2 * sr, np.float32),
             "hiss.wav": (rng.standard_normal(2 * sr) * 10 ** (-75 / 20)).astype(np.float32),
             "blip.wav": x[: int(0.4 * sr)],
             "quiet.wav": x * (0.02 / np.abs(x).max())}
    for name, wave in files.items():
        sf.write(tmp_path / name, wave, sr, subtype="FLOAT")
    out = tmp_path / "pred.csv"
    r = CliRunner().invoke(predict_cmd, ["--model", str(model_dir), *(str(tmp_path / n) for n in files), "--out",
                                         str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    rows = {Path(row["FileName"]).name: row for row in _rows(out.read_text())}
    assert all(row["Prediction"] in CLASSES for row in rows.values())
    assert "silent (digital silence)" in rows["zeros.wav"]["Warning"]
    assert "silent (peak -6" in rows["hiss.wav"]["Warning"]
    assert "very short (0.40 s" in rows["blip.wav"]["Warning"] and "silent" not in rows["blip.wav"]["Warning"]
    assert rows["quiet.wav"]["Warning"] == ""
    assert "2 file(s) silent" in r.stderr and "1 file(s) shorter than 1 s" in r.stderr
    # in memory alike, with the result's peak
    res = Predictor(model_dir).predict([np.zeros(sr, np.float32), files["quiet.wav"]])
    assert res[0].peak == 0 and "silent" in res[0].warning
    assert res[1].peak == pytest.approx(0.02, rel=1e-4) and res[1].warning is None

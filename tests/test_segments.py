"""predict --segment: long recordings cut by Silero VAD or into fixed windows, one row a segment."""

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch
from click.testing import CliRunner

from conilium.audio import read_audio, stream_audio
from conilium.cli.finetune import predict_cmd
from conilium.errors import AudioError, ConfigError
from conilium.finetune.predict import Predictor
from conilium.finetune.segments import fixed_segments, parse_segment
from conilium.testing import write_demo_model_dir

pytest.importorskip("silero_vad")

GAP = 2.0  # seconds of silence before, between and after the clips


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_demo_model_dir(tmp_path_factory.mktemp("segments"), max_seconds=8.0,
                                normalize={"mode": "utterance"})


@pytest.fixture(scope="module")
def recording(small_demo_corpus, tmp_path_factory):
    """Six demo clips with 2 s of silence around each, as 44.1 kHz stereo FLAC, the same at
    16 kHz mono, the speech parts' (start, end) seconds, a silent file and a broken one."""
    d = tmp_path_factory.mktemp("recording")
    parts, speech, t = [], [], 0.0
    for src in sorted((Path(small_demo_corpus) / "Audios").glob("*.wav"))[:6]:
        x, sr = sf.read(src, dtype="float32")
        parts += [np.zeros(int(GAP * sr), np.float32), x]
        t += GAP
        speech.append((t, t + len(x) / sr))
        t += len(x) / sr
    parts.append(np.zeros(int(GAP * 16000), np.float32))
    y = np.concatenate(parts)
    sf.write(d / "long16k.wav", y, 16000, subtype="FLOAT")
    y44 = soxr.resample(y, 16000, 44100).astype(np.float32)
    sf.write(d / "long44k.flac", np.stack([y44, y44], axis=1), 44100, subtype="PCM_24")
    sf.write(d / "silence.wav", np.zeros(16000 * 5, np.float32), 16000)
    (d / "broken.wav").write_bytes(b"RIFF....not really audio")
    return d, y, speech


def _rows(text):
    return list(csv.DictReader(io.StringIO(text)))


def test_fixed_windows_have_exact_bounds():
    assert fixed_segments(10.0, 4.0, 4.0, 1.0) == [(0.0, 4.0), (4.0, 8.0), (8.0, 10.0)]
    assert fixed_segments(10.0, 4.0, 3.0, 1.0) == [(0.0, 4.0), (3.0, 7.0), (6.0, 10.0)]
    assert fixed_segments(8.5, 4.0, 4.0, 1.0) == [(0.0, 4.0), (4.0, 8.0)]  # 0.5 s left: under min_segment
    assert fixed_segments(2.5, 4.0, 4.0, 1.0) == [(0.0, 2.5)]  # shorter than a window: one segment
    assert fixed_segments(0.5, 4.0, 4.0, 1.0) == []


def test_segment_option_errors_name_the_option():
    assert parse_segment("fixed:8:4").hop == 4.0 and parse_segment("fixed:8").hop == 8.0
    assert parse_segment("vad", max_segment=6).max_segment == 6
    for bad, word in (("fixed", "--segment"), ("fixed:0", "positive"), ("vadd", "--segment"),
                      ("fixed:a:b", "--segment")):
        with pytest.raises(ConfigError, match=word):
            parse_segment(bad)
    with pytest.raises(ConfigError, match="--min-segment"):
        parse_segment("vad", min_segment=9, max_segment=8)
    with pytest.raises(ConfigError, match="--vad-threshold"):
        parse_segment("vad", threshold=1.5)


def test_streamed_blocks_equal_the_whole_file(recording):
    d, y, _ = recording
    whole = read_audio(d / "long44k.flac")
    blocks = list(stream_audio(d / "long44k.flac", block_seconds=0.7))
    assert max(len(b) for b in blocks) <= int(0.7 * 16000) + 1024  # memory: a block (and soxr's delay), not the file
    joined = np.concatenate(blocks)
    assert len(joined) == len(whole)
    assert np.max(np.abs(joined - whole)) < 1e-4
    with pytest.raises(AudioError, match="unreadable audio"):
        list(stream_audio(d / "broken.wav"))


def test_vad_segments_fall_on_the_speech_whatever_the_block_size(recording):
    from silero_vad import get_speech_timestamps

    from conilium.finetune.vad import SpeechDetector

    d, y, speech = recording
    threads = torch.get_num_threads()
    det = SpeechDetector(min_segment=1.0, max_segment=8.0, pad=0.1, block_seconds=600)
    assert torch.get_num_threads() == threads  # importing silero_vad does not leave torch on one thread
    segs = det.segments(d / "long16k.wav")
    assert segs, "no speech found in demo speech"
    for start, end in segs:
        assert 1.0 <= end - start <= 8.0 + 1e-3
        # inside one clip's speech, give or take the padding (0.1 s), the 100 ms of silence the VAD
        # waits for before it ends a segment and its 32 ms windows
        assert any(a - 0.3 <= start and end <= b + 0.3 for a, b in speech), (start, end)
    covered = sum(min(b, e) - max(a, s) for a, b in speech for s, e in segs if min(b, e) > max(a, s))
    assert covered > 0.6 * sum(b - a for a, b in speech)
    # the same segments from small blocks, from the 44.1 kHz stereo file, and from silero on the whole array
    det.block_seconds = 0.77
    assert det.segments(d / "long16k.wav") == segs
    # the 44.1 kHz copy went 16 -> 44.1 -> 16 kHz: its scores differ a little, its bounds by a few 32 ms windows at most
    s44 = det.segments(d / "long44k.flac")
    assert len(s44) == len(segs) and np.abs(np.array(s44) - np.array(segs)).max() <= 4 * 0.032 + 1e-9
    det.block_seconds = 600
    assert det.segments(d / "long44k.flac") == s44
    ref = get_speech_timestamps(torch.from_numpy(y), det.model, min_speech_duration_ms=1000, max_speech_duration_s=8,
                                speech_pad_ms=100)
    assert [(round(r["start"] / 16000, 3), round(r["end"] / 16000, 3)) for r in ref] == segs
    assert det.segments(d / "silence.wav") == []


def test_predict_segment_vad_writes_a_row_per_segment(model_dir, recording, tmp_path):
    d, _, _ = recording
    res = CliRunner().invoke(predict_cmd, ["--model", str(model_dir), str(d / "long44k.flac"),
                                           str(d / "silence.wav"), str(d / "broken.wav"), "--segment", "vad",
                                           "--out", str(tmp_path / "seg.csv"), "--quiet"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(tmp_path / "seg.csv")))
    assert list(rows[0])[:3] == ["FileName", "Start", "End"]
    assert f"predict: {d / 'silence.wav'}: no speech found" in res.output
    assert not [r for r in rows if r["FileName"].endswith("silence.wav")]
    broken = [r for r in rows if r["FileName"].endswith("broken.wav")]
    assert len(broken) == 1 and "unreadable" in broken[0]["Error"] and broken[0]["Start"] == ""
    segs = [r for r in rows if r["FileName"].endswith("long44k.flac")]
    from conilium.finetune.vad import SpeechDetector

    expect = SpeechDetector(min_segment=1.0, max_segment=8.0, pad=0.1).segments(d / "long44k.flac")
    assert [(float(r["Start"]), float(r["End"])) for r in segs] == expect
    assert all(r["Prediction"] and not r["Error"] for r in segs)
    # each row is the prediction of that stretch of the file, as predict() gives for it in memory
    p = Predictor(model_dir, device="cpu")
    x44, sr = sf.read(d / "long44k.flac", dtype="float32")
    r0 = segs[1]
    a, b = int(round(float(r0["Start"]) * sr)), int(round(float(r0["End"]) * sr))
    direct = p.predict([(x44[a:b], sr)])[0]
    assert [float(r0[c]) for c in p.classes] == pytest.approx(direct.probabilities.tolist(), abs=2e-6)
    assert "segment(s) of 2 recording(s) predicted, 1 failed, 1 without speech" in res.output


def test_predict_segment_fixed_and_the_library_call(model_dir, recording, tmp_path):
    import pyarrow.parquet as pq

    d, y, _ = recording
    res = CliRunner().invoke(predict_cmd, ["--model", str(model_dir), str(d / "long16k.wav"), "--segment",
                                           "fixed:8:6", "--out", str(tmp_path / "seg.parquet"), "--quiet"])
    assert res.exit_code == 0, res.output
    t = pq.read_table(tmp_path / "seg.parquet").to_pydict()
    duration = len(y) / 16000
    assert list(zip(t["Start"], t["End"])) == [(round(s, 3), round(e, 3))
                                               for s, e in fixed_segments(duration, 8.0, 6.0, 1.0)]
    run = Predictor(model_dir, device="cpu").predict_segments([str(d / "long16k.wav"), str(d / "silence.wav")],
                                                              "fixed:8:6")
    assert [(r.start, r.end) for r in run.results if r.file.endswith("long16k.wav")] == \
        fixed_segments(duration, 8.0, 6.0, 1.0)
    silent = [r for r in run.results if r.file.endswith("silence.wav")]
    assert silent and all("silent" in r.warning for r in silent)  # fixed windows are predicted, and said silent
    probs = np.array([r.probabilities for r in run.results if r.file.endswith("long16k.wav")])
    table = np.array([t[c] for c in run.results[0].classes]).T
    assert np.allclose(probs, table, atol=1e-12)

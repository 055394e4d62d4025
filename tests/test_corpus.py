"""Corpus reader: both detailed-label layouts and every bad-input case."""

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conilium.corpus import load_corpus
from conilium.errors import AudioError, CorpusError
from conilium.audio import read_audio

HEADER = "FileName,EmoClass,EmoAct,EmoVal,EmoDom,SpkrID,Gender,Split_Set\n"
ROWS = [
    "MSP-PODCAST_0001_0001.wav,N,2.2,4.0,2.6,30,Male,Train",
    "MSP-PODCAST_0001_0002.wav,S,3.0,2.0,3.0,31,Female,Development",
    "MSP-PODCAST_0001_0003.wav,X,4.0,4.0,4.0,Unknown,Unknown,Train",
    "MSP-PODCAST_0001_0004.wav,,,,,Unknown,Unknown,Test3",
]
DETAILED = [
    'MSP-PODCAST_0001_0001.wav,"WORKER00001; Neutral; Sad,Other-bored; A:3.0; V:4.0; D:4.0;"',
    'MSP-PODCAST_0001_0001.wav,"WORKER00002; Neutral; ; A:2.0; V:4.0; D:3.0;"',
    'MSP-PODCAST_0001_0002.wav,"WORKER00001; Sad; Frustrated,Neutral; A:3.0; V:2.0; D:3.0;"',
]


def write_wav(path, seconds=1.0, sr=16000, channels=1):
    n = int(seconds * sr)
    x = 0.1 * np.sin(2 * np.pi * 220 * np.arange(n) / sr)
    if channels > 1:
        x = np.stack([x] * channels, axis=1)
    sf.write(str(path), x, sr, subtype="PCM_16")


def make_corpus(root: Path, rows=ROWS, detailed=DETAILED, detailed_header="FileName,EmoDetail"):
    (root / "Audios").mkdir(parents=True)
    (root / "Labels").mkdir()
    (root / "Labels" / "labels_consensus.csv").write_text(HEADER + "\n".join(rows) + "\n")
    if detailed is not None:
        (root / "Labels" / "labels_detailed.csv").write_text(detailed_header + "\n" + "\n".join(detailed) + "\n")
    for i, r in enumerate(rows):
        write_wav(root / "Audios" / r.split(",")[0], seconds=1.0 + 0.5 * i)
    return root


def test_reads_consensus_annotations_durations(tmp_path):
    c = load_corpus(make_corpus(tmp_path / "c"))
    assert list(c.clips) == [r.split(",")[0] for r in ROWS]
    a = c["MSP-PODCAST_0001_0001.wav"]
    assert (a.emo_class, a.split, a.speaker, a.gender) == ("N", "Train", "30", "Male")
    assert a.duration == pytest.approx(1.0)
    assert [x.worker for x in a.annotations] == ["WORKER00001", "WORKER00002"]
    assert a.annotations[0].secondary == ("Sad", "Other-bored")
    assert a.annotations[0].secondary_classes == ("S",)
    assert a.annotations[1].secondary == ()
    assert a.annotations[0].act == 3.0
    t3 = c["MSP-PODCAST_0001_0004.wav"]
    assert t3.emo_class is None and t3.annotations == () and t3.speaker is None and not t3.scoreable
    assert c["MSP-PODCAST_0001_0003.wav"].emo_class == "X"
    assert c.detailed_layout == "emodetail"
    assert c.splits == ["Train", "Development", "Test3"]


def test_reads_older_column_layout(tmp_path):
    detailed = [
        'MSP-PODCAST_0001_0001.wav,WORKER00001,Neutral,"Sad,Other-bored",3.0,4.0,4.0',
        "MSP-PODCAST_0001_0001.wav,WORKER00002,Neutral,,2.0,4.0,3.0",
        'MSP-PODCAST_0001_0002.wav,WORKER00001,Sad,"Frustrated,Neutral",3.0,2.0,3.0',
    ]
    root = make_corpus(tmp_path / "c", detailed=detailed,
                       detailed_header="FileName,Workers,EmoClass_Major,EmoClass_Second,EmoAct,EmoVal,EmoDom")
    old = load_corpus(root)
    new = load_corpus(make_corpus(tmp_path / "n"))
    assert old.detailed_layout == "columns"
    for name in new.clips:
        assert old[name].annotations == new[name].annotations


def test_figure2_annotations_through_the_reader(tmp_path):
    from conilium.targets import primary_target, secondary_target

    detailed = [
        'MSP-PODCAST_0001_0001.wav,"W1; Neutral; Neutral,Sad; A:3; V:4; D:4;"',
        'MSP-PODCAST_0001_0001.wav,"W2; Neutral; Neutral,Other; A:3; V:4; D:4;"',
        'MSP-PODCAST_0001_0001.wav,"W3; Sad; Sad,Surprise; A:3; V:4; D:4;"',
        'MSP-PODCAST_0001_0001.wav,"W4; Neutral; Neutral,Sad,Other; A:3; V:4; D:4;"',
    ]
    c = load_corpus(make_corpus(tmp_path / "c", detailed=detailed))
    anns = c["MSP-PODCAST_0001_0001.wav"].annotations
    p, s = primary_target(anns), secondary_target(anns)
    # classes A,S,H,U,F,D,C,N
    np.testing.assert_allclose(p, [0, 1 / 4, 0, 0, 0, 0, 0, 3 / 4], atol=1e-7)
    np.testing.assert_allclose(s, [0, 3 / 7, 0, 1 / 7, 0, 0, 0, 3 / 7], atol=1e-7)


def test_missing_label_file(tmp_path):
    root = make_corpus(tmp_path / "c")
    (root / "Labels" / "labels_consensus.csv").unlink()
    with pytest.raises(CorpusError, match="labels_consensus.csv: label file not found"):
        load_corpus(root)


def test_missing_corpus_dir(tmp_path):
    with pytest.raises(CorpusError, match="corpus directory not found"):
        load_corpus(tmp_path / "nowhere")


def test_unknown_emoclass_names_file_and_line(tmp_path):
    rows = ROWS[:1] + ["MSP-PODCAST_0001_0002.wav,Q,3.0,2.0,3.0,31,Female,Development"]
    with pytest.raises(CorpusError, match=r"labels_consensus.csv:3: clip MSP-PODCAST_0001_0002.wav: unknown EmoClass 'Q'"):
        load_corpus(make_corpus(tmp_path / "c", rows=rows))


def test_duplicate_filename(tmp_path):
    rows = ROWS[:2] + [ROWS[0]]
    with pytest.raises(CorpusError, match=r"labels_consensus.csv:4: duplicate FileName MSP-PODCAST_0001_0001.wav \(first on line 2\)"):
        load_corpus(make_corpus(tmp_path / "c", rows=rows))


@pytest.mark.parametrize("detail, why", [
    ('"WORKER00001"', "malformed EmoDetail"),
    ('"; Neutral; Sad; A:3.0;"', "empty worker id"),
    ('"WORKER00001; Neutral; Sad; A:three;"', "not a number"),
    ('"WORKER00001; Neutral; Sad; Q:3.0;"', "unexpected field"),
])
def test_malformed_emodetail_names_file_and_line(tmp_path, detail, why):
    detailed = DETAILED[:2] + [f"MSP-PODCAST_0001_0002.wav,{detail}"]
    with pytest.raises(CorpusError, match=rf"labels_detailed.csv:4: .*{why}"):
        load_corpus(make_corpus(tmp_path / "c", detailed=detailed))


def test_wrong_field_count_and_missing_columns(tmp_path):
    with pytest.raises(CorpusError, match=r"labels_consensus.csv:3: expected 8 fields, found 3"):
        load_corpus(make_corpus(tmp_path / "a", rows=ROWS[:1] + ["x.wav,N,1"]))
    root = make_corpus(tmp_path / "b")
    (root / "Labels" / "labels_consensus.csv").write_text("FileName,EmoClass\nx.wav,N\n")
    with pytest.raises(CorpusError, match=r"labels_consensus.csv:1: missing column\(s\) EmoAct"):
        load_corpus(root)


def test_missing_audio_is_an_error_or_skipped_on_request(tmp_path):
    root = make_corpus(tmp_path / "c")
    (root / "Audios" / "MSP-PODCAST_0001_0002.wav").unlink()
    with pytest.raises(CorpusError, match="clip MSP-PODCAST_0001_0002.wav: audio file .* not found.*--skip-bad"):
        load_corpus(root)
    c = load_corpus(root, skip_bad=True)
    assert "MSP-PODCAST_0001_0002.wav" not in c.clips and len(c) == 3
    assert c.skipped[0][0] == "MSP-PODCAST_0001_0002.wav"


def test_unreadable_audio_names_the_clip(tmp_path):
    root = make_corpus(tmp_path / "c")
    (root / "Audios" / "MSP-PODCAST_0001_0001.wav").write_bytes(b"RIFF\x00\x00garbage")
    with pytest.raises(CorpusError, match="clip MSP-PODCAST_0001_0001.wav: unreadable audio"):
        load_corpus(root)
    with pytest.raises(AudioError, match="MSP-PODCAST_0001_0001.wav.*unreadable"):
        read_audio(root / "Audios" / "MSP-PODCAST_0001_0001.wav", clip="MSP-PODCAST_0001_0001.wav")


def test_empty_labelled_emoclass_is_an_error(tmp_path):
    rows = ["MSP-PODCAST_0001_0001.wav,,2.2,4.0,2.6,30,Male,Train"]
    with pytest.raises(CorpusError, match=r":2: clip MSP-PODCAST_0001_0001.wav: empty EmoClass in split Train"):
        load_corpus(make_corpus(tmp_path / "c", rows=rows))


def test_no_detailed_file_means_no_annotations(tmp_path):
    c = load_corpus(make_corpus(tmp_path / "c", detailed=None))
    assert all(x.annotations == () for x in c) and c.detailed_layout is None


def test_read_audio_resamples_downmixes_and_truncates(tmp_path):
    p = tmp_path / "st.wav"
    write_wav(p, seconds=3.0, sr=44100, channels=2)
    x = read_audio(p, max_seconds=2.0)
    assert x.dtype == np.float32 and x.ndim == 1 and len(x) == 32000
    q = tmp_path / "nan.wav"
    sf.write(str(q), np.full(1600, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN"):
        read_audio(q)
    e = tmp_path / "empty.wav"
    sf.write(str(e), np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match="empty"):
        read_audio(e)


def test_fingerprint_changes_with_labels_and_audio(tmp_path):
    root = make_corpus(tmp_path / "c")
    f0 = load_corpus(root).fingerprint()
    assert load_corpus(root).fingerprint() == f0
    write_wav(root / "Audios" / "MSP-PODCAST_0001_0001.wav", seconds=2.0)
    f1 = load_corpus(root).fingerprint()
    assert f1 != f0
    p = root / "Labels" / "labels_consensus.csv"
    p.write_text(p.read_text().replace("2.2,4.0", "2.3,4.0"))
    assert load_corpus(root).fingerprint() != f1


def test_non_utf8_label_file_names_file_and_line(tmp_path):
    root = make_corpus(tmp_path / "c")
    p = root / "Labels" / "labels_consensus.csv"
    p.write_bytes(p.read_bytes() + b"MSP-PODCAST_0001_0009.wav,N,2,2,2,1,Male,Train\xff\xfe\n")
    with pytest.raises(CorpusError, match=r"labels_consensus.csv:6: not UTF-8"):
        load_corpus(root)

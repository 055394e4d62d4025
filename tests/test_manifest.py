"""Corpus manifest (corpus.csv / corpus.jsonl + classes.json): reading, class sets, bad rows."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conilium.classes import MSP_PODCAST, ClassSet, load_class_set
from conilium.corpus import load_corpus
from conilium.errors import CorpusError
from conilium.metrics import score
from conilium.targets import class_weights, training_set

CLASSES4 = {"classes": [
    {"code": "ang", "name": "Angry", "aliases": ["anger", "frustrated"]},
    {"code": "hap", "name": "Happy", "aliases": ["excited"]},
    {"code": "sad", "name": "Sad"},
    {"code": "neu", "name": "Neutral", "aliases": ["neutral state"]},
]}


def _wav(path: Path, seconds: float = 1.0, sr: int = 16000):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    sf.write(str(path), 0.1 * np.sin(2 * np.pi * 200 * t), sr, subtype="PCM_16")


def _ann(worker, primary, secondary=()):
    return {"annotator": worker, "primary": primary, "secondary": list(secondary)}


ROWS = [
    {"audio": "s1/a.wav", "split": "train", "speaker": "spk1", "gender": "F", "label": "ang",
     "annotations": [_ann("w1", "Angry", ["Sad"]), _ann("w2", "frustrated"), _ann("w3", "Neutral state")],
     "arousal": 5.0, "valence": 2.0, "dominance": 4.5, "transcript": "leave me alone"},
    {"audio": "s1/b.wav", "split": "Development", "speaker": "spk2", "gender": "Male",
     "annotations": [_ann("w1", "Happy"), _ann("w2", "excited", ["Other-amused"]), _ann("w3", "Sad")]},
    {"audio": "s2/c.wav", "split": "test", "label": "", "annotations": []},
    {"audio": "s2/d.wav", "split": "train", "label": "X",
     "annotations": [_ann("w1", "Happy"), _ann("w2", "Sad")]},
]


def write_manifest(root: Path, rows=ROWS, *, fmt="jsonl", classes=CLASSES4, audio=True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if classes is not None:
        (root / "classes.json").write_text(json.dumps(classes))
    if fmt == "jsonl":
        (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        cols = ["audio", "split", "speaker", "gender", "label", "annotations", "arousal", "valence", "dominance",
                "transcript"]
        with open(root / "corpus.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols)
            for r in rows:
                w.writerow([json.dumps(r[c]) if c == "annotations" and c in r else r.get(c, "") for c in cols])
    if audio:
        for i, r in enumerate(rows):
            _wav(root / r["audio"], 1.0 + 0.25 * i)
    return root


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_manifest_reads_like_the_msp_reader(tmp_path, fmt):
    c = load_corpus(write_manifest(tmp_path / "c", fmt=fmt))
    assert c.classes.codes == ("ang", "hap", "sad", "neu")
    assert list(c.clips) == ["s1/a.wav", "s1/b.wav", "s2/c.wav", "s2/d.wav"]
    a = c["s1/a.wav"]
    assert (a.emo_class, a.split, a.speaker, a.gender) == ("ang", "Train", "spk1", "Female")
    assert (a.act, a.val, a.dom, a.transcript) == (5.0, 2.0, 4.5, "leave me alone")
    assert a.duration == pytest.approx(1.0)
    assert [x.primary_class for x in a.annotations] == ["ang", "ang", "neu"]
    assert a.annotations[0].secondary_classes == ("sad",)
    assert a.scoreable and c.audio_path("s1/a.wav") == tmp_path / "c" / "s1" / "a.wav"
    # no label: the annotators' plurality; an "Other-…" word maps to no class
    b = c["s1/b.wav"]
    assert b.emo_class == "hap" and b.annotations[1].ignored_words() == ["Other-amused"]
    assert c["s2/c.wav"].emo_class is None and c["s2/c.wav"].split == "Test1"
    assert c["s2/d.wav"].emo_class == "X" and not c["s2/d.wav"].scoreable
    # the targets follow the class set: P of clip a is 2/3 ang, 1/3 neu; X clips stay out
    kept, y, _ = training_set(c.split("Train"), "P")
    assert [k.name for k in kept] == ["s1/a.wav"]
    np.testing.assert_allclose(y, [[2 / 3, 0, 0, 1 / 3]], rtol=1e-6)
    kept, y, _ = training_set(c.split("Train"), "S")
    np.testing.assert_allclose(y, [[0.5, 0, 0.25, 0.25]], rtol=1e-6)
    assert class_weights(["ang", "ang", "sad", "X"], c.classes).shape == (4,)
    s = score(["ang", "hap", "sad", "neu"], ["ang", "hap", "sad", "ang"], c.classes.codes)
    assert s["confusion_labels"] == ["ang", "hap", "sad", "neu"] and s["f1_macro"] == pytest.approx(
        (2 / 3 + 1 + 1 + 0) / 4)


def test_manifest_without_classes_json_is_msp_podcast(tmp_path):
    rows = [{"audio": "a.wav", "split": "Train", "label": "Sad", "annotations": [_ann("w", "Sad")]},
            {"audio": "b.wav", "split": "Development", "label": "N"}]
    c = load_corpus(write_manifest(tmp_path / "c", rows, classes=None))
    assert c.classes == MSP_PODCAST and c.classes.is_default
    assert c["a.wav"].emo_class == "S" and c["b.wav"].emo_class == "N"
    assert training_set(list(c), "hard")[1].shape == (2, 8)


def test_fingerprint_follows_manifest_and_classes(tmp_path):
    root = write_manifest(tmp_path / "c")
    f0 = load_corpus(root).fingerprint()
    assert load_corpus(root).fingerprint() == f0
    cl = json.loads((root / "classes.json").read_text())
    cl["classes"][0]["aliases"].append("furious")
    (root / "classes.json").write_text(json.dumps(cl))
    assert load_corpus(root).fingerprint() != f0


def test_class_set_json_round_trip_and_errors(tmp_path):
    cs = ClassSet.from_json(CLASSES4)
    assert ClassSet.from_json(cs.to_json()) == cs and not cs.is_default
    assert ClassSet.from_json(MSP_PODCAST.to_json()).is_default
    bad = {
        "one": {"classes": [{"code": "a", "name": "A"}]},
        "reserved": {"classes": [{"code": "X"}, {"code": "b"}]},
        "twice": {"classes": [{"code": "a"}, {"code": "a"}]},
        "word": {"classes": [{"code": "a", "aliases": ["z"]}, {"code": "b", "aliases": ["z"]}]},
        "code": {"classes": [{"code": "a b"}, {"code": "c"}]},
    }
    for what, obj in bad.items():
        p = tmp_path / f"{what}.json"
        p.write_text(json.dumps(obj))
        with pytest.raises(CorpusError, match=str(p)):
            load_class_set(p)
    p = tmp_path / "broken.json"
    p.write_text('{"classes": [\n{"code": "a"},\n')
    with pytest.raises(CorpusError, match=rf"{p}:\d+: malformed JSON"):
        load_class_set(p)


def _replace(rows, i, **kw):
    rows = [dict(r) for r in rows]
    rows[i].update(kw)
    return rows


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
@pytest.mark.parametrize("change,match", [
    (dict(label="happy-ish"), r"corpus\.\w+:3: clip s1/b\.wav: unknown class 'happy-ish'"),
    (dict(annotations=[_ann("w1", "Joy")]), r"corpus\.\w+:3: annotation 1 primary: unknown class 'Joy'"),
    (dict(split="holdout"), r"corpus\.\w+:3: clip s1/b\.wav: bad split 'holdout'"),
    (dict(audio="../b.wav"), r"corpus\.\w+:3: audio '\.\./b\.wav' leads out of the corpus root"),
    (dict(audio="/abs/b.wav"), r"corpus\.\w+:3: audio '/abs/b\.wav' is an absolute path"),
    (dict(audio="s1/a.wav"), r"corpus\.\w+:3: duplicate audio s1/a\.wav \(first on line 2\)"),
    (dict(gender="robot"), r"corpus\.\w+:3: clip s1/b\.wav: unknown gender"),
    (dict(arousal="high"), r"corpus\.\w+:3: arousal is not a number"),
])
def test_bad_rows_name_the_line(tmp_path, fmt, change, match):
    rows = [dict(r) for r in ROWS]
    rows[0] = dict(rows[0], audio="s1/a.wav")
    rows = _replace(rows, 1, **change)
    root = write_manifest(tmp_path / "c", rows, fmt=fmt, audio=False)
    if fmt == "jsonl":  # line 1 of a jsonl file is the first clip: shift the expected line
        match = match.replace(":3:", ":2:").replace("line 2", "line 1")
    for r in rows:
        if not r["audio"].startswith(("/", "..")):
            _wav(root / r["audio"])
    with pytest.raises(CorpusError, match=match):
        load_corpus(root)


def test_missing_audio_and_malformed_lines(tmp_path):
    root = write_manifest(tmp_path / "c")
    (root / "s2" / "c.wav").unlink()
    with pytest.raises(CorpusError, match=r"corpus\.jsonl:3: clip s2/c\.wav: audio file .* not found"):
        load_corpus(root)
    c = load_corpus(root, skip_bad=True)
    assert "s2/c.wav" not in c.clips and c.skipped[0][0] == "s2/c.wav"
    lines = (root / "corpus.jsonl").read_text().splitlines()
    lines[2] = lines[2][:-1]
    (root / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(CorpusError, match=r"corpus\.jsonl:3: malformed JSON"):
        load_corpus(root, read_durations=False)
    root = write_manifest(tmp_path / "d", fmt="csv")
    text = (root / "corpus.csv").read_text().replace('""annotator"": ""w2""', '""annotator"" ""w2""')
    (root / "corpus.csv").write_text(text)
    with pytest.raises(CorpusError, match=r"corpus\.csv:2: column annotations: malformed JSON"):
        load_corpus(root)
    (root / "corpus.jsonl").write_text("")
    with pytest.raises(CorpusError, match="both corpus.csv and corpus.jsonl"):
        load_corpus(root)
    (root / "corpus.jsonl").unlink()
    (root / "corpus.csv").write_text("audio,split,emotion\na.wav,Train,ang\n")
    with pytest.raises(CorpusError, match=r"corpus\.csv:1: unknown column\(s\) emotion"):
        load_corpus(root)
    (root / "corpus.csv").write_text("audio,label\na.wav,ang\n")
    with pytest.raises(CorpusError, match=r"corpus\.csv:1: missing column\(s\) split"):
        load_corpus(root)
    (root / "corpus.jsonl").write_text('{"audio": "s1/a.wav", "split": "train", "mood": "x"}\n')
    (root / "corpus.csv").unlink()
    with pytest.raises(CorpusError, match=r"corpus\.jsonl:1: unknown field\(s\) mood"):
        load_corpus(root)


def test_symlink_out_of_the_root_is_refused(tmp_path):
    outside = tmp_path / "elsewhere.wav"
    _wav(outside)
    rows = [{"audio": "a.wav", "split": "Train", "label": "sad"}, {"audio": "link.wav", "split": "Train",
                                                                  "label": "hap"}]
    root = write_manifest(tmp_path / "c", rows, audio=False)
    _wav(root / "a.wav")
    (root / "link.wav").symlink_to(outside)
    with pytest.raises(CorpusError, match=r"corpus\.jsonl:2: FileName 'link\.wav' is a symbolic link"):
        load_corpus(root)
    assert len(load_corpus(root, allow_symlinks=True)) == 2


def test_describe_corpus_speaks_in_the_class_set(tmp_path):
    from conilium.describe import describe_corpus

    s = describe_corpus(write_manifest(tmp_path / "c"), tmp_path / "out")
    assert list(s["consensus"]["all"]) == ["ang", "hap", "sad", "neu", "O", "X", "unlabelled"]
    assert s["consensus"]["all"]["ang"] == 1 and s["consensus"]["all"]["X"] == 1
    assert s["cooccurrence"]["rows"] == ["ang", "hap", "sad", "neu"] and s["cooccurrence"]["names"][0] == "Angry"
    assert s["cooccurrence"]["matrix"][0] == [0.5, 0.0, 0.25, 0.25]
    assert (tmp_path / "out" / "cooccurrence.png").stat().st_size > 0
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| Split | ang | hap | sad | neu | O | X | unlabelled | total |" in md
    assert "4 classes (ang, hap, sad, neu) and Other" in md and "layout: manifest corpus.jsonl" in md


def test_manifest_transcripts_come_before_transcript_files(tmp_path):
    """A manifest's transcript field is the clip's text; clips without one fall back to
    Transcripts/<clip stem>.txt, and those with neither are listed as missing."""
    from conilium.transcripts import transcript_path

    root = write_manifest(tmp_path / "c", fmt="csv")
    c = load_corpus(root)
    transcript_path(root, "s1/a.wav").parent.mkdir(parents=True, exist_ok=True)
    transcript_path(root, "s1/a.wav").write_text("a file the manifest overrides\n", encoding="utf-8")
    transcript_path(root, "s1/b.wav").write_text("  why   me\n", encoding="utf-8")
    t = c.transcripts()
    assert t.texts == {"s1/a.wav": "leave me alone", "s1/b.wav": "why me"}
    assert sorted(t.missing) == ["s2/c.wav", "s2/d.wav"]

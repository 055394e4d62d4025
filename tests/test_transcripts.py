"""Transcripts beside Audios/: reading, bad files, missing clips, describe-corpus coverage."""

import json
import shutil

import pytest
from click.testing import CliRunner

from conilium.corpus import load_corpus
from conilium.demo import make_demo_corpus
from conilium.describe import describe_corpus
from conilium.errors import CorpusError
from conilium.transcripts import (TRANSCRIPTION_FILE, load_transcripts, read_transcript, transcript_path,
                                  transcripts_dir)


def _corpus(tmp_path, clips=12):
    root = make_demo_corpus(tmp_path / "corpus", clips=clips, seed=3)
    shutil.rmtree(transcripts_dir(root), ignore_errors=True)  # the demo's own transcripts: these tests write theirs
    return load_corpus(root)


def _write_all(corpus, skip=()):
    for i, name in enumerate(corpus.clips):
        if name in skip:
            continue
        p = transcript_path(corpus.root, name)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"  words of clip {i}\n second line  ", encoding="utf-8")


def test_transcript_path_is_the_clip_stem_beside_audios(tmp_path):
    assert transcript_path(tmp_path, "MSP-PODCAST_0001_0008.wav") == tmp_path / "Transcripts" / "MSP-PODCAST_0001_0008.txt"
    assert transcript_path(tmp_path, "sub/a.b.wav") == tmp_path / "Transcripts" / "sub" / "a.b.txt"


def test_reads_every_clip_in_order_with_whitespace_normalised(tmp_path):
    corpus = _corpus(tmp_path)
    _write_all(corpus)
    t = corpus.transcripts().require_all()
    assert list(t.texts) == list(corpus.clips)
    assert t.texts[next(iter(corpus.clips))] == "words of clip 0 second line"
    assert t.missing == []
    # the fingerprint follows the texts and their order
    fp = t.fingerprint()
    first = next(iter(corpus.clips))
    transcript_path(corpus.root, first).write_text("other words", encoding="utf-8")
    assert corpus.transcripts().fingerprint() != fp
    assert t.fingerprint(list(corpus.clips)[::-1]) != fp


def test_missing_transcripts_are_listed_never_empty_strings(tmp_path):
    corpus = _corpus(tmp_path, clips=14)
    names = list(corpus.clips)
    gone = names[1:13]  # 12 missing: the summary names 10 and counts the rest
    _write_all(corpus, skip=set(gone))
    t = corpus.transcripts()
    assert t.missing == gone
    assert set(t.texts) == set(names) - set(gone)
    with pytest.raises(CorpusError) as e:
        t.require_all()
    msg = str(e.value)
    assert "12 of 14 clip(s) have no transcript" in msg
    assert gone[0] in msg and gone[9] in msg and gone[10] not in msg and "and 2 more" in msg
    with pytest.raises(CorpusError, match=gone[0]):
        t.in_order(names)


@pytest.mark.parametrize("content, words", [
    (b"caf\xe9 au lait", ["not UTF-8", "byte 3", "UTF-8"]),  # Latin-1
    ("hello".encode("utf-16"), ["NUL byte", "UTF-8"]),
    (b"   \n\t ", ["empty transcript", "UTF-8"]),
    (b"", ["empty transcript"]),
])
def test_a_bad_file_names_the_file_the_clip_and_the_encoding(tmp_path, content, words):
    corpus = _corpus(tmp_path)
    _write_all(corpus)
    bad = list(corpus.clips)[4]
    transcript_path(corpus.root, bad).write_bytes(content)
    with pytest.raises(CorpusError) as e:
        corpus.transcripts()
    msg = str(e.value)
    assert str(transcript_path(corpus.root, bad)) in msg and f"clip {bad}" in msg
    for w in words:
        assert w in msg


def test_a_byte_order_mark_is_accepted(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes("\ufeffhéllo".encode("utf-8"))
    assert read_transcript(p) == "héllo"


def test_no_text_clips_of_the_asr_are_missing_with_that_reason(tmp_path):
    corpus = _corpus(tmp_path)
    names = list(corpus.clips)
    _write_all(corpus, skip={names[2]})
    (transcripts_dir(corpus.root) / TRANSCRIPTION_FILE).write_text(
        json.dumps({"asr": "some/whisper", "no_text": [names[2]]}), encoding="utf-8")
    t = load_transcripts(corpus.root, names)
    assert t.missing == t.no_text == [names[2]]
    assert "the ASR heard no words" in t.missing_summary()


def test_describe_corpus_reports_coverage(tmp_path):
    from conilium.cli.corpus import describe_corpus_cmd

    corpus = _corpus(tmp_path)
    s = describe_corpus(corpus, tmp_path / "d0")
    assert s["transcripts"]["folder"] is False and s["transcripts"]["with_transcript"] == 0
    assert "No Transcripts/ folder" in (tmp_path / "d0" / "summary.md").read_text()
    names = list(corpus.clips)
    _write_all(corpus, skip={names[0], names[5]})
    s = describe_corpus(corpus, tmp_path / "d1")
    cov = s["transcripts"]
    assert (cov["clips"], cov["with_transcript"], cov["missing"]) == (12, 10, 2)
    assert cov["missing_first"] == [names[0], names[5]]
    md = (tmp_path / "d1" / "summary.md").read_text()
    assert "10 of 12 clips have a transcript" in md and names[5] in md
    r = CliRunner().invoke(describe_corpus_cmd, ["--corpus", str(corpus.root), "--out", str(tmp_path / "d2")])
    assert r.exit_code == 0, r.output
    assert "transcripts: 10 of 12 clips (2 missing" in r.output
    transcript_path(corpus.root, names[1]).write_bytes(b"\xff\xfe")
    r = CliRunner().invoke(describe_corpus_cmd, ["--corpus", str(corpus.root), "--out", str(tmp_path / "d3")])
    assert r.exit_code == 1 and "not UTF-8" in r.output and names[1].replace(".wav", ".txt") in r.output

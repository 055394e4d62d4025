"""conilium corpus transcribe: a random-weight tiny Whisper through the from_pretrained path of a real one."""

import json
import shutil

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from conilium.cli import main
from conilium.corpus import load_corpus
from conilium.demo import make_demo_corpus
from conilium.extract.asr import CHUNK_SECONDS, split_long
from conilium.testing.asr import write_tiny_whisper_asr
from conilium.transcripts import TRANSCRIPTION_FILE, transcript_path, transcripts_dir


@pytest.fixture(scope="module")
def tiny_asr(tmp_path_factory):
    return write_tiny_whisper_asr(tmp_path_factory.mktemp("asr") / "tiny-whisper", seed=0)


@pytest.fixture
def corpus_root(tmp_path):
    root = make_demo_corpus(tmp_path / "corpus", clips=10, seed=1)
    shutil.rmtree(transcripts_dir(root), ignore_errors=True)  # the demo's synthetic ones: made here instead
    return root


def _run(*args):
    r = CliRunner().invoke(main, ["corpus", "transcribe", *map(str, args), "-q"])
    return r


def test_transcribes_every_clip_records_the_model_and_resumes(corpus_root, tiny_asr):
    r = _run("--corpus", corpus_root, "--asr", tiny_asr, "--batch-size", 3, "--max-new-tokens", 6, "--device", "cpu")
    assert r.exit_code == 0, r.output
    corpus = load_corpus(corpus_root)
    names = list(corpus.clips)
    info = json.loads((transcripts_dir(corpus_root) / TRANSCRIPTION_FILE).read_text())
    s = info["settings"]
    assert s["model"] == str(tiny_asr.resolve()) and s["source"] == "local" and len(s["weights_sha256"]) == 64
    assert (s["num_beams"], s["max_new_tokens"], s["decoding"], s["chunk_seconds"]) == (1, 6, "greedy", 30.0)
    assert info["complete"] and info["clips"] == 10 and info["written"] + len(info["no_text"]) == 10
    assert info["written"] >= 8  # the random model writes words for (nearly) every clip
    t = corpus.transcripts()
    assert set(t.missing) == set(info["no_text"])
    assert all(text for text in t.texts.values())
    # a rerun skips every clip done: the files are not touched
    done = [n for n in names if transcript_path(corpus_root, n).is_file()]
    stamps = {n: transcript_path(corpus_root, n).stat().st_mtime_ns for n in done}
    transcript_path(corpus_root, done[0]).unlink()  # one lost: the rerun redoes it alone
    r = _run("--corpus", corpus_root, "--asr", tiny_asr, "--batch-size", 3, "--max-new-tokens", 6, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert transcript_path(corpus_root, done[0]).read_text() == t.texts[done[0]] + "\n"  # greedy: the same text
    for n in done[1:]:
        assert transcript_path(corpus_root, n).stat().st_mtime_ns == stamps[n]
    # other settings are refused, naming them, unless --overwrite
    r = _run("--corpus", corpus_root, "--asr", tiny_asr, "--beams", 2, "--max-new-tokens", 6, "--device", "cpu")
    assert r.exit_code == 1 and "num_beams: made with 1, requested 2" in r.output and "--overwrite" in r.output
    r = _run("--corpus", corpus_root, "--asr", tiny_asr, "--beams", 2, "--max-new-tokens", 6, "--device", "cpu",
             "--overwrite")
    assert r.exit_code == 0, r.output
    info = json.loads((transcripts_dir(corpus_root) / TRANSCRIPTION_FILE).read_text())
    assert info["settings"]["num_beams"] == 2 and info["settings"]["decoding"] == "beam search"


def test_transcripts_not_made_here_are_not_replaced_silently(corpus_root, tiny_asr):
    name = next(iter(load_corpus(corpus_root).clips))
    p = transcript_path(corpus_root, name)
    p.parent.mkdir(parents=True)
    p.write_text("the release's own words", encoding="utf-8")
    r = _run("--corpus", corpus_root, "--asr", tiny_asr, "--device", "cpu")
    assert r.exit_code == 1 and "not made by conilium corpus transcribe" in r.output
    assert p.read_text() == "the release's own words"


def test_long_clips_are_cut_into_equal_pieces_of_at_most_30_s(corpus_root, tiny_asr):
    sr = 16000
    x = np.arange(int(70 * sr), dtype=np.float32)
    parts = split_long(x)
    assert len(parts) == 3 and max(len(p) for p in parts) <= CHUNK_SECONDS * sr
    assert np.array_equal(np.concatenate(parts), x)
    assert len(split_long(x[: 30 * sr])) == 1
    # a 65 s clip is transcribed (three pieces joined), not cut at 30 s
    name = next(iter(load_corpus(corpus_root).clips))
    rng = np.random.default_rng(0)
    sf.write(str(corpus_root / "Audios" / name), (0.1 * rng.standard_normal(65 * sr)).astype(np.float32), sr,
             subtype="PCM_16")
    r = _run("--corpus", corpus_root, "--asr", tiny_asr, "--max-new-tokens", 4, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert transcript_path(corpus_root, name).is_file()


def test_a_model_that_hears_nothing_leaves_no_empty_files(corpus_root, tmp_path):
    silent = write_tiny_whisper_asr(tmp_path / "silent", seed=0, speak=False)
    r = _run("--corpus", corpus_root, "--asr", silent, "--max-new-tokens", 4, "--device", "cpu")
    assert r.exit_code == 0, r.output
    info = json.loads((transcripts_dir(corpus_root) / TRANSCRIPTION_FILE).read_text())
    corpus = load_corpus(corpus_root)
    t = corpus.transcripts()
    assert info["no_text"] and sorted(t.no_text) == sorted(info["no_text"]) and t.missing == t.no_text
    assert all(transcript_path(corpus_root, n).read_text().strip() for n in t.texts)


def test_not_a_whisper_registry_name(corpus_root):
    r = _run("--corpus", corpus_root, "--asr", "demo-wavlm")
    assert r.exit_code == 1 and "not a released Whisper model" in r.output

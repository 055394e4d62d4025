"""Clip names stay inside the corpus's Audios/: no '..', no absolute path, no symbolic link
out of it unless asked for."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conilium.cli.corpus import describe_corpus_cmd
from conilium.corpus import load_corpus
from conilium.errors import CorpusError
from test_corpus import DETAILED, HEADER, ROWS, make_corpus, write_wav

OUTSIDE_ROW = ",N,2.2,4.0,2.6,30,Male,Train"


@pytest.fixture
def outside(tmp_path):
    """A readable WAV file next to (not inside) the corpora of a test."""
    path = tmp_path / "outside.wav"
    write_wav(path, seconds=1.0)
    return path


def _with_name(root: Path, name: str) -> Path:
    """``root`` (a valid corpus) with one more consensus row whose FileName is ``name``."""
    labels = root / "Labels" / "labels_consensus.csv"
    labels.write_text(HEADER + "\n".join(ROWS + [name + OUTSIDE_ROW]) + "\n")
    return root


def test_dot_dot_and_absolute_file_names_are_refused(tmp_path, outside):
    root = make_corpus(tmp_path / "c")
    labels = root / "Labels" / "labels_consensus.csv"
    _with_name(root, "../../outside.wav")
    with pytest.raises(CorpusError, match=rf"{labels}:6: FileName '\.\./\.\./outside\.wav' leads out of Audios/"):
        load_corpus(root)
    with pytest.raises(CorpusError, match="leads out of Audios/"):  # also when durations are not read
        load_corpus(root, read_durations=False)
    _with_name(root, "sub/../../outside.wav")
    with pytest.raises(CorpusError, match=r":6: FileName 'sub/\.\./\.\./outside\.wav' leads out"):
        load_corpus(root)
    _with_name(root, str(outside))
    with pytest.raises(CorpusError, match=rf"{labels}:6: FileName '{outside}' is an absolute path"):
        load_corpus(root, allow_symlinks=True)  # allowing symlinks allows no absolute path


def test_detailed_labels_are_checked_too(tmp_path):
    root = make_corpus(tmp_path / "c", detailed=DETAILED + ['../x.wav,"W1; Sad; ; A:3.0; V:2.0; D:3.0;"'])
    with pytest.raises(CorpusError, match=r"labels_detailed.csv:5: FileName '\.\./x\.wav' leads out of Audios/"):
        load_corpus(root)


def test_symlink_out_of_audios_is_refused_unless_allowed(tmp_path, outside):
    root = _with_name(make_corpus(tmp_path / "c"), "linked.wav")
    (root / "Audios" / "linked.wav").symlink_to(outside)
    with pytest.raises(CorpusError, match=rf"labels_consensus.csv:6: FileName 'linked.wav' is a symbolic link to "
                                          rf"{outside}, outside .*--allow-symlinks"):
        load_corpus(root)
    corpus = load_corpus(root, allow_symlinks=True)
    assert corpus["linked.wav"].duration == pytest.approx(1.0)
    # a folder link leads out as well
    (root / "Audios" / "linked.wav").unlink()
    (root / "Audios" / "sub").symlink_to(outside.parent, target_is_directory=True)
    _with_name(root, "sub/outside.wav")
    with pytest.raises(CorpusError, match="FileName 'sub/outside.wav' is a symbolic link"):
        load_corpus(root)


def test_links_that_stay_inside_are_fine(tmp_path):
    """A link to another file of Audios/, and an Audios/ that is itself a link (a corpus
    on another disk), stay inside."""
    real = make_corpus(tmp_path / "real")
    _with_name(real, "alias.wav")
    (real / "Audios" / "alias.wav").symlink_to("MSP-PODCAST_0001_0001.wav")
    assert len(load_corpus(real)) == 5
    root = tmp_path / "linked"
    (root / "Labels").mkdir(parents=True)
    (root / "Labels" / "labels_consensus.csv").write_bytes((real / "Labels" / "labels_consensus.csv").read_bytes())
    (root / "Audios").symlink_to(real / "Audios", target_is_directory=True)
    assert list(load_corpus(root).clips) == list(load_corpus(real).clips)


def test_describe_corpus_option(tmp_path, outside):
    root = _with_name(make_corpus(tmp_path / "c"), "linked.wav")
    (root / "Audios" / "linked.wav").symlink_to(outside)
    refused = CliRunner().invoke(describe_corpus_cmd, ["--corpus", str(root), "--out", str(tmp_path / "r")])
    assert refused.exit_code == 1 and "FileName 'linked.wav' is a symbolic link" in refused.output
    assert not (tmp_path / "r" / "summary.json").exists()
    allowed = CliRunner().invoke(describe_corpus_cmd, ["--corpus", str(root), "--out", str(tmp_path / "r"),
                                                       "--allow-symlinks", "-q"])
    assert allowed.exit_code == 0, allowed.output
    assert (tmp_path / "r" / "summary.json").exists()


def test_extract_features_reads_nothing_outside(tmp_path, outside):
    """The command that used to extract ``../../outside.wav`` into the cache (exit status 0)."""
    root = _with_name(make_corpus(tmp_path / "c"), "../../outside.wav")
    out = tmp_path / "cache"
    argv = [sys.executable, "-m", "conilium.cli.extract", "--corpus", str(root), "--upstream", "demo-wavlm",
            "--random-init", "--out", str(out), "--quiet"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    assert r.returncode == 1, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("Error: ")
    assert "labels_consensus.csv:6: FileName '../../outside.wav' leads out of Audios/" in r.stderr
    assert not (out / "shards").exists() or not any((out / "shards").iterdir())

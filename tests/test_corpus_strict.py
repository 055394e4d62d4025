"""Strict label parsing: field counts, newline conventions, BOM, NUL bytes, csv errors."""

import shutil
from pathlib import Path

import pytest

from conilium.corpus import CONSENSUS_FILE, DETAILED_FILE, load_corpus
from conilium.errors import CorpusError

HEADER = "FileName,EmoClass,EmoAct,EmoVal,EmoDom,SpkrID,Gender,Split_Set"
ROWS = [
    "MSP-PODCAST_0001_0001.wav,N,2.2,4.0,2.6,30,Male,Train",
    "MSP-PODCAST_0001_0002.wav,S,3.0,2.0,3.0,31,Female,Development",
    "MSP-PODCAST_0001_0003.wav,,,,,Unknown,Unknown,Test3",
]
DETAILED = [
    'MSP-PODCAST_0001_0001.wav,"WORKER00001; Neutral; Sad,Other-bored; A:3.0; V:4.0; D:4.0;"',
    'MSP-PODCAST_0001_0001.wav,"WORKER00002; Neutral; ; A:2.0; V:4.0; D:3.0;"',
    'MSP-PODCAST_0001_0002.wav,"WORKER00001; Sad; Frustrated,Neutral; A:3.0; V:2.0; D:3.0;"',
]
COLUMNS_HEADER = "FileName,Workers,EmoClass_Major,EmoClass_Second,EmoAct,EmoVal,EmoDom"
COLUMNS = [
    'MSP-PODCAST_0001_0001.wav,WORKER00001,Neutral,"Sad,Other-bored",3.0,4.0,4.0',
    "MSP-PODCAST_0001_0001.wav,WORKER00002,Neutral,,2.0,4.0,3.0",
]
NEWLINES = {"LF": "\n", "CRLF": "\r\n", "CR": "\r"}
BOM = b"\xef\xbb\xbf"


def write_labels(root: Path, consensus=(HEADER, *ROWS), detailed=("FileName,EmoDetail", *DETAILED),
                 nl: str = "\n", bom: bool = False) -> Path:
    """Labels/ of a corpus root (no audio: load with ``read_durations=False``)."""
    labels = root / "Labels"
    labels.mkdir(parents=True)
    for name, lines in ((CONSENSUS_FILE, consensus), (DETAILED_FILE, detailed)):
        data = (nl.join(lines) + nl).encode("utf-8")
        (labels / name).write_bytes(BOM + data if bom else data)
    return root


def load(root: Path):
    return load_corpus(root, read_durations=False)


def as_json(corpus) -> dict:
    return {name: clip.to_json() for name, clip in corpus.clips.items()}


# ----------------------------------------------------------------------------- field counts


def test_unquoted_comma_in_emodetail_is_an_error(tmp_path):
    # Unquoted, "Sad,Concerned" splits EmoDetail in two: the secondaries and A/V/D were dropped.
    bad = "MSP-PODCAST_0001_0002.wav,WORKER00003; Sad; Sad,Concerned; A:3.0; V:2.0; D:3.0;"
    root = write_labels(tmp_path / "c", detailed=("FileName,EmoDetail", *DETAILED, bad))
    with pytest.raises(CorpusError, match=r"labels_detailed.csv:5: expected 2 fields, found 3; "
                                          r"quote any field that contains commas"):
        load(root)


def test_extra_field_in_column_layout_is_an_error(tmp_path):
    bad = "MSP-PODCAST_0001_0002.wav,WORKER00001,Sad,Frustrated,Neutral,3.0,2.0,3.0"
    root = write_labels(tmp_path / "c", detailed=(COLUMNS_HEADER, *COLUMNS, bad))
    with pytest.raises(CorpusError, match=r"labels_detailed.csv:4: expected 7 fields, found 8; quote"):
        load(root)


def test_extra_field_in_consensus_is_an_error(tmp_path):
    root = write_labels(tmp_path / "c", consensus=(HEADER, ROWS[0], ROWS[1] + ",extra", ROWS[2]))
    with pytest.raises(CorpusError, match=r"labels_consensus.csv:3: expected 8 fields, found 9; quote"):
        load(root)


@pytest.mark.parametrize("header, row, expected", [
    ("FileName,EmoDetail", "MSP-PODCAST_0001_0002.wav", 2),
    (COLUMNS_HEADER, "MSP-PODCAST_0001_0002.wav,WORKER00001,Sad", 7),
])
def test_missing_field_in_detailed_names_file_and_line(tmp_path, header, row, expected):
    root = write_labels(tmp_path / "c", detailed=(header, row))
    with pytest.raises(CorpusError, match=rf"labels_detailed.csv:2: expected {expected} fields, found "):
        load(root)


# ----------------------------------------------------------------------------- newline conventions


@pytest.mark.parametrize("nl", NEWLINES.values(), ids=NEWLINES.keys())
def test_demo_corpus_reads_alike_under_every_newline_convention(small_demo_corpus, tmp_path, nl):
    root = tmp_path / "c"
    shutil.copytree(small_demo_corpus / "Labels", root / "Labels")
    for name in (CONSENSUS_FILE, DETAILED_FILE):
        p = root / "Labels" / name
        p.write_bytes(p.read_bytes().replace(b"\n", nl.encode()))
    ref = load(small_demo_corpus)
    got = load(root)
    assert as_json(got) == as_json(ref) and got.detailed_layout == "emodetail"
    assert sum(len(c.annotations) for c in got) > 0


@pytest.mark.parametrize("nl", NEWLINES.values(), ids=NEWLINES.keys())
def test_line_numbers_count_under_every_newline_convention(tmp_path, nl):
    # A blank line 3 still counts; the bad consensus row is on line 5.
    consensus = (HEADER, ROWS[0], "", ROWS[1], "MSP-PODCAST_0001_0009.wav,Q,1,1,1,1,Male,Train")
    root = write_labels(tmp_path / "a", consensus=consensus, nl=nl)
    with pytest.raises(CorpusError, match=r"labels_consensus.csv:5: clip MSP-PODCAST_0001_0009.wav: unknown EmoClass"):
        load(root)
    detailed = ("FileName,EmoDetail", *DETAILED, "", 'MSP-PODCAST_0001_0002.wav,"W9; Sad; ; Q:1;"')
    root = write_labels(tmp_path / "b", detailed=detailed, nl=nl)
    with pytest.raises(CorpusError, match=r"labels_detailed.csv:6: malformed EmoDetail"):
        load(root)


def test_mixed_newlines_in_one_file(tmp_path):
    root = write_labels(tmp_path / "c")
    p = root / "Labels" / CONSENSUS_FILE
    lines = [HEADER, *ROWS, "MSP-PODCAST_0001_0009.wav,N,1,1,1,1,Male,Train,x"]
    p.write_bytes(f"{lines[0]}\r\n{lines[1]}\r{lines[2]}\n{lines[3]}\r\r\n{lines[4]}\n".encode())
    with pytest.raises(CorpusError, match=r"labels_consensus.csv:6: expected 8 fields, found 9"):
        load(root)


def test_quoted_field_running_over_lines_is_an_error(tmp_path):
    # The quote opened on line 3 is closed by the first quote of line 4.
    unbalanced = 'MSP-PODCAST_0001_0002.wav,"WORKER00003; Sad; ; A:3.0; V:2.0; D:3.0;'
    root = write_labels(tmp_path / "c", detailed=("FileName,EmoDetail", DETAILED[0], unbalanced, *DETAILED[1:]))
    with pytest.raises(CorpusError, match=r"labels_detailed.csv:3: quoted field runs on to line 4"):
        load(root)


def test_csv_error_names_file_and_line(tmp_path):
    huge = "MSP-PODCAST_0001_0002.wav," + "x" * 200_000
    root = write_labels(tmp_path / "c", detailed=("FileName,EmoDetail", DETAILED[0], huge), nl="\r")
    with pytest.raises(CorpusError, match=r"labels_detailed.csv:3: malformed CSV: field larger than field limit"):
        load(root)


# ----------------------------------------------------------------------------- BOM and NUL


@pytest.mark.parametrize("nl", NEWLINES.values(), ids=NEWLINES.keys())
def test_utf8_bom_is_accepted(tmp_path, nl):
    ref = load(write_labels(tmp_path / "plain"))
    got = load(write_labels(tmp_path / "bom", nl=nl, bom=True))
    assert as_json(got) == as_json(ref) and got.detailed_layout == "emodetail"
    assert [a.worker for a in got["MSP-PODCAST_0001_0001.wav"].annotations] == ["WORKER00001", "WORKER00002"]


@pytest.mark.parametrize("nl", NEWLINES.values(), ids=NEWLINES.keys())
@pytest.mark.parametrize("name", [CONSENSUS_FILE, DETAILED_FILE])
def test_nul_byte_names_file_and_line(tmp_path, nl, name):
    root = write_labels(tmp_path / "c", nl=nl)
    p = root / "Labels" / name
    lines = p.read_bytes().split(nl.encode())
    lines[2] = lines[2][:10] + b"\x00" + lines[2][10:]
    p.write_bytes(nl.encode().join(lines))
    with pytest.raises(CorpusError, match=rf"{name}:3: NUL byte"):
        load(root)


def test_utf16_file_is_a_corpus_error(tmp_path):
    root = write_labels(tmp_path / "c")
    p = root / "Labels" / CONSENSUS_FILE
    p.write_bytes(p.read_text().encode("utf-16"))
    with pytest.raises(CorpusError, match=r"labels_consensus.csv:1: NUL byte.*UTF-16"):
        load(root)

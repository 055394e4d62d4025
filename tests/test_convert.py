"""conilium corpus convert: IEMOCAP's EmoEvaluation files and CREMA-D's ratings to a manifest,
on small fixtures written in the corpora's documented formats with real WAV files."""

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from conilium.cli import main
from conilium.convert import convert_corpus
from conilium.corpus import load_corpus
from conilium.errors import CorpusError
from conilium.targets import training_set


def _wav(path: Path, seconds: float = 0.5):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * 16000)) / 16000
    sf.write(str(path), 0.1 * np.sin(2 * np.pi * 180 * t), 16000, subtype="PCM_16")


EVAL_S1 = """% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]

[6.2901 - 8.2357]\tSes01F_impro01_F000\tneu\t[2.5000, 2.5000, 2.5000]
C-E2:\tNeutral state;\t()
C-E3:\tNeutral state; Frustration;\t()
C-E4:\tSadness;\t()
C-F1:\tNeutral state;\t(curious)
A-E3:\tval 3; act 2; dom  2;\t()
A-F1:\tval 3; act 2; dom  1;\t()

[10.0100 - 11.3925]\tSes01F_impro01_M000\texc\t[4.0000, 3.5000, 3.0000]
C-E1:\tExcited; Happiness;\t()
C-E3:\tHappiness;\t()
C-E4:\tSurprise;\t(wow)

[14.8872 - 18.0175]\tSes01F_script01_1_F001\tfru\t[1.5000, 4.0000, 4.0000]
C-E1:\tFrustration; Anger;\t()
C-E2:\tAnger;\t()
"""
EVAL_S5 = """[1.0000 - 2.0000]\tSes05M_impro03_M000\txxx\t[3.0000, 3.0000, 3.0000]
C-E1:\tAnger;\t()
C-E2:\tSadness;\t()
"""


def make_iemocap(root: Path, s1: str = EVAL_S1) -> Path:
    for number, text in ((1, s1), (5, EVAL_S5)):
        session = root / f"Session{number}"
        (session / "dialog" / "EmoEvaluation").mkdir(parents=True)
        name = "Ses01F_impro01" if number == 1 else "Ses05M_impro03"
        (session / "dialog" / "EmoEvaluation" / f"{name}.txt").write_text(text)
        for line in text.splitlines():
            if line.startswith("["):
                turn = line.split("\t")[1]
                _wav(session / "sentences" / "wav" / turn.rpartition("_")[0] / f"{turn}.wav")
    (root / "Session1" / "dialog" / "transcriptions").mkdir()
    (root / "Session1" / "dialog" / "transcriptions" / "Ses01F_impro01.txt").write_text(
        "Ses01F_impro01_F000 [006.2901-008.2357]: Excuse me.\nSes01F_impro01_M000 [010.0100-011.3925]: Do you have "
        "your forms?\n")
    return root


def test_iemocap_to_a_manifest_read_as_any_corpus(tmp_path):
    src = make_iemocap(tmp_path / "IEMOCAP")
    out = tmp_path / "iemocap"
    r = CliRunner().invoke(main, ["corpus", "convert", "--from", "iemocap", str(src), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "4 clips" in r.output and "classes ang hap sad neu" in r.output
    c = load_corpus(out)
    assert c.classes.codes == ("ang", "hap", "sad", "neu") and len(c) == 4
    a = c["Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_F000.wav"]
    assert (a.emo_class, a.split, a.speaker, a.gender, a.transcript) == ("neu", "Train", "Ses01F", "Female",
                                                                          "Excuse me.")
    # C-E… evaluators only (not the actor's C-F1); secondaries after the first word; Other words kept as Other-…
    assert [x.worker for x in a.annotations] == ["E2", "E3", "E4"]
    assert [x.primary_class for x in a.annotations] == ["neu", "neu", "sad"]
    assert a.annotations[1].secondary == ("Other-Frustration",) and a.annotations[1].ignored_words() == [
        "Other-Frustration"]
    assert (a.val, a.act, a.dom) == (3.25, 3.25, 3.25)  # 2.5 on 1–5 → 1 + 1.5 · 1.5
    b = c["Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_M000.wav"]
    assert b.emo_class == "hap" and b.speaker == "Ses01M" and b.gender == "Male"  # excited merged into happy
    assert b.annotations[0].perceived_classes == ("hap",)
    assert c["Session1/sentences/wav/Ses01F_script01_1/Ses01F_script01_1_F001.wav"].emo_class == "O"
    t = c["Session5/sentences/wav/Ses05M_impro03/Ses05M_impro03_M000.wav"]
    assert t.emo_class == "X" and t.split == "Test1"
    kept, y, _ = training_set(c.split("Train"), "P")
    np.testing.assert_allclose(y[0], [0, 0, 1 / 3, 2 / 3], rtol=1e-6)
    # the audio was linked into --out: the source can go
    assert (out / "Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_F000.wav").is_file()


def test_iemocap_bad_lines_name_the_file_and_line(tmp_path):
    bad = EVAL_S1.replace("[10.0100 - 11.3925]\tSes01F_impro01_M000\texc\t[4.0000, 3.5000, 3.0000]",
                          "[10.0100 - 11.3925]\tSes01F_impro01_M000\texc\t[4.0000, 3.5000]")
    src = make_iemocap(tmp_path / "a", bad)
    with pytest.raises(CorpusError, match=r"Ses01F_impro01\.txt:11: turn Ses01F_impro01_M000: expected \[V, A, D\]"):
        convert_corpus("iemocap", src)
    src = make_iemocap(tmp_path / "b")
    (src / "Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_M000.wav").unlink()
    with pytest.raises(CorpusError, match=r"Ses01F_impro01\.txt:11: turn Ses01F_impro01_M000: audio file .* not "
                                          r"found"):
        convert_corpus("iemocap", src)
    assert not (src / "corpus.jsonl").exists() and not (src / "classes.json").exists()


CLIPS = ["1001_DFA_ANG_XX", "1001_IEO_SAD_HI", "1010_TIE_HAP_XX", "1011_IOM_NEU_XX", "1012_IWW_FEA_LO"]
RESPONSES = [  # localid, queryType, clipName, respEmo
    ("r1", 1, "1001_DFA_ANG_XX", "A"), ("r2", 1, "1001_DFA_ANG_XX", "A"), ("r3", 1, "1001_DFA_ANG_XX", "D"),
    ("r1", 2, "1001_DFA_ANG_XX", "N"),  # face only: not kept
    ("r4", 1, "1001_IEO_SAD_HI", "S"), ("r5", 1, "1001_IEO_SAD_HI", "N"),  # a tie: X
    ("r6", 1, "1010_TIE_HAP_XX", "H"), ("r7", 3, "1010_TIE_HAP_XX", "H"),
    ("r8", 1, "1011_IOM_NEU_XX", "N"), ("r9", 1, "1011_IOM_NEU_XX", "N"),
]


def make_crema(root: Path, *, responses=True) -> Path:
    for clip in CLIPS:
        _wav(root / "AudioWAV" / f"{clip}.wav")
    (root / "VideoDemographics.csv").write_text('ActorID,Age,Sex,Race,Ethnicity\n1001,51,Male,Caucasian,Not Hispanic\n'
                                                '1010,42,Female,Asian,Not Hispanic\n')
    if responses:
        lines = ["localid,sessionNums,queryType,questNum,pos,ans,ttr,numTries,clipNum,clipName,respEmo,respLevel"]
        lines += [f"{who},1,{q},1,1,{emo}_50,1200,0,1,{clip},{emo},50" for who, q, clip, emo in RESPONSES]
        (root / "finishedResponses.csv").write_text("\n".join(lines) + "\n")
    else:
        (root / "processedResults").mkdir()
        (root / "processedResults" / "tabulatedVotes.csv").write_text(
            "A,D,F,H,N,S,fileName,numResponses,agreement,emoVote\n"
            "2,1,0,0,0,0,1001_DFA_ANG_XX,3,0.67,A\n0,0,0,0,1,1,1001_IEO_SAD_HI,2,0.5,N:S\n"
            "0,0,0,2,0,0,1010_TIE_HAP_XX,2,1,H\n")
    return root


def test_crema_d_voice_ratings_to_a_manifest(tmp_path):
    src = make_crema(tmp_path / "CREMA-D")
    convert_corpus("crema-d", src)
    c = load_corpus(src)
    assert c.classes.codes == ("A", "D", "F", "H", "N", "S") and c.classes.name_of["A"] == "Angry"
    a = c["AudioWAV/1001_DFA_ANG_XX.wav"]
    assert (a.emo_class, a.speaker, a.gender, a.split) == ("A", "1001", "Male", "Development")
    assert [(x.worker, x.primary_class) for x in a.annotations] == [("r1", "A"), ("r2", "A"), ("r3", "D")]
    assert c["AudioWAV/1001_IEO_SAD_HI.wav"].emo_class == "X"
    h = c["AudioWAV/1010_TIE_HAP_XX.wav"]
    assert (h.split, h.gender, len(h.annotations)) == ("Test1", "Female", 1)
    f = c["AudioWAV/1012_IWW_FEA_LO.wav"]  # no rating: the acted emotion, no annotations
    assert (f.emo_class, f.annotations, f.split, f.gender) == ("F", (), "Train", "Unknown")


def test_crema_d_tabulated_votes_and_bad_rows(tmp_path):
    src = make_crema(tmp_path / "t", responses=False)
    convert_corpus("crema-d", src, tmp_path / "out")
    c = load_corpus(tmp_path / "out")
    assert [x.primary_class for x in c["AudioWAV/1001_DFA_ANG_XX.wav"].annotations] == ["A", "A", "D"]
    assert c["AudioWAV/1001_IEO_SAD_HI.wav"].emo_class == "X"
    text = (src / "processedResults" / "tabulatedVotes.csv").read_text().replace("0,0,0,2,0,0,1010", "0,0,x,2,0,0,1010")
    (src / "processedResults" / "tabulatedVotes.csv").write_text(text)
    with pytest.raises(CorpusError, match=r"tabulatedVotes\.csv:4: clip 1010_TIE_HAP_XX: column F is not a count"):
        convert_corpus("crema-d", src)
    src = make_crema(tmp_path / "r")
    good = (src / "finishedResponses.csv").read_text()
    (src / "finishedResponses.csv").write_text(good.replace("1011_IOM_NEU_XX,N,50", "1011_IOM_NEU_XX,Q,50", 1))
    with pytest.raises(CorpusError, match=r"finishedResponses\.csv:10: clip 1011_IOM_NEU_XX: unknown class 'Q'"):
        convert_corpus("crema-d", src)
    (src / "finishedResponses.csv").write_text(good)
    (src / "AudioWAV" / "1011_IOM_NEU_XX.wav").unlink()
    with pytest.raises(CorpusError, match=r"finishedResponses\.csv:10: clip 1011_IOM_NEU_XX: audio file .* not found"):
        convert_corpus("crema-d", src)
    assert not (src / "corpus.jsonl").exists() and not (src / "classes.json").exists()  # nothing written

"""``conilium corpus convert``: a corpus manifest (``corpus.jsonl`` + ``classes.json``) from the
documented layouts of two public corpora with per-annotator labels.

**IEMOCAP** (``--from iemocap``; the release's ``Session1`` … ``Session5`` folders):

* ``Session*/dialog/EmoEvaluation/*.txt``: per utterance a line
  ``[START - END]<TAB>TURN_NAME<TAB>cat<TAB>[V, A, D]`` followed by the evaluators' lines
  ``C-E1:<TAB>Frustration; Anger;<TAB>(comment)`` (first word: the primary, the rest:
  secondaries). The ``C-E…`` evaluators are kept; the actors' self-assessments (``C-F…``,
  ``C-M…``) and the dimensional ``A-…`` lines are not.
* audio: ``Session*/sentences/wav/<dialog>/<TURN_NAME>.wav``; transcripts, when present,
  from ``Session*/dialog/transcriptions/<dialog>.txt``.
* classes: the usual four, ``ang`` Angry, ``hap`` Happy (Excited merged into it, as is
  common), ``sad`` Sad, ``neu`` Neutral; other words (Frustration, Surprise, …) are Other.
  Consensus: the file's ``cat`` (``xxx`` → X, other categories → O).
* speaker ``Ses0NF``/``Ses0NM`` (the utterance's ``F…``/``M…`` suffix), gender from it;
  Session 5 is Test1, Session 4 Development, Sessions 1–3 Train.
* ``[V, A, D]`` (1–5) is rescaled to the 1–7 scale of the attributes: ``1 + (x − 1) · 1.5``.

**CREMA-D** (``--from crema-d``; the repository's root):

* audio: ``AudioWAV/<clip>.wav``, ``<clip>`` = ``ACTOR_SENTENCE_EMOTION_LEVEL``.
* ratings: ``finishedResponses.csv`` (one row per rating: ``localid`` the rater, ``queryType``
  1 = voice only, ``clipName``, ``respEmo`` one of A D F H N S); only voice-only ratings are
  kept. Without it, ``processedResults/tabulatedVotes.csv`` (``fileName`` and the counts
  ``A D F H N S``), each vote an anonymous annotator ``vote1``, ``vote2``, ….
* classes: A Angry, D Disgust, F Fear, H Happy, N Neutral, S Sad. Consensus: the ratings'
  plurality (X on a tie), the acted emotion for a clip with no rating.
* speaker: the actor id; gender from ``VideoDemographics.csv`` (``ActorID``, ``Sex``) when
  present; actors whose id ends in 0 are Test1, in 1 Development, the rest Train.

The manifest and ``classes.json`` are written under temporary names and renamed when
complete; with ``out`` other than the source, the audio files are hard-linked (copied
across file systems) into ``out`` under the same relative paths first. Every malformed
line is a :class:`~conilium.errors.CorpusError` naming the file and the line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from contextlib import closing
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from .classes import CLASSES_FILE, ClassSet, build_class_set
from .corpus import Annotation, _Lines, _check_width, _open_csv
from .errors import CorpusError
from .manifest import plurality
from .util import atomic_path

SOURCES = ("iemocap", "crema-d")
MANIFEST_NAME = "corpus.jsonl"

IEMOCAP_CLASSES = build_class_set([
    ("ang", "Angry", ["anger"]),
    ("hap", "Happy", ["happiness", "excited", "exc"]),
    ("sad", "Sad", ["sadness"]),
    ("neu", "Neutral", ["neutral state"]),
], "IEMOCAP classes")
_IEMOCAP_CAT = {"ang": "ang", "hap": "hap", "exc": "hap", "sad": "sad", "neu": "neu", "xxx": "X"}
_IEMOCAP_SPLIT = {1: "Train", 2: "Train", 3: "Train", 4: "Development", 5: "Test1"}
_TURN = re.compile(r"^\[\s*([0-9.]+)\s*-\s*([0-9.]+)\s*\]\s+(\S+)\s+(\S+)\s+\[\s*([^\]]*)\]\s*$")
_EVAL = re.compile(r"^C-(E\d+)\s*:\s*(.*)$")

CREMA_CLASSES = build_class_set([
    ("A", "Angry", ["anger", "ang"]), ("D", "Disgust", ["dis"]), ("F", "Fear", ["fea"]),
    ("H", "Happy", ["happy/joy", "hap"]), ("N", "Neutral", ["neu"]), ("S", "Sad", ["sad"]),
], "CREMA-D classes")
_CREMA_ACTED = {"ANG": "A", "DIS": "D", "FEA": "F", "HAP": "H", "NEU": "N", "SAD": "S"}


def _word(w: str, classes: ClassSet) -> str:
    """An annotator's word as the manifest takes it: a class word, or ``Other-<word>``."""
    w = w.strip()
    if classes.word_to_code(w) is not None or w.lower().startswith("other"):
        return w
    return f"Other-{w}"


def _row(audio: str, split: str, speaker: Optional[str], gender: str, label: Optional[str],
         annotations: List[Annotation], **extra) -> dict:
    row = {"audio": audio, "split": split, "speaker": speaker, "gender": gender, "label": label or "",
           "annotations": [{"annotator": a.worker, "primary": a.primary, "secondary": list(a.secondary)}
                           for a in annotations]}
    row.update({k: v for k, v in extra.items() if v is not None})
    return row


# ----------------------------------------------------------------------------- IEMOCAP

def _iemocap_transcripts(session: Path) -> Dict[str, str]:
    out: Dict[str, str] = {}
    folder = session / "dialog" / "transcriptions"
    for path in sorted(folder.glob("*.txt")) if folder.is_dir() else []:
        with open(path, "rb") as f:
            for text in _Lines(f, path):
                name, sep, said = text.partition(":")
                if sep and name.strip():
                    out[name.split()[0]] = said.strip()
    return out


def _iemocap_file(path: Path, session: Path, number: int, transcripts: Dict[str, str], src: Path) -> List[dict]:
    rows: List[dict] = []
    current: Optional[dict] = None

    def close():
        if current is not None:
            rows.append(_row(current["audio"], current["split"], current["speaker"], current["gender"],
                             current["label"], current["annotations"], arousal=current["a"],
                             valence=current["v"], dominance=current["d"],
                             transcript=transcripts.get(current["turn"])))

    with open(path, "rb") as f:
        lines = _Lines(f, path)
        for text in lines:
            line = text.strip()
            if not line or line.startswith("%"):
                continue
            if line.startswith("["):
                m = _TURN.match(line)
                if m is None:
                    raise CorpusError(f"{path}:{lines.line}: malformed utterance line {line!r}; expected "
                                      f"'[START - END]<TAB>TURN_NAME<TAB>cat<TAB>[V, A, D]'")
                close()
                turn, cat = m.group(3), m.group(4).lower()
                try:
                    vad = [float(x) for x in m.group(5).split(",")]
                except ValueError:
                    vad = []
                if len(vad) != 3:
                    raise CorpusError(f"{path}:{lines.line}: turn {turn}: expected [V, A, D], got [{m.group(5)}]")
                dialog, _, suffix = turn.rpartition("_")
                if not dialog or suffix[:1] not in ("F", "M"):
                    raise CorpusError(f"{path}:{lines.line}: turn name {turn!r}: expected <dialog>_F… or <dialog>_M…")
                wav = session / "sentences" / "wav" / dialog / f"{turn}.wav"
                if not wav.is_file():
                    raise CorpusError(f"{path}:{lines.line}: turn {turn}: audio file {wav} not found")
                scale = [None if x != x else round(1 + (x - 1) * 1.5, 4) for x in vad]
                current = {"turn": turn, "audio": wav.relative_to(src).as_posix(), "split": _IEMOCAP_SPLIT[number],
                           "speaker": f"Ses{number:02d}{suffix[0]}",
                           "gender": "Female" if suffix[0] == "F" else "Male",
                           "label": _IEMOCAP_CAT.get(cat, "O"), "annotations": [],
                           "v": scale[0], "a": scale[1], "d": scale[2]}
                continue
            m = _EVAL.match(line)
            if m is None:
                continue  # A-… (dimensional) lines and self-assessments C-F…/C-M… are not kept
            if current is None:
                raise CorpusError(f"{path}:{lines.line}: evaluator line before any utterance line")
            labels, _, _ = m.group(2).partition("(")
            words = [w.strip() for w in labels.replace("\t", " ").split(";") if w.strip()]
            if not words:
                raise CorpusError(f"{path}:{lines.line}: evaluator {m.group(1)} gives no emotion")
            words = [_word(w, IEMOCAP_CLASSES) for w in words]
            secondary = tuple(dict.fromkeys(w for w in words[1:] if w != words[0]))
            current["annotations"].append(Annotation(worker=m.group(1), primary=words[0], secondary=secondary))
    close()
    return rows


def iemocap_rows(src: Path) -> Tuple[List[dict], ClassSet]:
    sessions = sorted(p for p in src.glob("Session[1-5]") if p.is_dir())
    if not sessions:
        raise CorpusError(f"{src}: no Session1 … Session5 folder (expected IEMOCAP's release layout)")
    rows: List[dict] = []
    for session in sessions:
        number = int(session.name[-1])
        folder = session / "dialog" / "EmoEvaluation"
        files = sorted(folder.glob("*.txt")) if folder.is_dir() else []
        if not files:
            raise CorpusError(f"{folder}: no evaluation files (*.txt)")
        transcripts = _iemocap_transcripts(session)
        for path in files:
            rows += _iemocap_file(path, session, number, transcripts, src)
    return rows, IEMOCAP_CLASSES


# ----------------------------------------------------------------------------- CREMA-D

def _csv_rows(path: Path, needed: Tuple[str, ...]):
    header, records = _open_csv(path)
    missing = [c for c in needed if c not in header]
    if missing:
        records.close()
        raise CorpusError(f"{path}:1: missing column(s) {', '.join(missing)}")
    return header, records


def _clip_name(value: str) -> str:
    return Path(value.strip()).stem


def _crema_votes(src: Path, known: Dict[str, Path]) -> Dict[str, List[Annotation]]:
    votes: Dict[str, List[Annotation]] = {}
    responses = src / "finishedResponses.csv"
    tabulated = src / "processedResults" / "tabulatedVotes.csv"
    if responses.is_file():
        header, records = _csv_rows(responses, ("localid", "queryType", "clipName", "respEmo"))
        with closing(records):
            idx = {c: header.index(c) for c in ("localid", "queryType", "clipName", "respEmo")}
            for line, row in records:
                if not row or all(not x.strip() for x in row):
                    continue
                _check_width(row, header, responses, line)
                if row[idx["queryType"]].strip() not in ("1", "1.0"):
                    continue  # face-only and audio-visual ratings
                clip, emo = _clip_name(row[idx["clipName"]]), row[idx["respEmo"]].strip()
                if CREMA_CLASSES.word_to_code(emo) is None:
                    raise CorpusError(f"{responses}:{line}: clip {clip}: unknown class {emo!r}; expected one of "
                                      f"{', '.join(CREMA_CLASSES.codes)}")
                if clip not in known:
                    raise CorpusError(f"{responses}:{line}: clip {clip}: audio file {src / 'AudioWAV' / clip}.wav "
                                      f"not found")
                votes.setdefault(clip, []).append(Annotation(worker=row[idx["localid"]].strip(),
                                                             primary=CREMA_CLASSES.word_to_code(emo)))
        return votes
    if tabulated.is_file():
        cols = ("fileName",) + CREMA_CLASSES.codes
        header, records = _csv_rows(tabulated, cols)
        with closing(records):
            idx = {c: header.index(c) for c in cols}
            for line, row in records:
                if not row or all(not x.strip() for x in row):
                    continue
                _check_width(row, header, tabulated, line)
                clip = _clip_name(row[idx["fileName"]])
                if clip not in known:
                    raise CorpusError(f"{tabulated}:{line}: clip {clip}: audio file {src / 'AudioWAV' / clip}.wav "
                                      f"not found")
                anns = []
                for code in CREMA_CLASSES.codes:
                    text = row[idx[code]].strip() or "0"
                    try:
                        n = int(float(text))
                    except ValueError:
                        raise CorpusError(f"{tabulated}:{line}: clip {clip}: column {code} is not a count: "
                                          f"{text!r}") from None
                    if n < 0:
                        raise CorpusError(f"{tabulated}:{line}: clip {clip}: negative count in column {code}")
                    anns += [code] * n
                votes[clip] = [Annotation(worker=f"vote{k + 1}", primary=c) for k, c in enumerate(anns)]
        return votes
    raise CorpusError(f"{src}: no ratings: expected finishedResponses.csv or processedResults/tabulatedVotes.csv")


def _crema_genders(src: Path) -> Dict[str, str]:
    path = src / "VideoDemographics.csv"
    if not path.is_file():
        return {}
    header, records = _csv_rows(path, ("ActorID", "Sex"))
    out = {}
    with closing(records):
        for line, row in records:
            if not row or all(not x.strip() for x in row):
                continue
            _check_width(row, header, path, line)
            sex = row[header.index("Sex")].strip().capitalize()
            out[row[header.index("ActorID")].strip()] = sex if sex in ("Male", "Female") else "Unknown"
    return out


def crema_rows(src: Path) -> Tuple[List[dict], ClassSet]:
    folder = src / "AudioWAV"
    wavs = sorted(folder.glob("*.wav")) if folder.is_dir() else []
    if not wavs:
        raise CorpusError(f"{folder}: no WAV files (expected CREMA-D's AudioWAV/ folder)")
    known = {p.stem: p for p in wavs}
    votes = _crema_votes(src, known)
    genders = _crema_genders(src)
    rows = []
    for clip, path in known.items():
        parts = clip.split("_")
        if len(parts) < 3 or not parts[0].isdigit() or parts[2] not in _CREMA_ACTED:
            raise CorpusError(f"{path}: file name {clip!r}: expected ACTOR_SENTENCE_EMOTION_LEVEL (e.g. "
                              f"1001_DFA_ANG_XX)")
        actor = parts[0]
        split = {"0": "Test1", "1": "Development"}.get(actor[-1], "Train")
        anns = votes.get(clip, [])
        label = plurality(anns) if anns else _CREMA_ACTED[parts[2]]
        rows.append(_row(path.relative_to(src).as_posix(), split, actor, genders.get(actor, "Unknown"), label,
                         anns))
    return rows, CREMA_CLASSES


# ----------------------------------------------------------------------------- writing

READERS: Dict[str, Callable[[Path], Tuple[List[dict], ClassSet]]] = {"iemocap": iemocap_rows,
                                                                      "crema-d": crema_rows}


def _place_audio(src: Path, out: Path, rows: List[dict]) -> None:
    for r in rows:
        target = out / r["audio"]
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src / r["audio"], target)
        except OSError:
            shutil.copy2(src / r["audio"], target)


def convert_corpus(source: str, src, out=None) -> dict:
    """Write ``corpus.jsonl`` and ``classes.json`` for the corpus ``src`` of kind ``source``
    (:data:`SOURCES`) into ``out`` (default: ``src``); return counts per split and class."""
    if source not in READERS:
        raise CorpusError(f"unknown corpus kind {source!r}; expected one of {', '.join(SOURCES)}")
    src = Path(src)
    if not src.is_dir():
        raise CorpusError(f"{src}: source directory not found")
    out = src if out is None else Path(out)
    rows, classes = READERS[source](src)
    if not rows:
        raise CorpusError(f"{src}: no clips found")
    if out.resolve() != src.resolve():
        _place_audio(src, out, rows)
    with atomic_path(out / CLASSES_FILE) as tmp:
        tmp.write_text(json.dumps(classes.to_json(), indent=2) + "\n", encoding="utf-8")
    with atomic_path(out / MANIFEST_NAME) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    counts: Dict[str, Counter] = {}
    for r in rows:
        counts.setdefault(r["split"], Counter())[r["label"] or "unlabelled"] += 1
    return {"clips": len(rows), "manifest": str(out / MANIFEST_NAME), "classes": list(classes.codes),
            "splits": {s: dict(c) for s, c in counts.items()}}

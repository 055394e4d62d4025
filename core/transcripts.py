"""Transcripts of a corpus: one UTF-8 text file per clip in ``Transcripts/`` beside ``Audios/``.

The MSP-Podcast layout keeps the words spoken in each clip as ``Transcripts/<clip stem>.txt``
(``Audios/MSP-PODCAST_0001_0008.wav`` → ``Transcripts/MSP-PODCAST_0001_0008.txt``; a clip
in a subfolder of ``Audios/`` has its transcript in the same subfolder of ``Transcripts/``).
Every file must be UTF-8 text (a byte-order mark is allowed) with at least one
non-blank character; an undecodable, binary or empty file is a
:class:`~conilium.errors.CorpusError` naming the file, the clip and the encoding expected.
A text is read with its surrounding whitespace stripped and every run of whitespace inside
it (line breaks included) made one space.

Clips without a transcript are never read as empty strings: :func:`load_transcripts`
lists them (:attr:`Transcripts.missing`), :meth:`Transcripts.require_all` refuses them
with a summary (how many, the first names), and ``describe-corpus`` reports the coverage.

``conilium corpus transcribe`` writes these files with a Whisper model and records how it
made them in ``Transcripts/transcription.json`` (:data:`TRANSCRIPTION_FILE`); a clip in
which the model heard no words gets no file and is listed there under ``"no_text"``, so
that it is reported as missing, with that reason, rather than read as an empty string.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Dict, Iterable, List, Optional

from .errors import CorpusError

TRANSCRIPTS_DIR = "Transcripts"
TRANSCRIPT_SUFFIX = ".txt"
#: How ``conilium corpus transcribe`` made the transcripts (model, revision, settings, clips without words).
TRANSCRIPTION_FILE = "transcription.json"
ENCODING = "UTF-8"
#: Clip names shown in a summary of missing transcripts; the rest are counted.
SHOWN_NAMES = 10
_SPACE = re.compile(r"\s+")


def transcripts_dir(root) -> Path:
    return Path(root) / TRANSCRIPTS_DIR


def transcript_path(root, name: str) -> Path:
    """``Transcripts/<clip stem>.txt`` of clip ``name`` (a FileName of the label files) under ``root``."""
    rel = PurePosixPath(name).with_suffix(TRANSCRIPT_SUFFIX)
    return transcripts_dir(root).joinpath(*rel.parts)


def audio_transcript_path(audio, folder=None) -> Path:
    """Where the transcript of audio file ``audio`` is (``predict --run`` of a fusion run):
    ``folder/<audio stem>.txt`` when ``folder`` is given; else the corpus layout,
    ``Transcripts/`` beside the ``Audios/`` folder that holds the file (in the same subfolder),
    or, when no folder above it is called ``Audios``, ``../Transcripts/<stem>.txt`` relative to
    the file's folder."""
    audio = Path(audio)
    if folder is not None:
        return Path(folder) / (audio.stem + TRANSCRIPT_SUFFIX)
    for parent in audio.parents:
        if parent.name == "Audios":
            rel = audio.relative_to(parent).with_suffix(TRANSCRIPT_SUFFIX)
            return transcripts_dir(parent.parent) / rel
    return transcripts_dir(audio.parent.parent) / (audio.stem + TRANSCRIPT_SUFFIX)


def read_transcript(path, clip: Optional[str] = None) -> str:
    """The text of one transcript file, stripped and with its whitespace made single spaces.

    An undecodable or binary file, or one with no text, is a CorpusError naming the file,
    the clip and the encoding expected (UTF-8)."""
    path = Path(path)
    who = f"{path}" + (f" (transcript of clip {clip})" if clip else "")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CorpusError(f"{who}: cannot read: {e.strerror or e}") from None
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise CorpusError(f"{who}: NUL byte at byte {nul}; transcripts must be {ENCODING} text "
                          f"(is this file UTF-16 or binary?)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{who}: not {ENCODING} text ({e.reason} at byte {e.start}); transcripts must be "
                          f"{ENCODING}-encoded (convert it, e.g. iconv -f LATIN1 -t UTF-8)") from None
    text = _SPACE.sub(" ", text).strip()
    if not text:
        raise CorpusError(f"{who}: empty transcript (no text; {ENCODING} expected); remove the file if the "
                          f"clip has no transcript, so that it is reported as missing")
    return text


def read_transcription_info(root) -> Optional[dict]:
    """``Transcripts/transcription.json`` as written by ``conilium corpus transcribe``, or None."""
    path = transcripts_dir(root) / TRANSCRIPTION_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CorpusError(f"{path}: unreadable ({e}); remove it or run conilium corpus transcribe again") from None
    if not isinstance(info, dict):
        raise CorpusError(f"{path}: not a JSON object")
    return info


def summarize_names(names: List[str], shown: int = SHOWN_NAMES) -> str:
    """``a, b, c`` or ``a, b, … and 7 more``."""
    head = ", ".join(names[:shown])
    return head + (f", … and {len(names) - shown} more" if len(names) > shown else "")


@dataclass
class Transcripts:
    """The transcripts of a corpus's clips: texts by clip name (in clip order) and the clips without one."""

    root: Path
    texts: Dict[str, str]
    missing: List[str] = field(default_factory=list)  # clip order
    no_text: List[str] = field(default_factory=list)  # missing because the ASR heard no words (transcription.json)
    transcription: Optional[dict] = None  # Transcripts/transcription.json, when the ASR made them

    @property
    def num_clips(self) -> int:
        return len(self.texts) + len(self.missing)

    def missing_summary(self) -> str:
        """How many clips have no transcript, and which (the first :data:`SHOWN_NAMES`)."""
        if not self.missing:
            return f"every clip of {self.num_clips} has a transcript"
        where = transcripts_dir(self.root)
        text = (f"{len(self.missing)} of {self.num_clips} clip(s) have no transcript "
                f"({where}/<clip>{TRANSCRIPT_SUFFIX}): {summarize_names(self.missing)}")
        if self.no_text:
            text += (f"; {len(self.no_text)} of them because the ASR heard no words in them "
                     f"({TRANSCRIPTION_FILE}: no_text)")
        return text

    def require_all(self) -> "Transcripts":
        """Self when every clip has a transcript; else a CorpusError saying how many lack one and which."""
        if self.missing:
            raise CorpusError(f"{self.missing_summary()}; write them, or make them with "
                              f"conilium corpus transcribe --corpus {self.root} --asr MODEL")
        return self

    def in_order(self, names: Iterable[str]) -> List[str]:
        """The texts of ``names``, in that order (each must have one: see :meth:`require_all`)."""
        out = []
        for n in names:
            if n not in self.texts:
                raise CorpusError(f"clip {n}: no transcript ({transcript_path(self.root, n)})")
            out.append(self.texts[n])
        return out

    def fingerprint(self, names: Optional[Iterable[str]] = None) -> str:
        """SHA-256 of the transcripts of ``names`` (default: every clip with one), in that order,
        each as its clip name and text: a cache made from other transcripts has another one."""
        return transcripts_fingerprint(self.texts, self.texts.keys() if names is None else names)

    def coverage(self) -> dict:
        """Counts for ``describe-corpus``: clips with and without a transcript, the first names missing."""
        return {"folder": transcripts_dir(self.root).is_dir(), "clips": self.num_clips,
                "with_transcript": len(self.texts), "missing": len(self.missing),
                "missing_first": self.missing[:SHOWN_NAMES], "no_text": len(self.no_text),
                "asr": None if self.transcription is None else self.transcription.get("asr")}


def transcripts_fingerprint(texts: Dict[str, str], names: Iterable[str]) -> str:
    h = hashlib.sha256()
    for n in names:
        h.update(n.encode("utf-8") + b"\x00" + texts[n].encode("utf-8") + b"\x00")
    return h.hexdigest()


def load_transcripts(root, names: Iterable[str], given: Optional[Dict[str, str]] = None) -> Transcripts:
    """The transcripts of clips ``names`` under corpus ``root`` (see the module's docstring);
    ``given`` maps clips to texts a corpus manifest holds (its ``transcript`` field), which
    come before the files.

    A bad file is a CorpusError naming it; a clip without a file is listed in
    :attr:`Transcripts.missing` (none is read as an empty string)."""
    root = Path(root)
    info = read_transcription_info(root)
    no_text_listed = set((info or {}).get("no_text") or ())
    texts: Dict[str, str] = {}
    missing: List[str] = []
    no_text: List[str] = []
    for n in names:
        p = transcript_path(root, n)
        text = (given or {}).get(n)
        if text is not None and " ".join(text.split()):
            texts[n] = " ".join(text.split())
        elif p.is_file():
            texts[n] = read_transcript(p, n)
        else:
            missing.append(n)
            if n in no_text_listed:
                no_text.append(n)
    return Transcripts(root=root, texts=texts, missing=missing, no_text=no_text, transcription=info)

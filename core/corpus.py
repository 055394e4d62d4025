"""Reader of the MSP-Podcast release layout.

A corpus root holds ``Audios/`` (16 kHz WAV files) and ``Labels/`` with

* ``labels_consensus.csv``: ``FileName,EmoClass,EmoAct,EmoVal,EmoDom,SpkrID,Gender,Split_Set``,
  one row per clip;
* ``labels_detailed.csv``: one row per annotation, either as ``FileName,EmoDetail`` with
  ``EmoDetail = "WORKER; Primary; Sec1,Sec2; A:x; V:y; D:z;"`` (releases 1.7 to 1.12) or
  with separate columns ``Workers``/``WorkerID``, ``EmoClass_Major``, ``EmoClass_Second``,
  ``EmoAct``, ``EmoVal``, ``EmoDom`` (older releases).

:func:`load_corpus` returns a :class:`Corpus` of :class:`Clip` records, each with its
consensus label, every :class:`Annotation`, its duration read from the audio header,
speaker, gender and split. Every malformed line is a :class:`~conilium.errors.CorpusError`
naming the file and the line.

A ``FileName`` names a file inside ``Audios/``: an absolute path or a ``..`` component is
refused, and so is a name that leads outside ``Audios/`` through a symbolic link, unless
the caller allows symlinked audio (``allow_symlinks``, ``--allow-symlinks``).
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
from collections import Counter
from contextlib import closing
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import soundfile as sf

from . import CLASSES, NON_TARGET_CONSENSUS
from .classes import MSP_PODCAST, ClassSet
from .errors import CorpusError

CONSENSUS_FILE = "labels_consensus.csv"
DETAILED_FILE = "labels_detailed.csv"
CONSENSUS_COLUMNS = ("FileName", "EmoClass", "EmoAct", "EmoVal", "EmoDom", "SpkrID", "Gender", "Split_Set")
SPLITS = ("Train", "Development", "Test1", "Test2", "Test3")
#: Splits whose clips must carry a consensus label.
LABELLED_SPLITS = ("Train", "Development")
GENDERS = ("Male", "Female", "Unknown")
#: What ``--allow-symlinks`` does, for every command that reads a corpus.
ALLOW_SYMLINKS_HELP = ("Read audio through symbolic links in Audios/ that point outside it (refused by "
                       "default: every FileName must resolve inside Audios/).")

def word_to_class(word: str) -> Optional[str]:
    """Class letter of an emotion word, or None for Other, ``Other-…`` and non-target words."""
    return MSP_PODCAST.word_to_code(word)


@dataclass(frozen=True)
class Annotation:
    """One annotator's judgement of a clip: a primary emotion and a set of secondary ones.

    Words are kept as written in the label file; :attr:`primary_class` and
    :attr:`secondary_classes` give the target classes they map to (Other and
    non-target words map to nothing).
    """

    worker: str
    primary: str
    secondary: Tuple[str, ...] = ()
    act: Optional[float] = None
    val: Optional[float] = None
    dom: Optional[float] = None
    #: The class set its words map to (None: MSP-Podcast's eight).
    classes: Optional[ClassSet] = field(default=None, compare=False, repr=False)

    @property
    def class_set(self) -> ClassSet:
        return self.classes or MSP_PODCAST

    @property
    def primary_class(self) -> Optional[str]:
        return self.class_set.word_to_code(self.primary)

    @property
    def secondary_classes(self) -> Tuple[str, ...]:
        out = []
        for w in self.secondary:
            c = self.class_set.word_to_code(w)
            if c is not None and c not in out:
                out.append(c)
        return tuple(out)

    @property
    def perceived_classes(self) -> Tuple[str, ...]:
        """Primary ∪ secondaries, as target classes, each at most once (the S targets' unit)."""
        out = []
        p = self.primary_class
        if p is not None:
            out.append(p)
        for c in self.secondary_classes:
            if c not in out:
                out.append(c)
        return tuple(out)

    def ignored_words(self) -> List[str]:
        """Words of this annotation that map to no target class (Other, non-target words)."""
        return [w for w in (self.primary,) + tuple(self.secondary) if self.class_set.word_to_code(w) is None]

    def to_json(self) -> dict:
        return {"worker": self.worker, "primary": self.primary, "secondary": list(self.secondary),
                "act": self.act, "val": self.val, "dom": self.dom}

    @classmethod
    def from_json(cls, d: dict, classes: Optional[ClassSet] = None) -> "Annotation":
        return cls(worker=d["worker"], primary=d["primary"], secondary=tuple(d.get("secondary", ())),
                   act=d.get("act"), val=d.get("val"), dom=d.get("dom"), classes=classes)


@dataclass(frozen=True)
class Clip:
    """One audio segment: a row of labels_consensus.csv plus its annotations."""

    name: str
    split: str
    emo_class: Optional[str]  # consensus letter (A..N, O, X) or None where the split is unlabelled
    speaker: Optional[str]  # None for "Unknown"
    gender: str
    duration: Optional[float]  # seconds, from the audio header
    act: Optional[float] = None
    val: Optional[float] = None
    dom: Optional[float] = None
    annotations: Tuple[Annotation, ...] = ()
    transcript: Optional[str] = None
    #: The corpus's class set (None: MSP-Podcast's eight).
    classes: Optional[ClassSet] = field(default=None, compare=False, repr=False)

    @property
    def class_set(self) -> ClassSet:
        return self.classes or MSP_PODCAST

    @property
    def scoreable(self) -> bool:
        """True when the consensus label is one of the corpus's target classes."""
        return self.emo_class in self.class_set.codes

    def to_json(self) -> dict:
        d = {"name": self.name, "split": self.split, "emo_class": self.emo_class,
             "speaker": self.speaker, "gender": self.gender, "duration": self.duration,
             "act": self.act, "val": self.val, "dom": self.dom,
             "annotations": [a.to_json() for a in self.annotations]}
        if self.transcript is not None:
            d["transcript"] = self.transcript
        return d

    @classmethod
    def from_json(cls, d: dict, classes: Optional[ClassSet] = None) -> "Clip":
        return cls(name=d["name"], split=d["split"], emo_class=d.get("emo_class"),
                   speaker=d.get("speaker"), gender=d.get("gender", "Unknown"),
                   duration=d.get("duration"), act=d.get("act"), val=d.get("val"), dom=d.get("dom"),
                   annotations=tuple(Annotation.from_json(a, classes) for a in d.get("annotations", ())),
                   transcript=d.get("transcript"), classes=classes)


@dataclass
class Corpus:
    """A corpus root read into memory: clips in label-file order, keyed by FileName."""

    root: Path
    clips: Dict[str, Clip]
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (clip, reason) left out with skip_bad
    orphan_annotations: int = 0  # detailed rows whose FileName is not in the consensus file
    detailed_layout: Optional[str] = None  # "emodetail", "columns", "manifest <file>" or None when no detailed file
    classes: ClassSet = MSP_PODCAST
    #: Where clip names are resolved: ``Audios/`` (MSP-Podcast layout) or the root (manifest)
    audio_root: Optional[Path] = None
    #: The label files the fingerprint hashes (None: the MSP-Podcast label files)
    label_files: Optional[Tuple[Path, ...]] = None

    def __len__(self) -> int:
        return len(self.clips)

    def __iter__(self):
        return iter(self.clips.values())

    def __getitem__(self, name: str) -> Clip:
        return self.clips[name]

    @property
    def splits(self) -> List[str]:
        seen = []
        for c in self.clips.values():
            if c.split not in seen:
                seen.append(c.split)
        return seen

    def split(self, name: str) -> List[Clip]:
        return [c for c in self.clips.values() if c.split == name]

    @property
    def audio_dir(self) -> Path:
        return self.audio_root if self.audio_root is not None else audio_dir(self.root)

    def audio_path(self, name: str) -> Path:
        return self.audio_dir / name

    def restrict(self, clips: Dict[str, Clip]) -> "Corpus":
        """The same corpus with only ``clips``."""
        return replace(self, clips=clips, skipped=list(self.skipped))

    def fingerprint(self) -> str:
        """Hash of both label files' bytes and of every listed audio file's name and size."""
        if self.label_files is not None:
            from .manifest import manifest_fingerprint

            return manifest_fingerprint(self)
        return corpus_fingerprint(self.root, self.clips.keys())

    def transcripts(self):
        """The clips' transcripts (a corpus manifest's ``transcript`` field, else
        ``Transcripts/<clip stem>.txt``): a :class:`~conilium.transcripts.Transcripts` listing
        the clips without one; a bad file is a CorpusError naming it (:mod:`conilium.transcripts`)."""
        from .transcripts import load_transcripts

        given = {n: c.transcript for n, c in self.clips.items() if c.transcript is not None}
        return load_transcripts(self.root, self.clips.keys(), given)


def audio_dir(root) -> Path:
    return Path(root) / "Audios"


def corpus_fingerprint(root, names: Iterable[str]) -> str:
    root = Path(root)
    h = hashlib.sha256()
    for fname in (CONSENSUS_FILE, DETAILED_FILE):
        p = root / "Labels" / fname
        if p.exists():
            h.update(fname.encode())
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    adir = audio_dir(root)
    for name in sorted(names):
        p = adir / name
        try:
            size = p.stat().st_size
        except OSError:
            size = -1
        h.update(f"{name}:{size}\n".encode())
    return h.hexdigest()


def check_file_name(name: str, path: Path, line: int, *, column: str = "FileName", inside: str = "Audios/") -> None:
    """A label file's FileName must be a relative path below ``Audios/`` (``inside``): no
    absolute path, drive or ``..`` component (an error naming the file, the line and the name)."""
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.drive or windows.root:
        raise CorpusError(f"{path}:{line}: {column} {name!r} is an absolute path; clip names must "
                          f"name files inside {inside}")
    if ".." in posix.parts or ".." in windows.parts:
        raise CorpusError(f"{path}:{line}: {column} {name!r} leads out of {inside} ('..'); clip names "
                          f"must name files inside {inside}")


class _AudioBounds:
    """Whether clip names stay inside ``Audios/`` (or ``adir``) once symbolic links are followed."""

    def __init__(self, root: Path, adir: Optional[Path] = None):
        self.adir = audio_dir(root) if adir is None else Path(adir)
        self.real = os.path.realpath(self.adir)

    def check(self, name: str, path: Path, line: int) -> None:
        p = self.adir / name
        if len(PurePosixPath(name).parts) == 1 and not os.path.islink(p):
            return  # a plain file (or none) directly in Audios/: nothing to follow
        target = os.path.realpath(p)
        if os.path.commonpath([self.real, target]) != self.real:
            raise CorpusError(f"{path}:{line}: FileName {name!r} is a symbolic link to {target}, outside "
                              f"{self.adir}; pass --allow-symlinks (allow_symlinks=True) to read "
                              f"symlinked audio")


def _parse_float(value: str, path: Path, line: int, column: str) -> Optional[float]:
    value = value.strip()
    if value == "":
        return None
    try:
        x = float(value)
    except ValueError:
        raise CorpusError(f"{path}:{line}: column {column} is not a number: {value!r}") from None
    if not math.isfinite(x):
        raise CorpusError(f"{path}:{line}: column {column} is not finite: {value!r}")
    return x


class _Lines:
    """Physical lines of a binary file as text ending in ``\\n``, whatever the newline
    convention (LF, CRLF or a lone CR); a non-UTF-8 or NUL byte is an error naming its line."""

    def __init__(self, f, path: Path):
        self.f, self.path, self.line = f, path, 0
        self._pending: List[bytes] = []  # lines split off the current chunk, last first

    def __iter__(self):
        return self

    def __next__(self) -> str:
        if not self._pending:
            # Binary iteration splits at LF only; bytes.splitlines also splits at a lone CR
            # (and only at CR, LF and CRLF, unlike str.splitlines).
            self._pending = next(self.f).splitlines(keepends=True)[::-1]
        raw = self._pending.pop()
        self.line += 1
        nul = raw.find(b"\x00")
        if nul >= 0:
            raise CorpusError(f"{self.path}:{self.line}: NUL byte at byte {nul}; label files must be "
                              f"UTF-8 text (is this file UTF-16 or binary?)")
        try:
            text = raw.decode("utf-8-sig" if self.line == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise CorpusError(f"{self.path}:{self.line}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        return text.rstrip("\r\n") + "\n"


def _records(path: Path) -> Iterator[Tuple[int, List[str]]]:
    """(line, fields) of every CSV record of ``path``, ``line`` being the line it starts on.

    A record that runs over several lines (an unbalanced quote) and any ``csv.Error`` are
    a :class:`CorpusError` naming file and line.
    """
    with open(path, "rb") as f:
        lines = _Lines(f, path)
        reader = csv.reader(lines)
        while True:
            start = lines.line + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                where = f" (record runs on to line {lines.line})" if lines.line > start else ""
                raise CorpusError(f"{path}:{start}: malformed CSV: {e}{where}") from None
            if lines.line > start:
                raise CorpusError(f"{path}:{start}: quoted field runs on to line {lines.line}; "
                                  f"is a quote unbalanced?")
            yield start, row


def _open_csv(path: Path) -> Tuple[List[str], Iterator[Tuple[int, List[str]]]]:
    """Header of a label file and an iterator of its further ``(line, fields)`` records;
    close the iterator when done (``contextlib.closing``)."""
    if not path.is_file():
        raise CorpusError(f"{path}: label file not found (expected the MSP-Podcast layout: "
                          f"<corpus>/Labels/{CONSENSUS_FILE} and <corpus>/Labels/{DETAILED_FILE})")
    records = _records(path)
    first = next(records, None)
    if first is None:
        raise CorpusError(f"{path}: file is empty (no header line)")
    return [h.strip() for h in first[1]], records


def _check_width(row: List[str], header: List[str], path: Path, line: int) -> None:
    """A record must have exactly as many fields as the header."""
    if len(row) < len(header):
        raise CorpusError(f"{path}:{line}: expected {len(header)} fields, found {len(row)}")
    if len(row) > len(header):
        raise CorpusError(f"{path}:{line}: expected {len(header)} fields, found {len(row)}; "
                          f"quote any field that contains commas (e.g. \"Sad,Concerned\")")


def read_consensus(path, *, audios_in=None) -> List[dict]:
    """Rows of labels_consensus.csv as dicts, validated; errors name file and line.

    With ``audios_in`` (a corpus root), every FileName must also stay inside its
    ``Audios/`` once symbolic links are followed.
    """
    path = Path(path)
    bounds = None if audios_in is None else _AudioBounds(Path(audios_in))
    header, records = _open_csv(path)
    with closing(records):
        missing = [c for c in CONSENSUS_COLUMNS if c not in header]
        if missing:
            raise CorpusError(f"{path}:1: missing column(s) {', '.join(missing)}; "
                              f"expected {','.join(CONSENSUS_COLUMNS)}")
        idx = {c: header.index(c) for c in CONSENSUS_COLUMNS}
        rows, seen = [], {}
        for lineno, row in records:
            if not row or all(not x.strip() for x in row):
                continue
            _check_width(row, header, path, lineno)
            get = {c: row[i].strip() for c, i in idx.items()}
            name = get["FileName"]
            if not name:
                raise CorpusError(f"{path}:{lineno}: empty FileName")
            check_file_name(name, path, lineno)
            if bounds is not None:
                bounds.check(name, path, lineno)
            if name in seen:
                raise CorpusError(f"{path}:{lineno}: duplicate FileName {name} (first on line {seen[name]})")
            seen[name] = lineno
            split = get["Split_Set"]
            if split not in SPLITS:
                raise CorpusError(f"{path}:{lineno}: clip {name}: unknown Split_Set {split!r}; "
                                  f"expected one of {', '.join(SPLITS)}")
            emo = get["EmoClass"]
            if emo == "":
                if split in LABELLED_SPLITS:
                    raise CorpusError(f"{path}:{lineno}: clip {name}: empty EmoClass in split {split}")
                emo = None
            elif emo not in CLASSES + NON_TARGET_CONSENSUS:
                raise CorpusError(f"{path}:{lineno}: clip {name}: unknown EmoClass {emo!r}; "
                                  f"expected one of {', '.join(CLASSES + NON_TARGET_CONSENSUS)}")
            gender = get["Gender"] or "Unknown"
            if gender not in GENDERS:
                raise CorpusError(f"{path}:{lineno}: clip {name}: unknown Gender {gender!r}; "
                                  f"expected one of {', '.join(GENDERS)}")
            spk = get["SpkrID"]
            if spk in ("", "Unknown"):
                speaker = None
            else:
                try:
                    speaker = str(int(float(spk)))
                except ValueError:
                    raise CorpusError(f"{path}:{lineno}: clip {name}: SpkrID must be an integer "
                                      f"or 'Unknown', found {spk!r}") from None
            rows.append({
                "name": name, "emo_class": emo, "split": split, "gender": gender, "speaker": speaker,
                "act": _parse_float(get["EmoAct"], path, lineno, "EmoAct"),
                "val": _parse_float(get["EmoVal"], path, lineno, "EmoVal"),
                "dom": _parse_float(get["EmoDom"], path, lineno, "EmoDom"),
            })
    if not rows:
        raise CorpusError(f"{path}: no clips listed")
    return rows


def parse_emodetail(text: str, path: Path, line: int) -> Annotation:
    """Parse ``"WORKER; Primary; Sec1,Sec2; A:3.0; V:4.0; D:4.0;"``."""
    parts = [p.strip() for p in text.split(";")]
    while parts and parts[-1] == "":
        parts.pop()
    if len(parts) < 2:
        raise CorpusError(f"{path}:{line}: malformed EmoDetail {text!r}: expected "
                          f"'WORKER; Primary; Secondary,...; A:x; V:y; D:z;'")
    worker, primary = parts[0], parts[1]
    if not worker:
        raise CorpusError(f"{path}:{line}: malformed EmoDetail {text!r}: empty worker id")
    if not primary or ":" in primary:
        raise CorpusError(f"{path}:{line}: malformed EmoDetail {text!r}: missing primary emotion")
    rest = parts[2:]
    secondary: Tuple[str, ...] = ()
    if rest and ":" not in rest[0]:
        secondary = _split_secondary(rest[0])
        rest = rest[1:]
    attrs = {}
    for item in rest:
        key, sep, value = item.partition(":")
        key = key.strip().upper()
        if not sep or key not in ("A", "V", "D"):
            raise CorpusError(f"{path}:{line}: malformed EmoDetail {text!r}: unexpected field {item!r}")
        attrs[key] = _parse_float(value, path, line, f"EmoDetail {key}")
    return Annotation(worker=worker, primary=primary, secondary=secondary,
                      act=attrs.get("A"), val=attrs.get("V"), dom=attrs.get("D"))


def _split_secondary(text: str) -> Tuple[str, ...]:
    return tuple(w.strip() for w in text.split(",") if w.strip())


_WORKER_COLUMNS = ("Workers", "WorkerID", "Worker")
_PRIMARY_COLUMNS = ("EmoClass_Major", "EmoClass")
_SECONDARY_COLUMNS = ("EmoClass_Second", "EmoClass_Secondary")


def read_detailed(path) -> Tuple[Dict[str, List[Annotation]], str]:
    """Annotations per FileName from labels_detailed.csv, in either release layout."""
    path = Path(path)
    header, records = _open_csv(path)
    out: Dict[str, List[Annotation]] = {}
    with closing(records):
        if "FileName" not in header:
            raise CorpusError(f"{path}:1: missing column FileName")
        i_name = header.index("FileName")
        if "EmoDetail" in header:
            layout = "emodetail"
            i_detail = header.index("EmoDetail")
        else:
            layout = "columns"
            i_worker = next((header.index(c) for c in _WORKER_COLUMNS if c in header), None)
            i_primary = next((header.index(c) for c in _PRIMARY_COLUMNS if c in header), None)
            i_second = next((header.index(c) for c in _SECONDARY_COLUMNS if c in header), None)
            if i_worker is None or i_primary is None:
                raise CorpusError(
                    f"{path}:1: unknown layout: expected FileName,EmoDetail or FileName with "
                    f"{'/'.join(_WORKER_COLUMNS)}, {'/'.join(_PRIMARY_COLUMNS)}, "
                    f"{'/'.join(_SECONDARY_COLUMNS)}, EmoAct, EmoVal, EmoDom columns")
            i_attr = {k: (header.index(c) if c in header else None)
                      for k, c in (("act", "EmoAct"), ("val", "EmoVal"), ("dom", "EmoDom"))}
        for lineno, row in records:
            if not row or all(not x.strip() for x in row):
                continue
            _check_width(row, header, path, lineno)
            name = row[i_name].strip()
            if not name:
                raise CorpusError(f"{path}:{lineno}: empty FileName")
            check_file_name(name, path, lineno)
            if layout == "emodetail":
                ann = parse_emodetail(row[i_detail], path, lineno)
            else:
                worker = row[i_worker].strip()
                primary = row[i_primary].strip()
                if not worker or not primary:
                    raise CorpusError(f"{path}:{lineno}: clip {name}: empty worker or primary emotion")
                secondary = _split_secondary(row[i_second]) if i_second is not None else ()
                attrs = {k: (_parse_float(row[i], path, lineno, k) if i is not None else None)
                         for k, i in i_attr.items()}
                ann = Annotation(worker=worker, primary=primary, secondary=secondary, **attrs)
            out.setdefault(name, []).append(ann)
    return out, layout


def clip_duration(p: Path, where: str) -> float:
    """Seconds of the audio file ``p`` from its header; a CorpusError starting with ``where``
    (the clip, or the manifest line) when it is missing, unreadable or empty."""
    if not p.is_file():
        raise CorpusError(f"{where}: audio file {p} not found")
    try:
        info = sf.info(str(p))
    except Exception as e:  # soundfile raises RuntimeError/LibsndfileError
        raise CorpusError(f"{where}: unreadable audio {p}: {e}") from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise CorpusError(f"{where}: empty audio file {p}")
    return info.frames / info.samplerate


def load_corpus(root, *, read_durations: bool = True, skip_bad: bool = False,
                splits: Optional[Sequence[str]] = None, allow_symlinks: bool = False) -> Corpus:
    """Read a corpus root in the MSP-Podcast release layout, or in the manifest layout
    when the root holds ``corpus.csv`` or ``corpus.jsonl`` (:mod:`conilium.manifest`).

    Every FileName must name a file inside ``Audios/`` (no absolute path, no ``..``); a
    symbolic link in ``Audios/`` whose target lies outside it is refused too, unless
    ``allow_symlinks``. Either is an error naming the label file and the line.

    ``read_durations`` reads every clip's duration from its audio header (no decoding);
    a clip (of any split) whose audio is missing or unreadable is an error naming the clip,
    or, with ``skip_bad``, is left out and listed in :attr:`Corpus.skipped`.
    ``splits`` keeps only those splits.
    """
    root = Path(root)
    if not root.is_dir():
        raise CorpusError(f"{root}: corpus directory not found")
    from .manifest import find_manifest, load_manifest

    if find_manifest(root) is not None:
        return load_manifest(root, read_durations=read_durations, skip_bad=skip_bad, splits=splits,
                             allow_symlinks=allow_symlinks)
    rows = read_consensus(root / "Labels" / CONSENSUS_FILE, audios_in=None if allow_symlinks else root)
    detailed_path = root / "Labels" / DETAILED_FILE
    if detailed_path.exists():
        annotations, layout = read_detailed(detailed_path)
    else:
        annotations, layout = {}, None
    known = {r["name"] for r in rows}
    orphans = sum(len(v) for k, v in annotations.items() if k not in known)
    adir = audio_dir(root)
    clips: Dict[str, Clip] = {}
    skipped: List[Tuple[str, str]] = []
    for r in rows:
        if splits is not None and r["split"] not in splits:
            continue
        duration = None
        if read_durations:
            try:
                duration = clip_duration(adir / r["name"], f"clip {r['name']}")
            except CorpusError as e:
                if skip_bad:
                    skipped.append((r["name"], str(e)))
                    continue
                raise CorpusError(f"{e} (pass --skip-bad to leave such clips out and list them)") from None
        clips[r["name"]] = Clip(annotations=tuple(annotations.get(r["name"], ())), duration=duration, **r)
    return Corpus(root=root, clips=clips, skipped=skipped, orphan_annotations=orphans,
                  detailed_layout=layout)


def ignored_word_counts(clips: Iterable[Clip]) -> Counter:
    """How often each word that maps to no target class was used, over all annotations."""
    counts: Counter = Counter()
    for c in clips:
        for a in c.annotations:
            counts.update(a.ignored_words())
    return counts

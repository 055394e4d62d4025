"""Reader of the corpus manifest layout: any corpus, any class set.

A corpus root holds ``corpus.csv`` or ``corpus.jsonl`` (one clip a row or line), the audio
files it names (anywhere below the root) and, optionally, ``classes.json``
(:mod:`conilium.classes`; MSP-Podcast's eight classes without it). Fields:

==============  ========  ==========================================================
field           needed    meaning
==============  ========  ==========================================================
``audio``       yes       audio file, relative to the root (must stay inside it)
``split``       yes       Train, Development, Test1, Test2, Test3 (also train, dev,
                          development, validation, test = Test1)
``speaker``     no        speaker id (empty: unknown)
``gender``      no        Male, Female or Unknown (also m, f; empty: Unknown)
``label``       no        consensus: a class code, name or alias, O (Other), X (no
                          agreement); empty: the annotators' plurality primary
                          (X on a tie, O when every primary is Other)
``annotations`` no        list of ``{"annotator", "primary", "secondary": [...]}``
                          (optional ``arousal``/``valence``/``dominance``); in CSV a
                          JSON list in one quoted field
``arousal``,    no        consensus attributes (numbers; MSP-Podcast's 1–7 scale)
``valence``,
``dominance``
``transcript``  no        text of the clip
==============  ========  ==========================================================

:func:`load_manifest` returns the :class:`~conilium.corpus.Corpus` the MSP-Podcast reader
returns, clip names being the ``audio`` paths. Every bad row is a
:class:`~conilium.errors.CorpusError` naming the file and the line.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from contextlib import closing
from pathlib import Path, PurePosixPath
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from .classes import CLASSES_FILE, MSP_PODCAST, ClassSet, load_class_set
from .corpus import (GENDERS, LABELLED_SPLITS, SPLITS, Annotation, Clip, Corpus, _AudioBounds, _Lines,
                     _check_width, _open_csv, check_file_name, clip_duration)
from .errors import CorpusError

MANIFEST_FILES = ("corpus.csv", "corpus.jsonl")
FIELDS = ("audio", "split", "speaker", "gender", "label", "annotations", "arousal", "valence", "dominance",
          "transcript")
REQUIRED = ("audio", "split")
_SPLIT_ALIASES = {"train": "Train", "dev": "Development", "development": "Development", "valid": "Development",
                  "validation": "Development", "test": "Test1", **{s.lower(): s for s in SPLITS}}
_GENDER_ALIASES = {"m": "Male", "male": "Male", "f": "Female", "female": "Female", "unknown": "Unknown",
                   "": "Unknown"}
_ATTRS = (("arousal", "act"), ("valence", "val"), ("dominance", "dom"))
_OTHER_WORDS = {"o": "O", "other": "O", "x": "X"}


def find_manifest(root) -> Optional[Path]:
    """The manifest file of a corpus root, None when it has none; both is an error."""
    root = Path(root)
    found = [root / n for n in MANIFEST_FILES if (root / n).is_file()]
    if len(found) > 1:
        raise CorpusError(f"{root}: both {MANIFEST_FILES[0]} and {MANIFEST_FILES[1]}; keep one manifest")
    return found[0] if found else None


def corpus_class_set(root) -> ClassSet:
    """The class set of a manifest corpus root: its ``classes.json``, else MSP-Podcast's."""
    p = Path(root) / CLASSES_FILE
    return load_class_set(p) if p.is_file() else MSP_PODCAST


def _jsonl_records(path: Path) -> Iterator[Tuple[int, dict]]:
    with open(path, "rb") as f:
        lines = _Lines(f, path)
        for text in lines:
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{lines.line}: malformed JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(obj, dict):
                raise CorpusError(f"{path}:{lines.line}: expected a JSON object, got {type(obj).__name__}")
            yield lines.line, obj


def _csv_records(path: Path) -> Iterator[Tuple[int, dict]]:
    header, records = _open_csv(path)
    with closing(records):
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise CorpusError(f"{path}:1: missing column(s) {', '.join(missing)}; columns: {', '.join(FIELDS)}")
        unknown = [c for c in header if c not in FIELDS]
        if unknown:
            raise CorpusError(f"{path}:1: unknown column(s) {', '.join(unknown)}; columns: {', '.join(FIELDS)}")
        for lineno, row in records:
            if not row or all(not x.strip() for x in row):
                continue
            _check_width(row, header, path, lineno)
            d = dict(zip(header, row))
            text = d.get("annotations", "").strip()
            if text:
                try:
                    d["annotations"] = json.loads(text)
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{path}:{lineno}: column annotations: malformed JSON: {e.msg} "
                                      f"(column {e.colno})") from None
            else:
                d["annotations"] = None
            yield lineno, d


def _text(d: dict, key: str, path: Path, line: int) -> str:
    v = d.get(key)
    if v is None:
        return ""
    if not isinstance(v, (str, int)) or isinstance(v, bool):
        raise CorpusError(f"{path}:{line}: {key} must be a string, got {v!r}")
    return str(v).strip()


def _number(v, path: Path, line: int, key: str) -> Optional[float]:
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise CorpusError(f"{path}:{line}: {key} is not a number: {v!r}") from None
    if isinstance(v, bool) or not math.isfinite(x):
        raise CorpusError(f"{path}:{line}: {key} is not a finite number: {v!r}")
    return x


def _word(w, classes: ClassSet, path: Path, line: int, what: str) -> str:
    """An annotator's word: a class (code, name or alias) or Other; anything else is an error
    (a word of a class set other than the corpus's)."""
    if not isinstance(w, str) or not w.strip():
        raise CorpusError(f"{path}:{line}: {what}: expected a non-empty string, got {w!r}")
    w = w.strip()
    if classes.word_to_code(w) is None and not w.lower().startswith("other"):
        raise CorpusError(f"{path}:{line}: {what}: unknown class {w!r}; the class set is {classes.describe()} "
                          f"(or Other)")
    return w


def _annotations(items, classes: ClassSet, path: Path, line: int) -> Tuple[Annotation, ...]:
    if items is None:
        return ()
    if not isinstance(items, list):
        raise CorpusError(f"{path}:{line}: annotations must be a list of objects, got {type(items).__name__}")
    out = []
    for k, a in enumerate(items, start=1):
        where = f"annotation {k}"
        if not isinstance(a, dict):
            raise CorpusError(f"{path}:{line}: {where}: expected an object with annotator, primary, secondary")
        worker = a.get("annotator")
        if not isinstance(worker, (str, int)) or isinstance(worker, bool) or not str(worker).strip():
            raise CorpusError(f"{path}:{line}: {where}: missing annotator id")
        primary = _word(a.get("primary"), classes, path, line, f"{where} primary")
        sec = a.get("secondary", [])
        if isinstance(sec, str):
            sec = [s for s in sec.split(",") if s.strip()]
        if not isinstance(sec, list):
            raise CorpusError(f"{path}:{line}: {where}: secondary must be a list of words")
        secondary = tuple(_word(s, classes, path, line, f"{where} secondary") for s in sec)
        attrs = {attr: _number(a.get(key), path, line, f"{where} {key}") for key, attr in _ATTRS}
        out.append(Annotation(worker=str(worker).strip(), primary=primary, secondary=secondary,
                              classes=None if classes.is_default else classes, **attrs))
    return tuple(out)


def plurality(annotations: Sequence[Annotation]) -> Optional[str]:
    """The consensus of annotations without one: the most frequent primary class, X on a tie,
    O when every primary is Other; None without annotations."""
    if not annotations:
        return None
    counts = Counter(a.primary_class for a in annotations if a.primary_class is not None)
    if not counts:
        return "O"
    top = counts.most_common()
    if len(top) > 1 and top[0][1] == top[1][1]:
        return "X"
    return top[0][0]


def _row(d: dict, line: int, path: Path, root: Path, classes: ClassSet, bounds, seen: Dict[str, int]) -> dict:
    unknown = [k for k in d if k not in FIELDS]
    if unknown:
        raise CorpusError(f"{path}:{line}: unknown field(s) {', '.join(map(str, unknown))}; "
                          f"fields: {', '.join(FIELDS)}")
    name = _text(d, "audio", path, line)
    if not name:
        raise CorpusError(f"{path}:{line}: empty audio path")
    name = name.replace("\\", "/")
    check_file_name(name, path, line, column="audio", inside="the corpus root")
    name = PurePosixPath(name).as_posix()
    if bounds is not None:
        bounds.check(name, path, line)
    if name in seen:
        raise CorpusError(f"{path}:{line}: duplicate audio {name} (first on line {seen[name]})")
    seen[name] = line
    given = _text(d, "split", path, line)
    split = _SPLIT_ALIASES.get(given.lower())
    if split is None:
        raise CorpusError(f"{path}:{line}: clip {name}: bad split {given!r}; expected one of "
                          f"{', '.join(SPLITS)} (or train, dev, validation, test)")
    gender = _GENDER_ALIASES.get(_text(d, "gender", path, line).lower())
    if gender is None or gender not in GENDERS:
        raise CorpusError(f"{path}:{line}: clip {name}: unknown gender {d.get('gender')!r}; expected Male, "
                          f"Female or Unknown")
    speaker = _text(d, "speaker", path, line) or None
    if speaker == "Unknown":
        speaker = None
    annotations = _annotations(d.get("annotations"), classes, path, line)
    label = _text(d, "label", path, line)
    if label:
        emo = classes.word_to_code(label) or _OTHER_WORDS.get(label.lower())
        if emo is None:
            raise CorpusError(f"{path}:{line}: clip {name}: unknown class {label!r}; the class set is "
                              f"{classes.describe()} (or O = Other, X = no agreement)")
    else:
        emo = plurality(annotations)
        if emo is None and split in LABELLED_SPLITS:
            raise CorpusError(f"{path}:{line}: clip {name}: neither a label nor annotations in split {split}")
    transcript = d.get("transcript")
    if transcript is not None and not isinstance(transcript, str):
        raise CorpusError(f"{path}:{line}: clip {name}: transcript must be a string")
    attrs = {attr: _number(d.get(key), path, line, key) for key, attr in _ATTRS}
    return {"name": name, "emo_class": emo, "split": split, "gender": gender, "speaker": speaker,
            "annotations": annotations, "transcript": transcript or None, **attrs}


def load_manifest(root, *, read_durations: bool = True, skip_bad: bool = False,
                  splits: Optional[Sequence[str]] = None, allow_symlinks: bool = False) -> Corpus:
    """Read a corpus root in the manifest layout (the arguments of
    :func:`~conilium.corpus.load_corpus`). A missing or unreadable audio file is an error naming
    the manifest line and the clip, or, with ``skip_bad``, is left out and listed."""
    root = Path(root)
    path = find_manifest(root)
    if path is None:
        raise CorpusError(f"{root}: no corpus manifest ({' or '.join(MANIFEST_FILES)})")
    classes = corpus_class_set(root)
    bounds = None if allow_symlinks else _AudioBounds(root, root)
    records = _jsonl_records(path) if path.suffix == ".jsonl" else _csv_records(path)
    clips: Dict[str, Clip] = {}
    skipped: List[Tuple[str, str]] = []
    seen: Dict[str, int] = {}
    for line, d in records:
        r = _row(d, line, path, root, classes, bounds, seen)
        if splits is not None and r["split"] not in splits:
            continue
        duration = None
        if read_durations:
            try:
                duration = clip_duration(root / r["name"], f"{path}:{line}: clip {r['name']}")
            except CorpusError as e:
                if skip_bad:
                    skipped.append((r["name"], str(e)))
                    continue
                raise CorpusError(f"{e} (pass --skip-bad to leave such clips out and list them)") from None
        clips[r["name"]] = Clip(duration=duration, classes=None if classes.is_default else classes, **r)
    if not seen:
        raise CorpusError(f"{path}: no clips listed")
    label_files = (path,) + (((root / CLASSES_FILE),) if (root / CLASSES_FILE).is_file() else ())
    return Corpus(root=root, clips=clips, skipped=skipped, classes=classes, audio_root=root,
                  label_files=label_files, detailed_layout=f"manifest {path.name}")


def manifest_fingerprint(corpus: Corpus) -> str:
    """Hash of the manifest's and classes.json's bytes and of every clip's name and audio size."""
    h = hashlib.sha256()
    for p in corpus.label_files or ():
        h.update(Path(p).name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    for name in sorted(corpus.clips):
        try:
            size = corpus.audio_path(name).stat().st_size
        except OSError:
            size = -1
        h.update(f"{name}:{size}\n".encode())
    return h.hexdigest()


"""A corpus's class set: the target classes' short codes, names and the words that map to them.

MSP-Podcast's eight (A S H U F D C N) are the default (:data:`MSP_PODCAST`). A corpus in the
manifest layout may declare its own in ``classes.json`` beside its manifest::

    {"classes": [
        {"code": "A", "name": "Angry", "aliases": ["anger", "frustrated"]},
        {"code": "H", "name": "Happy", "aliases": ["happiness", "excited"]},
        {"code": "S", "name": "Sad"},
        {"code": "N", "name": "Neutral", "aliases": ["neutral state"]}
    ]}

The order is the order of every probability column. An annotator's word (or a consensus
label) maps to a class when it equals, case-insensitively, the class's code, its name or one
of its aliases; any other word is Other. Codes are short (at most 16 characters: letters,
digits, ``_`` or ``-``), unique, and not ``O`` or ``X`` (the non-target consensus letters).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple

from . import CLASS_NAMES, CLASSES, NON_TARGET_CONSENSUS
from .errors import CorpusError

#: File name of a class set beside a corpus manifest.
CLASSES_FILE = "classes.json"
_CODE = re.compile(r"^[A-Za-z0-9_-]{1,16}$")
#: Column names of predictions files a code may not take.
_RESERVED = {"filename", "prediction", "reference", "emoact", "emoval", "emodom"}

# Emotion words (lower case) of MSP-Podcast's eight classes. Aliases cover spellings seen
# across releases and the single letters some older files use.
_MSP_WORDS = {
    "angry": "A", "anger": "A", "a": "A",
    "sad": "S", "sadness": "S", "s": "S",
    "happy": "H", "happiness": "H", "h": "H",
    "surprise": "U", "surprised": "U", "u": "U",
    "fear": "F", "fearful": "F", "f": "F",
    "disgust": "D", "disgusted": "D", "d": "D",
    "contempt": "C", "contemptuous": "C", "c": "C",
    "neutral": "N", "n": "N",
}


@dataclass(frozen=True)
class ClassSet:
    """Target classes in column order: ``codes`` (short labels), ``names`` (words) and
    ``words`` (lower-case word → code, codes and names included)."""

    codes: Tuple[str, ...]
    names: Tuple[str, ...]
    words: Mapping[str, str]

    def __len__(self) -> int:
        return len(self.codes)

    def __iter__(self):
        return iter(self.codes)

    def __contains__(self, code) -> bool:
        return code in self.codes

    def __hash__(self) -> int:
        return hash(self.codes)

    def __eq__(self, other) -> bool:
        return isinstance(other, ClassSet) and self.to_json() == other.to_json()

    def index(self, code: str) -> int:
        return self.codes.index(code)

    def word_to_code(self, word: str) -> Optional[str]:
        """The class of an annotator's word, or None for Other and words of no class."""
        return self.words.get(word.strip().lower())

    @property
    def name_of(self) -> Dict[str, str]:
        return dict(zip(self.codes, self.names))

    @property
    def is_default(self) -> bool:
        """True for MSP-Podcast's eight classes."""
        return self == MSP_PODCAST

    def to_json(self) -> dict:
        """The class set as ``classes.json`` holds it (aliases: the words beyond code and name)."""
        out = []
        for code, name in zip(self.codes, self.names):
            own = {code.lower(), name.lower()}
            aliases = sorted(w for w, c in self.words.items() if c == code and w not in own)
            out.append({"code": code, "name": name, "aliases": aliases})
        return {"classes": out}

    def describe(self) -> str:
        return ", ".join(f"{c} = {n}" for c, n in zip(self.codes, self.names))

    @classmethod
    def from_json(cls, obj, where: str = "class set") -> "ClassSet":
        """A class set from its JSON form (:meth:`to_json`, or a list of such entries);
        a malformed one is a :class:`CorpusError` naming ``where``."""
        entries = obj.get("classes") if isinstance(obj, dict) else obj
        if not isinstance(entries, list):
            raise CorpusError(f"{where}: expected {{\"classes\": [{{\"code\": ..., \"name\": ...}}, ...]}}")
        return build_class_set([_entry(e, i, where) for i, e in enumerate(entries)], where)


def _entry(e, i: int, where: str) -> Tuple[str, str, Sequence[str]]:
    if isinstance(e, str):
        return e, e, ()
    if not isinstance(e, dict) or not isinstance(e.get("code"), str):
        raise CorpusError(f"{where}: class {i + 1}: expected an object with a \"code\" string, got {e!r}")
    name = e.get("name", e["code"])
    aliases = e.get("aliases", [])
    if not isinstance(name, str) or not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise CorpusError(f"{where}: class {e['code']!r}: \"name\" must be a string and \"aliases\" a list of strings")
    return e["code"], name, aliases


def build_class_set(entries: Sequence[Tuple[str, str, Sequence[str]]], where: str = "class set") -> ClassSet:
    """A checked class set from ``(code, name, aliases)`` entries in column order."""
    codes, names, words = [], [], {}
    for code, name, aliases in entries:
        code, name = code.strip(), name.strip()
        if not _CODE.match(code):
            raise CorpusError(f"{where}: class code {code!r}: use 1 to 16 letters, digits, '_' or '-'")
        if code in NON_TARGET_CONSENSUS or code.lower() in _RESERVED:
            raise CorpusError(f"{where}: class code {code!r} is reserved ({', '.join(NON_TARGET_CONSENSUS)} "
                              f"are the non-target consensus letters; FileName, Prediction, Reference and "
                              f"the attribute columns name predictions columns)")
        if code in codes:
            raise CorpusError(f"{where}: class code {code!r} declared twice")
        if not name:
            raise CorpusError(f"{where}: class {code!r} has an empty name")
        for w in (code, name, *aliases):
            key = w.strip().lower()
            if key in words and words[key] != code:
                raise CorpusError(f"{where}: word {w!r} names two classes ({words[key]} and {code})")
            if key:
                words[key] = code
        codes.append(code)
        names.append(name)
    if len(codes) < 2:
        raise CorpusError(f"{where}: a class set needs at least 2 classes, found {len(codes)}")
    return ClassSet(tuple(codes), tuple(names), words)


def load_class_set(path) -> ClassSet:
    """The class set of a ``classes.json`` file; errors name the file."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CorpusError(f"{path}: cannot read: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        line = getattr(e, "lineno", None)
        raise CorpusError(f"{path}{f':{line}' if line else ''}: malformed JSON: {e}") from None
    return ClassSet.from_json(obj, str(path))


def class_set_of(obj) -> ClassSet:
    """The class set recorded in a cache's settings, a run's config or a model's info
    (``"classes"``: a :meth:`ClassSet.to_json` object or a list of codes), MSP-Podcast's eight
    when none is recorded."""
    if obj is None:
        return MSP_PODCAST
    if isinstance(obj, ClassSet):
        return obj
    if isinstance(obj, (list, tuple)) and all(isinstance(c, str) for c in obj):
        if tuple(obj) == CLASSES:
            return MSP_PODCAST
        return build_class_set([(c, c, ()) for c in obj])
    return ClassSet.from_json(obj)


MSP_PODCAST = ClassSet(CLASSES, tuple(CLASS_NAMES[c] for c in CLASSES), dict(_MSP_WORDS))


def class_names(codes: Sequence[str], recorded=None) -> Tuple[str, ...]:
    """The names of the class ``codes`` a model outputs: those of ``recorded`` (a class set or
    its JSON form, as a cache manifest or a model's info keeps it) where it has the same codes,
    else MSP-Podcast's for its eight, else the codes themselves (a code is never given the
    MSP-Podcast name of a letter it shares with another class set)."""
    codes = tuple(codes)
    try:
        found = class_set_of(recorded) if recorded is not None else None
    except (CorpusError, TypeError, ValueError, AttributeError):
        found = None
    if found is not None and found.codes == codes:
        return found.names
    return MSP_PODCAST.names if codes == MSP_PODCAST.codes else codes

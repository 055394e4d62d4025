"""A feature cache directory on disk (:class:`CacheDir`) and its manifest (:class:`Manifest`);
the other kinds of directory, and telling them apart, are in :mod:`conilium.dirs`. The
shards themselves are read and written by :mod:`conilium.cache`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import List, Mapping, Optional

from .errors import CacheError
from .util import _default as _json_default
from .util import WRITE_CHECK_PREFIX, read_json, write_json

#: When a reader checks a clip's frames (their CRC-32, no NaN or infinite value): on the
#: reader's first read of the clip, at every read, or never
#: (:class:`conilium.cache.FeatureCache`'s ``verify``, train-head's ``--verify``).
VERIFY_MODES = ("first", "always", "never")


def file_sha256(path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


def json_object_or_none(path) -> Optional[dict]:
    """The JSON object in ``path``; None when it is missing, unreadable or not an object."""
    try:
        got = read_json(path)
    except (OSError, ValueError):
        return None
    return got if isinstance(got, dict) else None


def as_dict(value) -> dict:
    """``value`` as a dict when it is a mapping; an empty one otherwise."""
    return dict(value) if isinstance(value, Mapping) else {}


#: The manifest's checksum of its own content: every other field (see :meth:`Manifest.checksum`).
MANIFEST_CHECKSUM = "manifest_sha256"
#: What to do with a cache of an older format (format 1: one HDF5 dataset per clip).
UPGRADE_HINT = ("convert it in place, frames unchanged, with `conilium extract upgrade DIR`, "
                "or rebuild it: rerun extract-features with the same options and --overwrite")


class Manifest(dict):
    """A cache's ``manifest.json`` (or the summary of it a head checkpoint keeps) as a dict,
    with its fields as properties; fields missing from older manifests read as their
    earlier defaults."""

    @property
    def format(self) -> Optional[int]:
        return self.get("format")

    @property
    def complete(self) -> bool:
        return bool(self.get("complete"))

    @property
    def upstream(self) -> dict:
        """The upstream's identity: name, source (hub, local, random-init), path, revision, weights hash."""
        return as_dict(self.get("upstream"))

    @property
    def layers(self) -> List[int]:
        return list(self["layers"])

    @property
    def dim(self) -> int:
        return int(self["dim"])

    @property
    def dtype(self) -> str:
        """The stored frames' type: ``"float16"`` (the default) or ``"float32"``."""
        return "float32" if self.get("dtype") == "float32" else "float16"

    @property
    def pooled_stats(self) -> bool:
        return bool(self.get("pooled_stats"))

    @property
    def num_hidden_states(self) -> Optional[int]:
        n = self.get("num_hidden_states")
        return None if n is None else int(n)

    @property
    def compute_dtype(self) -> str:
        return self.get("compute_dtype") or "float32"

    @property
    def normalize(self) -> str:
        return self.get("normalize") or "none"

    @property
    def normalize_stats(self):
        return self.get("normalize_stats")

    @property
    def max_seconds(self) -> Optional[float]:
        ms = self.get("max_seconds")
        return float(ms) if ms else None

    @property
    def extraction(self) -> dict:
        """The extraction's own options (``"config"``: whisper_input, rescale_loud, …)."""
        return as_dict(self.get("config"))

    @property
    def whisper_input(self) -> Optional[str]:
        return self.extraction.get("whisper_input")

    @property
    def rescale_loud(self) -> bool:
        return bool(self.extraction.get("rescale_loud", False))

    @property
    def text(self) -> Optional[dict]:
        """A text upstream's cache: the transcripts' fingerprint, the tokenizer, the token limit;
        None for an audio upstream's (frames are then audio frames at ``frame_rate``)."""
        return as_dict(self.get("text")) or None

    @property
    def shards(self) -> List[dict]:
        return list(self.get("shards") or [])

    @property
    def clips_sha256(self) -> Optional[str]:
        return self.get("clips_sha256")

    def summary(self) -> dict:
        """The manifest without its shard list (what a head checkpoint keeps)."""
        return {k: v for k, v in self.items() if k != "shards"}

    def checksum(self) -> str:
        """SHA-256 of the content: every field but :data:`MANIFEST_CHECKSUM`, as canonical JSON
        (sorted keys, no spaces), so that it survives a round trip through the file."""
        body = {k: v for k, v in self.items() if k != MANIFEST_CHECKSUM}
        body = json.loads(json.dumps(body, default=_json_default))
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(text.encode("ascii")).hexdigest()

    def sealed(self) -> "Manifest":
        """This manifest with its own checksum recorded, last."""
        out = Manifest({k: v for k, v in self.items() if k != MANIFEST_CHECKSUM})
        out[MANIFEST_CHECKSUM] = out.checksum()
        return out

    def problem(self) -> Optional[str]:
        """Why this manifest, read from disk, cannot be used as it is (another format, not
        complete, a checksum that does not match its content), or None."""
        if self.format != CacheDir.FORMAT:
            return f"cache format {self.format!r}, this conilium reads format {CacheDir.FORMAT}"
        if not self.complete:
            return "the cache is incomplete (extraction did not finish)"
        if self.get(MANIFEST_CHECKSUM) != self.checksum():
            return "its checksum does not match its content (the manifest was edited or damaged)"
        return None


class CacheDir:
    """A feature cache directory (layout: :mod:`conilium.cache`)."""

    FORMAT = 2
    MANIFEST = "manifest.json"
    CLIPS = "clips.json"
    SETTINGS = "extraction.json"
    SHARDS = "shards"
    UPSTREAM = "upstream"
    #: What extract-features writes into a cache directory before its manifest.
    TRACES = (SETTINGS, CLIPS, SHARDS)

    def __init__(self, path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"CacheDir({str(self.path)!r})"

    @property
    def manifest_path(self) -> Path:
        return self.path / self.MANIFEST

    @property
    def clips_path(self) -> Path:
        return self.path / self.CLIPS

    @property
    def settings_path(self) -> Path:
        return self.path / self.SETTINGS

    @property
    def upstream_dir(self) -> Path:
        """Where weights made for the cache (random-init upstreams) are kept."""
        return self.path / self.UPSTREAM

    @classmethod
    def shard_file(cls, index: int) -> str:
        """Shard ``index``'s file, relative to the cache directory."""
        return f"{cls.SHARDS}/shard-{index:05d}.h5"

    def sidecar_path(self, index: int) -> Path:
        """The sidecar of a finished shard (its clips, checksum, settings key)."""
        return self.path / self.shard_file(index).replace(".h5", ".json")

    def has_manifest(self) -> bool:
        return self.manifest_path.is_file()

    def own_temporaries(self) -> List[Path]:
        """The temporary files extract-features leaves at the top of the directory when it is
        killed before renaming them: a write check's probe, a half-written extraction.json,
        clips.json or manifest.json (``.NAME.XXXX.tmp``). A directory holding nothing else
        (but a lock file) is a cache whose extraction was killed at its start."""
        try:
            children = list(self.path.iterdir())
        except OSError:
            return []
        names = (self.SETTINGS, self.CLIPS, self.MANIFEST)
        return sorted(c for c in children
                      if (c.name.startswith(WRITE_CHECK_PREFIX)
                          or (c.name.endswith(".tmp") and any(c.name.startswith(f".{n}.") for n in names)))
                      and c.is_file() and not c.is_symlink())

    def is_begun(self) -> bool:
        """True when extract-features has written anything here (a manifest or a trace of one)."""
        return self.manifest_path.exists() or self.settings_path.exists() or (self.path / self.SHARDS).is_dir()

    def manifest_or_none(self) -> Optional[Manifest]:
        """The manifest as it is on disk, unchecked; None when missing or unreadable."""
        got = json_object_or_none(self.manifest_path)
        return None if got is None else Manifest(got)

    def read_manifest(self) -> Manifest:
        """The manifest of the complete cache, checked against its own checksum.

        A :class:`CacheError` otherwise, saying what the directory is when it is no cache (a
        run, a model, a corpus, a folder of caches) and what to run when the cache is
        incomplete, damaged or of an older format."""
        path, mpath = self.path, self.manifest_path
        from .dirs import check_cache_dir, not_a_cache

        if path.is_file():
            raise CacheError(not_a_cache(path))
        if not path.is_dir():
            raise CacheError(f"{path}: cache directory not found (build it with extract-features)")
        if not mpath.is_file():
            check_cache_dir(path)
            raise CacheError(f"{path}: no {self.MANIFEST}: the cache is incomplete (extraction did not finish); "
                             f"rerun extract-features with the same options to resume it")
        rewrite = "rerun extract-features with the same options to rewrite it (intact shards are kept)"
        try:
            manifest = read_json(mpath)
        except ValueError as e:
            raise CacheError(f"{mpath}: corrupt manifest ({e}); {rewrite}") from None
        if not isinstance(manifest, dict):
            raise CacheError(f"{mpath}: corrupt manifest (not a JSON object); {rewrite}")
        manifest = Manifest(manifest)
        if manifest.format != self.FORMAT:
            hint = (UPGRADE_HINT if manifest.format == 1
                    else "rebuild it: rerun extract-features with the same options and --overwrite")
            raise CacheError(f"{mpath}: cache format {manifest.format!r}, this conilium reads format "
                             f"{self.FORMAT}; {hint}")
        if not manifest.complete:
            raise CacheError(f"{path}: the cache is incomplete (extraction did not finish); "
                             f"rerun extract-features with the same options to resume it")
        if manifest.get(MANIFEST_CHECKSUM) != manifest.checksum():
            raise CacheError(f"{mpath}: its checksum does not match its content: the manifest was edited or "
                             f"damaged; run verify-cache, then {rewrite}")
        return manifest

    def read_clips(self, manifest: Mapping) -> List[dict]:
        """The records of clips.json, checked against the manifest's checksum of it."""
        cpath = self.clips_path
        if not cpath.is_file():
            raise CacheError(f"{self.path}: {self.CLIPS} missing: the cache is incomplete; rerun extract-features "
                             f"with the same options to rewrite it")
        data = cpath.read_bytes()
        if hashlib.sha256(data).hexdigest() != manifest.get("clips_sha256"):
            raise CacheError(f"{cpath}: checksum differs from the manifest's: the file was edited or damaged; "
                             f"rerun extract-features with the same options to rewrite it (intact shards are kept)")
        try:
            return json.loads(data.decode("utf-8"))
        except ValueError as e:  # pragma: no cover - the checksum matched
            raise CacheError(f"{cpath}: unreadable ({e})") from None

    def write_clips(self, records: List[dict]) -> None:
        write_json(self.clips_path, records)

    def write_manifest(self, manifest: Mapping) -> None:
        write_json(self.manifest_path, dict(manifest))

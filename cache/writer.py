"""Writing a cache directory: :class:`CacheWriter`.

One writer owns everything a cache directory holds besides the upstream's weights::

    with CacheWriter(out) as cache:
        cache.begin(overwrite=False)             # claim the directory, clear a killed run's leftovers
        found = cache.existing_settings(settings) # a cache already there: its settings, checked
        if found is None:
            cache.write_settings(settings)       # extraction.json
        cache.write_shard(0, items)              # shards/shard-00000.h5 + its sidecar .json
        cache.finish(records)                    # clips.json, then manifest.json last

Every file is written under a temporary name and renamed when complete. An exception
inside the ``with`` block removes the temporary files this writer started and never
leaves a manifest: a cache without ``manifest.json`` is incomplete, and a rerun keeps
each shard whose sidecar still matches (:meth:`CacheWriter.valid_shard`). A cache whose
shards are intact but whose clips.json or manifest is damaged or edited (its checksum
does not match) is not finished (:meth:`CacheWriter.needs_finish`): a rerun writes them again.

Under ``torchrun`` every rank holds a writer on the same directory: rank 0 begins,
settles the settings and finishes; the others :meth:`~CacheWriter.use_settings` what
rank 0 settled and write their own shards.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from conilium.errors import CacheError, OutputError
from conilium.locking import LOCK_FILE
from conilium.util import check_writable, read_json, write_json

from conilium.dirs import MANIFEST_CHECKSUM, CacheDir, Manifest, file_sha256

from .shards import FORMAT_VERSION, SHARD_DIR, shard_name, write_shard

MANIFEST = CacheDir.MANIFEST
CLIPS = CacheDir.CLIPS
#: The settings file written when a cache is begun (the manifest is written when it is finished).
SETTINGS = CacheDir.SETTINGS
#: Where weights made for the cache (random-init upstreams) are saved, inside the cache directory.
UPSTREAM_DIR = CacheDir.UPSTREAM
#: The settings every cache records, in this order after ``"format"``: in extraction.json
#: and at the head of manifest.json.
SETTINGS_FIELDS = ("upstream", "layers", "layers_spec", "num_hidden_states", "dim", "dtype", "compute_dtype",
                   "frame_rate", "max_seconds", "normalize", "pooled_stats", "corpus_root", "corpus_fingerprint",
                   "splits", "augmentation", "shard_size", "code_version", "config", "normalize_stats")
#: Settings only some caches record, after the others, compared (and part of a shard's settings
#: key) only where one of the two sides has them, so that other caches are as before:
#: ``"classes"``, the corpus's class set (:meth:`conilium.classes.ClassSet.to_json`) when it is not
#: MSP-Podcast's eight; ``"text"``, a text upstream's transcripts fingerprint and tokenizer
#: (:mod:`conilium.extract.text`); ``"compile"``, true when the upstream ran through
#: ``torch.compile`` (``extract-features --compile``).
SETTINGS_OPTIONAL = ("classes", "text", "compile")
#: Kept in extraction.json only (bookkeeping of the run that wrote the settings), not in the manifest.
SETTINGS_ONLY = ("skipped_in_stats",)
#: What :meth:`CacheWriter.finish` adds to the settings to make the manifest (its own checksum last).
MANIFEST_FIELDS = ("num_clips", "skipped", "clips_sha256", "shards", "complete", MANIFEST_CHECKSUM)
#: Settings that must agree between a cache on disk and a request for it.
COMPARED = ("upstream", "layers", "num_hidden_states", "dim", "dtype", "compute_dtype", "max_seconds",
            "normalize", "pooled_stats", "corpus_fingerprint", "splits", "augmentation", "shard_size",
            "frame_rate", "code_version", "classes")


def _describe(value) -> str:
    s = repr(value)
    return s if len(s) <= 120 else s[:117] + "..."


def compare_settings(existing: Mapping, requested: Mapping) -> List[str]:
    """Names and values of the settings that differ, one line each."""
    diffs = []
    for k in COMPARED:
        a, b = existing.get(k), requested.get(k)
        if a != b:
            diffs.append(f"{k}: cache has {_describe(a)}, requested {_describe(b)}")
    if bool(existing.get("compile")) != bool(requested.get("compile")):
        diffs.append(f"compile: cache has {bool(existing.get('compile'))}, requested {bool(requested.get('compile'))} "
                     f"(extract-features --compile: its frames differ from the eager forward's in the last bits)")
    a, b = existing.get("text") or {}, requested.get("text") or {}
    if a.get("transcripts_fingerprint") != b.get("transcripts_fingerprint"):
        diffs.append(f"transcripts: the cache was built from other transcripts (fingerprint "
                     f"{str(a.get('transcripts_fingerprint'))[:12]}…, now {str(b.get('transcripts_fingerprint'))[:12]}…): "
                     f"Transcripts/ changed since")
    for k in sorted(set(a) | set(b)):
        if k != "transcripts_fingerprint" and a.get(k) != b.get(k):
            diffs.append(f"text {k}: cache has {_describe(a.get(k))}, requested {_describe(b.get(k))}")
    return diffs


def settings_key(settings: Mapping) -> str:
    """Digest of the settings a shard depends on, and of the shard format (recorded in its sidecar)."""
    h = hashlib.sha256()
    h.update(f"format={FORMAT_VERSION}\n".encode())
    for k in COMPARED:
        h.update(f"{k}={settings.get(k)!r}\n".encode())
    h.update(f"norm_stats={settings.get('normalize_stats')!r}\n".encode())
    for k in SETTINGS_OPTIONAL:
        if settings.get(k) is not None:
            h.update(f"{k}={json.dumps(settings[k], sort_keys=True)}\n".encode())
    return h.hexdigest()


def projected_bytes(num_frames: int, n_clips: int, n_layers: int, dim: int, dtype: str, pooled_layers: int) -> int:
    """Bytes the shards of ``n_clips`` clips with ``num_frames`` frames in all will take."""
    per_value = 2 if dtype == "float16" else 4
    frames = num_frames * n_layers * dim * per_value
    pooled = n_clips * pooled_layers * 2 * dim * 4
    overhead = n_clips * 256  # the shard's index: name, offset, frame count, checksums
    return frames + pooled + overhead


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


def _ordered_settings(settings: Mapping) -> dict:
    """``settings`` with ``"format"`` first and the fields in their order; a missing or
    unknown field is a ValueError (every cache records the same settings)."""
    given = {k: v for k, v in settings.items() if k != "format"}
    if settings.get("format", FORMAT_VERSION) != FORMAT_VERSION:
        raise ValueError(f"cache settings: format {settings['format']!r}, this writer writes {FORMAT_VERSION}")
    missing = [k for k in SETTINGS_FIELDS if k not in given]
    unknown = [k for k in given if k not in SETTINGS_FIELDS + SETTINGS_OPTIONAL + SETTINGS_ONLY]
    if missing or unknown:
        raise ValueError(f"cache settings: missing {missing}, unknown {unknown}")
    given = {k: v for k, v in given.items() if not (k in SETTINGS_OPTIONAL and v is None)}
    order = SETTINGS_FIELDS + SETTINGS_OPTIONAL + SETTINGS_ONLY
    return {"format": FORMAT_VERSION, **{k: given[k] for k in order if k in given}}


class CacheWriter:
    """Writes the cache directory ``out`` (see the module's docstring for the steps)."""

    def __init__(self, out, *, read_only: bool = False):
        self.out = Path(out)
        self.dir = CacheDir(out)
        #: a complete cache that cannot be written (read-only file system, no permission): checked,
        #: never written; beginning to write any file is an OutputError naming the directory
        self.read_only = read_only
        self.settings: Optional[dict] = None
        self.key: Optional[str] = None
        #: sidecar records of the shards written through this writer, by shard index
        self.written: Dict[int, dict] = {}
        self._started: List[Path] = []  # final names of the files this writer began to write
        self._finishing = False

    # ---- the directory ---------------------------------------------------------------
    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.discard()
        return False

    @property
    def upstream_dir(self) -> Path:
        """Where weights made for this cache are saved."""
        return self.out / UPSTREAM_DIR

    def begin(self, *, overwrite: bool = False) -> "CacheWriter":
        """Claim ``out``: create it, or accept a (partial) cache there (emptied when
        ``overwrite``), and remove the temporary files of a killed run. A directory holding
        nothing but the temporary files of an extraction killed at its start
        (:meth:`~conilium.cachedir.CacheDir.own_temporaries`) is such a cache. Anything else in a
        non-empty directory is a CacheError, and nothing in it is removed. The directory's lock file
        (:data:`conilium.locking.LOCK_FILE`, held by whoever writes the cache) is no content:
        it neither makes the directory non-empty nor is removed. A directory that cannot be
        written is an :class:`~conilium.errors.OutputError` naming it."""
        out = self.out
        if out.exists() and not out.is_dir():
            raise CacheError(f"--out {out}: exists and is not a directory")
        if self.read_only:
            if overwrite:
                self._start(out)  # an OutputError: rebuilding writes
            return self  # nothing to clear, nor can it be
        content = [c for c in out.iterdir() if not c.name.startswith(LOCK_FILE)] if out.is_dir() else []
        # an extraction killed at its start leaves its temporary files alone (a write check's probe,
        # a half-written extraction.json): the directory is that cache, begun; anything else the user's
        started = set(self.dir.own_temporaries())
        if ([c for c in content if c not in started] and not self.dir.is_begun()
                and not self.dir.upstream_dir.is_dir()):
            raise CacheError(f"--out {out}: directory is not empty and is not a feature cache; "
                             f"choose a new or empty directory")
        check_writable(out, what="cache directory")  # read-only, no permission, full: an OutputError naming it
        if content and overwrite:
            for child in content:
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        # leftovers of a killed run: temporary shard, spool, sidecar and weight files
        for folder in (out, out / SHARD_DIR, out / UPSTREAM_DIR):
            if folder.is_dir():
                for child in folder.iterdir():
                    if child.name.startswith(LOCK_FILE):
                        continue
                    if child.name.startswith(".") and child.name.endswith(".tmp") and child.is_file():
                        child.unlink()
                    elif folder == out and child in started:  # a write check's probe
                        child.unlink()
                    elif ".tmp" in child.name and child.is_dir() and folder.name == UPSTREAM_DIR:
                        shutil.rmtree(child, ignore_errors=True)
        return self

    def discard(self) -> None:
        """After a failure: remove the temporary files of what this writer began, and a
        ``clips.json`` written by an unfinished :meth:`finish` (no manifest was written)."""
        for path in self._started:
            if path.parent.is_dir():
                for tmp in path.parent.glob(f".{path.name}.*"):
                    if tmp.name.endswith(".tmp") and tmp.is_file():
                        tmp.unlink(missing_ok=True)
        if self._finishing:
            (self.out / CLIPS).unlink(missing_ok=True)
            self._finishing = False

    def _start(self, path: Path) -> Path:
        if self.read_only:
            raise OutputError(path, f"the feature cache {self.out} is read-only and needs writing: "
                                    f"{self.finish_problem() or 'shards to write again'}",
                              "rebuild it where it can be written (--out), or make it writable")
        self._started.append(path)
        return path

    # ---- settings --------------------------------------------------------------------
    def existing_settings(self, requested: Mapping) -> Optional[Tuple[dict, bool]]:
        """The settings of a cache already in ``out`` and whether it is complete (finished, with an
        intact manifest and clips.json: :meth:`needs_finish`), or None when there is none.
        Settings that differ from ``requested`` are a CacheError naming them. A manifest that is
        unreadable or fails its own checksum is not trusted (nor compared): it is written again
        when the cache is finished. The settings found are then used for the shards
        (:meth:`use_settings`); a cache of an older format keeps none of its shards."""
        found = None
        settings_path = self.out / SETTINGS
        for path in (self.out / MANIFEST, settings_path):  # extraction.json, when there, wins
            if not path.is_file():
                continue
            try:
                existing = read_json(path)
                if not isinstance(existing, dict):
                    raise ValueError("not a JSON object")
            except ValueError:
                if path.name == MANIFEST:
                    continue  # damaged: rewritten when the cache is finished
                raise CacheError(f"{path}: unreadable (corrupt); pass --overwrite to rebuild the cache") from None
            if (path.name == MANIFEST and existing.get("format") == FORMAT_VERSION
                    and existing.get(MANIFEST_CHECKSUM) != Manifest(existing).checksum()):
                continue  # edited or damaged: its settings are not to be trusted
            diffs = compare_settings(existing, requested)
            if diffs:
                raise CacheError(f"{self.out} was built with other settings than requested:\n  " + "\n  ".join(diffs)
                                 + "\npass --overwrite to rebuild it, or choose another --out")
            found = {k: v for k, v in existing.items() if k not in MANIFEST_FIELDS}
        if found is None:
            return None
        found = {"format": FORMAT_VERSION, **{k: v for k, v in found.items() if k != "format"}}
        on_disk = None
        if settings_path.is_file():
            try:
                on_disk = read_json(settings_path)
            except ValueError:  # pragma: no cover - refused above
                on_disk = None
        if on_disk != found and not self.read_only:  # missing, or of an older format
            write_json(self._start(settings_path), found)
        self.use_settings(found)
        return found, not self.needs_finish()

    def finish_problem(self) -> Optional[str]:
        """Why the cache in ``out`` is not finished: no manifest, an unreadable, edited or
        damaged one (its own checksum), one of another format, a clips.json that is missing
        or differs from the manifest's checksum of it; None when it is finished and intact.
        (The shards are checked one by one: :meth:`valid_shard`.)"""
        mpath, cpath = self.out / MANIFEST, self.out / CLIPS
        if not mpath.is_file():
            return f"no {MANIFEST}"
        try:
            manifest = read_json(mpath)
        except ValueError as e:
            return f"{MANIFEST} unreadable ({e})"
        if not isinstance(manifest, dict):
            return f"{MANIFEST} is not a JSON object"
        why = Manifest(manifest).problem()
        if why is not None:
            return f"{MANIFEST}: {why}"
        if not cpath.is_file():
            return f"no {CLIPS}"
        if file_sha256(cpath) != manifest.get("clips_sha256"):
            return f"{CLIPS} differs from the manifest's checksum of it"
        return None

    def needs_finish(self) -> bool:
        """True unless ``out`` holds a finished cache of this format whose manifest and
        clips.json are intact (:meth:`finish_problem`): then :meth:`finish` has to run, even
        when every shard is kept, so that a rerun repairs a damaged clips.json or manifest."""
        return self.finish_problem() is not None

    def write_settings(self, settings: Mapping) -> dict:
        """Write ``settings`` (every field of :data:`SETTINGS_FIELDS`) to extraction.json and
        use them for the shards; returns them as written."""
        settings = _ordered_settings(settings)
        write_json(self._start(self.out / SETTINGS), settings)
        self.use_settings(settings)
        return settings

    def use_settings(self, settings: Mapping) -> None:
        """Write and check shards for ``settings`` (settled elsewhere, e.g. by rank 0)."""
        self.settings = dict(settings)
        self.key = settings_key(self.settings)

    def _need_settings(self, what: str) -> None:
        if self.settings is None:
            raise RuntimeError(f"CacheWriter.{what}: no settings yet (write_settings, existing_settings "
                               f"or use_settings first)")

    # ---- shards ----------------------------------------------------------------------
    def sidecar_path(self, index: int) -> Path:
        return self.dir.sidecar_path(index)

    def valid_shard(self, index: int, names: Iterable[str], *, check_hash: bool = True) -> Optional[dict]:
        """The sidecar record of shard ``index`` if the shard is complete, holds (or skipped)
        exactly ``names``, was made with these settings and is intact; None otherwise."""
        self._need_settings("valid_shard")
        side = self.sidecar_path(index)
        if not side.is_file():
            return None
        try:
            rec = read_json(side)
        except ValueError:
            return None
        if rec.get("settings_key") != self.key:
            return None
        planned = sorted(names)
        done = sorted(list(rec.get("clips", [])) + [n for n, _ in rec.get("skipped", [])])
        if planned != done:
            return None
        path = self.out / rec["entry"]["file"]
        if not path.is_file() or path.stat().st_size != rec["entry"]["bytes"]:
            return None
        if check_hash and file_sha256(path) != rec["entry"]["sha256"]:
            return None
        return rec

    def write_shard(self, index: int, items: Iterable[Tuple[str, np.ndarray, Optional[np.ndarray]]], *,
                    skipped: Sequence[Sequence[str]] = ()) -> dict:
        """Write shard ``index`` from ``(name, frames (T, L, D), pooled or None)`` items, then its
        sidecar; returns the sidecar record. ``skipped`` lists ``[name, reason]`` of the shard's
        clips left out; it is read once the items are exhausted (it may grow meanwhile)."""
        self._need_settings("write_shard")
        frames_of: Dict[str, int] = {}

        def counted():
            for name, frames, pooled in items:
                frames_of[name] = int(frames.shape[0])
                yield name, frames, pooled

        layers, dim = self.settings.get("layers"), self.settings.get("dim")
        entry = write_shard(self._start(self.out / shard_name(index)), counted(), dtype=self.settings["dtype"],
                            shard_index=index, num_layers=None if layers is None else len(layers),
                            dim=None if dim is None else int(dim))
        rec = {"settings_key": self.key, "index": index, "entry": entry, "clips": list(frames_of),
               "num_frames": frames_of, "skipped": list(skipped)}
        write_json(self._start(self.sidecar_path(index)), rec)
        self.written[index] = rec
        return rec

    # ---- the end ---------------------------------------------------------------------
    def finish(self, records: List[dict], *, shards: Optional[List[dict]] = None,
               skipped: Optional[Mapping[str, str]] = None) -> dict:
        """Write ``clips.json`` (``records``, each with its ``"shard"`` and ``"num_frames"``),
        then, last, ``manifest.json``: the settings, the clip count, ``skipped`` (clip →
        reason), the clips.json checksum, ``shards`` (manifest entries in shard order;
        default: the shards written through this writer), ``"complete": true`` and, last,
        the manifest's checksum of all of that. Returns the manifest."""
        self._need_settings("finish")
        if shards is None:
            if sorted(self.written) != list(range(len(self.written))):
                raise CacheError(f"{self.out}: shards {sorted(self.written)} written; expected 0..n-1")
            shards = [self.written[i]["entry"] for i in range(len(self.written))]
        for r in records:
            if not 0 <= int(r["shard"]) < len(shards):
                raise CacheError(f"{self.out}: clip {r.get('name')} is in shard {r['shard']}, "
                                 f"the cache has {len(shards)} shard(s)")
        self._finishing = True
        (self.out / MANIFEST).unlink(missing_ok=True)  # never a manifest beside another clips.json
        self._start(self.dir.clips_path)
        self.dir.write_clips(records)
        manifest = {k: v for k, v in self.settings.items() if k not in SETTINGS_ONLY}
        manifest.update({
            "format": FORMAT_VERSION,
            "num_clips": len(records),
            "skipped": [{"clip": n, "reason": r} for n, r in sorted((skipped or {}).items())],
            "clips_sha256": file_sha256(self.out / CLIPS),
            "shards": list(shards),
            "complete": True,
        })
        manifest = Manifest(manifest).sealed()
        self._start(self.dir.manifest_path)
        write_manifest(self.out, manifest)
        self._finishing = False
        return manifest


def write_manifest(path, manifest: Manifest) -> None:
    """Write the manifest of the cache directory ``path`` (the last file of a finished cache)."""
    CacheDir(path).write_manifest(manifest)

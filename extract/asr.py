"""``conilium corpus transcribe``: a corpus's transcripts made by a Whisper model.

transformers' ``WhisperForConditionalGeneration`` and ``WhisperProcessor`` are loaded with
``from_pretrained`` from a registry name (``whisper-large-v3`` → ``openai/whisper-large-v3``,
every ``whisper-*`` name of :data:`~conilium.extract.registry.UPSTREAMS`), a hub id or a local
model directory. Decoding is greedy (``num_beams=1``) or beam search, never sampled, on
batches of clips, and writes ``Transcripts/<clip stem>.txt`` (:mod:`conilium.transcripts`).

Long clips: Whisper reads 30 s windows (its feature extractor cuts longer input). A clip
longer than :data:`CHUNK_SECONDS` is cut into the fewest equal consecutive pieces of at most
30 s, each piece is transcribed on its own, and the texts are joined with a space: a word
spoken across a cut may be split or lost. (MSP-Podcast clips last 2.75 to 11 s.)

Resumable: each transcript is written atomically, one file per clip; a rerun with the same
settings skips the clips done. ``Transcripts/transcription.json`` records the model
(registry name, model id or path, the revision asked for, the hub commit or the local weights'
SHA-256), the settings, the versions, and the clips in which the model heard no words
(``"no_text"``: they get no file, and are reported as missing, never read as empty strings);
a rerun with other settings is refused unless ``overwrite``.
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from tqdm import tqdm

import conilium
from conilium import SAMPLE_RATE
from conilium.audio import read_audio
from conilium.corpus import Corpus, load_corpus
from conilium.errors import AudioError, ConfigError, CorpusError
from conilium.locking import lock_directory
from conilium.runtime import resolve_device
from conilium.transcripts import (TRANSCRIPTION_FILE, read_transcription_info, transcript_path,
                                  transcripts_dir)
from conilium.util import atomic_path, write_json

from .registry import UPSTREAMS

#: Whisper's input window, in seconds: longer clips are cut into pieces of at most this length.
CHUNK_SECONDS = 30.0
#: Settings that must agree between transcription.json and a rerun that resumes it.
COMPARED = ("asr", "model", "revision", "num_beams", "max_new_tokens", "language", "task", "chunk_seconds")
_SPACE = re.compile(r"\s+")


def asr_source(asr: str, revision: Optional[str] = None) -> Tuple[str, dict]:
    """Where to load ``asr`` from (a path or hub id) and its identity for transcription.json."""
    p = Path(asr)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ConfigError(f"--asr {asr}: not a transformers model directory (no config.json)")
        from .upstreams import weights_hash

        return str(p), {"asr": asr, "model": str(p.resolve()), "source": "local", "revision": None,
                        "weights_sha256": weights_hash(p)}
    spec = UPSTREAMS.get(asr)
    if spec is not None:
        if spec.family != "whisper" or spec.model_id is None:
            names = [n for n, s in UPSTREAMS.items() if s.family == "whisper" and s.model_id]
            raise ConfigError(f"--asr {asr}: not a released Whisper model; use one of {', '.join(names)}, "
                              f"a hub id or a local model directory")
        model_id = spec.model_id
    else:
        model_id = asr
    return model_id, {"asr": asr, "model": model_id, "source": "hub", "revision": revision}


def load_asr(asr: str, *, revision: Optional[str] = None, device="cpu"):
    """``(model, processor, identity)`` of a Whisper ASR model, loaded with ``from_pretrained``."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from .upstreams import hub_access

    source, identity = asr_source(asr, revision)
    access = hub_access(asr, source, revision) if identity["source"] == "hub" else {}
    try:
        processor = WhisperProcessor.from_pretrained(source, revision=revision, **access)
        model = WhisperForConditionalGeneration.from_pretrained(source, revision=revision, **access)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--asr {asr}: cannot load a Whisper model and processor from {source}: {e}") from None
    identity["commit"] = getattr(model.config, "_commit_hash", None)
    model.eval().to(resolve_device(device))
    return model, processor, identity


def split_long(wave: np.ndarray, chunk_seconds: float = CHUNK_SECONDS) -> List[np.ndarray]:
    """``wave`` as the fewest equal consecutive pieces of at most ``chunk_seconds``."""
    limit = int(round(chunk_seconds * SAMPLE_RATE))
    n = max(1, math.ceil(len(wave) / limit))
    size = math.ceil(len(wave) / n)
    return [wave[i * size:(i + 1) * size] for i in range(n)]


def _settings(identity: dict, *, num_beams: int, max_new_tokens: int, language: Optional[str], task: str) -> dict:
    return {**identity, "num_beams": num_beams, "max_new_tokens": max_new_tokens, "language": language,
            "task": task, "chunk_seconds": CHUNK_SECONDS, "decoding": "greedy" if num_beams == 1 else "beam search"}


def _check_resume(tdir: Path, info: Optional[dict], settings: dict, names: List[str], root: Path,
                  overwrite: bool) -> None:
    if overwrite:
        return
    if info is None:
        present = [n for n in names if transcript_path(root, n).is_file()]
        if present:
            raise CorpusError(f"{tdir}: holds {len(present)} transcript(s) not made by conilium corpus transcribe "
                              f"(no {TRANSCRIPTION_FILE}); move them away, or pass --overwrite to replace them")
        return
    made = info.get("settings") or {}
    diffs = [f"{k}: made with {made.get(k)!r}, requested {settings.get(k)!r}" for k in COMPARED
             if made.get(k) != settings.get(k)]
    if made.get("weights_sha256") and settings.get("weights_sha256") and made["weights_sha256"] != settings["weights_sha256"]:
        diffs.append("weights_sha256: the model directory's weights changed")
    if diffs:
        raise CorpusError(f"{tdir} was transcribed with other settings than requested:\n  " + "\n  ".join(diffs)
                          + "\npass --overwrite to transcribe every clip again")


def transcribe_corpus(corpus, asr: str, *, revision: Optional[str] = None, num_beams: int = 1,
                      batch_size: int = 8, max_new_tokens: Optional[int] = None, language: Optional[str] = None,
                      device: str = "auto", overwrite: bool = False, skip_bad: bool = False,
                      allow_symlinks: bool = False, verbose: bool = True) -> dict:
    """Write ``Transcripts/<clip stem>.txt`` for every clip of ``corpus`` (a root or a loaded
    :class:`~conilium.corpus.Corpus`) with the Whisper model ``asr``; returns transcription.json.

    ``num_beams`` 1 is greedy decoding; ``batch_size`` pieces of at most 30 s go through the
    model at once; ``max_new_tokens`` bounds each piece's text (default: half the decoder's
    positions, 224 for the released models, as Whisper's own decoding); ``language`` (e.g.
    ``en``) is given to the model, None lets it detect the language. Clips already transcribed
    with the same settings are skipped; ``overwrite`` transcribes every clip again. An
    unreadable clip is an error naming it, or with ``skip_bad`` is left without a transcript
    and listed (``"skipped"``)."""
    if num_beams < 1 or batch_size < 1:
        raise ConfigError("--beams and --batch-size must be at least 1")
    if not isinstance(corpus, Corpus):
        corpus = load_corpus(corpus, read_durations=True, skip_bad=skip_bad, allow_symlinks=allow_symlinks)
    root = Path(corpus.root)
    tdir = transcripts_dir(root)
    names = list(corpus.clips)
    task = "transcribe"
    with lock_directory(tdir, what="transcripts directory"):
        info = read_transcription_info(root)
        from .extract import _hf_bars

        with _hf_bars(verbose):
            model, processor, identity = load_asr(asr, revision=revision, device=device)
        positions = int(model.config.max_target_positions)
        if max_new_tokens is None:
            max_new_tokens = positions // 2
        if max_new_tokens + 4 > positions:
            raise ConfigError(f"--max-new-tokens {max_new_tokens}: the model's decoder holds {positions} "
                              f"positions, a few of them for its prompt; use at most {positions - 4}")
        settings = _settings(identity, num_beams=num_beams, max_new_tokens=max_new_tokens, language=language,
                             task=task)
        _check_resume(tdir, info, settings, names, root, overwrite)
        no_text = [] if overwrite or info is None else [n for n in info.get("no_text", []) if n in corpus.clips]
        skipped = dict(corpus.skipped)
        record = {"settings": settings, "transformers": _transformers_version(), "conilium": conilium.__version__,
                  "clips": len(names), "written": 0, "no_text": no_text, "skipped": [], "complete": False}
        info_path = tdir / TRANSCRIPTION_FILE

        def save(complete: bool = False):
            done = sum(transcript_path(root, n).is_file() for n in names)
            record.update(written=done, no_text=list(no_text), complete=complete,
                          skipped=[{"clip": n, "reason": r} for n, r in sorted(skipped.items())])
            write_json(info_path, record)

        todo = [n for n in names if overwrite or not (transcript_path(root, n).is_file() or n in no_text)]
        save()
        dev = next(model.parameters()).device
        bar = tqdm(total=len(todo), desc=f"transcribe {asr}", unit="clip", disable=not verbose or not todo,
                   file=sys.stderr, dynamic_ncols=True)
        try:
            for batch in _batches(corpus, todo, batch_size, skip_bad, skipped):
                texts = _generate(model, processor, [w for _, w in batch], dev, num_beams=num_beams,
                                  max_new_tokens=max_new_tokens, language=language, task=task)
                pieces: Dict[str, List[str]] = {}
                for (name, _), text in zip(batch, texts):
                    pieces.setdefault(name, []).append(text)
                for name, parts in pieces.items():
                    _write(root, name, _join(parts), no_text)
                save()
                bar.update(len(pieces))
        finally:
            bar.close()
        save(complete=True)
    if verbose:
        tqdm.write(f"{tdir}: {record['written']} of {len(names)} clips transcribed ({len(todo)} this run)"
                   + (f"; no words heard in {len(no_text)}" if no_text else "")
                   + (f"; {len(skipped)} skipped (unreadable audio)" if skipped else ""), file=sys.stderr)
    return record


class Transcriber:
    """A Whisper model's transcripts of waveforms in memory, decoded as :func:`transcribe_corpus`
    decodes a corpus's clips (the same model loading, long-clip cutting, decoding and joining;
    the same default ``max_new_tokens``): ``transcribe(waves)`` gives one text per 16 kHz mono
    waveform, ``""`` where the model heard no words. ``predict --asr`` uses it for the files of
    a fusion run."""

    def __init__(self, asr: str, *, revision: Optional[str] = None, num_beams: int = 1, batch_size: int = 8,
                 max_new_tokens: Optional[int] = None, language: Optional[str] = None, device="cpu"):
        if num_beams < 1 or batch_size < 1:
            raise ConfigError("--asr: the beams and the batch size must be at least 1")
        self.model, self.processor, self.identity = load_asr(asr, revision=revision, device=device)
        positions = int(self.model.config.max_target_positions)
        self.max_new_tokens = positions // 2 if max_new_tokens is None else int(max_new_tokens)
        if self.max_new_tokens + 4 > positions:
            raise ConfigError(f"max_new_tokens {self.max_new_tokens}: the model's decoder holds {positions} "
                              f"positions, a few of them for its prompt; use at most {positions - 4}")
        self.asr, self.num_beams, self.batch_size, self.language = asr, num_beams, batch_size, language
        self.settings = _settings(self.identity, num_beams=num_beams, max_new_tokens=self.max_new_tokens,
                                  language=language, task="transcribe")

    def transcribe(self, waves: List[np.ndarray]) -> List[str]:
        dev = next(self.model.parameters()).device
        pieces = [(i, p) for i, w in enumerate(waves) for p in split_long(np.asarray(w, dtype=np.float32))]
        parts: Dict[int, List[str]] = {i: [] for i in range(len(waves))}
        for at in range(0, len(pieces), self.batch_size):
            batch = pieces[at:at + self.batch_size]
            texts = _generate(self.model, self.processor, [p for _, p in batch], dev, num_beams=self.num_beams,
                              max_new_tokens=self.max_new_tokens, language=self.language, task="transcribe")
            for (i, _), text in zip(batch, texts):
                parts[i].append(text)
        return [_join(parts[i]) for i in range(len(waves))]


def _join(parts: List[str]) -> str:
    """A clip's text from its pieces' texts (one piece for a clip of at most 30 s)."""
    return _SPACE.sub(" ", " ".join(parts)).strip()


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _batches(corpus: Corpus, todo: List[str], batch_size: int, skip_bad: bool, skipped: Dict[str, str]):
    """Lists of ``(clip, piece)`` of at most ``batch_size`` pieces, a clip's pieces never split
    across batches (a clip with more pieces than ``batch_size`` is a batch of its own)."""
    batch: List[Tuple[str, np.ndarray]] = []
    for name in todo:
        try:
            wave = read_audio(corpus.audio_path(name), clip=name)
        except AudioError as e:
            if not skip_bad:
                raise AudioError(e.path, f"{e.reason} (pass --skip-bad to leave such clips untranscribed)",
                                 name) from None
            skipped[name] = str(e)
            continue
        parts = [(name, p) for p in split_long(wave)]
        if batch and len(batch) + len(parts) > batch_size:
            yield batch
            batch = []
        batch += parts
    if batch:
        yield batch


@torch.inference_mode()
def _generate(model, processor, waves: List[np.ndarray], dev, *, num_beams: int, max_new_tokens: int,
              language: Optional[str], task: str) -> List[str]:
    feats = processor.feature_extractor(waves, sampling_rate=SAMPLE_RATE, return_tensors="pt",
                                        return_attention_mask=True)
    kwargs = dict(num_beams=num_beams, do_sample=False, max_new_tokens=max_new_tokens)
    if language is not None:
        kwargs.update(language=language, task=task)
    with _generation_notices_off():  # transformers' notes on its own defaults (max_length beside max_new_tokens)
        ids = model.generate(feats.input_features.to(dev, model.dtype),
                             attention_mask=feats.attention_mask.to(dev), **kwargs)
    return [t.strip() for t in processor.tokenizer.batch_decode(ids, skip_special_tokens=True)]


@contextlib.contextmanager
def _generation_notices_off():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _write(root: Path, name: str, text: str, no_text: List[str]) -> None:
    path = transcript_path(root, name)
    if not text:  # no words heard: no file (reported as missing with that reason), never an empty one
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        if name not in no_text:
            no_text.append(name)
        return
    if name in no_text:
        no_text.remove(name)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")

"""Audio decoding shared by extraction, fine-tuning and prediction.

soundfile decodes, multi-channel audio is averaged to mono, other sample rates are
resampled to 16 kHz with soxr, and the result is truncated to ``max_seconds``
(reading only the frames needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import soundfile as sf
import soxr

from . import SAMPLE_RATE
from .errors import AudioError


def read_audio(path, *, sample_rate: int = SAMPLE_RATE, max_seconds: Optional[float] = None,
               clip: Optional[str] = None) -> np.ndarray:
    """Decode ``path`` into a float32 mono waveform at ``sample_rate``.

    Raises :class:`AudioError` naming the file (and ``clip``) when it is missing,
    unreadable, empty, or holds NaN/inf samples.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(path, "audio file not found", clip)
    try:
        with sf.SoundFile(str(path)) as f:
            sr = f.samplerate
            frames = f.frames
            if max_seconds is not None and max_seconds > 0:
                frames = min(frames, int(round(max_seconds * sr)))
            x = f.read(frames=frames, dtype="float32", always_2d=True)
    except AudioError:
        raise
    except Exception as e:  # libsndfile errors come as RuntimeError / LibsndfileError
        raise AudioError(path, f"unreadable audio ({e})", clip) from None
    if x.size == 0:
        raise AudioError(path, "empty audio (no samples)", clip)
    x = x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]
    if not np.all(np.isfinite(x)):
        raise AudioError(path, "audio holds NaN or infinite samples", clip)
    if sr != sample_rate:
        x = soxr.resample(x, sr, sample_rate, quality="HQ").astype(np.float32)
        if max_seconds is not None and max_seconds > 0:
            x = x[: int(round(max_seconds * sample_rate))]
    return np.ascontiguousarray(x, dtype=np.float32)


def normalize(x: np.ndarray, mode: str, stats: Optional[dict] = None) -> np.ndarray:
    """Waveform normalisation: ``global`` (corpus mean/std in ``stats``), ``utterance`` or ``none``."""
    if mode == "none":
        return x
    if mode == "utterance":
        return ((x - x.mean()) / (x.std() + 1e-7)).astype(np.float32)
    if mode == "global":
        if not stats or "mean" not in stats or "std" not in stats:
            raise ValueError("global normalisation needs the corpus mean and std")
        return ((x - stats["mean"]) / (stats["std"] + 1e-7)).astype(np.float32)
    raise ValueError(f"unknown normalisation {mode!r}; expected global, utterance or none")

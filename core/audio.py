"""The signal path shared by extraction, fine-tuning and prediction.

read → truncate/resample → (noise) → normalise, the same code for every stage:

* :func:`read_audio` — soundfile decodes, multi-channel audio is averaged to mono,
  other sample rates are resampled to 16 kHz with soxr, and the result is truncated to
  ``max_seconds`` (reading only the frames needed); samples far outside [-1, 1] (float
  audio stored at integer scale) are an error unless ``rescale_loud``;
* :func:`mix_noise` — a segment of a noise recording added at a given SNR (paper 3.2);
  :class:`NoiseMixer` draws which clips get noise, and which noise, per (seed, epoch, clip);
* :func:`normalize` — ``global`` (the Train audio's mean and std, :func:`global_stats`),
  ``utterance`` or ``none``;
* :class:`SignalPath` — the three in order, with the settings a cache or a model
  directory records.
"""

from __future__ import annotations

import math
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Tuple

import numpy as np
import soundfile as sf
import soxr
from tqdm import tqdm

from . import SAMPLE_RATE
from .errors import AudioError, ConfigError

if TYPE_CHECKING:  # annotations only
    from .corpus import Corpus

NORMALIZE_MODES = ("global", "utterance", "none")
#: File endings taken as audio in a noise folder.
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")
#: Largest plausible peak of decoded audio. Integer PCM (WAV, FLAC, AIFF) decodes to
#: [-1, 1) exactly; float WAV and lossy codecs may go somewhat past full scale (inter-sample
#: overs, resampling, mixing: +1 to +3 dBFS in practice). Past +6 dBFS (2.0) the samples are
#: not float audio but integer values stored as floats (int16 scale: peaks of 1e2 to 3.3e4),
#: which would swamp the global mean/std and every other clip's features.
MAX_PEAK = 2.0
#: Integer full scales tried, smallest first, when ``rescale_loud`` divides such audio back.
_FULL_SCALES = (2.0 ** 15, 2.0 ** 23, 2.0 ** 31)


def loud_scale(peak: float) -> float:
    """The integer full scale (2**15, 2**23, 2**31) that audio peaking at ``peak`` was most
    likely written at (the smallest one it fits in); the peak itself beyond them."""
    for scale in _FULL_SCALES:
        if peak <= scale:
            return scale
    return float(peak)


def read_audio(path, *, sample_rate: int = SAMPLE_RATE, max_seconds: Optional[float] = None,
               clip: Optional[str] = None, rescale_loud: bool = False) -> np.ndarray:
    """Decode ``path`` into a float32 mono waveform at ``sample_rate``.

    Raises :class:`AudioError` naming the file (and ``clip``) when it is missing,
    unreadable, empty, holds NaN/inf samples, or samples beyond ±:data:`MAX_PEAK` (float
    audio at integer scale). With ``rescale_loud`` such audio is divided by the integer
    full scale it fits (:func:`loud_scale`: 32768 for int16-scale values) instead.
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
    return condition_audio(x, sr, source=path, sample_rate=sample_rate, max_seconds=max_seconds, clip=clip,
                           rescale_loud=rescale_loud)


def stream_audio(path, *, block_seconds: float = 60.0, sample_rate: int = SAMPLE_RATE, clip: Optional[str] = None,
                 rescale_loud: bool = False):
    """Decode ``path`` block by block into float32 mono pieces at ``sample_rate``, for recordings
    too long to hold whole: memory is bounded by ``block_seconds`` of audio, not by the file.
    Resampling runs as one soxr stream across the blocks, so the pieces joined equal (to float
    rounding) what :func:`read_audio` returns for the whole file. The checks are
    :func:`read_audio`'s; with ``rescale_loud`` a block beyond ±:data:`MAX_PEAK` is divided by
    the integer full scale of the loudest block seen so far."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(path, "audio file not found", clip)
    try:
        f = sf.SoundFile(str(path))
    except Exception as e:
        raise AudioError(path, f"unreadable audio ({e})", clip) from None
    with f:
        sr = f.samplerate
        if f.frames == 0:
            raise AudioError(path, "empty audio (no samples)", clip)
        stream = None if sr == sample_rate else soxr.ResampleStream(sr, sample_rate, 1, dtype="float32", quality="HQ")
        scale = 1.0
        size = max(1, int(round(block_seconds * sr)))
        while True:
            try:
                x = f.read(frames=size, dtype="float32", always_2d=True)
            except Exception as e:
                raise AudioError(path, f"unreadable audio at {f.tell() / sr:.1f} s ({e})", clip) from None
            last = len(x) < size
            x = x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]
            if not np.all(np.isfinite(x)):
                raise AudioError(path, "audio holds NaN or infinite samples", clip)
            peak = float(np.abs(x).max()) if len(x) else 0.0
            if peak > MAX_PEAK:
                if not rescale_loud:
                    raise AudioError(path, f"samples reach {peak:.6g}, far outside the [-1, 1] range of float "
                                           f"audio; pass --rescale-loud to divide such files by "
                                           f"{loud_scale(peak):.0f}", clip)
                scale = max(scale, loud_scale(peak))
            if scale != 1.0:
                x = (x / np.float32(scale)).astype(np.float32)
            if stream is not None:
                x = stream.resample_chunk(x, last=last)
            if len(x):
                yield np.ascontiguousarray(x, dtype=np.float32)
            if last:
                return


def read_span(path, start: float, end: float, *, clip: Optional[str] = None) -> Tuple[np.ndarray, int]:
    """Samples ``start``..``end`` seconds of ``path`` as stored — ``(samples, channels)`` at the
    file's rate, and the rate — read by seeking, without decoding the rest of the file."""
    path = Path(path)
    try:
        with sf.SoundFile(str(path)) as f:
            sr = f.samplerate
            a = max(0, int(round(start * sr)))
            b = min(f.frames, int(round(end * sr)))
            f.seek(a)
            x = f.read(frames=max(0, b - a), dtype="float32", always_2d=True)
    except Exception as e:
        raise AudioError(path, f"unreadable audio between {start:.3f} and {end:.3f} s ({e})", clip) from None
    return x, sr


def condition_audio(x, sr: int, *, source, sample_rate: int = SAMPLE_RATE, max_seconds: Optional[float] = None,
                    clip: Optional[str] = None, rescale_loud: bool = False) -> np.ndarray:
    """Samples ``x`` at ``sr`` — (N,) or (N, channels), decoded from ``source`` or given in memory —
    as :func:`read_audio` returns a file's: truncated, mono, checked, at ``sample_rate``."""
    path = source
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise AudioError(path, f"a waveform must be (samples,) or (samples, channels), not shape {x.shape}", clip)
    if not (isinstance(sr, (int, np.integer)) and sr > 0):
        raise AudioError(path, f"sample rate must be a positive whole number, not {sr!r}", clip)
    if max_seconds is not None and max_seconds > 0:
        x = x[: int(round(max_seconds * sr))]
    if x.size == 0:
        raise AudioError(path, "empty audio (no samples)", clip)
    x = x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]
    if not np.all(np.isfinite(x)):
        raise AudioError(path, "audio holds NaN or infinite samples", clip)
    peak = float(np.abs(x).max())
    if peak > MAX_PEAK:
        if not rescale_loud:
            raise AudioError(path, f"samples reach {peak:.6g}, far outside the [-1, 1] range of float audio "
                                   f"(float samples written at integer scale, e.g. int16 values?); convert the "
                                   f"file to integer PCM or rescale it to [-1, 1], or pass --rescale-loud to "
                                   f"divide such files by {loud_scale(peak):.0f}", clip)
        x = (x / np.float32(loud_scale(peak))).astype(np.float32)
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


# ----------------------------------------------------------------------------- noise


def parse_snr(text) -> Tuple[float, float]:
    """``"5:20"`` -> (5.0, 20.0); a single number is a fixed SNR. LOW <= HIGH, both finite."""
    if isinstance(text, (tuple, list)):
        text = ":".join(str(v) for v in text)
    parts = str(text).split(":")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ConfigError(f"--snr-db must be LOW:HIGH in dB (e.g. 5:20), got {text!r}") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or values[0] > values[1] or not all(math.isfinite(v) for v in values):
        raise ConfigError(f"--snr-db must be LOW:HIGH in dB with LOW <= HIGH (e.g. 5:20), got {text!r}")
    return (values[0], values[1])


def list_noise_files(noise_dir) -> List[Path]:
    """The audio files under ``noise_dir``, sorted (a clear error when there are none)."""
    d = Path(noise_dir)
    if not d.is_dir():
        raise ConfigError(f"--augment-noise {d}: directory not found")
    files = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
    if not files:
        raise ConfigError(f"--augment-noise {d}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) found")
    return files


def audio_seconds(path) -> float:
    """Duration of an audio file from its header (no decoding)."""
    if not Path(path).is_file():
        raise AudioError(path, "audio file not found")
    try:
        info = sf.info(str(path))
    except Exception as e:
        raise AudioError(path, f"unreadable audio file ({e})") from None
    return info.frames / info.samplerate


def mix_noise(x: np.ndarray, noise_path: Path, snr_db: float, offset: float, *, clip: str) -> np.ndarray:
    """``x`` plus a segment of ``noise_path`` from ``offset`` seconds (looped if short) at ``snr_db``."""
    try:
        with sf.SoundFile(str(noise_path)) as f:
            sr = f.samplerate
            start = min(int(offset * sr), max(f.frames - 1, 0))
            need = int(math.ceil(len(x) * sr / SAMPLE_RATE)) + 16
            f.seek(start)
            seg = f.read(frames=min(need, f.frames - start), dtype="float32", always_2d=True)
            if seg.shape[0] < need:  # loop from the beginning
                f.seek(0)
                whole = f.read(dtype="float32", always_2d=True)
                reps = int(math.ceil((need - seg.shape[0]) / max(len(whole), 1)))
                seg = np.concatenate([seg] + [whole] * reps)[:need]
    except Exception as e:
        raise AudioError(noise_path, f"unreadable noise file ({e})", clip) from None
    n = seg.mean(axis=1) if seg.shape[1] > 1 else seg[:, 0]
    if sr != SAMPLE_RATE:
        n = soxr.resample(n, sr, SAMPLE_RATE, quality="HQ")
    n = n[: len(x)].astype(np.float64)
    if len(n) < len(x):
        n = np.pad(n, (0, len(x) - len(n)), mode="wrap")
    ps = float(np.mean(np.asarray(x, np.float64) ** 2))
    pn = float(np.mean(n ** 2))
    if pn <= 0 or ps <= 0:
        return x
    gain = math.sqrt(ps / (pn * 10 ** (snr_db / 10)))
    return (x + gain * n).astype(np.float32)


@dataclass(frozen=True)
class Noise:
    """One noise mixing: which recording, at which SNR, from where in it (seconds)."""

    path: Path
    snr_db: float
    offset: float


class NoiseMixer:
    """Decides, per (seed, epoch, clip index), whether a clip gets noise and which.

    A fraction ``fraction`` of the clips of each epoch get a random recording of
    ``noise_dir`` at a random SNR in ``snr_db`` from a random offset: the same for any
    number of processes or DataLoader workers, and after a resume.
    """

    def __init__(self, noise_dir, *, fraction: float, snr_db: Tuple[float, float], seed: int):
        self.files = list_noise_files(noise_dir)
        self.fraction = float(fraction)
        self.snr_db = (float(snr_db[0]), float(snr_db[1]))
        self.seed = int(seed)
        self._seconds: Dict[int, float] = {}

    def draw(self, num_samples: int, *, epoch: int, index: int) -> Optional[Noise]:
        rng = np.random.default_rng([self.seed, epoch, index, 0x6E6F697365])
        if rng.random() >= self.fraction:
            return None
        k = int(rng.integers(len(self.files)))
        snr = float(rng.uniform(*self.snr_db))
        if k not in self._seconds:
            self._seconds[k] = audio_seconds(self.files[k])
        spare = max(0.0, self._seconds[k] - num_samples / SAMPLE_RATE)
        offset = float(rng.uniform(0.0, spare)) if spare > 0 else 0.0
        return Noise(self.files[k], snr, offset)

    def __call__(self, x: np.ndarray, *, epoch: int, index: int, clip: Optional[str] = None) -> np.ndarray:
        """``x`` with the noise drawn for (epoch, index) mixed in, or ``x`` itself."""
        noise = self.draw(len(x), epoch=epoch, index=index)
        if noise is None:
            return x
        return mix_noise(x, noise.path, noise.snr_db, noise.offset, clip=clip or str(index))


# ----------------------------------------------------------------------------- the path


@dataclass
class SignalPath:
    """read → truncate/resample → noise → normalise, as a cache or a model directory records it.

    ``max_seconds`` None (or 0) reads whole files; ``stats`` holds the global mean and
    std when ``normalize`` is ``global``; ``rescale_loud`` divides float audio stored at
    integer scale back to [-1, 1] instead of refusing it (see :func:`read_audio`).
    """

    max_seconds: Optional[float] = None
    normalize: str = "none"
    stats: Optional[Mapping] = None
    rescale_loud: bool = False

    def __post_init__(self):
        if self.normalize not in NORMALIZE_MODES:
            raise ConfigError(f"--normalize must be one of {', '.join(NORMALIZE_MODES)}, not {self.normalize!r}")
        if not self.max_seconds:
            self.max_seconds = None

    def read(self, path, *, clip: Optional[str] = None) -> np.ndarray:
        """The decoded, truncated 16 kHz waveform (before noise and normalisation)."""
        return read_audio(path, max_seconds=self.max_seconds, clip=clip, rescale_loud=self.rescale_loud)

    def take(self, x, sr: int, *, source, clip: Optional[str] = None) -> np.ndarray:
        """A waveform given in memory, as :meth:`read` gives a file's."""
        return condition_audio(x, sr, source=source, max_seconds=self.max_seconds, clip=clip,
                               rescale_loud=self.rescale_loud)

    def finish(self, x: np.ndarray, path, *, clip: Optional[str] = None) -> np.ndarray:
        """Normalise ``x`` (read from ``path``); an error naming the clip when it is not finite."""
        x = normalize(x, self.normalize, self.stats)
        if not np.all(np.isfinite(x)):
            raise AudioError(path, "audio holds NaN or inf after normalisation", clip)
        return x

    def __call__(self, path, *, clip: Optional[str] = None, noise: Optional[Noise] = None) -> np.ndarray:
        x = self.read(path, clip=clip)
        if noise is not None:
            x = mix_noise(x, noise.path, noise.snr_db, noise.offset, clip=clip or str(path))
        return self.finish(x, path, clip=clip)


def global_stats(corpus: "Corpus", *, max_seconds: Optional[float], split: str = "Train", skip_bad: bool = False,
                 workers: int = 2, verbose: bool = True,
                 rescale_loud: bool = False) -> Tuple[dict, List[Tuple[str, str]]]:
    """Mean and std of the ``split`` audio as fed to the upstream (truncated, before noise),
    and the clips left out as unreadable (with ``skip_bad``).

    A clip read_audio refuses (float audio at integer scale among them) stops the
    computation, or with ``skip_bad`` is left out and listed, never used as it is;
    ``rescale_loud`` uses it rescaled, as the extraction then reads it.
    """
    train = [c.name for c in corpus if c.split == split]
    if not train:
        raise ConfigError(f"--normalize global needs the corpus's {split} split (its audio gives the mean and "
                          f"std); this corpus selection has none: use --normalize utterance, or none")
    path = SignalPath(max_seconds=max_seconds, rescale_loud=rescale_loud)
    total = 0
    s1 = 0.0
    s2 = 0.0
    bad: List[Tuple[str, str]] = []

    def stats(name):
        try:
            x = path.read(corpus.audio_path(name), clip=name).astype(np.float64)
        except AudioError as e:
            if not skip_bad:
                raise AudioError(e.path, e.reason + " (pass --skip-bad to leave such clips out)", name) from None
            return name, str(e)
        return x.size, float(x.sum()), float((x * x).sum())

    with ThreadPoolExecutor(max(1, workers)) as pool:
        for r in tqdm(pool.map(stats, train), total=len(train), desc=f"global mean/std ({split} audio)",
                      unit="clip", disable=not verbose, file=sys.stderr):
            if isinstance(r[0], str):
                bad.append(r)
                continue
            total += r[0]
            s1 += r[1]
            s2 += r[2]
    if total == 0:
        raise ConfigError(f"--normalize global: no readable {split} audio")
    mean = s1 / total
    std = math.sqrt(max(s2 / total - mean * mean, 0.0))
    return {"mean": mean, "std": std, "samples": total, "clips": len(train) - len(bad)}, bad

"""Speech-like audio for the demo corpus: a voice, prosody that follows an emotion mixture, noise.

:func:`speech_signal` makes a speech-like signal: syllables and pauses grouped into
phrases, glottal pulses along a pitch contour (accents, declination, drift, jitter,
creak, tremor), aspiration and fricative noise, filtered frame by frame through each
syllable's vowel formants, the voice's own timbre and a spectral tilt. Its prosody
(:func:`clip_prosody`) is the mixture-weighted prosody of the eight classes, scaled by the
speaker's expressiveness (:class:`Voice`) and varied per clip. :func:`coloured_noise`
gives white, pink or brown noise. Every function draws from the generator it is given,
so a seed fixes its output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np

from . import CLASSES, SAMPLE_RATE

_SR = SAMPLE_RATE

# Prosody of each class (columns in CLASSES order A S H U F D C N); a clip's prosody is
# the mixture-weighted row, its deviation from Neutral scaled by the speaker's expressiveness.
_PROSODY_ROWS = (
    #              A      S      H      U      F      D      C      N
    ("pitch_st", (4.0, -2.5, 3.0, 5.0, 3.5, -0.5, -1.0, 0.0)),  # mean f0 shift, semitones
    ("range_st", (6.0, 1.5, 6.5, 8.0, 4.0, 3.0, 2.5, 3.5)),  # pitch-accent excursion, semitones
    ("rate", (5.4, 3.0, 5.0, 4.4, 4.8, 3.6, 3.8, 4.2)),  # syllables per second
    ("energy_db", (7.0, -6.0, 3.0, 2.0, -4.0, 0.0, -1.0, 0.0)),  # loudness
    ("tilt_db", (5.0, -2.0, 3.5, 3.0, 1.0, 2.0, 1.5, 2.0)),  # dB/octave above 500 Hz
    ("closure", (0.08, 0.30, 0.12, 0.14, 0.22, 0.16, 0.16, 0.16)),  # glottal closing phase (soft = dark)
    ("breath", (0.02, 0.10, 0.03, 0.05, 0.25, 0.05, 0.05, 0.04)),  # aspiration noise
    ("jitter", (0.010, 0.012, 0.008, 0.010, 0.025, 0.020, 0.018, 0.008)),  # period perturbation
    ("creak", (0.05, 0.15, 0.0, 0.0, 0.05, 0.45, 0.40, 0.05)),  # period-doubling depth
    ("pause", (0.25, 0.65, 0.25, 0.35, 0.45, 0.45, 0.40, 0.35)),  # mean phrase pause, s
    ("final_st", (-1.0, -2.0, 1.0, 5.0, 2.0, -3.0, -4.0, -1.5)),  # phrase-final rise (+) / fall (-)
    ("tremor", (0.0, 0.2, 0.0, 0.0, 0.8, 0.0, 0.0, 0.0)),  # 5-7 Hz f0 tremor depth, semitones
)
_PROSODY_NAMES = tuple(name for name, _ in _PROSODY_ROWS)
_PROSODY = np.array([row for _, row in _PROSODY_ROWS])

# Vowel formants F1-F3 (Hz) of an adult male voice (Peterson & Barney).
_VOWELS = np.array([
    (270, 2290, 3010), (390, 1990, 2550), (530, 1840, 2480), (660, 1720, 2410), (730, 1090, 2440),
    (570, 840, 2410), (440, 1020, 2240), (300, 870, 2240), (640, 1190, 2390), (490, 1350, 1690),
], dtype=np.float64)
_BANDWIDTHS = np.array([70.0, 100.0, 140.0])

# Short-time filtering: Hann analysis window, 50 % overlap (the windows sum to one),
# FFT twice the window so that formant ringing does not wrap around.
_WIN, _HOP, _NFFT = 512, 256, 1024
_WINDOW = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(_WIN) / _WIN)).astype(np.float32)
_FREQS = np.fft.rfftfreq(_NFFT, 1.0 / _SR)
CONTROL_HOP = 80  # samples between pitch / envelope control points (5 ms)
_TABLE = 2048  # lookup-table entries per pitch period

@dataclass(frozen=True)
class Voice:
    """A speaker's fixed vocal characteristics."""

    f0: float  # base pitch, Hz
    formant_scale: float  # vocal-tract length factor (women > men)
    colour_hz: float  # an extra resonance giving each voice its own timbre
    colour_db: float
    tilt_db: float  # spectral tilt offset, dB/octave
    rate: float  # speaking-rate factor
    level_db: float  # habitual loudness offset
    breath: float  # habitual breathiness
    expressivity: float  # how strongly emotion shows in the prosody

def clip_prosody(rng: np.random.Generator, voice: Voice, mixture: np.ndarray) -> Dict[str, float]:
    """Mixture-weighted prosody with speaker expressiveness and per-clip variation."""
    neutral = _PROSODY[:, CLASSES.index("N")]
    v = dict(zip(_PROSODY_NAMES, neutral + voice.expressivity * (_PROSODY @ mixture - neutral)))
    v["pitch_st"] += rng.normal(0, 0.8)
    v["range_st"] *= rng.lognormal(0, 0.2)
    v["rate"] *= voice.rate * rng.lognormal(0, 0.1)
    v["energy_db"] += voice.level_db + rng.normal(0, 2.0)  # includes the recording level
    v["tilt_db"] += voice.tilt_db + rng.normal(0, 1.0)
    v["closure"] = float(np.clip(v["closure"] * rng.lognormal(0, 0.15), 0.05, 0.45))
    v["breath"] = max(0.0, v["breath"] + voice.breath + rng.normal(0, 0.02))
    v["jitter"] *= rng.lognormal(0, 0.2)
    v["creak"] = float(np.clip(v["creak"] + rng.normal(0, 0.05), 0.0, 0.8))
    v["pause"] *= rng.lognormal(0, 0.2)
    v["final_st"] += rng.normal(0, 1.0)
    return v


def _glottal_tables(closure: float, creak: float) -> Tuple[np.ndarray, np.ndarray]:
    """Lookup tables over two pitch periods: the glottal source and the aspiration gate.

    The source is the derivative of a Rosenberg pulse (opening 40 % of the period,
    closing ``closure``); creak alternates the amplitude of successive periods.
    """
    frac = (np.arange(_TABLE) + 0.5) / _TABLE
    tp = 0.4
    flow = np.where(frac < tp, 0.5 - 0.5 * np.cos(np.pi * frac / tp),
                    np.where(frac < tp + closure, np.cos(0.5 * np.pi * (frac - tp) / closure), 0.0))
    pulse = np.diff(flow, append=flow[0])
    source = np.concatenate([pulse * (1 + creak), pulse * (1 - creak)])
    source /= np.sqrt(np.mean(source ** 2))
    gate = np.tile(0.6 + 0.4 * np.cos(2 * np.pi * frac), 2)
    return source.astype(np.float32), gate.astype(np.float32)


def speech_signal(rng: np.random.Generator, n: int, voice: Voice, p: Dict[str, float]):
    """``n`` samples of speech-like signal and a mask of its voiced samples."""
    dur = n / _SR
    # Syllables grouped into phrases separated by pauses; each syllable an optional
    # fricative onset and a vowel, stressed ones louder and carrying a pitch accent.
    m = int(dur * p["rate"] * 1.5) + 8
    syl = rng.lognormal(0, 0.25, m) / p["rate"]
    phrase_end = rng.random(m) < 1.0 / rng.uniform(4, 9)
    gap = np.where(phrase_end, rng.gamma(2.0, p["pause"] / 2, m), 0.0)
    starts = rng.uniform(0.05, 0.3) + np.concatenate([[0.0], np.cumsum(syl + gap)[:-1]])
    phrase = np.concatenate([[0], np.cumsum(phrase_end[:-1])])
    phrase_start = starts[np.searchsorted(phrase, phrase)]
    stressed = rng.random(m) < 0.35
    accent = np.where(phrase_end, p["final_st"], stressed * rng.uniform(0.5, 1.0, m) * p["range_st"])
    accent += rng.normal(0, 0.15 * p["range_st"], m)
    amp = rng.lognormal(0, 0.25, m) * (1 + 0.4 * stressed)
    cons_frac = np.where(rng.random(m) < 0.75, rng.uniform(0.15, 0.35, m), 0.0)
    cons_amp = rng.uniform(0.05, 0.3, m)
    formants = _VOWELS[rng.integers(len(_VOWELS), size=m)] * voice.formant_scale
    formants[:, 0] *= 1 + 0.02 * p["energy_db"] / 6  # louder speech, more open vowels

    # Pitch and envelopes at control points every 5 ms.
    nc = n // CONTROL_HOP + 2
    tc = np.arange(nc) * (CONTROL_HOP / _SR)
    k = np.clip(np.searchsorted(starts, tc, side="right") - 1, 0, m - 1)
    u = (tc - starts[k]) / syl[k]
    in_syl = (tc >= starts[k]) & (u < 1)
    cf = cons_frac[k]
    vu = np.clip((u - cf) / (1 - cf), 0, 1)
    v_env = np.where(in_syl & (u >= cf), np.sin(np.pi * vu) ** 0.6, 0.0) * amp[k]
    cu = np.clip(u / np.maximum(cf, 1e-6), 0, 1)
    c_env = np.where(in_syl & (u < cf), np.sin(np.pi * cu), 0.0) * cons_amp[k]

    shape = np.where(phrase_end[k], vu, np.sin(np.pi * vu))  # phrase-final: a glide, else a hump
    drift = (np.sin(2 * np.pi * np.outer(tc, rng.uniform(0.2, 1.5, 3)) + rng.uniform(0, 2 * np.pi, 3))
             @ rng.normal(0, 0.15, 3))
    st = (p["pitch_st"] + accent[k] * shape - rng.uniform(0.5, 2) * (tc - phrase_start[k])
          + drift * p["range_st"] + p["tremor"] * np.sin(2 * np.pi * rng.uniform(5, 7) * tc))
    f0c = np.clip(voice.f0 * 2 ** (st / 12) * (1 + p["jitter"] * rng.standard_normal(nc)), 50, 450)

    # Sample level: glottal source and aspiration from lookup tables along the phase.
    phase = np.cumsum(upsample(f0c * (_TABLE / _SR), n), dtype=np.float64)
    idx = phase.astype(np.int64) & (2 * _TABLE - 1)
    source, gate = _glottal_tables(p["closure"], p["creak"])
    white = rng.standard_normal(n, dtype=np.float32)
    venv = upsample(v_env, n)
    excitation = (source[idx] + np.float32(3 * p["breath"]) * white * gate[idx]) * venv
    voiced = _vocal_tract(excitation, starts, formants, voice, p["tilt_db"])
    fric = np.diff(white, prepend=np.float32(0))
    fric *= upsample(c_env, n)
    fric *= np.float32(2 * np.sqrt(np.mean(voiced ** 2)))
    return voiced + fric, venv > 0.2 * amp.mean()


def upsample(control: np.ndarray, n: int) -> np.ndarray:
    """``n`` samples linearly interpolated between control points ``CONTROL_HOP`` apart."""
    c = control.astype(np.float32)
    w = np.arange(CONTROL_HOP, dtype=np.float32) / CONTROL_HOP
    return (c[:-1, None] + np.diff(c)[:, None] * w).ravel()[:n]


def _vocal_tract(x: np.ndarray, starts: np.ndarray, formants: np.ndarray, voice: Voice,
                 tilt_db: float) -> np.ndarray:
    """Filter ``x`` frame by frame through its syllable's vowel formants, timbre and tilt."""
    n = x.size
    n_frames = -(-n // _HOP) + 1
    padded = np.zeros((n_frames + 1) * _HOP, dtype=np.float32)
    padded[_HOP:_HOP + n] = x
    frames = np.lib.stride_tricks.sliding_window_view(padded, _WIN)[::_HOP][:n_frames] * _WINDOW
    spec = np.fft.rfft(frames, n=_NFFT, axis=1)

    # One spectral envelope per syllable; formants jump at syllable onsets, where the
    # voiced envelope is zero.
    f = _FREQS[None, :]
    env = np.ones((len(starts), _FREQS.size))
    for i, bw in enumerate(_BANDWIDTHS):
        fi = formants[:, i:i + 1]
        env *= fi ** 2 / np.sqrt((fi ** 2 - f ** 2) ** 2 + (bw * f) ** 2)
    octaves = np.log2(np.maximum(_FREQS, 1.0) / voice.colour_hz)
    env *= 10 ** (voice.colour_db * np.exp(-0.5 * (octaves / 0.25) ** 2) / 20)
    env *= (np.maximum(_FREQS, 500.0) / 500.0) ** (tilt_db / 6.02)
    env *= (_FREQS >= 60) & (_FREQS <= 7000)
    k = np.clip(np.searchsorted(starts, np.arange(n_frames) * (_HOP / _SR), side="right") - 1, 0, len(starts) - 1)
    spec *= env.astype(np.float32)[k]
    y = np.fft.irfft(spec, n=_NFFT, axis=1)

    # Overlap-add: frames NFFT/HOP apart do not overlap, so each such group adds at once.
    out = np.zeros((n_frames + 4) * _HOP, dtype=np.float32)
    step = _NFFT // _HOP
    for g in range(step):
        block = y[g::step].ravel()
        out[g * _HOP:g * _HOP + block.size] += block
    return out[_HOP:_HOP + n]


def coloured_noise(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Unit-RMS noise with a power spectrum falling as 1/f^(2*exponent) above 20 Hz."""
    size = 1 << max(int(np.ceil(np.log2(max(n, 2)))), 1)
    spec = np.fft.rfft(rng.standard_normal(size))
    f = np.fft.rfftfreq(size, 1.0 / _SR)
    spec *= np.where(f < 20, 0.0, np.maximum(f, 20.0) ** -exponent)
    x = np.fft.irfft(spec, n=size)[:n]
    return x / (np.sqrt(np.mean(x ** 2)) + 1e-12)

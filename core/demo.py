"""A small synthetic corpus in the MSP-Podcast release layout, for demos and tests.

:func:`make_demo_corpus` writes ``Audios/*.wav`` (16 kHz mono PCM_16) and
``Labels/labels_consensus.csv`` / ``Labels/labels_detailed.csv`` exactly as
:func:`conilium.corpus.load_corpus` reads a real release, so that every stage of the
pipeline can run end to end without the real data.

How it is simulated:

* every clip has a latent emotion mixture over the eight classes: a Dirichlet around a
  dominant class, with mass on the emotions that co-occur with it; dominant classes
  follow MSP-Podcast's imbalance (Neutral and Happy most often) in every split;
* its audio is a speech-like signal (glottal pulses along a pitch contour, syllables and
  pauses, vowel formants, fricative noise, a noise floor) whose prosody follows the
  mixture: pitch level and range, speaking rate, loudness, spectral tilt, breathiness,
  jitter, creak, tremor and phrase-final contour, scaled by each speaker's own
  expressiveness and varied per speaker and per clip, so that classes are learnable
  but overlap (:mod:`.synthesis`);
* 5 to 7 simulated annotators from a pool of workers, each with their own bias,
  sharpness and habits, give a primary emotion (sometimes Other), secondary emotions
  (sometimes non-target words) and A/V/D scores; the consensus label is the majority of
  primaries, O when Other wins and X on a tie, as in the real corpus.

* every clip also gets a synthetic transcript, ``Transcripts/<clip stem>.txt`` (the
  MSP-Podcast layout): podcast-like filler words, about two per second of audio, among
  which some emotion cue words ("furious", "wonderful", "scared", …) carry part of the
  emotion. A cue word's class is the class of one of the clip's simulated annotators'
  primary labels, drawn at random, or, as often as not, a class drawn from the prior
  regardless of the clip; so the words say something about the annotators' labels that the
  audio does not, and much less than they do. They are synthetic: they stand in for
  transcripts to exercise the text pipeline, and say nothing about what the words of
  MSP-Podcast carry. They come from their own random stream: the audio and labels are the
  same with or without them.

The output is a pure function of ``seed`` and ``clips``: the same arguments give
byte-identical files. ``noise_dir`` adds a few noise recordings (white, pink, brown,
babble, hum) for noise augmentation, in the manner of MUSAN.
"""

from __future__ import annotations

import contextlib
import csv
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import soundfile as sf
from tqdm import tqdm

from . import CLASS_NAMES, CLASSES, SAMPLE_RATE
from .corpus import CONSENSUS_COLUMNS, CONSENSUS_FILE, DETAILED_FILE, word_to_class
from .errors import ConfigError, CorpusError
from .synthesis import CONTROL_HOP, Voice, clip_prosody, coloured_noise, speech_signal, upsample
from .transcripts import TRANSCRIPTS_DIR, transcript_path

_SR = SAMPLE_RATE
MIN_CLIPS = 10

#: Probability that a clip's dominant emotion is each class (MSP-Podcast-like imbalance).
DOMINANT_PRIOR = {"A": 0.08, "S": 0.09, "H": 0.25, "U": 0.07, "F": 0.04, "D": 0.04, "C": 0.08, "N": 0.35}
SPLIT_SHARES = {"Train": 0.60, "Development": 0.25, "Test3": 0.15}
N_WORKERS = 60
ANNOTATORS_PER_CLIP = {5: 0.5, 6: 0.3, 7: 0.2}
UNKNOWN_SPEAKER_SHARE = 0.07
CLIPS_PER_SPEAKER = 8
# Gamma distribution of clip durations (mean 5.8 s, sd 2.4 s), redrawn outside the bounds.
DURATION_MEAN, DURATION_SD, DURATION_BOUNDS = 5.8, 2.4, (1.5, 14.0)
# Share of clips whose emotion is outside the eight classes (bored, sarcastic, ...).
OTHER_CLIP_SHARE = 0.03

_K = len(CLASSES)
_IDX = {c: i for i, c in enumerate(CLASSES)}
_PRIOR = np.array([DOMINANT_PRIOR[c] for c in CLASSES])

# Emotions that tend to be mixed with each dominant one (Dirichlet mass besides the dominant).
_COOCCURS = {
    "A": {"D": 0.5, "C": 0.5, "F": 0.1, "N": 0.3},
    "S": {"F": 0.3, "C": 0.1, "N": 0.5},
    "H": {"U": 0.6, "N": 0.5},
    "U": {"H": 0.6, "F": 0.3, "N": 0.3},
    "F": {"S": 0.4, "U": 0.4, "N": 0.3},
    "D": {"C": 0.7, "A": 0.4, "N": 0.3},
    "C": {"D": 0.6, "A": 0.3, "N": 0.5},
    "N": {"H": 0.3, "S": 0.3, "C": 0.2, "A": 0.1, "U": 0.1},
}
_DIRICHLET_BASE, _DIRICHLET_DOMINANT = 0.08, 3.0

# Mean activation, valence, dominance (1-7) an annotator gives each class.
_AVD = np.array([
    (5.6, 2.3, 5.4), (2.9, 2.5, 3.1), (5.0, 5.9, 4.8), (5.3, 4.6, 4.2),
    (4.9, 2.6, 3.0), (4.3, 2.5, 4.7), (3.9, 2.9, 5.0), (3.7, 4.1, 4.1),
])

# Non-target words annotators add as secondaries, by the emotion they lean to.
_NON_TARGET = {
    "A": ("Frustrated", "Annoyed"), "S": ("Disappointed", "Concerned"), "H": ("Amused", "Excited"),
    "U": ("Confused", "Excited"), "F": ("Concerned", "Confused"), "D": ("Annoyed", "Disappointed"),
    "C": ("Annoyed", "Frustrated"), "N": ("Confused", "Concerned"),
}
_OTHER_FLAVOURS = ("bored", "tired", "sarcastic", "curious", "calm", "confident", "serious", "thoughtful")

@dataclass(frozen=True)
class _ClipPlan:
    """Everything about a clip but its samples."""

    name: str
    split: str
    speaker: Optional[int]
    gender: str
    voice: Voice
    duration: float
    mixture: np.ndarray
    rows: List[str]  # EmoDetail strings, one per annotator
    emo_class: str  # consensus of the annotators' primaries
    avd: Tuple[float, float, float]  # mean of their A/V/D scores


@dataclass(frozen=True)
class _Worker:
    sharpness: float  # exponent on the mixture: >1 favours its top emotion
    bias: np.ndarray  # log-odds preference for each class
    lapse: float  # chance of a primary drawn from the prior, ignoring the clip
    other_rate: float  # chance of answering Other on any clip
    secondaries: float  # mean number of secondary emotions
    non_target_rate: float  # chance of adding a non-target word
    avd_bias: np.ndarray
    avd_noise: float
    activity: float  # how many clips the worker annotates, relatively


def make_demo_corpus(out, *, clips: int = 300, seed: int = 0, noise_dir=None, noise_files: int = 8,
                     overwrite: bool = False, verbose: bool = False) -> Path:
    """Write a synthetic corpus of ``clips`` clips in the MSP-Podcast layout to ``out``.

    Splits are Train / Development / Test3 (60 / 25 / 15 %, speakers disjoint), Test3
    unlabelled. ``noise_dir`` also receives ``noise_files`` noise recordings. The corpus
    is built in a temporary directory beside ``out`` and renamed into place; an existing
    non-empty ``out`` (or ``noise_dir``) is replaced only with ``overwrite``.
    ``verbose`` shows a progress bar. Returns ``out``.
    """
    if clips < MIN_CLIPS:
        raise ConfigError(f"a demo corpus needs at least {MIN_CLIPS} clips (so that every split has some), "
                          f"got {clips}")
    if noise_dir is not None and noise_files < 1:
        raise ConfigError(f"noise_files must be at least 1 when noise_dir is given, got {noise_files}")
    out = Path(out)
    _check_target(out, overwrite)
    noise_inside: Optional[Path] = None  # noise_dir relative to out, when it lies inside the corpus
    if noise_dir is not None:
        noise_dir = Path(noise_dir)
        if _is_within(out, noise_dir):
            raise ConfigError(f"the noise directory {noise_dir} must not contain the corpus directory {out}")
        if _is_within(noise_dir, out):
            noise_inside = noise_dir.resolve().relative_to(out.resolve())
            if noise_inside.parts[0] in ("Audios", "Labels"):
                raise ConfigError(f"the noise directory {noise_dir} must not lie inside the corpus's "
                                  f"Audios/ or Labels/ folder")
        else:
            _check_target(noise_dir, overwrite)

    plans = _plan_corpus(clips, seed)
    with _staging(out) as tmp:
        _write_labels(tmp / "Labels", plans)
        _write_transcripts(tmp / TRANSCRIPTS_DIR, plans, seed)
        audios = tmp / "Audios"
        audios.mkdir()
        for i, plan in enumerate(tqdm(plans, desc="synthesising clips", unit="clip", disable=not verbose)):
            _write_wav(audios / plan.name, _clip_audio(np.random.default_rng([seed, 1, i]), plan))
        if noise_inside is not None:
            (tmp / noise_inside).mkdir(parents=True)
            _write_noises(tmp / noise_inside, noise_files, seed)
    if noise_dir is not None and noise_inside is None:
        with _staging(noise_dir) as noise_tmp:
            _write_noises(noise_tmp, noise_files, seed)
    return out


# ----------------------------------------------------------------------------- output files


def _is_within(path: Path, parent: Path) -> bool:
    try:
        path.resolve().relative_to(parent.resolve())
    except ValueError:
        return False
    return True


def _check_target(path: Path, overwrite: bool) -> None:
    if path.exists() and not path.is_dir():
        raise CorpusError(f"{path}: exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise CorpusError(f"{path}: directory exists and is not empty; "
                          f"choose another directory or pass overwrite=True (--overwrite) to replace it")


@contextlib.contextmanager
def _staging(final: Path):
    """Yield a fresh directory beside ``final``; on success it replaces ``final``."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            trash = final.parent / f".{final.name}.{secrets.token_hex(4)}.old"
            os.rename(final, trash)
            try:
                os.rename(tmp, final)
            except BaseException:
                os.rename(trash, final)
                raise
            shutil.rmtree(trash)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_wav(path: Path, x: np.ndarray) -> None:
    sf.write(str(path), x, _SR, subtype="PCM_16", format="WAV")


def _write_labels(labels: Path, plans: List[_ClipPlan]) -> None:
    labels.mkdir()
    with open(labels / CONSENSUS_FILE, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(CONSENSUS_COLUMNS)
        for p in plans:
            labelled = p.split != "Test3"
            act, val, dom = (f"{v:.1f}" for v in p.avd) if labelled else ("", "", "")
            w.writerow([p.name, p.emo_class if labelled else "", act, val, dom,
                        "Unknown" if p.speaker is None else p.speaker, p.gender, p.split])
    with open(labels / DETAILED_FILE, "w", newline="", encoding="utf-8") as f:
        f.write("FileName,EmoDetail\n")
        for p in plans:
            if p.split != "Test3":
                f.writelines(f'{p.name},"{row}"\n' for row in p.rows)


def _write_transcripts(folder: Path, plans: List[_ClipPlan], seed: int) -> None:
    folder.mkdir()
    for i, p in enumerate(plans):
        text = synthetic_transcript(np.random.default_rng([seed, 3, i]), p)
        transcript_path(folder.parent, p.name).write_text(text + "\n", encoding="utf-8")


# Words of the synthetic transcripts: filler, and cue words of each class.
FILLER_WORDS = ("so", "I", "you", "we", "they", "it", "that", "the", "a", "and", "but", "was", "is", "just", "like",
           "know", "think", "mean", "really", "then", "there", "what", "when", "about", "people", "time", "going",
           "said", "thing", "right", "yeah", "well", "kind", "of", "to", "in", "on", "with", "my", "show",
           "episode", "week", "today", "story", "guys", "something", "back", "little", "actually", "pretty")
CUE_WORDS = {
    "A": ("furious", "ridiculous", "hate", "unacceptable", "mad", "outrageous"),
    "S": ("miss", "lost", "unfortunately", "sorry", "lonely", "heartbroken"),
    "H": ("great", "love", "awesome", "wonderful", "glad", "fun"),
    "U": ("wow", "unbelievable", "suddenly", "unexpected", "whoa", "shocked"),
    "F": ("scared", "worried", "afraid", "danger", "nervous", "terrified"),
    "D": ("gross", "disgusting", "sick", "nasty", "awful", "yuck"),
    "C": ("whatever", "obviously", "pathetic", "clueless", "supposedly", "amateurs"),
    "N": ("okay", "basically", "schedule", "meeting", "report", "usually"),
}
#: Share of a synthetic transcript's words that are cue words, and the share of those whose
#: class follows the annotators (the rest: a class drawn from the prior).
CUE_SHARE, CUE_FOLLOWS_ANNOTATORS = 0.2, 0.5
WORDS_PER_SECOND = 2.0


def synthetic_transcript(rng: np.random.Generator, plan: _ClipPlan) -> str:
    """A clip's synthetic transcript (see the module's docstring): filler words and cue words
    whose class is that of a random annotator's primary label, or drawn from the prior."""
    primaries = [c for c in (word_to_class(r.split(";")[1]) for r in plan.rows) if c is not None]
    n = int(np.clip(round(plan.duration * WORDS_PER_SECOND), 3, 30))
    words = []
    for _ in range(n):
        if rng.random() < CUE_SHARE:
            if primaries and rng.random() < CUE_FOLLOWS_ANNOTATORS:
                cls = primaries[int(rng.integers(len(primaries)))]
            else:
                cls = CLASSES[int(rng.choice(_K, p=_PRIOR))]
            words.append(str(rng.choice(CUE_WORDS[cls])))
        else:
            words.append(str(rng.choice(FILLER_WORDS)))
    return " ".join(words)


# ----------------------------------------------------------------------------- corpus design


def _plan_corpus(n: int, seed: int) -> List[_ClipPlan]:
    """Everything about every clip except its samples, drawn from one generator."""
    rng = np.random.default_rng([seed, 0])
    counts = {"Train": round(n * SPLIT_SHARES["Train"]), "Development": round(n * SPLIT_SHARES["Development"])}
    counts["Test3"] = n - counts["Train"] - counts["Development"]
    workers = [_draw_worker(rng) for _ in range(N_WORKERS)]
    activity = np.array([w.activity for w in workers])
    activity /= activity.sum()
    speaker_ids = iter(rng.choice(np.arange(1, 10 * n), size=n, replace=False))
    episode_ids = iter(rng.choice(np.arange(1, 10 * n), size=n, replace=False))
    durations = iter(_draw_durations(rng, n))

    plans: List[_ClipPlan] = []
    for split, n_split in counts.items():
        n_spk = max(2, round(n_split / CLIPS_PER_SPEAKER))
        genders = np.where(rng.permutation(n_spk) % 2 == 0, "Female", "Male")
        speakers = [(int(next(speaker_ids)), str(g), _draw_voice(rng, str(g))) for g in genders]
        talk_share = rng.dirichlet(np.full(n_spk, 2.0))
        dominants = _dominant_classes(rng, n_split)
        # Clips are segments of podcast episodes, a speaker's current episode until its
        # segment numbers pass 40; Unknown speakers join the episode of a random speaker.
        episode: Dict[int, int] = {}
        segment: Dict[int, int] = {}
        for i in range(n_split):
            if rng.random() < UNKNOWN_SPEAKER_SHARE:
                speaker, gender = None, "Unknown"
                voice = _draw_voice(rng, str(rng.choice(["Female", "Male"])))
                key = int(rng.integers(n_spk))
            else:
                key = int(rng.choice(n_spk, p=talk_share))
                speaker, gender, voice = speakers[key]
            if key not in episode or segment[key] > 40:
                episode[key], segment[key] = int(next(episode_ids)), 0
            segment[key] += int(rng.integers(1, 12))
            name = f"MSP-PODCAST_{episode[key]:04d}_{segment[key]:04d}.wav"
            plan = _plan_clip(rng, dominants[i], workers, activity, name=name, split=split, speaker=speaker,
                              gender=gender, voice=voice, duration=float(next(durations)))
            plans.append(plan)
    return sorted(plans, key=lambda p: p.name)


def _dominant_classes(rng: np.random.Generator, n: int) -> np.ndarray:
    """Dominant-class indices of ``n`` clips in :data:`DOMINANT_PRIOR` proportions, shuffled.

    Counts are the prior's shares of ``n`` rounded by largest remainder, so that even a
    small split holds its share of every class.
    """
    exact = _PRIOR * n
    counts = np.floor(exact).astype(int)
    counts[np.argsort(counts - exact, kind="stable")[: n - counts.sum()]] += 1
    return rng.permutation(np.repeat(np.arange(_K), counts))


def _draw_voice(rng: np.random.Generator, gender: str) -> Voice:
    lo, hi = (170.0, 250.0) if gender == "Female" else (90.0, 140.0)
    return Voice(
        f0=float(np.exp(rng.uniform(np.log(lo), np.log(hi)))),
        formant_scale=float(rng.normal(1.16 if gender == "Female" else 1.0, 0.04)),
        colour_hz=float(rng.uniform(2500, 4200)),
        colour_db=float(rng.uniform(0, 8)),
        tilt_db=float(rng.normal(0, 1.0)),
        rate=float(rng.lognormal(0, 0.1)),
        level_db=float(rng.normal(0, 2.0)),
        breath=float(rng.uniform(0, 0.05)),
        expressivity=float(rng.uniform(0.8, 1.3)),
    )


def _draw_worker(rng: np.random.Generator) -> _Worker:
    return _Worker(
        sharpness=float(rng.uniform(1.2, 2.4)),
        bias=rng.normal(0, 0.3, _K),
        lapse=float(rng.uniform(0.02, 0.10)),
        other_rate=float(rng.uniform(0.0, 0.03)),
        secondaries=float(rng.uniform(0.2, 1.6)),
        non_target_rate=float(rng.uniform(0.03, 0.2)),
        avd_bias=rng.normal(0, 0.4, 3),
        avd_noise=float(rng.uniform(0.4, 1.0)),
        activity=float(rng.gamma(2.0)),
    )


def _draw_durations(rng: np.random.Generator, n: int) -> np.ndarray:
    shape = (DURATION_MEAN / DURATION_SD) ** 2
    scale = DURATION_SD ** 2 / DURATION_MEAN
    lo, hi = DURATION_BOUNDS
    out = np.empty(0)
    while out.size < n:
        d = rng.gamma(shape, scale, 2 * n)
        out = np.concatenate([out, d[(d >= lo) & (d <= hi)]])
    return np.round(out[:n], 2)


def _plan_clip(rng: np.random.Generator, dominant: int, workers: List[_Worker], activity: np.ndarray,
               **clip) -> _ClipPlan:
    """Draw a clip's emotion mixture and its annotations; ``clip`` holds the other fields."""
    alpha = np.full(_K, _DIRICHLET_BASE)
    for c, a in _COOCCURS[CLASSES[dominant]].items():
        alpha[_IDX[c]] += a
    alpha[dominant] += _DIRICHLET_DOMINANT
    mixture = rng.dirichlet(alpha)
    other_share = rng.uniform(0.35, 0.7) if rng.random() < OTHER_CLIP_SHARE else 0.0
    flavour = str(rng.choice(_OTHER_FLAVOURS))

    k = int(rng.choice(list(ANNOTATORS_PER_CLIP), p=list(ANNOTATORS_PER_CLIP.values())))
    chosen = rng.choice(len(workers), size=k, replace=False, p=activity)
    rows, primaries, avds = [], [], []
    for wi in sorted(chosen):
        w = workers[wi]
        word, cls, secondary, avd = _annotate(rng, w, mixture, other_share, flavour)
        rows.append(f"WORKER{wi + 1:05d}; {word}; {','.join(secondary)}; "
                    f"A:{avd[0]:.1f}; V:{avd[1]:.1f}; D:{avd[2]:.1f};")
        primaries.append("O" if cls is None else cls)
        avds.append(avd)
    return _ClipPlan(mixture=mixture, rows=rows, emo_class=_majority(primaries), avd=tuple(np.mean(avds, axis=0)),
                     **clip)


def _annotate(rng, w: _Worker, mixture: np.ndarray, other_share: float, flavour: str):
    """One annotator's primary word (and its class or None), secondary words and A/V/D."""
    if rng.random() < w.lapse:
        p = _PRIOR
    else:
        p = mixture ** w.sharpness * np.exp(w.bias)
        p = p / p.sum()
    cls: Optional[str] = CLASSES[int(rng.choice(_K, p=p))]
    word = CLASS_NAMES[cls]
    if rng.random() < 1 - (1 - w.other_rate) * (1 - other_share):
        cls = None
        word = "Other" if rng.random() < 0.4 else f"Other-{flavour}"

    secondary: List[str] = []
    n_sec = min(3, int(rng.poisson(w.secondaries)))
    if n_sec:
        weights = mixture ** 0.8 + 0.02
        if cls is not None:
            weights[_IDX[cls]] = 0.0
        picks = rng.choice(_K, size=n_sec, replace=False, p=weights / weights.sum())
        secondary += [CLASS_NAMES[CLASSES[i]] for i in picks]
    if rng.random() < w.non_target_rate:
        lean = CLASSES[int(np.argmax(mixture))] if cls is None else cls
        secondary.append(str(rng.choice(_NON_TARGET[lean])))
    if rng.random() < 0.03:
        other = f"Other-{rng.choice(_OTHER_FLAVOURS)}"
        if other != word:
            secondary.append(other)

    own = _AVD[_IDX[cls]] if cls is not None else _AVD.T @ mixture
    avd = 0.5 * own + 0.5 * (_AVD.T @ mixture) + w.avd_bias + rng.normal(0, w.avd_noise, 3)
    return word, cls, secondary, tuple(float(v) for v in np.clip(np.round(avd), 1, 7))


def _majority(primaries: List[str]) -> str:
    """Consensus of primaries: the most frequent, X on a tie, O when Other wins."""
    labels, counts = np.unique(primaries, return_counts=True)
    top = np.flatnonzero(counts == counts.max())
    return "X" if len(top) > 1 else str(labels[top[0]])


# ----------------------------------------------------------------------------- synthesis


def _clip_audio(rng: np.random.Generator, plan: _ClipPlan) -> np.ndarray:
    n = int(round(plan.duration * _SR))
    p = clip_prosody(rng, plan.voice, plan.mixture)
    speech, active = speech_signal(rng, n, plan.voice, p)
    level = 10 ** ((-26.0 + p["energy_db"]) / 20)
    reference = speech[active] if active.any() else speech
    speech *= level / (np.sqrt(np.mean(reference ** 2)) + 1e-9)
    # noise floor: hiss and a little low-frequency rumble, 50 to 70 dB below full scale
    rumble = upsample(rng.standard_normal(n // CONTROL_HOP + 2), n)
    floor = rng.standard_normal(n, dtype=np.float32) + np.float32(rng.uniform(0.5, 2.0)) * rumble
    speech += 10 ** (rng.uniform(-70, -50) / 20) * floor
    peak = np.max(np.abs(speech))
    if peak > 0.98:
        speech *= 0.98 / peak
    return speech.astype(np.float32)


# ----------------------------------------------------------------------------- noise recordings


def _write_noises(folder: Path, count: int, seed: int) -> None:
    kinds: Tuple[Tuple[str, Callable[[np.random.Generator, int], np.ndarray]], ...] = (
        ("white", lambda rng, n: rng.standard_normal(n)),
        ("pink", lambda rng, n: coloured_noise(rng, n, 0.5)),
        ("brown", lambda rng, n: coloured_noise(rng, n, 1.0)),
        ("babble", _babble),
        ("hum", _hum),
    )
    for i in range(count):
        rng = np.random.default_rng([seed, 2, i])
        kind, make = kinds[i % len(kinds)]
        n = int(round(rng.uniform(3.0, 10.0) * _SR))
        x = make(rng, n)
        x = x / (np.sqrt(np.mean(x ** 2)) + 1e-12) * 10 ** (-26 / 20)
        x = x * min(1.0, 0.98 / np.max(np.abs(x)))
        _write_wav(folder / f"noise_{i:03d}_{kind}.wav", x.astype(np.float32))


def _babble(rng: np.random.Generator, n: int) -> np.ndarray:
    """Four to seven overlapping voices of random speakers and moods."""
    total = np.zeros(n)
    for _ in range(int(rng.integers(4, 8))):
        voice = _draw_voice(rng, str(rng.choice(["Female", "Male"])))
        mixture = rng.dirichlet(np.full(_K, 0.5))
        speech, _ = speech_signal(rng, n, voice, clip_prosody(rng, voice, mixture))
        total += speech / (np.sqrt(np.mean(speech ** 2)) + 1e-12) * rng.uniform(0.5, 1.0)
    return total


def _hum(rng: np.random.Generator, n: int) -> np.ndarray:
    """Mains hum (50 or 60 Hz and harmonics) over a little pink noise."""
    t = np.arange(n) / _SR
    base = 50.0 if rng.random() < 0.5 else 60.0
    harmonics = np.arange(1, 9)
    amps = rng.uniform(0.3, 1.0, harmonics.size) / harmonics
    hum = np.sin(2 * np.pi * base * np.outer(t, harmonics) + rng.uniform(0, 2 * np.pi, harmonics.size)) @ amps
    return hum / np.sqrt(np.mean(hum ** 2)) + 0.1 * coloured_noise(rng, n, 0.5)

"""``predict --segment``: long recordings cut into segments, one prediction per segment.

Two ways to cut a recording:

* ``vad`` — speech segments found by Silero VAD (:mod:`.vad`), run over the recording
  block by block, so that memory is bounded by a block, not by the file;
* ``fixed:SECONDS[:HOP]`` — windows of ``SECONDS`` every ``HOP`` seconds (default: no
  overlap), from the file's header alone; the last, partial window is kept when it has
  at least ``min_segment`` seconds.

Each segment is then read by seeking (:func:`conilium.audio.read_span`), resampled and
conditioned as a whole file is, and predicted by whichever predictor is given
(:class:`~conilium.finetune.predict.Predictor` or
:class:`~conilium.finetune.onnx_predict.OnnxPredictor`), a bounded number of segments at
a time. The results are :class:`~conilium.finetune.results.FilePrediction` rows with
``start`` and ``end`` (seconds); the writers add ``Start`` and ``End`` columns. A
recording without speech gives no rows and is listed in :attr:`SegmentRun.no_speech`.

Nothing here imports torch; ``vad`` does (Silero's model runs in PyTorch).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

from tqdm import tqdm

from conilium.audio import audio_seconds, condition_audio, read_span
from conilium.errors import AudioError, ConfigError

from .results import FilePrediction

#: Why ``--segment`` refuses a fusion run.
SEGMENT_FUSION = ("--segment: a fusion run (train-head over an audio and a text cache) reads each file's transcript, "
                  "and a segment of a recording has none of its own; predict whole clips with their transcripts, "
                  "or use a run trained on audio alone")

#: Segments predicted per call of the predictor (memory: this many segments' audio at once).
SEGMENTS_PER_CALL = 64


@dataclass(frozen=True)
class SegmentSpec:
    """How recordings are cut: ``kind`` ``"vad"`` or ``"fixed"``; for fixed windows ``seconds``
    and ``hop``; for both ``min_segment`` (shorter segments are dropped) and ``max_segment``
    (longer speech is cut into pieces of at most this); ``pad`` seconds of context around a
    speech segment and ``threshold`` the VAD's speech probability threshold."""

    kind: str
    seconds: Optional[float] = None
    hop: Optional[float] = None
    min_segment: float = 1.0
    max_segment: float = 8.0
    pad: float = 0.1
    threshold: float = 0.5

    def describe(self) -> str:
        if self.kind == "fixed":
            return f"fixed windows of {self.seconds:g} s every {self.hop:g} s"
        return (f"speech segments (Silero VAD, threshold {self.threshold:g}) of {self.min_segment:g}-"
                f"{self.max_segment:g} s, padded {self.pad:g} s")


def parse_segment(text: str, *, min_segment: float = 1.0, max_segment: float = 8.0, pad: float = 0.1,
                  threshold: float = 0.5) -> SegmentSpec:
    """``vad`` or ``fixed:SECONDS[:HOP]`` as a :class:`SegmentSpec` (a ConfigError naming the option
    when malformed)."""
    text = str(text).strip()
    if not (0 < min_segment <= max_segment):
        raise ConfigError(f"--min-segment {min_segment:g} and --max-segment {max_segment:g}: need 0 < min <= max")
    if pad < 0:
        raise ConfigError(f"--pad {pad:g}: padding cannot be negative")
    if not (0 < threshold < 1):
        raise ConfigError(f"--vad-threshold {threshold:g}: a speech probability strictly between 0 and 1")
    if text == "vad":
        return SegmentSpec("vad", min_segment=min_segment, max_segment=max_segment, pad=pad, threshold=threshold)
    m = re.fullmatch(r"fixed:([0-9.]+)(?::([0-9.]+))?", text)
    if m:
        try:
            seconds = float(m.group(1))
            hop = float(m.group(2)) if m.group(2) else seconds
        except ValueError:
            m = None
        else:
            if seconds <= 0 or hop <= 0:
                raise ConfigError(f"--segment {text}: window and hop must be positive seconds")
            return SegmentSpec("fixed", seconds=seconds, hop=hop, min_segment=min(min_segment, seconds),
                               max_segment=max(max_segment, seconds), pad=0.0, threshold=threshold)
    raise ConfigError(f"--segment {text!r}: expected 'vad' or 'fixed:SECONDS[:HOP]' (e.g. fixed:8 or fixed:8:4)")


def fixed_segments(duration: float, seconds: float, hop: float, min_segment: float) -> List[Tuple[float, float]]:
    """Windows ``(start, end)`` of ``seconds`` every ``hop`` over ``duration`` seconds; the last
    window may be shorter and is kept when it has at least ``min_segment`` seconds (a recording
    shorter than one window is one segment, under the same rule)."""
    out = []
    k = 0
    while True:
        start = round(k * hop, 6)
        if start >= duration - 1e-9:
            break
        end = min(duration, start + seconds)
        if end - start >= min_segment - 1e-9:
            out.append((start, end))
        if end >= duration - 1e-9:
            break
        k += 1
    return out


@dataclass
class SegmentRun:
    """What :func:`predict_segments` gives back: the rows (one per segment, plus one per file that
    failed as a whole, with its error), the recordings in which no speech was found, and the
    number of recordings cut."""

    results: List[FilePrediction] = field(default_factory=list)
    no_speech: List[str] = field(default_factory=list)
    files: int = 0


Cutter = Callable[[str], List[Tuple[float, float]]]


def _cutter(spec: SegmentSpec, *, rescale_loud: bool) -> Cutter:
    if spec.kind == "fixed":
        def cut(path: str) -> List[Tuple[float, float]]:
            return fixed_segments(audio_seconds(path), spec.seconds, spec.hop, spec.min_segment)
        return cut
    from .vad import SpeechDetector  # torch

    detector = SpeechDetector(threshold=spec.threshold, min_segment=spec.min_segment,
                              max_segment=spec.max_segment, pad=spec.pad)
    return lambda path: detector.segments(path, rescale_loud=rescale_loud)


def predict_segments(predictor, inputs: Sequence, spec: SegmentSpec, *, progress: bool = False,
                     cutter: Optional[Cutter] = None, per_call: int = SEGMENTS_PER_CALL) -> SegmentRun:
    """Cut each audio file of ``inputs`` as ``spec`` says and predict every segment with
    ``predictor`` (anything with a ``predict(waveforms)`` method and a ``signal`` path:
    :class:`~conilium.finetune.predict.Predictor`, :class:`~conilium.finetune.onnx_predict.OnnxPredictor`).

    Rows come in the order of the inputs, then of time. A file that cannot be read or cut gets one
    row with its error; a file with no speech gets none and is listed in ``no_speech``. At most
    ``per_call`` segments' audio is held at once. A fusion run's predictor (which reads each
    file's transcript) is refused: a segment has no transcript of its own."""
    if getattr(predictor, "needs_text", False):
        raise ConfigError(SEGMENT_FUSION)
    cut = cutter or _cutter(spec, rescale_loud=predictor.signal.rescale_loud)
    run = SegmentRun()
    pending: List[Tuple[FilePrediction, tuple]] = []

    def flush():
        if not pending:
            return
        got = predictor.predict([wave for _, wave in pending])
        for (row, _), r in zip(pending, got):
            row.probabilities, row.prediction, row.attributes = r.probabilities, r.prediction, r.attributes
            row.error, row.peak = r.error, r.peak
        pending.clear()

    bar = tqdm(inputs, desc="segmenting", unit="file", disable=not progress, leave=False)
    for item in bar:
        if not isinstance(item, (str, Path)):
            raise ConfigError("predict --segment: inputs are audio file paths (a waveform in memory is predicted "
                              "whole with predict())")
        path = str(item)
        run.files += 1
        try:
            spans = cut(path)
        except AudioError as e:
            run.results.append(FilePrediction(path, classes=tuple(predictor.classes), names=tuple(predictor.class_names),
                                              error=e.reason))
            continue
        if not spans:
            run.no_speech.append(path)
            continue
        for start, end in spans:
            row = FilePrediction(path, classes=tuple(predictor.classes), names=tuple(predictor.class_names),
                                 duration=end - start, seconds=end - start,
                                 start=start, end=end)
            run.results.append(row)
            try:
                x, sr = read_span(path, start, end)
                wave = (condition_audio(x, sr, source=path, rescale_loud=predictor.signal.rescale_loud), 16000)
            except AudioError as e:
                row.error = e.reason
                continue
            pending.append((row, wave))
            if len(pending) >= per_call:
                flush()
    flush()
    for row in run.results:
        if row.ok and row.seconds is not None and predictor.max_seconds and row.seconds > predictor.max_seconds:
            row.seconds = float(predictor.max_seconds)  # the predictor used only the beginning: the Warning says so
    return run


def segment_and_predict(predictor, inputs: Sequence, segment: str = "vad", *, min_segment: float = 1.0,
                        max_segment: Optional[float] = None, pad: float = 0.1, threshold: float = 0.5,
                        progress: bool = False) -> SegmentRun:
    """Each audio file of ``inputs`` cut into segments (``"vad"``: speech found by Silero VAD;
    ``"fixed:SECONDS[:HOP]"``: windows) and each segment predicted by ``predictor``: a
    :class:`SegmentRun` whose ``results`` are one row per segment (``start``, ``end`` in
    seconds) and ``no_speech`` the files without any. ``max_segment`` defaults to the
    predictor's ``max_seconds``, else 30 s."""
    spec = parse_segment(segment, min_segment=min_segment, pad=pad, threshold=threshold,
                         max_segment=max_segment or predictor.max_seconds or 30.0)
    return predict_segments(predictor, inputs, spec, progress=progress)

"""Speech segments of a recording with Silero VAD (the ``silero-vad`` package, which ships its
model: nothing is downloaded), run over the recording block by block.

Silero scores 32 ms windows (512 samples at 16 kHz) with a recurrent state carried from one
window to the next; :class:`SpeechDetector` feeds it the windows of
:func:`conilium.audio.stream_audio`'s blocks, keeping the few samples left over at a
block's end for the next, so the windows and scores are those of the whole recording
read at once, while memory holds one block and one float per window (a ten-hour recording:
about 1.1 million floats). The scores become segments with silero's own rules
(``get_speech_timestamps_from_probs``): speech above the threshold, at least
``min_segment`` long, cut at a pause (or, lacking one, hard) to at most ``max_segment``
including ``pad`` seconds of context on each side.
"""

from __future__ import annotations

import warnings
from typing import List, Tuple

import numpy as np
import torch

from conilium.audio import stream_audio
from conilium.errors import ConfigError

#: Silero's rate and window at that rate.
VAD_RATE = 16000
WINDOW = 512


def load_vad():
    """Silero VAD's PyTorch model, from the package's own file. Importing silero_vad sets torch
    to one thread for the whole process; the count is put back as it was."""
    threads = torch.get_num_threads()
    try:
        from silero_vad import load_silero_vad
    except ImportError:
        raise ConfigError("predict --segment vad needs the silero-vad package: pip install 'conilium[vad]' "
                          "(or pip install silero-vad); --segment fixed:SECONDS works without it") from None
    finally:
        torch.set_num_threads(threads)
    with warnings.catch_warnings():  # its loader's use of deprecated importlib and torch.jit calls
        warnings.simplefilter("ignore", DeprecationWarning)
        model = load_silero_vad()
    torch.set_num_threads(threads)
    return model


class SpeechDetector:
    """Speech segments ``[(start, end), ...]`` in seconds of a recording (see the module)."""

    def __init__(self, *, threshold: float = 0.5, min_segment: float = 1.0, max_segment: float = 8.0,
                 pad: float = 0.1, block_seconds: float = 60.0):
        self.threshold = float(threshold)
        self.min_segment = float(min_segment)
        self.max_segment = float(max_segment)
        self.pad = float(pad)
        self.block_seconds = float(block_seconds)
        self.model = load_vad()

    def probabilities(self, path, *, rescale_loud: bool = False) -> Tuple[np.ndarray, int]:
        """Silero's speech probability of every 32 ms window of ``path``, and the recording's
        length in 16 kHz samples."""
        self.model.reset_states()
        probs: List[float] = []
        rest = np.zeros(0, dtype=np.float32)
        n = 0
        with torch.inference_mode():
            for block in stream_audio(path, block_seconds=self.block_seconds, sample_rate=VAD_RATE,
                                      rescale_loud=rescale_loud):
                n += len(block)
                x = np.concatenate([rest, block]) if len(rest) else block
                whole = len(x) // WINDOW * WINDOW
                for k in range(0, whole, WINDOW):
                    probs.append(float(self.model(torch.from_numpy(x[k : k + WINDOW]), VAD_RATE)))
                rest = x[whole:].copy()
            if len(rest):
                last = np.zeros(WINDOW, dtype=np.float32)
                last[: len(rest)] = rest
                probs.append(float(self.model(torch.from_numpy(last), VAD_RATE)))
        return np.asarray(probs, dtype=np.float32), n

    def segments(self, path, *, rescale_loud: bool = False) -> List[Tuple[float, float]]:
        from silero_vad import get_speech_timestamps_from_probs

        probs, n = self.probabilities(path, rescale_loud=rescale_loud)
        if not len(probs):
            return []
        stamps = get_speech_timestamps_from_probs(
            probs.tolist(), sampling_rate=VAD_RATE, threshold=self.threshold,
            min_speech_duration_ms=int(round(self.min_segment * 1000)), max_speech_duration_s=self.max_segment,
            speech_pad_ms=int(round(self.pad * 1000)), audio_length_samples=n)
        return [(round(s["start"] / VAD_RATE, 3), round(s["end"] / VAD_RATE, 3)) for s in stamps]

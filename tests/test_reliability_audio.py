"""Audio sanity: float audio stored at integer scale is refused (or rescaled on request), and
never feeds the global normalisation statistics."""

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conilium.audio import MAX_PEAK, SignalPath, global_stats, loud_scale, read_audio
from conilium.errors import AudioError


def _speech(seconds=0.5, seed=0):
    rng = np.random.default_rng(seed)
    return (0.3 * np.sin(np.linspace(0, 400, int(16000 * seconds))) + 0.05 * rng.standard_normal(int(16000 * seconds))
            ).astype(np.float32)


@pytest.fixture
def loud_and_clean(tmp_path):
    """The same clip as int16 PCM (clean) and as float WAV holding the int16 values (loud)."""
    pcm = np.round(_speech() * 32767).astype(np.int16)
    clean, loud = tmp_path / "clean.wav", tmp_path / "loud.wav"
    sf.write(clean, pcm, 16000, subtype="PCM_16")
    sf.write(loud, pcm.astype(np.float32), 16000, subtype="FLOAT")
    return clean, loud


def test_float_audio_at_int16_scale_is_an_error_naming_clip_file_and_peak(loud_and_clean):
    _, loud = loud_and_clean
    with pytest.raises(AudioError) as e:
        read_audio(loud, clip="MSP_0001.wav")
    msg = str(e.value)
    assert "MSP_0001.wav" in msg and str(loud) in msg
    peak = float(np.abs(sf.read(loud, dtype="float32")[0]).max())
    assert f"{peak:.6g}" in msg and "--rescale-loud" in msg and "32768" in msg
    with pytest.raises(AudioError, match="outside"):
        SignalPath(max_seconds=0.2)(loud, clip="MSP_0001.wav")  # also when only the start is read


def test_rescale_loud_gives_the_integer_pcm_decoding(loud_and_clean):
    clean, loud = loud_and_clean
    np.testing.assert_array_equal(read_audio(loud, rescale_loud=True), read_audio(clean))
    np.testing.assert_array_equal(SignalPath(rescale_loud=True).read(loud), read_audio(clean))
    assert [loud_scale(p) for p in (2.5, 32767.0, 32768.0, 40000.0, 2.0 ** 31, 1e12)] == [
        2.0 ** 15, 2.0 ** 15, 2.0 ** 15, 2.0 ** 23, 2.0 ** 31, 1e12]


def test_plausible_float_overs_and_integer_pcm_are_read_unchanged(tmp_path):
    x = _speech()
    x[100] = 1.6  # an inter-sample over of float audio: +4 dBFS, below the 2.0 limit
    sf.write(tmp_path / "over.wav", x, 16000, subtype="FLOAT")
    np.testing.assert_array_equal(read_audio(tmp_path / "over.wav"), x)
    full = np.full(1600, -32768, dtype=np.int16)  # integer PCM is within [-1, 1) by construction
    sf.write(tmp_path / "full.flac", full, 16000, subtype="PCM_16")
    assert read_audio(tmp_path / "full.flac").min() == -1.0
    assert MAX_PEAK == 2.0


class _Clip:
    def __init__(self, name, split):
        self.name, self.split = name, split


class _Corpus:
    """What global_stats needs of a corpus: its clips and their audio paths."""

    def __init__(self, root: Path, clips):
        self.root, self.clips = root, clips

    def __iter__(self):
        return iter(self.clips)

    def audio_path(self, name):
        return self.root / name


def test_global_stats_never_uses_a_loud_clip(tmp_path):
    for i in range(3):
        sf.write(tmp_path / f"c{i}.wav", _speech(seed=i), 16000, subtype="PCM_16")
    sf.write(tmp_path / "loud.wav", np.round(_speech(seed=9) * 32767), 16000, subtype="FLOAT")
    good = [_Clip(f"c{i}.wav", "Train") for i in range(3)]
    corpus = _Corpus(tmp_path, good + [_Clip("loud.wav", "Train")])
    reference, _ = global_stats(_Corpus(tmp_path, good), max_seconds=None, verbose=False)
    assert reference["std"] < 1.0

    with pytest.raises(AudioError, match=r"loud\.wav.*outside.*--skip-bad"):
        global_stats(corpus, max_seconds=None, verbose=False)
    stats, bad = global_stats(corpus, max_seconds=None, skip_bad=True, verbose=False)
    assert [n for n, _ in bad] == ["loud.wav"] and "outside" in bad[0][1]
    assert stats == reference  # left out, listed, not used
    rescaled, bad = global_stats(corpus, max_seconds=None, rescale_loud=True, verbose=False)
    assert bad == [] and rescaled["clips"] == 4 and rescaled["std"] < 1.0

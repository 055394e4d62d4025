"""extract-features --compute-dtype bfloat16-weights: the upstream's weights and activations in
bfloat16 (no autocast), checked against the float32 forward, recorded and compared on reuse."""

import numpy as np
import pytest

from conilium.cache import FeatureCache
from conilium.errors import CacheError, ConfigError
from conilium.extract import ExtractConfig, extract_features

#: Each clip's frames of each layer against float32's: relative (Frobenius) error at most this
#: (measured on demo-wavlm: about 0.8 %, bfloat16 keeping 8 bits of mantissa).
RELATIVE_TOLERANCE = 0.02


def _extract(corpus, out, compute_dtype, upstream="demo-wavlm"):
    config = ExtractConfig(upstream, random_init=True, layers="all", dtype="float32", compute_dtype=compute_dtype)
    return extract_features(config, corpus, out, device="cpu", verbose=False)


def test_bfloat16_weights_give_the_float32_frames_within_the_documented_tolerance(small_demo_corpus, tmp_path):
    full = FeatureCache(_extract(small_demo_corpus, tmp_path / "float32", "float32"))
    half = FeatureCache(_extract(small_demo_corpus, tmp_path / "bf16", "bfloat16-weights"))
    assert half.manifest["compute_dtype"] == "bfloat16-weights"
    worst = 0.0
    for name in full.split("Development"):
        a, b = full.frames(name), half.frames(name)
        assert a.shape == b.shape and np.isfinite(b).all()
        for layer in range(a.shape[1]):
            worst = max(worst, float(np.linalg.norm(a[:, layer] - b[:, layer]) / np.linalg.norm(a[:, layer])))
    assert 0 < worst <= RELATIVE_TOLERANCE  # bfloat16 did run: not the float32 frames
    with pytest.raises(CacheError, match="compute_dtype: cache has 'bfloat16-weights', requested 'float32'"):
        _extract(small_demo_corpus, tmp_path / "bf16", "float32")


@pytest.mark.parametrize("upstream", ["demo-whisper", "demo-text"])
def test_whisper_and_text_upstreams_refuse_bfloat16_weights_before_writing(small_demo_corpus, tmp_path, upstream):
    with pytest.raises(ConfigError, match="bfloat16-weights"):
        if upstream == "demo-text":
            from conilium.extract.text import extract_text_features

            extract_text_features(ExtractConfig(upstream, random_init=True, compute_dtype="bfloat16-weights"),
                                  small_demo_corpus, tmp_path / "out", device="cpu", verbose=False)
        else:
            _extract(small_demo_corpus, tmp_path / "out", "bfloat16-weights", upstream=upstream)
    assert not (tmp_path / "out").exists()

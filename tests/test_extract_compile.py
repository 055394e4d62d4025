"""extract-features --compile: the upstream's forward through torch.compile, checked against the
eager float32 forward, recorded in the manifest and compared when a cache is resumed or reused."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from conilium.cache import FeatureCache
from conilium.cli.extract import extract_features_cmd
from conilium.errors import CacheError, ConfigError
from conilium.extract import ExtractConfig, extract_features

#: The compiled forward's frames against the eager forward's, float32 (measured: about 3e-6).
TOLERANCE = 1e-4

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="torch.compile on CPU needs a C++ compiler")


def _extract(corpus, out, compile: bool):
    config = ExtractConfig("demo-wavlm", random_init=True, layers="all", dtype="float32", compile=compile)
    return extract_features(config, corpus, out, device="cpu", verbose=False)


def test_compiled_frames_equal_the_eager_ones_and_the_manifest_says_compiled(small_demo_corpus, tmp_path):
    eager = FeatureCache(_extract(small_demo_corpus, tmp_path / "eager", False))
    compiled = FeatureCache(_extract(small_demo_corpus, tmp_path / "compiled", True))
    names = eager.split("Development")
    assert names and names == compiled.split("Development")
    worst = 0.0
    for name in names:
        a, b = eager.frames(name), compiled.frames(name)
        assert a.shape == b.shape
        worst = max(worst, float(np.abs(a - b).max()))
    assert worst <= TOLERANCE
    manifests = {k: json.loads((tmp_path / k / "manifest.json").read_text()) for k in ("eager", "compiled")}
    assert manifests["compiled"]["compile"] is True and manifests["compiled"]["config"]["compile"] is True
    # a cache made without it records what caches always recorded
    assert "compile" not in manifests["eager"] and "compile" not in manifests["eager"]["config"]

    # reused only with the same setting, either way round
    with pytest.raises(CacheError, match="compile: cache has True, requested False"):
        _extract(small_demo_corpus, tmp_path / "compiled", False)
    r = CliRunner().invoke(extract_features_cmd, ["--corpus", str(small_demo_corpus), "--upstream", "demo-wavlm",
                                                  "--random-init", "--layers", "all", "--dtype", "float32",
                                                  "--out", str(tmp_path / "eager"), "--device", "cpu", "--compile"])
    assert r.exit_code == 1 and "compile: cache has False, requested True" in r.output, r.output


def test_a_text_upstream_refuses_compile(small_demo_corpus, tmp_path):
    from conilium.extract.text import extract_text_features

    with pytest.raises(ConfigError, match="--compile applies to audio upstreams"):
        extract_text_features(ExtractConfig("demo-text", random_init=True, compile=True), small_demo_corpus,
                              tmp_path / "text", device="cpu", verbose=False)

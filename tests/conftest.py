"""Shared pytest fixtures."""

import pytest

from conilium.demo import make_demo_corpus


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory):
    """Root of a 300-clip demo corpus (seed 0), built once per session.

    Its 8 noise recordings lie in the sibling folder ``demo_corpus.parent / "noise"``.
    """
    base = tmp_path_factory.mktemp("demo300")
    return make_demo_corpus(base / "corpus", clips=300, seed=0, noise_dir=base / "noise")


@pytest.fixture(scope="session")
def small_demo_corpus(tmp_path_factory):
    """Root of a 60-clip demo corpus (seed 0), built once per session."""
    return make_demo_corpus(tmp_path_factory.mktemp("demo60") / "corpus", clips=60, seed=0)


@pytest.fixture(scope="session")
def demo_cache(demo_corpus, tmp_path_factory):
    """Feature cache of ``demo_corpus``: demo-wavlm (random init, seed 0), every layer
    (4 hidden states of dim 96), float16 frames, pooled statistics, global normalisation,
    8 s truncation. Built once per session with :func:`conilium.extract.extract_features`."""
    from conilium.extract import ExtractConfig, extract_features

    out = tmp_path_factory.mktemp("demo_cache") / "demo-wavlm"
    config = ExtractConfig("demo-wavlm", random_init=True, seed=0, layers="all", pooled_stats=True)
    return extract_features(config, demo_corpus, out, device="cpu", verbose=False)


@pytest.fixture(scope="module")
def two_torch_threads():
    """torch uses 2 CPU threads in the module that asks for it (the machine CI runs on has 2 cores)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)

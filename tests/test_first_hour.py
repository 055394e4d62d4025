"""First use offline: a hub upstream that is neither reachable nor cached fails in seconds,
names the command that fetches it, and leaves nothing behind."""

import time

import pytest
from click.testing import CliRunner

import conilium.extract.upstreams as upstreams
from conilium.errors import ConfigError


@pytest.fixture
def offline(monkeypatch, tmp_path):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(upstreams, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))


def test_check_names_the_download_command(offline):
    with pytest.raises(ConfigError, match=r"`(hf|huggingface-cli) download microsoft/wavlm-large`"):
        upstreams.check_upstream("wavlm-large")
    with pytest.raises(ConfigError, match="facebook/hubert-large-ll60k"):
        upstreams.check_upstream("hubert-large-ll60k")  # the self-supervised HuBERT beside the ASR one


def test_extract_features_offline_fails_fast_and_writes_nothing(offline, small_demo_corpus, tmp_path):
    from conilium.cli.extract import extract_features_cmd

    out = tmp_path / "cache"
    t = time.perf_counter()
    result = CliRunner().invoke(extract_features_cmd, ["--corpus", str(small_demo_corpus), "--upstream", "wavlm-large",
                                                       "--out", str(out), "--device", "cpu", "-q"])
    assert result.exit_code == 1 and "download microsoft/wavlm-large" in result.output
    assert time.perf_counter() - t < 20 and not out.exists()


def test_text_upstream_offline_fails_fast_and_writes_nothing(offline, small_demo_corpus, tmp_path):
    from conilium.cli.extract import extract_features_cmd

    out = tmp_path / "cache"
    result = CliRunner().invoke(extract_features_cmd, ["--corpus", str(small_demo_corpus), "--upstream",
                                                       "roberta-large", "--out", str(out), "--device", "cpu", "-q"])
    assert result.exit_code == 1 and "download FacebookAI/roberta-large" in result.output
    assert not out.exists()


def test_finetune_best_offline_fails_fast_and_writes_nothing(offline, small_demo_corpus, tmp_path):
    from conilium.cli.finetune import finetune_best_cmd

    out = tmp_path / "model"
    result = CliRunner().invoke(finetune_best_cmd, ["--corpus", str(small_demo_corpus), "--out", str(out),
                                                    "--device", "cpu", "-q"])
    assert result.exit_code == 1 and "download microsoft/wavlm-large" in result.output
    assert not out.exists()

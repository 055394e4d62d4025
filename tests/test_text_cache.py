"""A text upstream in the feature cache: token-level hidden states of demo-text over the transcripts."""

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conilium.cache.reader import FeatureCache
from conilium.cache.writer import SETTINGS, settings_key
from conilium.cli.extract import extract_features_cmd, verify_cache_cmd
from conilium.cli.heads import train_head_cmd
from conilium.corpus import load_corpus
from conilium.errors import CacheError, ConfigError, CorpusError
from conilium.extract import ExtractConfig, extract_features
from conilium.extract.text import is_text_upstream
from conilium.transcripts import transcript_path

CONFIG = ExtractConfig("demo-text", random_init=True, layers="all", dtype="float32", pooled_stats=True, shard_size=16)


@pytest.fixture
def corpus_root(small_demo_corpus, tmp_path):
    """A private copy of the 60-clip demo corpus (these tests edit its transcripts)."""
    return shutil.copytree(small_demo_corpus, tmp_path / "corpus")


@pytest.fixture(scope="module")
def text_cache(small_demo_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("text") / "demo-text"
    return FeatureCache(extract_features(CONFIG, small_demo_corpus, out, device="cpu", verbose=False))


def test_registry_names_and_directories_are_text_upstreams(text_cache):
    for name in ("roberta-base", "roberta-large", "modernbert-large", "deberta-v3-large", "demo-text"):
        assert is_text_upstream(name)
    assert not is_text_upstream("demo-wavlm") and not is_text_upstream("microsoft/wavlm-large")
    folder = text_cache.path / text_cache.manifest["upstream"]["path"]
    assert is_text_upstream(str(folder))


def test_frames_are_the_models_own_hidden_states_on_the_same_token_ids(text_cache, small_demo_corpus):
    from transformers import AutoModel, AutoTokenizer

    m = text_cache.manifest
    assert m["frame_rate"] is None and m["max_seconds"] is None and m["normalize"] == "none"
    assert m["upstream"]["source"] == "random-init" and m["layers"] == [0, 1, 2, 3]
    corpus = load_corpus(small_demo_corpus)
    assert text_cache.names == list(corpus.clips)
    folder = text_cache.path / m["upstream"]["path"]
    model = AutoModel.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = corpus.transcripts().texts
    for name in text_cache.names[:5] + text_cache.names[-3:]:
        ids = tokenizer(texts[name], return_tensors="pt")["input_ids"]
        assert ids[0, 0] == tokenizer.bos_token_id and ids[0, -1] == tokenizer.eos_token_id
        assert (ids != tokenizer.unk_token_id).all()  # the demo's words are all in the vocabulary
        with torch.no_grad():
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        want = torch.stack(hs, dim=2)[0].numpy()  # (tokens, layers, dim)
        got = text_cache.frames(name)
        assert got.shape == want.shape == (ids.shape[1], 4, 64)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
        pooled = text_cache.pooled(name)
        np.testing.assert_allclose(pooled[:, 0], want.mean(axis=0), atol=1e-5)
        np.testing.assert_allclose(pooled[:, 1], want.std(axis=0), atol=1e-5)
    assert text_cache.clips[name].duration is not None  # the clip records are those of an audio cache


def test_manifest_names_the_transcripts_and_the_tokenizer(text_cache, small_demo_corpus):
    t = text_cache.manifest["text"]
    corpus = load_corpus(small_demo_corpus)
    assert t["transcripts_fingerprint"] == corpus.transcripts().fingerprint(list(corpus.clips))
    assert t["transcripts"] == 60 and t["max_tokens"] == 128
    assert t["tokenizer"]["name"] == "demo-text" and len(t["tokenizer"]["sha256"]) == 64
    r = CliRunner().invoke(verify_cache_cmd, [str(text_cache.path)])
    assert r.exit_code == 0, r.output


def test_a_cache_from_other_transcripts_is_refused_on_reuse_and_on_resume(corpus_root, tmp_path):
    out = tmp_path / "cache"
    extract_features(CONFIG, corpus_root, out, device="cpu", verbose=False)
    extract_features(CONFIG, corpus_root, out, device="cpu", verbose=False)  # the same: reused
    name = next(iter(load_corpus(corpus_root).clips))
    transcript_path(corpus_root, name).write_text("so wonderful", encoding="utf-8")
    with pytest.raises(CacheError, match="built from other transcripts"):
        extract_features(CONFIG, corpus_root, out, device="cpu", verbose=False)
    # a partial cache (no manifest yet): resuming it with these transcripts is refused too
    (out / "manifest.json").unlink()
    with pytest.raises(CacheError, match="Transcripts/ changed since"):
        extract_features(CONFIG, corpus_root, out, device="cpu", verbose=False)
    # a tokenizer of other content is another cache as well
    settings = json.loads((out / SETTINGS).read_text())
    other = json.loads(json.dumps(settings))
    other["text"]["tokenizer"]["sha256"] = "0" * 64
    other["text"]["transcripts_fingerprint"] = settings["text"]["transcripts_fingerprint"]
    from conilium.cache.writer import compare_settings

    assert any("text tokenizer" in d for d in compare_settings(settings, other))
    assert settings_key(settings) != settings_key(other)
    extract_features(CONFIG, corpus_root, out, device="cpu", verbose=False, overwrite=True)
    assert FeatureCache(out).manifest["text"]["transcripts_fingerprint"] != settings["text"]["transcripts_fingerprint"]


def test_audio_settings_keep_their_shard_key():
    # an audio cache records no "text": its shards' settings key is what it was before text upstreams
    settings = {"upstream": {"name": "demo-wavlm"}, "layers": [1], "dim": 96}
    assert settings_key(settings) == settings_key(dict(settings, text=None))


def test_missing_transcripts_are_named_or_skipped_and_listed(corpus_root, tmp_path):
    names = list(load_corpus(corpus_root).clips)
    for n in names[3:5]:
        transcript_path(corpus_root, n).unlink()
    with pytest.raises(CorpusError, match=f"2 of 60 clip\\(s\\) have no transcript.*{names[3]}"):
        extract_features(CONFIG, corpus_root, tmp_path / "c1", device="cpu", verbose=False)
    assert not (tmp_path / "c1" / "manifest.json").exists()
    cache = FeatureCache(extract_features(CONFIG, corpus_root, tmp_path / "c2", device="cpu", verbose=False,
                                          skip_bad=True))
    assert len(cache.names) == 58 and names[3] not in cache.names
    assert {s["clip"]: s["reason"] for s in cache.manifest["skipped"]} == {n: "no transcript" for n in names[3:5]}


def test_audio_only_options_are_refused(corpus_root, tmp_path):
    with pytest.raises(ConfigError, match="text encoder"):
        extract_features(ExtractConfig("demo-text", random_init=True, normalize="global"), corpus_root,
                         tmp_path / "c", device="cpu", verbose=False)
    with pytest.raises(ConfigError, match="only demo-text"):
        extract_features(ExtractConfig("roberta-base", random_init=True), corpus_root, tmp_path / "c", device="cpu",
                         verbose=False)


def test_a_head_trains_on_the_text_cache(text_cache, small_demo_corpus, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(train_head_cmd, ["--cache", str(text_cache.path), "--out", str(out), "--loss", "wbce",
                                            "--labels", "S", "--epochs", "2", "--hidden", "16", "--device", "cpu",
                                            "--quiet"])
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["f1_macro"] <= 1.0 and metrics["n"] > 0
    # predict --run runs the head on audio: a text head is refused, saying why
    from conilium.cli.finetune import predict_cmd

    wav = sorted((small_demo_corpus / "Audios").iterdir())[0]
    r = CliRunner().invoke(predict_cmd, ["--run", str(out), str(wav), "--out", str(tmp_path / "p.csv"), "-q"])
    assert r.exit_code == 1 and "text upstream's cache" in r.output, r.output


def test_cli_extracts_a_text_cache(corpus_root, tmp_path):
    out = tmp_path / "cli"
    r = CliRunner().invoke(extract_features_cmd, ["--corpus", str(corpus_root), "--upstream", "demo-text",
                                                  "--random-init", "--out", str(out), "--layers", "last", "-q"])
    assert r.exit_code == 0, r.output
    cache = FeatureCache(out)
    assert cache.manifest["layers"] == [3] and cache.manifest["dtype"] == "float16"


def test_a_transcript_beyond_the_token_limit_is_cut_and_named(corpus_root, tmp_path, capsys):
    names = list(load_corpus(corpus_root).clips)
    transcript_path(corpus_root, names[7]).write_text(" ".join(["wonderful"] * 300), encoding="utf-8")
    cache = FeatureCache(extract_features(CONFIG, corpus_root, tmp_path / "c", device="cpu", verbose=True))
    assert cache.num_frames(names[7]) == cache.manifest["text"]["max_tokens"] == 128
    assert f"1 transcript(s) longer than 128 tokens were cut there: {names[7]}" in capsys.readouterr().err

"""extract-features: batch independence, cache contents, settings, augmentation, bad audio."""

import json
import math
import shutil

import h5py
import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner

from conilium.audio import read_audio
from conilium.cache import FeatureCache
from conilium.cache.shards import to_float16
from conilium.corpus import load_corpus
from conilium.demo import make_demo_corpus
from conilium.errors import AudioError, CacheError, ConfigError
from conilium.extract import ExtractConfig, ExtractStats, NoiseAugmentation, extract_features, parse_layers
from conilium.cli.extract import extract_features_cmd
from conilium.audio import list_noise_files, mix_noise
from conilium.extract.plan import assign_shards, plan_batches, plan_jobs
from conilium.extract.encoder import UpstreamRunner
from conilium.extract.upstreams import load_upstream

FAMILIES = ["demo-wavlm", "demo-wav2vec2-base", "demo-wav2vec2-large", "demo-hubert"]
DEMO = ExtractConfig("demo-wavlm", random_init=True)


pytestmark = pytest.mark.usefixtures("two_torch_threads")


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    """24 demo clips (Train 14, Development 6, Test3 4) and 5 noise recordings beside them."""
    base = tmp_path_factory.mktemp("tiny24")
    make_demo_corpus(base / "corpus", clips=24, seed=3, noise_dir=base / "noise", noise_files=5)
    return base / "corpus"


@pytest.fixture(scope="module")
def weights_root(tmp_path_factory):
    return tmp_path_factory.mktemp("weights")


def _waves(corpus_root, n=4):
    """``n`` demo waveforms cut to different lengths (1.0 s, 1.6 s + 123 samples, ...)."""
    corpus = load_corpus(corpus_root)
    names = list(corpus.clips)[:n]
    return [read_audio(corpus.audio_path(c))[: 16000 + i * (9600 + 123)] for i, c in enumerate(names)]


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_one_clip_at_a_time(family, tiny_corpus, weights_root):
    """Every clip's hidden states in a padded batch equal the plain transformers forward of
    that clip alone (hidden states 0..L-1 and last_hidden_state), for every family."""
    model, _ = load_upstream(family, random_init=True, seed=0, random_root=weights_root)
    runner = UpstreamRunner(model, device=torch.device("cpu"), pooled_stats=True)
    waves = _waves(tiny_corpus)
    assert len({len(w) for w in waves}) == len(waves)  # really different lengths: padding happens
    batch = runner(waves)
    for w, (frames, pooled) in zip(waves, batch):
        with torch.inference_mode():
            ref = model(torch.from_numpy(w)[None], output_hidden_states=True)
        want = torch.stack(list(ref.hidden_states[:-1]) + [ref.last_hidden_state], dim=2)[0].numpy()
        assert frames.shape == want.shape == (runner.frames_for(len(w)), 4, 96)
        scale = np.abs(want).max()
        np.testing.assert_allclose(frames, want, atol=2e-5 * scale, rtol=0)
        np.testing.assert_allclose(pooled[:, 0], want.mean(axis=0), atol=2e-5 * scale, rtol=0)
        np.testing.assert_allclose(pooled[:, 1], want.std(axis=0), atol=2e-5 * scale, rtol=0)
    runner.close()


def test_naive_padding_changes_group_norm_outputs(tiny_corpus, weights_root):
    """Why the per-clip CNN matters: transformers' own padded batch differs for group norm."""
    model, _ = load_upstream("demo-wav2vec2-base", random_init=True, seed=0, random_root=weights_root)
    w_short, w_long = _waves(tiny_corpus, 2)
    x = torch.zeros(2, max(len(w_short), len(w_long)))
    x[0, : len(w_short)] = torch.from_numpy(w_short)
    x[1, : len(w_long)] = torch.from_numpy(w_long)
    mask = (torch.arange(x.shape[1])[None] < torch.tensor([[len(w_short)], [len(w_long)]])).long()
    with torch.inference_mode():
        padded = model(x, attention_mask=mask).last_hidden_state
        alone = model(torch.from_numpy(w_short)[None]).last_hidden_state
    short = 0 if len(w_short) < len(w_long) else 1
    n = alone.shape[1]
    assert (padded[short, :n] - alone[0]).abs().max() > 1e-3


def test_cache_independent_of_batching(tiny_corpus, tmp_path):
    """A whole cache made with big batches equals one made one clip per batch (group-norm family)."""
    config = ExtractConfig("demo-wav2vec2-base", random_init=True, layers="all", dtype="float32", pooled_stats=True,
                           max_seconds=4.0, shard_size=10)
    a = extract_features(config, tiny_corpus, tmp_path / "a", batch_seconds=120, device="cpu", verbose=False)
    b = extract_features(config, tiny_corpus, tmp_path / "b", batch_seconds=0.5, device="cpu", verbose=False)
    ca, cb = FeatureCache(a), FeatureCache(b)
    assert ca.names == cb.names
    for n in ca.names:
        np.testing.assert_allclose(ca.frames(n), cb.frames(n), atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(ca.pooled(n), cb.pooled(n), atol=1e-4, rtol=1e-4)


def test_demo_cache_contents(demo_cache, demo_corpus):
    cache = FeatureCache(demo_cache)
    corpus = load_corpus(demo_corpus)
    m = cache.manifest
    assert cache.names == list(corpus.clips)  # corpus order, every clip
    assert cache.layers == [0, 1, 2, 3] and cache.dim == 96 and m["dtype"] == "float16"
    assert m["frame_rate"] == 50.0 and m["max_seconds"] == 8.0 and m["normalize"] == "global"
    assert m["upstream"]["name"] == "demo-wavlm" and len(m["upstream"]["weights_sha256"]) == 64
    assert (demo_cache / m["upstream"]["path"] / "config.json").is_file()  # weights kept for later stages
    assert m["corpus_fingerprint"] == corpus.fingerprint()
    assert m["code_version"] and m["skipped"] == []
    assert sum(s["clips"] for s in m["shards"]) == len(cache) == m["num_clips"]
    assert all(len(s["sha256"]) == 64 for s in m["shards"])
    for name in cache.names[:40]:
        clip = corpus[name]
        assert cache.clips[name] == clip  # annotations travel in the cache
        x = cache.frames(name)
        n_samples = min(round(clip.duration * 16000), 8 * 16000)
        assert x.dtype == np.float32 and x.shape == (cache.num_frames(name), 4, 96)
        assert abs(x.shape[0] - n_samples / 320) <= 1
        np.testing.assert_array_equal(cache.frames(name, layer=2)[:, 0], x[:, 2])
        p = cache.pooled(name)  # computed in float32 before the float16 cast
        np.testing.assert_allclose(p[:, 0], x.mean(axis=0).T.T, atol=2e-3 * np.abs(x).max())
    assert {c.split for c in cache.clips.values()} == {"Train", "Development", "Test3"}


def test_global_normalisation_stats(demo_cache, demo_corpus):
    corpus = load_corpus(demo_corpus)
    x = np.concatenate([read_audio(corpus.audio_path(c.name), max_seconds=8.0).astype(np.float64)
                        for c in corpus if c.split == "Train"])
    st = FeatureCache(demo_cache).manifest["normalize_stats"]
    assert st["samples"] == x.size
    assert math.isclose(st["mean"], x.mean(), rel_tol=1e-6, abs_tol=1e-9)
    assert math.isclose(st["std"], x.std(), rel_tol=1e-6)


def test_one_layer_chunks_read_little(demo_cache):
    """Each stored layer's frames are contiguous and uncompressed: one layer of a clip is its own bytes."""
    cache = FeatureCache(demo_cache)
    name = cache.names[0]
    shard = demo_cache / cache.manifest["shards"][cache.shard_of(name)]["file"]
    with h5py.File(shard, "r") as f:
        ds = f["frames"]
        assert ds.chunks is None and ds.compression is None
        assert ds.id.get_storage_size() == ds.shape[1] * 4 * 96 * 2
    index = cache.shard_index(cache.shard_of(name))
    i, t = index.position[name], cache.num_frames(name)
    with open(shard, "rb") as f:
        f.seek(index.layer_offset(2, int(index.offsets[i])))
        raw = np.frombuffer(f.read(t * 96 * 2), np.float16).reshape(t, 96)
    np.testing.assert_array_equal(raw, cache.frames(name, layer=2, dtype=None)[:, 0])


def test_extract_config_is_all_a_cache_records(demo_cache, tmp_path):
    """The manifest's "config" rebuilds the ExtractConfig that made the cache, with the settings
    left to the upstream's family resolved (normalisation "auto" → global for WavLM); runtime
    options are keyword arguments of extract_features, content settings are not."""
    from conilium.extract.plan import resolve_for_family

    m = FeatureCache(demo_cache).manifest
    config = ExtractConfig("demo-wavlm", random_init=True, seed=0, layers="all", pooled_stats=True)
    assert config.normalize == "auto"
    assert ExtractConfig.from_dict(m["config"]) == resolve_for_family(config, whisper=False)
    assert m["config"]["normalize"] == "global" and m["config"]["whisper_input"] is None
    assert ExtractConfig("x", layers=[1, -1], splits="Train, Development").layers == "1,-1"
    assert ExtractConfig("x", splits="Train, Development").splits == ("Train", "Development")
    aug = ExtractConfig("x", augmentation={"noise_dir": str(tmp_path), "snr_db": "0:10"}).augmentation
    assert aug == NoiseAugmentation(str(tmp_path.resolve()), 0.8, (0.0, 10.0), 1)
    with pytest.raises(ConfigError, match="unknown extraction option"):
        ExtractConfig.from_dict({"upstream": "x", "device": "cpu"})
    with pytest.raises(ConfigError, match="--snr-db"):
        NoiseAugmentation(str(tmp_path), snr_db=(20, 5))
    with pytest.raises(TypeError, match="layers"):
        extract_features(config, demo_cache, tmp_path / "c", layers="last")  # a setting of the cache, not a runtime option


def test_extract_features_takes_a_config_first(tiny_corpus, tmp_path):
    with pytest.raises(TypeError, match="ExtractConfig"):
        extract_features(tiny_corpus, "demo-wavlm", tmp_path)


def test_parse_layers():
    assert parse_layers("last", 25) == [24]
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("12, 6,-1", 25) == [6, 12, 24]
    with pytest.raises(ConfigError, match="out of range"):
        parse_layers("30", 25)
    with pytest.raises(ConfigError, match="last, all or comma-separated"):
        parse_layers("middle", 25)


def test_selected_layers_and_float32(tiny_corpus, tmp_path):
    config = ExtractConfig("demo-hubert", random_init=True, layers="1,-1", dtype="float32", normalize="utterance")
    out = extract_features(config, tiny_corpus, tmp_path / "c", device="cpu", verbose=False)
    cache = FeatureCache(out)
    assert cache.layers == [1, 3] and not cache.has_pooled and cache.manifest["normalize_stats"] is None
    with h5py.File(out / cache.manifest["shards"][0]["file"], "r") as f:
        assert f["frames"].dtype == np.float32
    with pytest.raises(CacheError, match="pooled"):
        cache.pooled(cache.names[0])


def test_float16_overflow_is_an_error():
    x = np.ones((3, 1, 4), np.float32)
    x[1, 0, 2] = 1e5
    with pytest.raises(CacheError, match="--dtype float32"):
        to_float16(x, "clip.wav")


def test_rerun_and_mismatched_settings(tiny_corpus, tmp_path):
    out = tmp_path / "cache"
    runner = CliRunner()
    args = ["--corpus", str(tiny_corpus), "--upstream", "demo-wavlm", "--random-init", "--out", str(out),
            "--device", "cpu", "--shard-size", "8"]
    r = runner.invoke(extract_features_cmd, args)
    assert r.exit_code == 0, r.output
    before = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    r = runner.invoke(extract_features_cmd, args)
    assert r.exit_code == 0 and "nothing to do" in r.output
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()} == before

    r = runner.invoke(extract_features_cmd, args + ["--layers", "all", "--max-seconds", "6"])
    assert r.exit_code == 1
    assert "Error: " in r.output and "Traceback" not in r.output
    assert "layers: cache has [3], requested [0, 1, 2, 3]" in r.output
    assert "max_seconds: cache has 8.0, requested 6.0" in r.output and "--overwrite" in r.output
    with pytest.raises(CacheError, match="upstream"):  # other weights: other seed
        extract_features(ExtractConfig("demo-wavlm", random_init=True, seed=1), tiny_corpus, out, device="cpu",
                         verbose=False)

    r = runner.invoke(extract_features_cmd, args + ["--layers", "all", "--max-seconds", "6", "--overwrite", "-q"])
    assert r.exit_code == 0, r.output
    cache = FeatureCache(out)
    assert cache.layers == [0, 1, 2, 3] and cache.manifest["max_seconds"] == 6.0
    assert max(cache.num_frames(n) for n in cache.names) <= 6 * 50


def test_out_must_be_a_cache_or_empty(tiny_corpus, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not a feature cache"):
        extract_features(DEMO, tiny_corpus, tmp_path, device="cpu", verbose=False, overwrite=True)
    assert (tmp_path / "notes.txt").exists()


def test_disk_space_check(tiny_corpus, tmp_path, monkeypatch, capsys):
    import shutil as _shutil

    real = _shutil.disk_usage
    monkeypatch.setattr(_shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(CacheError, match="exceeds the free disk space.*--no-space-check"):
        extract_features(DEMO, tiny_corpus, tmp_path / "c", device="cpu")
    err = capsys.readouterr().err
    assert "projected cache size:" in err
    assert not list((tmp_path / "c").glob("shards/*.h5"))
    extract_features(DEMO, tiny_corpus, tmp_path / "c", device="cpu", check_space=False, verbose=False)
    assert FeatureCache(tmp_path / "c").names


def test_projected_size_is_close(tiny_corpus, tmp_path, capsys):
    out = extract_features(ExtractConfig("demo-wavlm", random_init=True, layers="all", pooled_stats=True),
                           tiny_corpus, tmp_path / "c", device="cpu", batch_seconds=30)
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("projected cache size:"))
    value, unit = line.split(":")[1].split(";")[0].split()[:2]
    projected = float(value) * {"KB": 1024, "MB": 1024 ** 2}[unit]
    actual = sum(p.stat().st_size for p in (out / "shards").glob("*.h5"))
    assert 0.8 < actual / projected < 1.25
    assert "clip/s" in err  # the progress bar reports clips per second


# ----------------------------------------------------------------------------- noise augmentation


def test_mix_noise_hits_the_snr(tiny_corpus):
    noise = list_noise_files(tiny_corpus.parent / "noise")
    x = _waves(tiny_corpus, 1)[0]
    for snr in (5.0, 20.0):
        y = mix_noise(x, noise[0], snr, 0.5, clip="c")
        n = (y - x).astype(np.float64)
        got = 10 * np.log10(np.mean(x.astype(np.float64) ** 2) / np.mean(n ** 2))
        assert abs(got - snr) < 0.01


def test_noise_augmented_copies(tiny_corpus, tmp_path):
    noise_dir = tiny_corpus.parent / "noise"
    config = ExtractConfig("demo-wavlm", random_init=True, seed=5,
                           augmentation=NoiseAugmentation(noise_dir, fraction=0.5, snr_db="5:20", copies=2))
    out = extract_features(config, tiny_corpus, tmp_path / "aug", device="cpu", verbose=False)
    cache = FeatureCache(out)
    corpus = load_corpus(tiny_corpus)
    train = [c.name for c in corpus if c.split == "Train"]
    aug = [n for n in cache.names if "#aug" in n]
    assert len(aug) == 2 * round(0.5 * len(train))
    records = {r["name"]: r for r in json.loads((out / "clips.json").read_text())}
    for n in aug:
        src, k = n.split("#aug")
        assert k in ("1", "2") and src in train
        assert cache.clips[n].annotations == corpus[src].annotations
        assert cache.clips[n].split == "Train" and cache.clips[n].emo_class == corpus[src].emo_class
        rec = records[n]["augmentation"]
        assert 5 <= rec["snr_db"] <= 20 and (noise_dir / rec["file"]).is_file()
        assert cache.num_frames(n) == cache.num_frames(src)
        assert not np.allclose(cache.frames(n), cache.frames(src), atol=1e-2)
    assert cache.manifest["augmentation"]["copies"] == 2
    # deterministic for the seed: the same plan again; another seed: another plan
    cfg = ExtractConfig("demo-wavlm", seed=5, augmentation=NoiseAugmentation(str(noise_dir.resolve()), 0.5,
                                                                             (5.0, 20.0), 2))
    files = list_noise_files(cfg.augmentation.noise_dir)
    plan = [(j.name, j.noise) for j in plan_jobs(corpus, cfg, files) if j.noise]
    assert plan == [(n, records[n]["augmentation"]) for n in aug]
    other = [(j.name, j.noise) for j in plan_jobs(corpus, dataclasses_replace(cfg, seed=6), files) if j.noise]
    assert other != plan


def dataclasses_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


# ----------------------------------------------------------------------------- planning


def test_batches_bounded_and_sorted(demo_corpus):
    corpus = load_corpus(demo_corpus)
    cfg = ExtractConfig("demo-wavlm")
    shards = assign_shards(plan_jobs(corpus, cfg), 64)
    assert [len(s) for s in shards] == [64, 64, 64, 64, 44]
    lengths = [j.samples for s in shards for j in s]
    assert lengths == sorted(lengths)
    for shard in shards:
        batches = plan_batches(shard, 60.0)
        assert sorted(j.name for b in batches for j in b) == sorted(j.name for j in shard)
        for b in batches:
            assert len(b) == 1 or len(b) * max(j.samples for j in b) <= 60 * 16000
        padded = sum(len(b) * max(j.samples for j in b) for b in batches)
        assert padded / sum(j.samples for j in shard) < 1.05
        assert np.mean([len(b) for b in batches]) > 4  # not needlessly small batches


# ----------------------------------------------------------------------------- bad audio


@pytest.fixture()
def bad_corpus(tiny_corpus, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(tiny_corpus, root)
    corpus = load_corpus(root)
    names = [c.name for c in corpus if c.split == "Train"][:2] + [c.name for c in corpus if c.split == "Test3"][:1]
    x = np.zeros(16000, np.float32)
    x[100] = np.nan
    sf.write(str(root / "Audios" / names[0]), x, 16000, subtype="FLOAT")  # NaN samples
    (root / "Audios" / names[1]).write_bytes(b"RIFF not really a wav file")  # unreadable
    sf.write(str(root / "Audios" / names[2]), np.zeros(100, np.float32), 16000)  # too short for the upstream
    return root, names


def test_bad_audio_is_an_error_naming_the_clip(bad_corpus, tmp_path):
    root, names = bad_corpus
    r = CliRunner().invoke(extract_features_cmd, ["--corpus", str(root), "--upstream", "demo-wavlm",
                                                  "--random-init", "--out", str(tmp_path / "c"), "--device", "cpu"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert names[1] in r.output and "--skip-bad" in r.output
    corpus = load_corpus(root, skip_bad=True)  # leaves out the unreadable header only
    assert [n for n, _ in corpus.skipped] == [names[1]]
    with pytest.raises(AudioError, match=names[0].replace(".", r"\.") + ".*NaN.*--skip-bad"):
        extract_features(DEMO, corpus, tmp_path / "d", device="cpu", verbose=False)


def test_skip_bad_lists_left_out_clips(bad_corpus, tmp_path):
    root, names = bad_corpus
    out = extract_features(DEMO, root, tmp_path / "c", device="cpu", skip_bad=True, verbose=False)
    cache = FeatureCache(out)
    skipped = {s["clip"]: s["reason"] for s in cache.manifest["skipped"]}
    assert set(skipped) == set(names)
    assert "NaN" in skipped[names[0]] and "unreadable" in skipped[names[1]] and "too short" in skipped[names[2]]
    assert not set(names) & set(cache.names)
    assert len(cache) == 24 - 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["demo-wavlm", "demo-wav2vec2-base"])
def test_cuda_batches_and_bf16(family, tiny_corpus, weights_root):
    """On CUDA: batched equals one clip at a time (float32), and bf16 autocast stays close."""
    model, _ = load_upstream(family, random_init=True, seed=0, random_root=weights_root)
    waves = _waves(tiny_corpus)
    cpu = [f for f, _ in UpstreamRunner(model, device=torch.device("cpu"))(waves)]
    runner = UpstreamRunner(model, device=torch.device("cuda"), compute_dtype="float32")
    batch = [f for f, _ in runner(waves)]
    for w, f, ref in zip(waves, batch, cpu):
        (alone, _), = runner([w])
        scale = np.abs(ref).max()
        np.testing.assert_allclose(f, alone, atol=1e-3 * scale, rtol=0)
        np.testing.assert_allclose(f, ref, atol=1e-3 * scale, rtol=0)
    runner.close()
    bf16 = UpstreamRunner(model, device=torch.device("cuda"), compute_dtype="bfloat16")
    for f, ref in zip([f for f, _ in bf16(waves)], cpu):
        rel = np.linalg.norm(f - ref) / np.linalg.norm(ref)
        assert rel < 0.05
    bf16.close()


def test_offline_without_weights_says_how_to_get_them(tiny_corpus, tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    r = subprocess.run([sys.executable, "-m", "conilium.cli.extract", "--corpus", str(tiny_corpus),
                        "--upstream", "wavlm-large", "--out", str(tmp_path / "c"), "--device", "cpu"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "Error: upstream 'wavlm-large' (microsoft/wavlm-large)" in r.stderr
    assert "download microsoft/wavlm-large" in r.stderr
    assert "--random-init" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "c").exists()  # nothing written when nothing started


def test_cpu_extraction_runs_one_clip_at_a_time_by_default(tiny_corpus, tmp_path):
    """On CPU the default plan is one clip per batch (no padding computed); 0 asks for it anywhere."""
    from conilium.extract.plan import plan_batches

    st = ExtractStats()
    extract_features(ExtractConfig("demo-wavlm", random_init=True), tiny_corpus, tmp_path / "c", device="cpu",
                     verbose=False, stats=st)
    assert st.batch_seconds == 0 and st.computed_frames == st.useful_frames
    jobs = plan_jobs(load_corpus(tiny_corpus, read_durations=True), ExtractConfig("demo-wavlm"))
    assert all(len(b) == 1 for b in plan_batches(jobs, 0.0))

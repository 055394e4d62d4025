"""extract-features with batch k+1 submitted before batch k is written: the same cache as one
batch at a time, the states narrowed to float16 before leaving the device, failures."""

import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import conilium.extract.extract as extract_module
from conilium.cache import FeatureCache
from conilium.audio import read_audio
from conilium.corpus import load_corpus
from conilium.demo import make_demo_corpus
from conilium.errors import AudioError, CacheError
from conilium.extract import ExtractConfig, ExtractStats, extract_features, pipeline
from conilium.extract.encoder import UpstreamRunner
from conilium.extract.plan import assign_shards, plan_batches, plan_jobs, resolve_for_family

# 24 clips of 3-11 s in 3 shards of 8, batches of up to 16 s of padded audio: several batches per shard
RUNTIME = dict(batch_seconds=16.0, device="cpu", workers=2, verbose=False)


def _config(**kw):
    return ExtractConfig("demo-wavlm", random_init=True, shard_size=8, layers="1,-1", **kw)


pytestmark = pytest.mark.usefixtures("two_torch_threads")


@pytest.fixture(scope="module", autouse=True)
def submit_ahead():
    """The overlap runs on CUDA only by default; here, on the CPU, it is switched on."""
    mp = pytest.MonkeyPatch()
    mp.setattr(pipeline, "SUBMIT_AHEAD", True)
    yield
    mp.undo()


def _files(root: Path):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_files(got: Path, want: Path):
    a, b = _files(got), _files(want)
    assert sorted(a) == sorted(b)
    for name in b:
        assert a[name] == b[name], f"{name} differs"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The demo corpus with three clips left out with skip_bad: one too short for the upstream
    (the first clip of shard 0), one with a NaN sample inside shard 1 and one the last clip of
    the last shard (both of their original length)."""
    root = make_demo_corpus(tmp_path_factory.mktemp("async") / "corpus", clips=24, seed=3)
    shards = assign_shards(plan_jobs(load_corpus(root, read_durations=True), _config(), []), 8)
    for job in (shards[1][3], shards[2][-1]):
        x = read_audio(root / "Audios" / job.name)
        x[len(x) // 2] = np.nan
        sf.write(str(root / "Audios" / job.name), x, 16000, subtype="FLOAT")
    sf.write(str(root / "Audios" / shards[0][4].name), np.zeros(100, np.float32), 16000)
    return root


def _batches(corpus):
    """The (shard, batch) plan of the corpus, as run_shards makes it."""
    shards = assign_shards(plan_jobs(load_corpus(corpus, read_durations=True), _config(), []), 8)
    return [(s, b) for s, jobs in enumerate(shards) for b in plan_batches(jobs, RUNTIME["batch_seconds"])]


def _loader(corpus, config, norm_stats):
    """The waveforms extraction feeds the upstream."""
    return pipeline.JobLoader(load_corpus(corpus, skip_bad=True), resolve_for_family(config, False), norm_stats)


def _extract(config, corpus, out, **kw):
    stats = ExtractStats()
    extract_features(config, corpus, out, skip_bad=True, stats=stats, **RUNTIME, **kw)
    return stats


@pytest.fixture(scope="module", params=["float16", "float32"])
def one_at_a_time(request, corpus, tmp_path_factory):
    """The cache each batch is written into as soon as it is computed (the loop without the overlap)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(pipeline, "SUBMIT_AHEAD", False)
    try:
        config = _config(dtype=request.param, pooled_stats=True)
        out = tmp_path_factory.mktemp("sync") / "cache"
        stats = _extract(config, corpus, out)
    finally:
        mp.undo()
    return config, out, stats


def _bad(corpus):
    """The names of the clips extraction leaves out."""
    loader = _loader(corpus, _config(normalize="utterance"), None)
    bad = set()
    for _, batch in _batches(corpus):
        for job in batch:
            try:
                if len(loader(job)) < 400:
                    bad.add(job.name)
            except AudioError:
                bad.add(job.name)
    return bad


def _good_batches(corpus):
    bad = _bad(corpus)
    return [b for _, b in _batches(corpus) if len(b) > 1 and not bad & {j.name for j in b}]


def test_the_plan_has_what_the_tests_need(corpus):
    batches = _batches(corpus)
    per_shard = [sum(1 for s, _ in batches if s == k) for k in range(3)]
    assert len(per_shard) == 3 and min(per_shard) >= 3
    assert max(len(b) for _, b in batches) > 1
    bad = _bad(corpus)
    assert len(bad) == 3
    where = [(s, i, len(b)) for i, (s, b) in enumerate(batches) for j in b if j.name in bad]
    assert sorted(s for s, _, _ in where) == [0, 1, 2]
    assert where[-1][1] == len(batches) - 1  # in the last batch
    assert any(n > 1 for _, _, n in where)  # beside clips that are kept


def test_submitting_ahead_writes_the_cache_of_one_batch_at_a_time(one_at_a_time, corpus, tmp_path):
    config, want, want_stats = one_at_a_time
    stats = _extract(config, corpus, tmp_path / "cache")
    assert_same_files(tmp_path / "cache", want)
    cache = FeatureCache(tmp_path / "cache")
    assert len(cache) == 21 and len(cache.manifest["skipped"]) == 3 and cache.has_pooled
    assert (stats.clips, stats.skipped, stats.shards_written) == (21, 3, 3)
    assert (stats.clips, stats.skipped, stats.shards_written, stats.useful_frames, stats.computed_frames,
            stats.audio_seconds) == (want_stats.clips, want_stats.skipped, want_stats.shards_written,
                                     want_stats.useful_frames, want_stats.computed_frames, want_stats.audio_seconds)
    assert 0 < stats.forward_seconds < stats.loop_seconds


def test_every_clip_holds_what_the_runner_returns_for_its_batch(one_at_a_time, corpus, weights_dir):
    """The cache against the runner called directly on each planned batch: the right states
    under the right name, stored as the cache's dtype rounds them."""
    config, out, _ = one_at_a_time
    cache = FeatureCache(out)
    names = set(cache.names)
    model, _ = extract_module.load_upstream(config.upstream, random_init=True, seed=config.seed,
                                            random_root=weights_dir)
    runner = UpstreamRunner(model, device=torch.device("cpu"), layers=cache.layers, pooled_stats=True)
    loader = _loader(corpus, config, cache.manifest["normalize_stats"])
    stored = np.float16 if config.dtype == "float16" else np.float32
    checked = 0
    for _, batch in _batches(corpus):
        keep = [j for j in batch if j.name in names]
        for job, (frames, pooled) in zip(keep, runner([loader(j) for j in keep])):
            np.testing.assert_array_equal(cache.frames(job.name), frames.astype(stored))
            np.testing.assert_array_equal(cache.pooled(job.name), pooled)
            checked += 1
    runner.close()
    assert checked == len(cache) == 21


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("weights")


def _narrow_on_the_device(monkeypatch):
    """States leave the runner as float16, as on CUDA with a float16 cache."""
    load = extract_module._load_runner

    def load_narrowing(config, *a, **kw):
        runner, identity = load(config, *a, **kw)
        assert runner.stored_dtype == config.dtype and runner.transfer_dtype == torch.float32  # CPU
        if config.dtype == "float16":
            runner.transfer_dtype = torch.float16
        return runner, identity

    monkeypatch.setattr(extract_module, "_load_runner", load_narrowing)


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16-weights"])
def test_states_narrowed_before_the_copy_store_the_same_bits(compute_dtype, corpus, tmp_path, monkeypatch):
    """float32 (or bfloat16, widened to float32) states narrowed to float16 by torch before they leave the
    device are stored with the bits the cache writer's NumPy conversion gives."""
    config = _config(pooled_stats=True, compute_dtype=compute_dtype)
    _extract(config, corpus, tmp_path / "host")
    _narrow_on_the_device(monkeypatch)
    _extract(config, corpus, tmp_path / "device")
    assert_same_files(tmp_path / "device", tmp_path / "host")


def test_the_runner_returns_float16_states_when_it_narrows_them(corpus, weights_dir):
    model, _ = extract_module.load_upstream("demo-wavlm", random_init=True, seed=0, random_root=weights_dir)
    runner = UpstreamRunner(model, device=torch.device("cpu"), layers=[1, 3], pooled_stats=True,
                            stored_dtype="float16")
    loader = _loader(corpus, _config(normalize="utterance"), None)
    waves = [loader(j) for j in _good_batches(corpus)[0]]
    wide = runner(waves)
    runner.transfer_dtype = torch.float16
    pending = runner.submit(waves)
    narrow = runner.result(pending)
    assert len(narrow) == len(wide) == len(waves) > 1
    for (f16, p16), (f32, p32) in zip(narrow, wide):
        assert f16.dtype == np.float16 and p16.dtype == np.float32
        np.testing.assert_array_equal(f16, f32.astype(np.float16))
        np.testing.assert_array_equal(p16, p32)
    runner.close()


def _scaled_states(monkeypatch, factor):
    """The upstream's states multiplied by ``factor``."""
    forward = UpstreamRunner._call

    def scaled(self, *a):
        states, frames = forward(self, *a)
        return states * factor, frames

    monkeypatch.setattr(UpstreamRunner, "_call", scaled)


@pytest.mark.parametrize("narrow", [False, True], ids=["on-host", "on-device"])
def test_a_value_beyond_float16_is_the_same_error_wherever_states_are_narrowed(narrow, corpus, tmp_path, monkeypatch):
    _scaled_states(monkeypatch, 1e5)
    if narrow:
        _narrow_on_the_device(monkeypatch)
    out = tmp_path / "cache"
    with pytest.raises(CacheError, match=r"clip .*\.wav: feature value .* exceeds float16's range .*--dtype float32"):
        _extract(_config(), corpus, out)
    assert not list((out / "shards").glob("*.h5*"))
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


class Boom(RuntimeError):
    pass


def _fail_forward(monkeypatch, at: int):
    """The upstream's forward raises on its ``at``-th call (0-based)."""
    forward = UpstreamRunner._call
    calls = []

    def failing(self, *a):
        calls.append(1)
        if len(calls) == at + 1:
            raise Boom(f"forward {at}")
        return forward(self, *a)

    monkeypatch.setattr(UpstreamRunner, "_call", failing)
    return calls


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "cache"
    _extract(_config(), corpus, out)
    return out


@pytest.mark.parametrize("where", ["inside a shard", "first of a shard"])
def test_a_failing_forward_drops_the_shard_being_written_and_a_rerun_completes(where, corpus, reference, tmp_path,
                                                                             monkeypatch):
    """A forward error in a later batch is raised as it is; the shards before it are complete, the
    one being written is dropped without a trace; a rerun keeps the complete ones and equals an
    uninterrupted run. The batch before the failing one is still pending when it fails: when
    that batch ends shard 0, shard 0 is complete all the same."""
    names = set(FeatureCache(reference).names)
    batches = [(s, b) for s, b in _batches(corpus) if any(j.name in names for j in b)]
    first_of_1 = next(i for i, (s, _) in enumerate(batches) if s == 1)
    at = first_of_1 if where == "first of a shard" else first_of_1 + 1
    calls = _fail_forward(monkeypatch, at)
    out = tmp_path / "cache"
    with pytest.raises(Boom, match=f"forward {at}"):
        _extract(_config(), corpus, out)
    assert len(calls) == at + 1
    assert not [t for t in threading.enumerate() if t.name == "shard-writer"]  # stopped, not left waiting
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["shard-00000.h5", "shard-00000.json"]
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    monkeypatch.undo()
    stats = _extract(_config(), corpus, out)
    assert (stats.shards_kept, stats.shards_written) == (1, 2)
    assert_same_files(out, reference)


def test_a_failing_write_is_raised_and_leaves_nothing_half_written(corpus, tmp_path, monkeypatch):
    """A cache writer failure in the middle of shard 1 (a clip written twice) stops the loop with
    its error; the shard is dropped."""
    twice = next(b for s, b in _batches(corpus) if s == 1)[-1].name  # not the shard's first clip
    put = pipeline._ShardWriter.put

    def put_twice(self, item):
        put(self, item)
        if isinstance(item, tuple) and item[0] == twice:
            put(self, item)

    monkeypatch.setattr(pipeline._ShardWriter, "put", put_twice)
    out = tmp_path / "cache"
    with pytest.raises(CacheError, match="written twice"):
        _extract(_config(), corpus, out)
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["shard-00000.h5", "shard-00000.json"]
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_submit_and_result_one_batch_apart_equal_the_call(corpus, weights_dir):
    model, _ = extract_module.load_upstream("demo-wavlm", random_init=True, seed=0, random_root=weights_dir)
    runner = UpstreamRunner(model, device=torch.device("cpu"), pooled_stats=True)
    loader = _loader(corpus, _config(normalize="utterance"), None)
    batches = [[loader(j) for j in b] for b in _good_batches(corpus)[:3]]
    at_once = [runner(w) for w in batches]
    counts = (runner.useful_frames, runner.computed_frames)
    first = runner.submit(batches[0])
    second = runner.submit(batches[1])
    apart = [runner.result(first), runner.result(second), runner.result(runner.submit(batches[2]))]
    assert runner.submit([]) is None and runner.result(None) == [] and runner([]) == []
    for got, want in zip(apart, at_once):
        assert len(got) == len(want)
        for (f, p), (fw, pw) in zip(got, want):
            np.testing.assert_array_equal(f, fw)
            np.testing.assert_array_equal(p, pw)
    assert (runner.useful_frames, runner.computed_frames) == (2 * counts[0], 2 * counts[1])
    runner.close()


@pytest.mark.parametrize("setting,device,ahead", [(None, "cpu", False), (None, "cuda:0", True), (True, "cpu", True),
                                                  (False, "cuda", False)])
def test_batches_are_submitted_ahead_on_cuda_only_by_default(setting, device, ahead, corpus, tmp_path, monkeypatch):
    """On the CPU the forward is over when submit() returns, so by default each batch is written
    before the next is submitted; on CUDA the next is submitted first. Same cache either way."""
    events = []
    submit, result = UpstreamRunner.submit, UpstreamRunner.result

    def spy_submit(self, waves):
        events.append("submit")
        return submit(self, waves)

    def spy_result(self, handle):
        if handle is not None:  # None: a batch whose clips were all left out, never submitted
            events.append("result")
        return result(self, handle)

    monkeypatch.setattr(UpstreamRunner, "submit", spy_submit)
    monkeypatch.setattr(UpstreamRunner, "result", spy_result)
    monkeypatch.setattr(pipeline, "SUBMIT_AHEAD", setting)
    # the device the overlap is decided by (the forward itself stays on the CPU)
    monkeypatch.setattr(UpstreamRunner, "asynchronous", property(lambda self: device.startswith("cuda")))
    _extract(_config(), corpus, tmp_path / "cache")
    assert events.count("submit") > 3
    second = events.index("submit", 1)
    assert events[:second] == (["submit"] if ahead else ["submit", "result"])
    assert len(FeatureCache(tmp_path / "cache")) == 21

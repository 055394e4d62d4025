"""extract-features --length-buckets: batches padded up to a few lengths, so that a GPU sees few
distinct shapes; the cache holds the same frames within float rounding."""

import numpy as np
import pytest
from click.testing import CliRunner

from conilium.cache import FeatureCache
from conilium.cli.extract import extract_features_cmd
from conilium.corpus import load_corpus
from conilium.demo import make_demo_corpus
from conilium.extract import ExtractConfig, ExtractStats, extract_features
from conilium.extract.encoder import UpstreamRunner
from conilium.extract.plan import BUCKET_HOP, BUCKET_STEPS, Job, bucket_samples, plan_batches, plan_jobs

pytestmark = pytest.mark.usefixtures("two_torch_threads")


def test_a_bucket_holds_the_batch_with_at_most_an_eighth_more_and_never_beyond_the_cap():
    seen = set()
    for n in range(1, 30 * 16000, 97):
        b = bucket_samples(n)
        assert b >= n and b % BUCKET_HOP == 0
        assert b <= n + n / BUCKET_STEPS + BUCKET_HOP  # at most 1/8 more (and the hop's rounding)
        assert bucket_samples(n + 97) >= b  # longer clips never get a shorter bucket
        if n >= 16000:
            seen.add(b)
        assert bucket_samples(n, cap=n) == n  # the longest clip of the run: its own length
        assert bucket_samples(n, cap=max(1, n - 5)) == n  # a cap below n never cuts a clip
    assert len(seen) == 40  # 1-30 s: 40 lengths, not one per clip length
    assert bucket_samples(8 * 16000 - 3000, cap=8 * 16000) == 8 * 16000  # clips cut at --max-seconds: one length


def test_planned_batches_stay_within_the_bound_counting_their_bucket():
    rng = np.random.default_rng(0)
    jobs = [Job(f"c{i}.wav", f"c{i}.wav", None, int(s)) for i, s in enumerate(rng.integers(8000, 160000, 200))]
    limit = 20.0
    cap = max(j.samples for j in jobs)
    batches = plan_batches(jobs, limit, pad_to=lambda n: bucket_samples(n, cap))
    assert sorted(j.name for b in batches for j in b) == sorted(j.name for j in jobs)
    for b in batches:
        longest = max(j.samples for j in b)
        assert len(b) == 1 or len(b) * bucket_samples(longest, cap) <= limit * 16000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_demo_corpus(tmp_path_factory.mktemp("buckets") / "corpus", clips=30, seed=5)


def _extract(upstream, corpus, out, buckets, shapes=None, monkeypatch=None, batch_seconds=12.0):
    if shapes is not None:
        call = UpstreamRunner._call

        def spy(self, x, lengths, wanted):
            shapes.append((x.shape[1], int(lengths.max())))
            return call(self, x, lengths, wanted)
        monkeypatch.setattr(UpstreamRunner, "_call", spy)
    stats = ExtractStats()
    config = ExtractConfig(upstream, random_init=True, layers="all", dtype="float32", pooled_stats=True,
                           max_seconds=6.0, shard_size=10)
    extract_features(config, corpus, out, batch_seconds=batch_seconds, device="cpu", verbose=False, stats=stats,
                     length_buckets=buckets)
    if shapes is not None:
        monkeypatch.undo()
    return FeatureCache(out), stats


@pytest.mark.parametrize("upstream", ["demo-wavlm", "demo-wav2vec2-base"], ids=["layer-norm", "group-norm"])
def test_bucketed_batches_give_the_cache_of_unbucketed_ones(upstream, corpus, tmp_path, monkeypatch):
    """A layer-normalised CNN and a group-normalised one (normalised over each clip's valid samples
    only): every clip's frames and pooled statistics as without buckets; the upstream saw only
    bucket lengths, fewer distinct ones, and the padding computed is counted."""
    plain_shapes, bucket_shapes = [], []
    plain, plain_stats = _extract(upstream, corpus, tmp_path / "plain", False, plain_shapes, monkeypatch)
    got, stats = _extract(upstream, corpus, tmp_path / "buckets", True, bucket_shapes, monkeypatch)
    assert stats.length_buckets and not plain_stats.length_buckets
    assert got.names == plain.names and len(got) == 30
    for n in got.names:
        np.testing.assert_allclose(got.frames(n), plain.frames(n), atol=2e-4, rtol=1e-4)
        np.testing.assert_allclose(got.pooled(n), plain.pooled(n), atol=2e-4, rtol=1e-4)
    cap = max(j.samples for j in plan_jobs(load_corpus(corpus, read_durations=True), ExtractConfig(upstream, max_seconds=6.0), []))
    assert all(padded == bucket_samples(longest, cap) for padded, longest in bucket_shapes)
    assert any(padded > longest for padded, longest in bucket_shapes)  # some batches were padded further
    assert all(padded == longest for padded, longest in plain_shapes)
    assert len({p for p, _ in bucket_shapes}) < len({p for p, _ in plain_shapes})
    assert stats.computed_frames > plain_stats.computed_frames and stats.useful_frames == plain_stats.useful_frames
    assert stats.padding_ratio <= plain_stats.padding_ratio * (1 + 1 / BUCKET_STEPS) + 0.01


def test_buckets_are_off_on_the_cpu_by_default_and_the_cli_switches_them_on(corpus, tmp_path, monkeypatch):
    shapes = []
    _, stats = _extract("demo-wavlm", corpus, tmp_path / "auto", None, shapes, monkeypatch)
    assert not stats.length_buckets and all(p == n for p, n in shapes)
    seen = []
    use = UpstreamRunner.use_length_buckets

    def spy(self, cap):
        seen.append(cap)
        return use(self, cap)
    monkeypatch.setattr(UpstreamRunner, "use_length_buckets", spy)
    out = tmp_path / "cli"
    r = CliRunner().invoke(extract_features_cmd, ["--corpus", str(corpus), "--upstream", "demo-wavlm", "--random-init",
                                                  "--out", str(out), "--max-seconds", "6", "--device", "cpu",
                                                  "--batch-seconds", "12", "--length-buckets", "on", "-q"])
    assert r.exit_code == 0, r.output
    assert seen == [6 * 16000] and len(FeatureCache(out)) == 30


def test_a_whisper_encoder_keeps_its_own_input_length(corpus, tmp_path):
    """Whisper pads to its 30 s window (or the clip): buckets do not apply, the run goes on without."""
    stats = ExtractStats()
    config = ExtractConfig("demo-whisper", random_init=True, layers="-1", max_seconds=4.0, shard_size=30,
                           whisper_input="clip")
    extract_features(config, corpus, tmp_path / "w", batch_seconds=12.0, device="cpu", verbose=False, stats=stats,
                     length_buckets=True)
    assert not stats.length_buckets and len(FeatureCache(tmp_path / "w")) == 30

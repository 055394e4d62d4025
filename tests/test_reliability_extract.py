"""extract-features under contention and failure: one writer per cache (a second extraction
into the same --out stops naming the first, or waits), an --out that cannot be written found
before the model loads, random weights never left half-saved, --rescale-loud part of the
cache's settings."""

import errno
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from conilium.cache import FeatureCache
from conilium.cli.extract import extract_features_cmd
from conilium.demo import make_demo_corpus
from conilium.errors import OutputError
from conilium.extract import ExtractConfig, extract_features
from conilium.extract import extract as extract_module
from conilium.extract.upstreams import build_random_upstream
from conilium.extract.verify import verify_cache
from conilium.locking import LOCK_FILE, lock_directory

# the fixtures that make read-only and full file systems (a tmpfs as root, chmod otherwise)
from test_reliability_output import full_disk, read_only  # noqa: F401

pytestmark = pytest.mark.usefixtures("two_torch_threads")

# small shards and one clip per batch: an extraction of many short steps
ARGS = ["--upstream", "demo-wav2vec2-base", "--random-init", "--max-seconds", "3", "--shard-size", "3",
        "--batch-seconds", "1", "--layers", "all", "--device", "cpu", "--threads", "1", "--workers", "1"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p])
    return env


def _args(corpus, out, *more):
    return ["--corpus", str(corpus), "--out", str(out), *ARGS, *more]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_demo_corpus(tmp_path_factory.mktemp("contention") / "corpus", clips=36, seed=12)


# a second extract-features, its imports done, that starts when told (a line on its stdin)
SECOND = textwrap.dedent("""
    import sys
    from conilium.cli.extract import extract_features_cmd
    import conilium.extract.extract  # torch, transformers, h5py: loaded before the go
    print("ready", flush=True)
    sys.stdin.readline()
    extract_features_cmd.main(sys.argv[1:], prog_name="extract-features")
""")


def test_a_second_extraction_into_the_same_cache_stops_naming_the_first(corpus, tmp_path):
    """Two real processes: the second, started while the first writes a shard, stops with a
    message naming the first (pid, host), and the first finishes a cache that verifies."""
    out = tmp_path / "cache"
    second = subprocess.Popen([sys.executable, "-c", SECOND, *_args(corpus, out, "-q")], env=_env(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = None
    try:
        assert second.stdout.readline().strip() == "ready", second.stderr.read()
        first = subprocess.Popen([sys.executable, "-m", "conilium.cli.extract", *_args(corpus, out, "-q")],
                                 env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None:  # the first is writing its shards
            if list((out / "shards").glob("shard-*.json")):
                break
            time.sleep(0.005)
        assert first.poll() is None, "the first extraction ended too soon: " + first.stderr.read()
        second.stdin.write("go\n")
        second.stdin.flush()
        _, err2 = second.communicate(timeout=120)
        _, err1 = first.communicate(timeout=300)
    finally:
        for p in (second, first):
            if p is not None and p.poll() is None:
                p.kill()
    assert second.returncode == 1, err2
    assert "Traceback" not in err2
    assert f"this feature cache is being written by another process: process {first.pid} on host" in err2, err2
    assert "--wait-for-lock" in err2 and str(out) in err2
    assert first.returncode == 0, err1[-3000:]
    assert "Traceback" not in err1
    assert not verify_cache(out, verbose=False).problems
    assert not (out / LOCK_FILE).exists()
    assert [p.name for p in out.rglob("*") if p.name.endswith(".tmp")] == []


def test_wait_for_lock_waits_for_the_holder_or_gives_up(corpus, tmp_path):
    out = tmp_path / "cache"
    runner = CliRunner()
    with lock_directory(out, what="feature cache"):  # another writer (this process, to the lock)
        t0 = time.monotonic()
        r = runner.invoke(extract_features_cmd, _args(corpus, out, "-q", "--wait-for-lock", "0.6"))
        assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
        assert time.monotonic() - t0 >= 0.6
        assert f"being written by another process: process {os.getpid()}" in r.output
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing of the cache written
    assert not out.exists()  # the lock made the directory and removed it, empty

    held = lock_directory(out, what="feature cache").acquire()
    timer = threading.Timer(1.0, held.release)
    timer.start()
    try:
        t0 = time.monotonic()
        r = runner.invoke(extract_features_cmd, _args(corpus, out, "--wait-for-lock"))  # as long as it takes
    finally:
        timer.join()
    assert r.exit_code == 0, r.output
    assert time.monotonic() - t0 >= 1.0
    assert "waiting for process" in r.output
    assert FeatureCache(out).names and not (out / LOCK_FILE).exists()


def test_overwrite_keeps_the_lock_and_a_new_directory_is_a_cache(corpus, tmp_path):
    """The lock file in --out is neither content that makes it "not a cache" nor deleted by
    --overwrite; it is held until the manifest is written."""
    weights = build_random_upstream("demo-wavlm", tmp_path / "weights")  # a local model: no upstream/ in the cache
    out = tmp_path / "cache"
    seen = []
    real_begin = extract_module.CacheWriter.begin

    def begin(self, *, overwrite=False):
        seen.append(read_lock())
        return real_begin(self, overwrite=overwrite)

    def read_lock():
        return json.loads((out / LOCK_FILE).read_text())["pid"] if (out / LOCK_FILE).exists() else None

    config = ExtractConfig(str(weights), max_seconds=1.0, normalize="utterance", shard_size=64)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(extract_module.CacheWriter, "begin", begin)
        extract_features(config, corpus, out, device="cpu", verbose=False)
        real_finish = extract_module._finish

        def finish(cache, *a, **k):
            seen.append(read_lock())  # still locked when the manifest is written
            return real_finish(cache, *a, **k)

        m.setattr(extract_module, "_finish", finish)
        extract_features(config, corpus, out, device="cpu", verbose=False, overwrite=True)
    assert seen == [os.getpid()] * 3
    assert not (out / LOCK_FILE).exists() and FeatureCache(out).names
    assert not (out / "upstream").exists()  # what _begin made to start a new cache is gone


def _no_long_work(monkeypatch):
    def refused(*a, **k):
        raise AssertionError("the corpus was read or the model loaded although --out cannot be written")

    monkeypatch.setattr(extract_module, "load_corpus", refused)
    monkeypatch.setattr(extract_module, "load_upstream", refused)
    monkeypatch.setattr(extract_module, "global_stats", refused)


def test_read_only_out_is_one_clear_error_before_the_model_loads(corpus, read_only, monkeypatch):  # noqa: F811
    _no_long_work(monkeypatch)
    for out in (read_only / "cache", read_only):
        r = CliRunner().invoke(extract_features_cmd, _args(corpus, out, "-q"))
        assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
        assert f"Error: cannot write {out}" in r.output
        assert "read-only file system" in r.output or "permission denied" in r.output
        assert "Errno" not in r.output


def test_random_weights_are_never_left_half_saved(tmp_path, monkeypatch):
    """A save_pretrained that fails (here: the disk fills up) leaves no <name>.tmp<pid> folder
    and is an OutputError naming the weights folder."""
    from transformers import PreTrainedModel

    def full(self, path, *a, **k):
        Path(path).mkdir(parents=True)
        (Path(path) / "config.json").write_text("{}")
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(path) / "model.safetensors"))

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    target = tmp_path / "upstream" / "demo-wavlm-random-seed0"
    with pytest.raises(OutputError, match=rf"cannot write {target}: no space left on device"):
        build_random_upstream("demo-wavlm", target)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["upstream"]


def test_extraction_onto_a_full_disk_leaves_no_half_saved_weights(corpus, full_disk, tmp_path):  # noqa: F811
    out = full_disk / "cache"
    config = ExtractConfig("demo-wavlm", random_init=True, max_seconds=1.0, normalize="utterance")
    with pytest.raises(OutputError, match=rf"cannot write {out}.*no space left on device"):
        extract_features(config, corpus, out, device="cpu", verbose=False)
    left = sorted(str(p.relative_to(full_disk)) for p in full_disk.rglob("*"))
    assert not [p for p in left if ".tmp" in p or p.endswith(LOCK_FILE)], left


# ----------------------------------------------------------------------------- --rescale-loud

@pytest.fixture(scope="module")
def loud_corpus(tmp_path_factory):
    """A demo corpus whose first Train clip is float WAV holding int16 values (integer scale)."""
    root = make_demo_corpus(tmp_path_factory.mktemp("loud") / "corpus", clips=20, seed=5)
    rows = (Path(root) / "Labels" / "labels_consensus.csv").read_text().splitlines()
    name = next(r.split(",")[0] for r in rows[1:] if r.rstrip().endswith("Train"))
    path = Path(root) / "Audios" / name
    x, sr = sf.read(path, dtype="int16")
    sf.write(path, x.astype(np.float32), sr, subtype="FLOAT")
    return root, name


def test_rescale_loud_is_a_cache_setting(loud_corpus, tmp_path):
    root, name = loud_corpus
    out = tmp_path / "cache"
    args = ["--corpus", str(root), "--out", str(out), "--upstream", "demo-wavlm", "--random-init",
            "--max-seconds", "1", "--device", "cpu", "-q"]
    runner = CliRunner()
    r = runner.invoke(extract_features_cmd, args)
    assert r.exit_code == 1 and "--rescale-loud" in r.output and name in r.output, r.output
    r = runner.invoke(extract_features_cmd, args + ["--rescale-loud"])
    assert r.exit_code == 0, r.output
    cache = FeatureCache(out)
    assert name in cache.names and cache.manifest["config"]["rescale_loud"] is True
    assert ExtractConfig.from_dict(cache.manifest["config"]).rescale_loud
    before = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}

    r = runner.invoke(extract_features_cmd, args)  # the same cache without --rescale-loud: other settings
    assert r.exit_code == 1, r.output
    assert "built with other settings" in r.output and "rescale_loud: cache has True, requested False" in r.output
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()} == before
    r = runner.invoke(extract_features_cmd, args + ["--rescale-loud"])
    assert r.exit_code == 0 and {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()} == before


def test_caches_made_before_rescale_loud_compare_equal(corpus, tmp_path):
    """A cache whose recorded config has no rescale_loud (made before the option) is the same
    cache as one requested with the default: reused, no shard made again."""
    out = tmp_path / "cache"
    config = ExtractConfig("demo-wavlm", random_init=True, max_seconds=1.0, normalize="utterance", shard_size=8)
    extract_features(config, corpus, out, device="cpu", verbose=False)
    settings = json.loads((out / "extraction.json").read_text())
    del settings["config"]["rescale_loud"]
    (out / "extraction.json").write_text(json.dumps(settings))
    before = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    from conilium.extract import ExtractStats

    st = ExtractStats()
    extract_features(config, corpus, out, device="cpu", verbose=False, stats=st)
    assert st.shards_written == 0 and st.shards_kept == len([n for n in before if n.endswith(".h5")])
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()} == before
    with pytest.raises(Exception, match="rescale_loud: cache has False, requested True"):
        extract_features(ExtractConfig(**{**config.to_json(), "rescale_loud": True}), corpus, out, device="cpu",
                         verbose=False)

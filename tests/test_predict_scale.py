"""predict --inputs: a resumable job of Parquet shards, under torchrun and on ray."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner

from conilium.cli.finetune import predict_cmd
from conilium.finetune.results import audio_files
from conilium.finetune.scale import JobDir, read_predictions, walk_audio
from conilium.testing import write_demo_model_dir

SHARD = ["--shard-files", "2"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_demo_model_dir(tmp_path_factory.mktemp("scale_model"), max_seconds=1.0,
                                normalize={"mode": "utterance"})


@pytest.fixture(scope="module")
def folder(small_demo_corpus, tmp_path_factory):
    """Seven demo clips (two in a subfolder, one of them named so that the folder's own order
    and the sorted paths' order could differ) and one unreadable file: eight files, four shards of two."""
    d = tmp_path_factory.mktemp("scale_audio") / "in"
    (d / "b").mkdir(parents=True)
    src = sorted((Path(small_demo_corpus) / "Audios").glob("*.wav"))[:7]
    names = ["a.wav", "b/x.wav", "b/y.flac", "b.wav", "c.wav", "d.wav", "e.wav"]
    for s, n in zip(src, names):
        x, sr = sf.read(s, frames=24000)
        sf.write(d / n, x, sr)
    (d / "broken.wav").write_bytes(b"RIFF....not really audio")
    return d


def _job(model_dir, inputs, out, *extra):
    return CliRunner().invoke(predict_cmd, ["--model", str(model_dir), "--inputs", str(inputs), "--out", str(out),
                                            "--device", "cpu", "--quiet", *SHARD, *extra])


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One torch thread in this module, as in the torchrun test's processes: the same sums, the same bits."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def one_process(model_dir, folder, tmp_path_factory):
    """The job in this process."""
    out = tmp_path_factory.mktemp("scale_ref") / "job"
    r = _job(model_dir, folder, out)
    assert r.exit_code == 0, r.output
    return out, r


def test_walk_order_is_the_sorted_paths_order(folder):
    assert list(walk_audio(folder)) == audio_files(folder)
    assert list(walk_audio(folder, "*.flac")) == [str(folder / "b" / "y.flac")]


def test_job_has_every_file_in_order_and_lists_the_bad_one(one_process, model_dir, folder, tmp_path):
    out, r = one_process
    table = read_predictions(out)
    files = audio_files(folder)
    assert table.column("FileName").to_pylist() == files and len(files) == 8
    assert sorted(p.name for p in (out / "shards").iterdir()) == [f"part-{k:06d}.parquet" for k in range(4)]
    errors = dict(zip(files, table.column("Error").to_pylist()))
    broken = str(folder / "broken.wav")
    assert "unreadable" in errors.pop(broken) and all(e is None for e in errors.values())
    assert "1 file(s) failed" in r.stderr and "broken.wav" in r.stderr
    assert "7 file(s) predicted, 1 failed in 4 shard(s)" in r.stderr
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert sorted(i["shard"] for i in index) == [0, 1, 2, 3] and sum(i["files"] for i in index) == 8
    # the same rows as predict with the same files in one output file (batches differ: float noise only)
    whole = tmp_path / "whole.parquet"
    r2 = CliRunner().invoke(predict_cmd, ["--model", str(model_dir), *files, "--out", str(whole), "--device", "cpu",
                                          "--quiet"])
    assert r2.exit_code == 0, r2.output
    ref = pq.read_table(whole)
    assert ref.column_names == table.column_names
    for c in ("FileName", "Prediction", "Error", "Warning"):
        assert ref.column(c).to_pylist() == table.column(c).to_pylist(), c
    ok = [e is None for e in table.column("Error").to_pylist()]
    for c in "ASHUFDCN":
        a = np.array(table.column(c).to_pylist(), dtype=float)[ok]
        b = np.array(ref.column(c).to_pylist(), dtype=float)[ok]
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_rerun_after_a_kill_predicts_only_what_is_missing(one_process, model_dir, folder, tmp_path):
    ref_out, _ = one_process
    out = tmp_path / "job"
    shutil.copytree(ref_out, out)
    jd = JobDir(out)
    # killed while writing shard 3 (its temporary file left), after shard 2 was renamed but before its
    # index line was complete (the next line written must not be glued to it), and shard 1 lost
    jd.shard(3).unlink()
    temp = jd.shard(3).parent / f".{jd.shard(3).name}.abc123.tmp"
    temp.write_bytes(b"PAR1 half")
    lines = (out / "index.jsonl").read_text().splitlines()
    keep = [ln for ln in lines if json.loads(ln)["shard"] == 0]
    two = next(ln for ln in lines if json.loads(ln)["shard"] == 2)
    (out / "index.jsonl").write_text("\n".join(keep) + "\n" + two[: len(two) // 2])
    jd.shard(1).unlink()
    with pytest.raises(Exception, match="3 of 4 shard"):
        read_predictions(out)
    r = _job(model_dir, folder, out)
    assert r.exit_code == 0, r.output
    assert "3 predicted now, 1 already done" in r.stderr
    assert not temp.exists()
    assert read_predictions(out).equals(read_predictions(ref_out))
    r = _job(model_dir, folder, out)  # all done: nothing predicted, the model not even loaded
    assert r.exit_code == 0 and "0 predicted now, 4 already done" in r.stderr, r.output


def test_other_settings_are_refused_naming_what_differs(one_process, model_dir, folder, tmp_path):
    ref_out, _ = one_process
    out = tmp_path / "job"
    shutil.copytree(ref_out, out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    r = _job(model_dir, folder, out, "--max-seconds", "0.5")
    assert r.exit_code == 1 and "max_seconds: not given there, 0.5 now" in r.output, r.output
    listed = tmp_path / "list.txt"
    listed.write_text("\n".join(audio_files(folder)[:5]) + "\n")
    r = _job(model_dir, listed, out)
    assert r.exit_code != 0 and "input_sha256" in r.output and "input_files: 8 there, 5 now" in r.output, r.output
    r = CliRunner().invoke(predict_cmd, ["--model", str(model_dir), "--inputs", str(folder), "--out", str(out),
                                         "--device", "cpu", "--quiet", "--shard-files", "3"])
    assert r.exit_code != 0 and "shard_files: 2 there, 3 now" in r.output, r.output
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    # a folder that is not a job is not written into
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    r = _job(model_dir, folder, other)
    assert r.exit_code != 0 and "no job.json" in r.output
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_torchrun_with_two_processes_gives_the_same_rows(one_process, model_dir, folder, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    args = ["finetune", "predict", "--model", str(model_dir), "--inputs", str(folder), "--device", "cpu", "--quiet",
            *SHARD]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "conilium.cli", *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "process 1 of 2" in two.stderr and "process 2 of 2" in two.stderr
    assert read_predictions(tmp_path / "two").equals(read_predictions(one_process[0]))
    index = [json.loads(line) for line in (tmp_path / "two" / "index.jsonl").read_text().splitlines()]
    assert sorted(i["shard"] for i in index) == [0, 1, 2, 3]


def test_ray_actors_give_the_same_rows(one_process, model_dir, folder, tmp_path, monkeypatch):
    """Two ray actors, started from another folder than the job's, on a list of relative paths."""
    ray = pytest.importorskip("ray", reason="ray is in the cluster extra")
    if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free < 200 * 2**20:
        pytest.skip("too little shared memory for ray's object store")
    ref_out, _ = one_process
    files = audio_files(folder)
    (tmp_path / "list.txt").write_text("\n".join(os.path.relpath(f, folder.parent) for f in files) + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 2**20,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        monkeypatch.chdir(folder.parent)
        r = _job(model_dir, tmp_path / "list.txt", tmp_path / "job", "--backend", "ray", "--n-jobs", "2")
    finally:
        ray.shutdown()
    assert r.exit_code == 0, r.output
    assert "4 predicted now" in r.stderr
    got, ref = read_predictions(tmp_path / "job"), read_predictions(ref_out)
    assert got.column("FileName").to_pylist() == [os.path.relpath(f, folder.parent) for f in files]
    assert got.drop_columns(["FileName", "Error"]).equals(ref.drop_columns(["FileName", "Error"]))
    assert [e and e.replace(str(folder.parent) + os.sep, "") for e in got.column("Error").to_pylist()] == \
        [e and e.replace(str(folder.parent) + os.sep, "") for e in ref.column("Error").to_pylist()]
    r = _job(model_dir, tmp_path / "list.txt", tmp_path / "job")  # the same job, resumed here: nothing left
    assert r.exit_code == 0 and "0 predicted now, 4 already done" in r.stderr, r.output


def test_progress_bar_and_bad_usage(model_dir, folder, tmp_path):
    listed = tmp_path / "list.txt"
    listed.write_text("# two files\n" + "\n".join(audio_files(folder)[:2]) + "\n\n")
    r = CliRunner().invoke(predict_cmd, ["--model", str(model_dir), "--inputs", str(listed), "--out",
                                         str(tmp_path / "job"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "files/s" in r.stderr and "audio-h/s" in r.stderr
    assert read_predictions(tmp_path / "job").num_rows == 2
    model = ["--model", str(model_dir), "--device", "cpu", "--quiet"]
    for args, said in (
            ([str(folder / "a.wav"), "--shard-files", "5"], "are for a job"),
            (["--inputs", str(folder), "--out", str(tmp_path / "j"), str(folder / "a.wav")], "takes the place of"),
            (["--inputs", str(folder)], "needs --out DIR"),
            (["--inputs", str(folder / "a.wav"), "--out", str(tmp_path / "j")], "an audio file, not a list"),
            (["--inputs", str(folder), "--out", str(tmp_path / "j"), "--n-jobs", "2"], "for --backend ray"),
            (["--inputs", str(tmp_path / "empty"), "--out", str(tmp_path / "j")], "no audio file in it"),
            (["--inputs", str(folder), "--out", str(tmp_path / "j"), "--segment", "vad"], "not available with --inputs")):
        (tmp_path / "empty").mkdir(exist_ok=True)
        r = CliRunner().invoke(predict_cmd, model + args)
        assert r.exit_code == 2 and said in r.output, (args, r.output)
        assert not (tmp_path / "j").exists()


def test_a_file_that_breaks_its_whole_batch_fails_alone(one_process, model_dir, folder, tmp_path):
    """An exception no input check caught (a decoder crash, say) takes only its own file's row."""
    from conilium.finetune.predict import Predictor
    from conilium.finetune.scale import PredictorSpec, run_job

    class CrashesOnC(Predictor):
        def predict(self, inputs, *, progress=False):
            if any(str(f).endswith("c.wav") for f in inputs):
                raise RuntimeError("decoder crashed\nsecond line")
            return super().predict(inputs, progress=progress)

    spec = PredictorSpec("model", str(model_dir), device="cpu")
    summary = run_job(spec, folder, tmp_path / "job", shard_files=2, rank=0, world=1,
                      predictor=CrashesOnC(model_dir, device="cpu"))
    assert summary.complete and summary.failed == 2 and summary.predicted == 6
    got = read_predictions(tmp_path / "job").to_pylist()
    ref = read_predictions(one_process[0]).to_pylist()
    crashed = str(folder / "c.wav")
    assert [r["FileName"] for r in got] == [r["FileName"] for r in ref]
    for g, r in zip(got, ref):
        if g["FileName"] == crashed:
            assert g["Error"] == "prediction failed (RuntimeError: decoder crashed)" and g["A"] is None
        else:
            assert g == r


def test_onnx_model_job(model_dir, folder, tmp_path):
    """A job with an exported model (onnxruntime): the rows of predict --onnx on the same files."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is in the onnx extra")
    from conilium.finetune.onnx import export_onnx

    onnx = tmp_path / "model.onnx"
    export_onnx(onnx, model_dir=model_dir)
    r = CliRunner().invoke(predict_cmd, ["--onnx", str(onnx), "--inputs", str(folder), "--out", str(tmp_path / "job"),
                                         "--device", "cpu", "--quiet", *SHARD])
    assert r.exit_code == 0, r.output
    job = json.loads((tmp_path / "job" / "job.json").read_text())["settings"]
    assert job["model_kind"] == "onnx" and len(job["model_sha256"]) == 64
    files = audio_files(folder)
    r = CliRunner().invoke(predict_cmd, ["--onnx", str(onnx), *files, "--out", str(tmp_path / "whole.parquet"),
                                         "--device", "cpu", "--quiet"])
    assert r.exit_code == 0, r.output
    got, ref = read_predictions(tmp_path / "job"), pq.read_table(tmp_path / "whole.parquet")
    for c in ("FileName", "Prediction", "Error"):
        assert got.column(c).to_pylist() == ref.column(c).to_pylist(), c
    np.testing.assert_allclose(np.array(got.column("A").to_pylist(), dtype=float),
                               np.array(ref.column("A").to_pylist(), dtype=float), atol=1e-5)

"""predict --inputs over many short files: one process against torchrun's K processes.

    OPENBLAS_NUM_THREADS=1 python bench/bench_scale.py                  # 2,000 files of 1 s, 1 vs 2 processes
    python bench/bench_scale.py --files 500 --processes 1 2 4 --threads 4

Writes ``--files`` seeded noise-and-tone clips (16 kHz WAV, 0.5 to ``--seconds`` s long) in
a folder, a demo-wavlm model directory (random weights) as finetune-best writes it, then
runs ``predict --inputs FOLDER --out JOB`` as a command: once in one process with
``--threads`` torch threads, then under ``torchrun --nproc_per_node K`` with
``--threads / K`` threads a process (the same cores), and once more over the finished job
(a resume with nothing left: the cost of walking the inputs and hashing the model). Prints
the wall seconds (process start, model loading and Python imports included), files/s and
audio hours/s of each, and checks every run's rows against the one-process table (the same
files, labels and errors; probabilities within float noise, since the thread counts differ:
with equal threads they are equal, as tests/test_predict_scale.py checks).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf


def _files(folder: Path, n: int, seconds: float, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    total = 0.0
    for i in range(n):
        d = float(rng.uniform(0.5, 1.0) * seconds)
        t = np.arange(int(d * 16000)) / 16000
        x = 0.1 * np.sin(2 * np.pi * rng.uniform(100, 300) * t) + 0.02 * rng.standard_normal(len(t))
        sub = folder / f"{i // 1000:03d}"
        sub.mkdir(exist_ok=True)
        sf.write(sub / f"clip{i:07d}.wav", x.astype(np.float32), 16000, subtype="PCM_16")
        total += len(t) / 16000
    return total


def _model(root: Path) -> Path:
    import torch

    from conilium.extract.upstreams import load_upstream
    from conilium.finetune.model import EndToEndModel, save_model_dir
    from conilium.heads.model import EmotionHead, HeadConfig

    upstream, identity = load_upstream("demo-wavlm", random_init=True, seed=0, random_root=root / "w")
    torch.manual_seed(0)
    head = EmotionHead(HeadConfig(dim=96, layers=0, hidden=32, dropout=0.0))
    return save_model_dir(root / "model", EndToEndModel(upstream, head), {
        "max_seconds": 8.0, "normalize": {"mode": "utterance"}, "offsets": {}, "loss": "wbce", "labels": "S",
        "upstream": identity})


def _run(cmd, threads: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return dt


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=1.0, help="longest clip; the others 0.5x to 1x of it")
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, default=2, help="torch threads in all (split between processes)")
    ap.add_argument("--shard-files", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from conilium.finetune.scale import read_predictions

    py = sys.executable
    rows = []
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        folder = root / "in"
        folder.mkdir()
        audio_s = _files(folder, args.files, args.seconds)
        model = _model(root)
        common = ["finetune", "predict", "--model", str(model), "--inputs", str(folder), "--shard-files",
                  str(args.shard_files), "--batch-size", str(args.batch_size), "--device", args.device, "--quiet"]
        ref = None
        for k in args.processes:
            out = root / f"job{k}"
            launch = [py, "-m", "conilium.cli"] if k == 1 else \
                [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(k), "-m", "conilium.cli"]
            threads = max(1, args.threads // k)
            dt = _run([*launch, *common, "--out", str(out)], threads)
            table = read_predictions(out)
            ref = table if ref is None else ref
            same = table.select(["FileName", "Prediction", "Error"]).equals(ref.select(["FileName", "Prediction",
                                                                                        "Error"]))
            probs = lambda t: np.array([t.column(c).to_pylist() for c in "ASHUFDCN"], dtype=float)  # noqa: E731
            diff = float(np.nanmax(np.abs(probs(table) - probs(ref))))
            rows.append({"processes": k, "threads_each": threads, "seconds": round(dt, 2),
                         "files_per_s": round(args.files / dt, 1), "audio_h_per_s": round(audio_s / 3600 / dt, 4),
                         "same_files_and_labels": same, "max_probability_diff": diff})
            print(f"{k} process(es) x {threads} thread(s): {dt:7.1f} s  {args.files / dt:7.1f} files/s  "
                  f"{audio_s / 3600 / dt:.4f} audio-h/s  files and labels as 1 process: {same}, probabilities "
                  f"within {diff:.1e} (thread counts differ)", flush=True)
        out = root / f"job{args.processes[0]}"
        launch = [py, "-m", "conilium.cli"]
        dt = _run([*launch, *common, "--out", str(out)], args.threads)
        print(f"rerun of the finished job (walk + hash + index, nothing predicted): {dt:.1f} s", flush=True)
    result = {"bench": "scale", "files": args.files, "audio_hours": round(audio_s / 3600, 4),
              "shard_files": args.shard_files, "batch_size": args.batch_size, "device": args.device, "runs": rows,
              "resume_done_s": round(dt, 2), "machine": platform.platform(), "cpus": os.cpu_count(),
              "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

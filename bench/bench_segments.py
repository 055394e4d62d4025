"""predict --segment on long recordings: seconds and peak memory against the recording's length.

    OPENBLAS_NUM_THREADS=1 python bench/bench_segments.py                 # 10 and 40 minutes
    OPENBLAS_NUM_THREADS=1 python bench/bench_segments.py --minutes 10 60 --segment fixed:8

A recording is built from demo-corpus speech (synthetic voices, each clip followed by 0.5-3 s
of silence, seeded) as a 44.1 kHz FLAC, so that the VAD finds segments and the reader
resamples. Each length runs in a fresh process (``predict --segment`` with a demo-wavlm
model directory, random weights): its wall time, the seconds of the VAD pass alone, the
number of segments, audio minutes per wall second, and the process's peak resident memory
(``ru_maxrss``). Memory bounded by the block and the segments, not the file, shows as a
peak that stays flat as the recording grows; a whole-file read would add 10.6 MB (float32 at
44.1 kHz) per minute.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _child(args) -> None:
    """One measurement in this (fresh) process: prints a JSON line."""
    import torch

    from conilium.finetune.predict import Predictor
    from conilium.finetune.segments import parse_segment, predict_segments
    from conilium.finetune.vad import SpeechDetector

    torch.set_num_threads(args.threads)
    vad_seconds = None
    if args.segment == "vad":
        det = SpeechDetector(max_segment=8.0)
        t = time.perf_counter()
        det.segments(args.file)
        vad_seconds = time.perf_counter() - t
    p = Predictor(args.model, device="cpu", batch_size=8)
    t = time.perf_counter()
    run = predict_segments(p, [args.file], parse_segment(args.segment, max_segment=8.0))
    wall = time.perf_counter() - t
    print(json.dumps({"segments": len(run.results), "seconds": wall, "vad_seconds": vad_seconds,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def _recording(path: Path, minutes: float, corpus: Path, seed: int = 0) -> float:
    import numpy as np
    import soundfile as sf
    import soxr

    rng = np.random.default_rng(seed)
    clips = [sf.read(p, dtype="float32")[0] for p in sorted((corpus / "Audios").glob("*.wav"))]
    with sf.SoundFile(str(path), "w", 44100, 1, subtype="PCM_16") as f:
        total = 0.0
        while total < minutes * 60:
            x = clips[int(rng.integers(len(clips)))]
            x = np.concatenate([x, np.zeros(int(rng.uniform(0.5, 3.0) * 16000), np.float32)])
            f.write(soxr.resample(x, 16000, 44100))
            total += len(x) / 16000
    return total


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, nargs="+", default=[10.0, 40.0])
    ap.add_argument("--segment", default="vad")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--file", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args)
        return {}

    import torch

    from conilium.demo import make_demo_corpus
    from conilium.testing import write_demo_model_dir

    out = {"bench": "segments", "segment": args.segment, "threads": args.threads, "runs": [],
           "machine": platform.processor() or platform.machine(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = make_demo_corpus(tmp / "corpus", clips=40, seed=0)
        model_dir = write_demo_model_dir(tmp, max_seconds=8.0, normalize={"mode": "utterance"})
        for minutes in args.minutes:
            path = tmp / f"rec{minutes:g}.flac"
            seconds = _recording(path, minutes, Path(corpus))
            res = subprocess.run([sys.executable, __file__, "--child", "--file", str(path), "--model", str(model_dir),
                                  "--segment", args.segment, "--threads", str(args.threads)],
                                 capture_output=True, text=True, check=True)
            got = json.loads(res.stdout.strip().splitlines()[-1])
            got.update(minutes=round(seconds / 60, 2), audio_min_per_s=round(seconds / 60 / got["seconds"], 3))
            out["runs"].append(got)
            vad = "" if got["vad_seconds"] is None else f", VAD pass {got['vad_seconds']:.1f} s"
            print(f"{got['minutes']:6.1f} min: {got['segments']} segments in {got['seconds']:.1f} s{vad} "
                  f"({got['audio_min_per_s']:.2f} audio min/s), peak RSS {got['peak_rss_mb']:.0f} MB", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()

"""ONNX export time and onnxruntime vs PyTorch CPU throughput of the exported model.

    OPENBLAS_NUM_THREADS=1 python bench/bench_onnx.py                    # demo-wavlm, 2 threads
    OPENBLAS_NUM_THREADS=1 python bench/bench_onnx.py --upstream demo-wav2vec2-base --threads 1
    python bench/bench_onnx.py --upstream wavlm-base-plus --seconds 4 --clips 16   # a real architecture

A model directory is written as finetune-best writes it (the upstream with random weights,
a fresh attentive head), exported with ``conilium finetune export``'s code (the time includes
tracing, writing and the onnxruntime-vs-PyTorch check), then the same zero-padded batches of
seeded test signals go through PyTorch (predict's own loop) and onnxruntime, alternately, with
the same number of threads. Prints the export time, the largest probability difference, and
clips and audio seconds per second of each with their ratio (median over repetitions).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", default="demo-wavlm")
    ap.add_argument("--clips", type=int, default=32, help="clips per repetition")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=3.0, help="longest clip; the others 0.5x to 1x of it")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import onnxruntime as ort

    from conilium.extract.upstreams import load_upstream
    from conilium.extract.encoder import hidden_shape
    from conilium.finetune.model import EndToEndModel, save_model_dir
    from conilium.finetune.onnx import check_inputs, export_onnx
    from conilium.finetune.predict import load_model_source
    from conilium.heads.model import EmotionHead, HeadConfig
    from conilium.heads.predict import predict_batches

    with tempfile.TemporaryDirectory() as root:
        upstream, identity = load_upstream(args.upstream, random_init=True, seed=0, random_root=Path(root) / "w")
        torch.manual_seed(0)
        head = EmotionHead(HeadConfig(dim=hidden_shape(upstream)[1], layers=0, hidden=256, dropout=0.0))
        model_dir = save_model_dir(Path(root) / "model", EndToEndModel(upstream, head), {
            "max_seconds": args.seconds, "normalize": {"mode": "none"}, "offsets": {}, "loss": "wbce", "labels": "S",
            "upstream": identity})
        t0 = time.perf_counter()
        meta = export_onnx(Path(root) / "model.onnx", model_dir=model_dir)
        export_s = time.perf_counter() - t0
        size_mb = (Path(root) / "model.onnx").stat().st_size / 2**20
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        opts.inter_op_num_threads = 1
        session = ort.InferenceSession(str(Path(root) / "model.onnx"), sess_options=opts,
                                       providers=["CPUExecutionProvider"])
        loaded = load_model_source(model_dir, device=torch.device("cpu"), precision="float32")

    n = int(args.seconds * 16000)
    rng = np.random.default_rng(0)
    sizes = sorted((rng.uniform(0.5, 1.0, args.clips) * n).astype(int))
    batches = check_inputs([sizes[k : k + args.batch_size] for k in range(0, len(sizes), args.batch_size)])
    audio_s = sum(sizes) / 16000

    def run_torch():
        for waves, lengths in batches:
            predict_batches(loaded.model, [((torch.from_numpy(waves), torch.from_numpy(lengths)),
                                            list(range(len(lengths))))], loaded.loss,
                            device=torch.device("cpu"), dtype="float32")

    def run_onnx():
        for waves, lengths in batches:
            session.run(None, {"waves": waves, "lengths": lengths})

    run_torch(), run_onnx()  # warm-up
    times = {"torch": [], "onnxruntime": []}
    for _ in range(args.repeats):
        for name, fn in (("torch", run_torch), ("onnxruntime", run_onnx)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "bench": "onnx", "upstream": args.upstream, "threads": args.threads, "clips": args.clips,
        "batch_size": args.batch_size, "max_seconds": args.seconds, "audio_seconds": round(audio_s, 2),
        "export_seconds": round(export_s, 2), "onnx_mb": round(size_mb, 1),
        "max_abs_diff_probabilities": meta["check"]["max_abs_diff_probabilities"],
        "torch_clips_per_s": round(args.clips / med["torch"], 2),
        "onnxruntime_clips_per_s": round(args.clips / med["onnxruntime"], 2),
        "torch_audio_s_per_s": round(audio_s / med["torch"], 2),
        "onnxruntime_audio_s_per_s": round(audio_s / med["onnxruntime"], 2),
        "onnxruntime_speedup": round(med["torch"] / med["onnxruntime"], 3),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__, "onnxruntime": ort.__version__,
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    }
    print(f"{args.upstream}: export {export_s:.2f} s (trace, write, check; {size_mb:.1f} MB), "
          f"max |Δp| {result['max_abs_diff_probabilities']:.1e}")
    print(f"CPU, {args.threads} thread(s), {args.clips} clips of {sizes[0] / 16000:.2f}-{sizes[-1] / 16000:.2f} s "
          f"in batches of {args.batch_size}:")
    for k in ("torch", "onnxruntime"):
        print(f"  {k:12s} {result[k + '_clips_per_s']:8.2f} clips/s  {result[k + '_audio_s_per_s']:8.2f} audio s/s "
              f"(median of {args.repeats})")
    print(f"  onnxruntime / torch: {result['onnxruntime_speedup']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

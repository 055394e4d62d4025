"""WavLM's attention: the fused ``scaled_dot_product_attention`` forward vs transformers' own.

    python bench/bench_attention.py                       # wavlm-large (random weights), CPU
    python bench/bench_attention.py --device cuda --dtype bfloat16

Both encoders wrap copies of one random-weight model (the real wavlm-large architecture)
and run the same batch, alternately, in one process: each repetition gives one ratio
stock/fused of a whole forward (CNN, transformer, every hidden state), so machine noise
hits both sides alike. Prints min and median of the ratios and the largest relative
difference of the hidden states.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from conilium.extract.encoder import UpstreamEncoder, pad_waves
from conilium.extract.upstreams import load_upstream
from conilium.runtime import autocast, resolve_device


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", default="wavlm-large")
    ap.add_argument("--seconds", type=float, nargs="+", default=[8.0, 5.5, 3.0, 6.5],
                    help="clip lengths of the batch (padded to the longest)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as root:
        model, _ = load_upstream(args.upstream, random_init=True, seed=0, random_root=root)
    model.eval()
    stock = UpstreamEncoder(copy.deepcopy(model), fused_attention=False).to(device)
    fused = UpstreamEncoder(model).to(device)
    rng = np.random.default_rng(0)
    x, lengths = pad_waves([rng.standard_normal(int(s * 16000)).astype(np.float32) for s in args.seconds])
    x, lengths = x.to(device), lengths.to(device)
    every = list(range(stock.num_hidden_states))

    def run(enc):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode(), autocast(device, args.dtype):
            out, frames = enc.hidden_states(x, lengths, every)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t, out.float(), frames

    run(stock), run(fused)  # warm-up
    ratios, t_stock, t_fused = [], [], []
    for _ in range(args.repeats):
        a, out_a, frames = run(stock)
        b, out_b, _ = run(fused)
        t_stock.append(a), t_fused.append(b), ratios.append(a / b)
    err = max(float((out_a[i, :n] - out_b[i, :n]).abs().max() / out_a[i, :n].abs().max())
              for i, n in enumerate(frames.tolist()))
    result = {
        "bench": "attention", "upstream": args.upstream, "device": str(device), "dtype": args.dtype,
        "batch_seconds": args.seconds, "threads": torch.get_num_threads(), "switched_modules": fused.fused_attention,
        "repeats": args.repeats, "speedup_min": min(ratios), "speedup_median": statistics.median(ratios),
        "stock_seconds_median": statistics.median(t_stock), "fused_seconds_median": statistics.median(t_fused),
        "max_relative_difference": err, "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])),
    }
    print(f"{args.upstream} forward of {len(args.seconds)} clips ({max(args.seconds):.1f} s longest) on {device} "
          f"{args.dtype}: fused attention {result['speedup_min']:.3f}x (min) / {result['speedup_median']:.3f}x "
          f"(median) faster than transformers' own over {args.repeats} alternating repeats; stock "
          f"{result['stock_seconds_median']:.2f} s, fused {result['fused_seconds_median']:.2f} s; "
          f"largest relative difference {err:.2e}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

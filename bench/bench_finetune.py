"""Time one end-to-end fine-tuning step of the wavlm-large architecture (random weights).

A step is what finetune-best does per batch: forward through the upstream (CNN encoder
frozen) and the attentive head, WBCE loss, backward, AdamW update. Prints the figures
and, with ``--json OUT``, writes them as JSON.

    python bench/bench_finetune.py                                    # this CPU, batch 2, 3 steps
    python bench/bench_finetune.py --device cuda --batch-size 16 --steps 10   # bf16 autocast
    python bench/bench_finetune.py --device cuda --batch-size 16 --gradient-checkpointing
    python bench/bench_finetune.py --lora-rank 8 --steps 5 --threads 2   # LoRA vs full, steps in turn

With ``--lora-rank R`` a second model of the same architecture gets LoRA adapters
(finetune-best --lora-rank: upstream frozen, adapters on ``--lora-modules`` of every
transformer layer, head trained) and the two models' steps are timed in turn, full then
LoRA, so that both see the same machine load; the figures give each model's trainable
parameters, min and median step time, and the LoRA / full ratios of this one run.

Inputs are random waveforms of ``--seconds`` seconds (the paper's 8 s truncation), so
every clip of a batch has the longest length (no padding): an upper bound for a corpus
whose mean duration is shorter. The random weights are saved once to ``--weights-dir``
(default: a temporary folder) and loaded with ``from_pretrained``, as finetune-best does.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import warnings

import torch

from conilium.extract.encoder import freeze_front_end
from conilium.extract.lora import add_adapters, check_lora_modules
from conilium.extract.upstreams import load_upstream
from conilium.finetune import EndToEndModel, FinetuneConfig
from conilium.runtime import precision_dtype
from conilium.finetune.model import default_head_config, enable_checkpointing
from conilium.runtime import autocast
from conilium.training.losses import loss_fn
from conilium.heads.model import EmotionHead

MSP_TRAIN_CLIPS = 68000  # MSP-Podcast 1.11 Train split, about
MSP_MEAN_SECONDS = 5.8


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", default="wavlm-large", help="registered architecture (random init)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="auto: bf16 autocast on CUDA, float32 on CPU")
    ap.add_argument("--batch-size", type=int, default=None, help="clips per step (default: 2 on CPU, 16 on CUDA)")
    ap.add_argument("--seconds", type=float, default=8.0, help="clip length")
    ap.add_argument("--steps", type=int, default=3, help="timed steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--weights-dir", default=None, help="where the random weights are saved (reused when present)")
    ap.add_argument("--lora-rank", type=int, default=None,
                    help="also time a LoRA model of this rank (steps in turn with the full model)")
    ap.add_argument("--lora-modules", default="q,k,v,o", help="linear layers that get adapters (with --lora-rank)")
    ap.add_argument("--json", dest="json_out", default=None, help="write the figures here")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask and attn_mask")

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if (args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()))
                          else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    batch = args.batch_size or (16 if device.type == "cuda" else 2)

    t0 = time.perf_counter()
    config = FinetuneConfig(corpus="", out="", upstream=args.upstream)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.weights_dir or tmp

        def build(lora: bool):
            """The end-to-end model as finetune-best builds it, its optimizer and trained parameters."""
            torch.manual_seed(0)
            upstream, _ = load_upstream(args.upstream, random_init=True, seed=0, random_root=root)
            freeze_front_end(upstream)  # the CNN encoder (Whisper: its two convolutions)
            torch.manual_seed(0)
            m = EndToEndModel(upstream, EmotionHead(default_head_config(upstream, config)))
            if lora:
                add_adapters(upstream, rank=args.lora_rank, modules=check_lora_modules(args.lora_modules))
            if args.gradient_checkpointing:
                enable_checkpointing(upstream)
            m.to(device).train()
            trained = [p for p in m.parameters() if p.requires_grad]
            return m, torch.optim.AdamW(trained, lr=1e-5), trained

        model, opt, params = build(False)
        lora_model = build(True) if args.lora_rank else None
    load_seconds = time.perf_counter() - t0
    fn = loss_fn("wbce")
    n = int(args.seconds * 16000)
    g = torch.Generator().manual_seed(0)
    waves = (0.1 * torch.randn(batch, n, generator=g)).to(device)
    lengths = torch.full((batch,), n, dtype=torch.long, device=device)
    targets = torch.softmax(torch.randn(batch, 8, generator=g), dim=1).to(device)
    weights = torch.ones(8, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step(m, o):
        with autocast(device, precision_dtype(args.precision, device)):
            logits = m(waves, lengths)
        loss = fn(logits.float(), targets, weights)
        loss.backward()
        o.step()
        o.zero_grad(set_to_none=True)
        return float(loss.detach())

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    cpu_times: dict = {"full": [], "lora": []}  # process CPU seconds (all threads): steadier on a shared machine

    def timed(m, o, kind: str = "full") -> float:
        c, t = time.process_time(), time.perf_counter()
        step(m, o)
        sync()
        cpu_times[kind].append(time.process_time() - c)
        return time.perf_counter() - t

    for _ in range(args.warmup):
        step(model, opt)
        if lora_model is not None:
            step(*lora_model[:2])
    sync()
    times, lora_times = [], []
    for i in range(args.steps):
        times.append(timed(model, opt))
        msg = f"step {i + 1}/{args.steps}: {times[-1]:.3f} s"
        if lora_model is not None:
            lora_times.append(timed(*lora_model[:2], "lora"))
            msg += f" (LoRA {lora_times[-1]:.3f} s)"
        print(msg, file=sys.stderr)

    med = statistics.median(times)
    clips_per_s = batch / med
    amp = device.type == "cuda" and args.precision in ("auto", "bfloat16")
    res = {
        "upstream": args.upstream,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "precision": "bf16 autocast" if amp else "float32",
        "gradient_checkpointing": args.gradient_checkpointing,
        "batch_size": batch,
        "clip_seconds": args.seconds,
        "trainable_parameters": int(sum(p.numel() for p in params)),
        "frozen_parameters": int(sum(p.numel() for p in model.parameters() if not p.requires_grad)),
        "steps_timed": args.steps,
        "step_seconds": [round(t, 4) for t in times],
        "step_seconds_median": round(med, 4),
        "clips_per_second": round(clips_per_s, 3),
        "audio_seconds_per_second": round(clips_per_s * args.seconds, 2),
        "model_load_seconds": round(load_seconds, 1),
        "peak_memory_gib": round((torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                                  else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 30, 2),
        "peak_memory_kind": ("CUDA max allocated" if device.type == "cuda" else "process max RSS")
                            + (", full and LoRA models together" if lora_model is not None else ""),
        # an MSP-Podcast epoch at this rate: clips cut at --seconds (upper bound) and at the mean duration
        "projected_epoch_hours_at_clip_seconds": round(MSP_TRAIN_CLIPS / clips_per_s / 3600, 2),
        "projected_epoch_hours_at_mean_duration": round(
            MSP_TRAIN_CLIPS / clips_per_s / 3600 * MSP_MEAN_SECONDS / args.seconds, 2),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }
    print(f"{res['upstream']} fine-tuning step on {res['device']} ({res['precision']}"
          f"{', gradient checkpointing' if args.gradient_checkpointing else ''}), batch {batch} x {args.seconds:g} s:")
    print(f"  median step {med:.3f} s over {args.steps} steps ({', '.join(f'{t:.3f}' for t in times)})")
    print(f"  {clips_per_s:.2f} clips/s, {res['audio_seconds_per_second']:.1f} s of audio per second")
    print(f"  trainable parameters {res['trainable_parameters']:,} (CNN encoder frozen: "
          f"{res['frozen_parameters']:,})")
    print(f"  peak memory {res['peak_memory_gib']} GiB ({res['peak_memory_kind']})")
    print(f"  projected MSP-Podcast epoch ({MSP_TRAIN_CLIPS:,} clips): {res['projected_epoch_hours_at_clip_seconds']} h "
          f"with {args.seconds:g} s clips, {res['projected_epoch_hours_at_mean_duration']} h scaled to the "
          f"{MSP_MEAN_SECONDS} s mean duration")
    if lora_model is not None:
        lm = lora_model[0]
        lora_trained = int(sum(p.numel() for p in lora_model[2]))
        head_params = int(sum(p.numel() for p in lm.head.parameters()))
        lmed = statistics.median(lora_times)
        res["lora"] = {
            "rank": args.lora_rank,
            "modules": args.lora_modules,
            "trainable_parameters": lora_trained,
            "adapter_parameters": lora_trained - head_params,
            "frozen_parameters": int(sum(p.numel() for p in lm.parameters() if not p.requires_grad)),
            "step_seconds": [round(t, 4) for t in lora_times],
            "step_seconds_min": round(min(lora_times), 4),
            "step_seconds_median": round(lmed, 4),
            "full_step_seconds_min": round(min(times), 4),
            "ratio_median_lora_over_full": round(lmed / med, 3),
            "ratio_min_lora_over_full": round(min(lora_times) / min(times), 3),
            "step_cpu_seconds": [round(t, 3) for t in cpu_times["lora"]],
            "full_step_cpu_seconds": [round(t, 3) for t in cpu_times["full"]],
            "ratio_median_cpu_lora_over_full": round(statistics.median(cpu_times["lora"])
                                                     / statistics.median(cpu_times["full"]), 3),
            "trainable_ratio_lora_over_full": round(lora_trained / res["trainable_parameters"], 5),
        }
        r = res["lora"]
        print(f"  LoRA rank {args.lora_rank} on {args.lora_modules} of every layer, same batch, steps in turn with "
              f"the full model:")
        print(f"    trainable parameters {lora_trained:,} ({r['adapter_parameters']:,} adapter + {head_params:,} "
              f"head) vs {res['trainable_parameters']:,} full: {100 * r['trainable_ratio_lora_over_full']:.2f} %")
        print(f"    step min / median: LoRA {min(lora_times):.3f} / {lmed:.3f} s, full {min(times):.3f} / "
              f"{med:.3f} s; LoRA / full {r['ratio_min_lora_over_full']:.3f} (min), "
              f"{r['ratio_median_lora_over_full']:.3f} (median)")
        print(f"    process CPU time per step (median): LoRA {statistics.median(cpu_times['lora']):.3f} s, full "
              f"{statistics.median(cpu_times['full']):.3f} s; LoRA / full {r['ratio_median_cpu_lora_over_full']:.3f}")
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=2)
            f.write("\n")
        print(f"  written to {args.json_out}")
    return res


if __name__ == "__main__":
    main()

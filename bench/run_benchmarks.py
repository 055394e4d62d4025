"""All stage benchmarks behind one entry point, gathered into bench/RESULTS.md.

    python bench/run_benchmarks.py                 # run the CPU benchmarks here, then write RESULTS.md
    python bench/run_benchmarks.py --device cuda   # the GPU figures (bf16), on a CUDA machine
    python bench/run_benchmarks.py --report-only   # rewrite RESULTS.md from bench/results/*.json

Each benchmark script writes its figures as JSON into ``bench/results/`` (named after
the bench and the device, e.g. ``extract_cpu.json``, ``finetune_cuda.json``);
RESULTS.md is made from every JSON file there, so figures measured on another machine
(a GPU box) sit beside this machine's, each with its machine and command. The last
section projects full-corpus times for the real MSP-Podcast (Train ≈ 68,000 clips,
Development ≈ 19,800, mean ≈ 5.8 s, truncated to 8 s) from the measured rates.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TRAIN_CLIPS, DEV_CLIPS, MEAN_SECONDS, MAX_SECONDS = 68_000, 19_800, 5.8, 8.0
# The mean clip length after 8-second truncation, for MSP-Podcast's durations (a gamma
# with mean 5.8 s and sd 2.4 s, the paper's Figure 1): E[min(d, 8)].
TRUNCATED_MEAN_SECONDS = 5.5


def benches(device: str):
    """(name, argv) of every benchmark for ``device``."""
    py = sys.executable
    out = lambda name: str(RESULTS / f"{name}_{device}.json")  # noqa: E731
    cache = ("cache", [py, str(HERE / "bench_cache.py"), "--clips", "1000", "--json", out("cache")])  # CPU and disk only
    if device == "cpu":
        return [
            ("extract", [py, str(HERE / "bench_extract.py"), "--clips", "24", "--device", "cpu", "--json", out("extract")]),
            ("heads", [py, str(HERE / "bench_heads.py"), "--json", out("heads")]),
            ("finetune", [py, str(HERE / "bench_finetune.py"), "--steps", "3", "--warmup", "1", "--json", out("finetune")]),
            ("onnx", [py, str(HERE / "bench_onnx.py"), "--json", out("onnx")]),
            ("threads", [py, str(HERE / "bench_threads.py"), "--json", out("threads")]),
            # train-grid --preset table2 against its five train-head commands, each a process
            ("grid_cli", [py, str(HERE / "bench_grid_cli.py"), "--large-clips", "300", "--json", out("grid_cli")]),
            # the report of ./run_all.sh's results (run it first): its bootstrap intervals' cost
            ("report", [py, str(HERE / "bench_report.py"), str(HERE.parent / "results" / "report_spec.json"),
                        "--json", out("report")]),
            cache,
        ]
    return [
        ("extract", [py, str(HERE / "bench_extract.py"), "--clips", "256", "--device", "cuda",
                     "--upstream", "demo-wavlm", "--upstream", "wavlm-large", "--batch-seconds", "400", "--json", out("extract")]),
        ("heads", [py, str(HERE / "bench_heads.py"), "--device", "cuda", "--e2e-batch", "16", "--json", out("heads")]),
        ("finetune", [py, str(HERE / "bench_finetune.py"), "--device", "cuda", "--batch-size", "16", "--steps", "10",
                      "--warmup", "2", "--json", out("finetune")]),
        # conilium beside plain PyTorch loops on the card (extraction, train-head, train-grid, fine-tuning)
        ("gpu", [py, str(HERE / "bench_gpu.py"), "--device", "cuda", "--json", out("gpu")]),
        cache,
    ]


def run(device: str, only=None) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name, argv in benches(device):
        if only and name not in only:
            continue
        if name == "report" and not Path(argv[2]).is_file():
            print(f"== report: skipped, no {argv[2]} (run ./run_all.sh first)", flush=True)
            continue
        print(f"== {name} ({device}): {' '.join(argv)}", flush=True)
        t = time.time()
        subprocess.run(argv, check=True)
        data = json.loads(Path(argv[-1]).read_text())
        data.setdefault("command", " ".join(["python"] + [os.path.relpath(a, HERE.parent) if a.startswith("/") else a
                                                          for a in argv[1:]]))
        data["bench_wall_seconds"] = round(time.time() - t, 1)
        Path(argv[-1]).write_text(json.dumps(data, indent=2) + "\n")


# ------------------------------------------------------------------------------ report
def _rows(d, prefix=""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _rows(v, key + ".")
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for i, item in enumerate(v):
                label = item.get("upstream", i)
                yield from _rows(item, f"{key}[{label}].")
        else:
            yield key, v


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v)
    return "—" if v is None else str(v)


def projections(figs: dict) -> list:
    """Full-corpus time projections from measured rates, one line each."""
    lines = []
    audio_all = (TRAIN_CLIPS + DEV_CLIPS) * TRUNCATED_MEAN_SECONDS
    for key, data in sorted(figs.items()):
        dev = key.split("_", 1)[1] if "_" in key else key  # device and variant, e.g. cuda_checkpointing
        if key.startswith("extract"):
            for r in data.get("runs", []):
                rtf = r.get("real_time_factor")
                if rtf:
                    lines.append(f"| extract-features, {r['upstream']} ({dev}, {r.get('compute_dtype', '')}) | "
                                 f"Train+Development, {(TRAIN_CLIPS + DEV_CLIPS):,} clips | "
                                 f"{audio_all * rtf / 3600:.2f} h | RTF {rtf:.4g} |")
        elif key.startswith("heads"):
            ht = data.get("head_training", {}).get("wavlm_large_shaped_streamed") or \
                data.get("head_training", {}).get("wavlm_large_shaped")
            if ht and ht.get("clips_per_s"):
                lines.append(f"| train-head epoch, WavLM-large last layer ({dev}, streamed) | Train, {TRAIN_CLIPS:,} clips | "
                             f"{TRAIN_CLIPS / ht['clips_per_s'] / 60:.1f} min | {ht['clips_per_s']} clips/s |")
                lines.append(f"| train-head, 40 epochs ({dev}) | Train × 40 | "
                             f"{40 * TRAIN_CLIPS / ht['clips_per_s'] / 3600:.2f} h | |")
            e2e = data.get("end_to_end")
            if e2e and e2e.get("clips_per_s"):
                lines.append(f"| end-to-end step, wavlm-large (bench_heads, {dev}) | Train, one epoch | "
                             f"{TRAIN_CLIPS / e2e['clips_per_s'] / 3600:.1f} h | {e2e['clips_per_s']} clips/s |")
        elif key.startswith("cache"):
            one = data.get("per_clip", {}).get("one_layer")
            if one:
                us = one["us_per_clip_median"]["featurecache"]
                lines.append(f"| reading one WavLM-large layer of Train from the cache (page cache warm, CRC-32 checked) "
                             f"| Train, {TRAIN_CLIPS:,} clips | {TRAIN_CLIPS * us / 1e6:.1f} s an epoch | {us} µs a clip |")
        elif key.startswith("finetune"):
            cps = data.get("clips_per_second")
            if cps:
                lines.append(f"| finetune-best epoch, wavlm-large ({dev}, {data.get('precision')}, batch "
                             f"{data.get('batch_size')} × {data.get('clip_seconds')} s) | Train, {TRAIN_CLIPS:,} clips | "
                             f"{TRAIN_CLIPS / cps / 3600:.2f} h (8 s clips; shorter clips are faster) | {cps} clips/s |")
                lines.append(f"| finetune-best, 40 epochs ({dev}) | Train × 40 | {40 * TRAIN_CLIPS / cps / 3600:.1f} h | |")
    return lines


#: The headline table at the top of RESULTS.md (kept by hand: each figure names the raw value it comes from).
HEADLINE = HERE / "HEADLINE.md"


def write_report(path=HERE / "RESULTS.md") -> Path:
    figs = {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))}
    out = ["# Benchmarks", ""]
    if HEADLINE.is_file():  # the headline table: figures picked from the raw values, kept by hand
        out += [HEADLINE.read_text(encoding="utf-8").rstrip("\n"), ""]
    out += ["## Raw values", "",
            "Figures measured by the scripts in `bench/` (`python bench/run_benchmarks.py`), one section per "
            "benchmark and machine; the JSON behind each section is in `bench/results/`. CPU figures come from "
            "a 2-core machine shared with other work, so they are on the slow side; read them as orders of magnitude.",
            ""]
    for key, data in figs.items():
        out += [f"### {key}", ""]
        cmd = data.get("command")
        if cmd:
            out += ["```bash", cmd, "```", ""]
        out += ["| figure | value |", "|---|---|"]
        for k, v in _rows(data):
            if k in ("command",):
                continue
            out.append(f"| `{k}` | {_fmt(v)} |")
        out.append("")
    proj = projections(figs)
    if proj:
        out += ["### Full-corpus projections (MSP-Podcast: Train ≈ 68,000 clips, Development ≈ 19,800, mean ≈ 5.8 s)", "",
                f"From the measured rates above; audio truncated to {MAX_SECONDS:g} s, mean truncated clip "
                f"≈ {TRUNCATED_MEAN_SECONDS} s.", "",
                "| what | data | projected time | measured rate |", "|---|---|---:|---|", *proj, ""]
    path.write_text("\n".join(out))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--only", action="append", choices=["extract", "heads", "finetune", "onnx", "threads", "report", "cache", "gpu"],
                    help="run only this benchmark (repeatable)")
    ap.add_argument("--report-only", action="store_true", help="only rewrite RESULTS.md from bench/results/*.json")
    args = ap.parse_args(argv)
    if not args.report_only:
        run(args.device, args.only)
    print(f"wrote {write_report()}  (machine: {platform.platform()}, {os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

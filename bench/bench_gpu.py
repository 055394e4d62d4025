"""conilium against plain PyTorch loops on one device, in one process: extraction, train-head,
train-grid and fine-tuning rates beside the plain-loop ceilings, with ratios.

On a CUDA machine (one card; wavlm-large random weights, bf16, 1024-dim caches, batch 16; sized
to stay under 5 minutes on an H100/H200, an estimate: it has not been run on one):

    OPENBLAS_NUM_THREADS=1 python bench/bench_gpu.py            # writes bench/results/gpu_cuda.json
    python bench/bench_gpu.py --compile                          # also the torch.compile variants

``bench/gpu_check.sh`` runs the CUDA-only tests and then this benchmark in one command (with
``WHEELS=DIR`` it first installs the dependencies a CUDA image often lacks, downloaded beforehand
with ``bench/gpu_check.sh --download DIR``).

The CPU smoke check (demo-wavlm, 48 clips, 96-dim caches, one torch thread; about 25 s on 2 cores,
a minute with ``--compile``):

    OPENBLAS_NUM_THREADS=1 python bench/bench_gpu.py --device cpu --small --json bench/results/gpu_cpu-small.json

NOTE: this script was written on a machine without a GPU. Only its CPU paths (``--device cpu``)
have been run (``--compile`` too, on CPU); every CUDA-only part (CUDA graphs, pinned host
buffers, bf16 weights and autocast, the compiled variants on CUDA) is untested and is guarded so
that a failure of one variant is recorded in the JSON ("failed: …") and the other rows go on.

Rows (each: conilium's rate and the plain loop's rate(s), min and median over ``--repeats``
measurements in which conilium and the plain loops run in turn, their order alternating; the
ratio is conilium / plain, of the medians, of the minima and per repeat):

1. extraction, audio seconds per second: ``extract_features`` over a demo corpus of real WAV
   files (its ``ExtractStats.loop_seconds``: decoding, forward, writing the cache; no model
   loading, no normalisation statistics), against a plain loop over the same waveforms already
   in memory, padded into length-sorted batches of the same padded-audio bound: the same
   upstream's forward (``output_hidden_states``; WavLM's attention through the same fused
   ``scaled_dot_product_attention`` as conilium, so that the loops differ in the pipeline, not
   the kernel), bf16 autocast on CUDA (float32 on CPU), the cached layers copied to the host as
   float16. CUDA also: bf16 weights (no autocast), and conilium's own ``--compute-dtype
   bfloat16-weights``; with ``--compile``, the compiled model, and conilium's own
   ``extract-features --compile`` (its compilation inside its loop time). conilium's
   extraction with ``--length-buckets`` the other way round from its default (off on CUDA, on
   on CPU), to show what the few padded lengths gain or cost.
2. one head, clips/s at batch 16: ``train_head`` (preloaded; its training steps' own
   ``train_seconds``, epochs after the first) on a synthetic cache, against the plain loop of
   bench/bench_loop.py (the same head, loss and fused AdamW on batches already padded on the
   device; one warm-up epoch, then the timed ones). On CUDA ``train_head`` captures its steps
   as CUDA graphs (``--cuda-graphs auto``), and beside it runs them eagerly
   (``conilium_eager``: ``--cuda-graphs off``). CUDA also: the whole plain step (forward,
   loss, backward, AdamW ``capturable``) captured in one CUDA graph, batches padded to the
   cache's longest clip (full batches only); with ``--compile``, the compiled head.
3. Table 2 grid, clip·heads/s: ``train_heads`` with the five runs of ``--preset table2`` (one
   data pass) as one stacked module (``--stack-heads on``, what ``auto`` does on CUDA), and
   beside it one by one (``conilium_one_by_one``: ``--stack-heads off``; on CUDA also stacked
   with eager steps, ``conilium_stacked_eager``: ``--cuda-graphs off``), against the five
   plain heads stepped in turn on the same batches, eager; CUDA also: the five heads' steps
   captured in one CUDA graph.
4. fine-tuning, audio seconds per second: conilium's step (``EndToEndModel``: upstream, CNN
   frozen, the attentive head of finetune-best; AdamW from ``training.loop.make_optimizer``;
   conilium's autocast; one read-back of the loss per step, as ``FinetuneRecipe.fit_batch``
   in one process), against a plain loop (the same upstream, CNN frozen, fused attention, mean
   pooling and one linear layer, fused AdamW, ``torch.autocast`` bf16 on CUDA), the same random
   batch (16 × 8 s on CUDA), steps in turn after warm-up steps; with ``--compile``, conilium's
   step through ``finetune-best --compile``'s ``CompiledCall`` too.

Writes ``--json`` (default ``bench/results/gpu_<device>.json``): the machine, the arguments and
each row's figures; ``python bench/run_benchmarks.py --report-only`` puts it in RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
SKIPPED_CUDA = "skipped (needs CUDA)"
SKIPPED_COMPILE = "skipped (needs --compile)"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _amp(device: torch.device):
    """bf16 autocast on CUDA (fp16 where bf16 is missing), nothing on CPU: the plain loops' precision."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def _summary(values) -> dict:
    return {"rates": [round(v, 2) for v in values], "min": round(min(values), 2),
            "median": round(statistics.median(values), 2)}


def _row(unit: str, ours, plains: dict, notes: dict) -> dict:
    """A row's figures: conilium's rates, each plain variant's rates and the ratios conilium / plain."""
    row = {"unit": unit, "conilium": _summary(ours), "plain": {}}
    for name, rates in plains.items():
        if isinstance(rates, str):  # skipped or failed
            row["plain"][name] = rates
            continue
        n = min(len(ours), len(rates))
        per = [a / b for a, b in zip(ours[:n], rates[:n])]
        row["plain"][name] = {**_summary(rates),
                              "ratio_median": round(statistics.median(ours) / statistics.median(rates), 3),
                              "ratio_min": round(min(ours) / min(rates), 3),
                              "ratio_per_repeat_median": round(statistics.median(per), 3)}
    row.update(notes)
    return row


def _alternate(repeats: int, ours, plains: dict, label: str):
    """Run ``ours()`` and every plain variant ``repeats`` times, in turn, the order alternating
    (conilium first in even repeats, last in odd ones); a variant that raises is marked failed."""
    got_ours, got = [], {k: [] for k in plains}
    for r in range(repeats):
        order = [("conilium", ours)] + list(plains.items())
        if r % 2:
            order = order[1:] + order[:1]
        parts = []
        for name, fn in order:
            if name != "conilium" and isinstance(got[name], str):
                continue
            if name == "conilium":
                got_ours.append(fn())
                parts.append(f"conilium {got_ours[-1]:.1f}")
                continue
            try:
                got[name].append(fn())
                parts.append(f"{name} {got[name][-1]:.1f}")
            except Exception as e:  # noqa: BLE001 - an untested (CUDA) variant: record it, go on
                got[name] = f"failed: {type(e).__name__}: {str(e)[:300]}"
                log(f"  {label}: {name} {got[name]}")
        log(f"  {label} repeat {r + 1}: " + ", ".join(parts))
    return got_ours, got


# ------------------------------------------------------------------------------ 1. extraction
def extraction(args, device: torch.device, work: Path) -> dict:
    from conilium.audio import read_audio
    from conilium.corpus import load_corpus
    from conilium.demo import make_demo_corpus
    from conilium.extract import ExtractConfig, ExtractStats, extract_features
    from conilium.extract.encoder import use_fused_attention
    from conilium.extract.extract import DEFAULT_BATCH_SECONDS
    from conilium.extract.upstreams import load_upstream

    corpus_dir = make_demo_corpus(work / "corpus", clips=args.extract_clips, seed=0)
    weights = work / "weights"
    config = ExtractConfig(args.upstream, random_init=True, seed=0, layers=args.layers)
    stats = {}

    def conilium(folder: str, record: bool = False, runtime=None, **changes):
        """conilium's extract_features (with ``changes`` to the config, ``runtime`` options to the
        call), audio seconds per loop second."""
        def run() -> float:
            out = work / folder
            shutil.rmtree(out, ignore_errors=True)  # (random weights rebuilt in the cache each time: not in the loop)
            st = ExtractStats()
            extract_features(dataclasses.replace(config, **changes), corpus_dir, out, device=device.type,
                             batch_seconds=args.batch_seconds, workers=2, verbose=False, stats=st, **(runtime or {}))
            if record:
                stats.update(st.as_dict())
            return st.audio_seconds / st.loop_seconds
        return run

    ours = conilium("extract-cache", record=True)

    # the waveforms, in memory, as extraction reads them (8 s truncation)
    corpus = load_corpus(corpus_dir, read_durations=True)
    waves = [read_audio(corpus.audio_path(n), max_seconds=8.0) for n in sorted(corpus.clips)]
    audio_seconds = sum(len(w) for w in waves) / 16000
    bound = DEFAULT_BATCH_SECONDS[device.type] if args.batch_seconds is None else args.batch_seconds
    order = sorted(range(len(waves)), key=lambda i: -len(waves[i]))
    batches, cur = [], []
    for i in order:
        longest = len(waves[cur[0]]) if cur else len(waves[i])
        if cur and (len(cur) + 1) * longest / 16000 > bound:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    pin = device.type == "cuda"
    host = []
    for b in batches:
        n = max(len(waves[i]) for i in b)
        x = torch.zeros(len(b), n)
        mask = torch.zeros(len(b), n, dtype=torch.long)
        for k, i in enumerate(b):
            x[k, : len(waves[i])] = torch.from_numpy(np.ascontiguousarray(waves[i], dtype=np.float32))
            mask[k, : len(waves[i])] = 1
        host.append((x.pin_memory() if pin else x, mask.pin_memory() if pin else mask))

    model, _ = load_upstream(args.upstream, random_init=True, seed=0, random_root=weights)
    fused = use_fused_attention(model)
    model.to(device).eval()
    num_states = model.config.num_hidden_layers + 1
    keep = [num_states - 1] if args.layers == "last" else list(range(num_states))

    def plain(m, amp: bool):
        def run() -> float:
            sync(device)
            t0 = time.perf_counter()
            with torch.inference_mode(), (_amp(device) if amp else contextlib.nullcontext()):
                for x, mask in host:
                    x = x.to(device, non_blocking=True)
                    mask = mask.to(device, non_blocking=True)
                    if not amp and device.type == "cuda":
                        x = x.to(next(m.parameters()).dtype)
                    out = m(x, attention_mask=mask, output_hidden_states=True)
                    states = torch.stack([out.hidden_states[k] for k in keep], dim=2).to(torch.float16)
                    states.to("cpu")  # the copy back to the host (synchronous)
            sync(device)
            return audio_seconds / (time.perf_counter() - t0)
        return run

    variants = {"eager": plain(model, True)}
    notes = {"fused_attention_modules": fused}
    # length buckets the other way round from the default (auto: on CUDA only)
    buckets = device.type != "cuda"
    variants[f"conilium --length-buckets {'on' if buckets else 'off'} (not a plain loop)"] = conilium(
        "extract-cache-buckets", runtime={"length_buckets": buckets})
    if device.type == "cuda":
        bf16 = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        try:
            m16, _ = load_upstream(args.upstream, random_init=True, seed=0, random_root=weights)
            use_fused_attention(m16)
            m16.to(device=device, dtype=bf16).eval()
            variants["bf16_weights"] = plain(m16, False)
        except Exception as e:  # noqa: BLE001
            variants["bf16_weights"] = f"failed: {type(e).__name__}: {e}"
        variants["conilium --compute-dtype bfloat16-weights (not a plain loop)"] = conilium(
            "extract-cache-bf16w", compute_dtype="bfloat16-weights")
    else:
        variants["bf16_weights"] = SKIPPED_CUDA
    if args.compile:
        try:
            variants["compiled"] = plain(torch.compile(model, dynamic=True), True)
            variants["compiled"]()  # compile before the timed repeats
        except Exception as e:  # noqa: BLE001
            variants["compiled"] = f"failed: {type(e).__name__}: {str(e)[:300]}"
        # (each call compiles again: the compilation is in its loop time)
        variants["conilium --compile (not a plain loop)"] = conilium("extract-cache-compiled", compile=True)
    else:
        variants["compiled"] = SKIPPED_COMPILE
    for name, fn in list(variants.items()):
        if callable(fn) and name != "compiled" and not name.startswith("conilium"):
            fn()  # warm-up
    ours_r, plains = _alternate(args.repeats, ours, {k: v for k, v in variants.items() if callable(v)}, "extraction")
    plains.update({k: v for k, v in variants.items() if not callable(v)})
    notes.update({"upstream": args.upstream, "layers": args.layers, "clips": len(waves),
                  "audio_seconds": round(audio_seconds, 1), "batch_seconds": bound, "plain_batches": len(host),
                  "conilium_compute_dtype": stats.get("compute_dtype"),
                  "conilium_length_buckets": stats.get("length_buckets"),
                  "conilium_padding_ratio": round(stats.get("padding_ratio", float("nan")), 4),
                  "conilium_forward_fraction": round(stats.get("forward_fraction", float("nan")), 4)})
    del model
    return _row("audio s/s", ours_r, plains, notes)


# ------------------------------------------------------------------------------ heads
def _prepared(config, cache):
    from conilium.heads.prepare import prepare
    return prepare(config, cache=cache)


def _targets(data, device):
    t = np.asarray(data.train_targets)
    t = torch.as_tensor(t if np.issubdtype(t.dtype, np.integer) else t.astype(np.float32), device=device)
    w = None if data.weights is None else torch.as_tensor(np.asarray(data.weights, dtype=np.float32), device=device)
    return t, w


def _batches(cache, data, batch_size: int, device, pad_to=None):
    """The Train clips of ``data`` as (x, frames, index) batches on ``device`` (a fixed order),
    read once; ``pad_to``: every batch padded to this many frames, full batches only (a CUDA graph)."""
    from conilium.heads.batches import BatchReader
    from conilium.heads.data import ClipDataset

    ds = ClipDataset(cache, data.train_names, data.selection, None, preload=True)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
    index = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if pad_to:
        index = [b for b in index if len(b) == batch_size]
    reader = BatchReader(ds, device, max_batch=batch_size)
    out = []
    for x, n, i in reader(index):
        x = x.clone()
        if pad_to and x.shape[1] < pad_to:
            x = torch.nn.functional.pad(x, [0, 0] * (x.dim() - 2) + [0, pad_to - x.shape[1]])
        out.append((x, None if n is None else n.clone(), torch.as_tensor(i, device=device)))
    return out, len(ds)


class PlainHeads:
    """Heads, losses, targets and fused AdamW optimisers of ``configs`` (one data pass), stepped
    eagerly in turn on each batch (one loss read-back per step for all), or captured in a CUDA graph."""

    def __init__(self, configs, datas, device, compile_model: bool = False, capturable: bool = False):
        from conilium.heads.model import EmotionHead
        from conilium.heads.prepare import head_config_for
        from conilium.training.losses import loss_fn

        self.device = device
        self.parts = []
        for config, data in zip(configs, datas):
            torch.manual_seed(config.seed)
            model = EmotionHead(head_config_for(config, data.selection)).to(device).train()
            opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                    fused=True, capturable=capturable)
            t, w = _targets(data, device)
            fwd = torch.compile(model, dynamic=True) if compile_model else model
            self.parts.append((fwd, opt, loss_fn(config.loss), t, w))
        self.graph = None

    def _step(self, x, n, idx):
        losses = []
        for model, opt, fn, t, w in self.parts:
            loss = fn(model(x, n), t[idx], w)
            opt.zero_grad(set_to_none=True)  # (a CUDA graph: None before capture, its backward allocates them)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        return torch.stack(losses)

    def epoch(self, batches) -> None:
        for x, n, idx in batches:
            if self.graph is None:
                self._step(x, n, idx).tolist()  # a plain loop reads its losses back too
            else:
                self.static[0].copy_(x)
                self.static[1].copy_(n)
                self.static[2].copy_(idx)
                self.graph.replay()
                self.static_loss.tolist()

    def capture(self, batches) -> None:
        """The whole step of every head in one CUDA graph (the usual warm-up on a side stream first)."""
        x, n, idx = batches[0]
        self.static = (x.clone(), n.clone(), idx.clone())
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                self._step(*self.static)
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_loss = self._step(*self.static)
        torch.cuda.synchronize()


def _timed_epochs(plain: PlainHeads, batches, clips: int, epochs: int, heads: int, device) -> float:
    """clips·heads/s of ``epochs`` timed epochs after one warm-up epoch."""
    plain.epoch(batches)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(epochs):
        plain.epoch(batches)
    sync(device)
    return clips * epochs * heads / (time.perf_counter() - t0)


def _conilium_rate(metrics: dict, heads: int) -> float:
    """clips·heads/s of a train-head / train-heads run: its training steps after the first epoch."""
    hist = metrics["history"]
    timed = hist[1:] if len(hist) > 1 else hist
    return metrics["training"]["clips"] * len(timed) * heads / sum(h["train_seconds"] for h in timed)


def _head_variants(args, device, configs, datas, cache, label: str):
    """The plain variants of a head row: eager, CUDA graph, compiled (callables or skip notes)."""
    batches, clips = _batches(cache, datas[0], configs[0].batch_size, device)
    n = len(configs)
    epochs = args.epochs - 1
    eager = PlainHeads(configs, datas, device)
    variants = {"eager": lambda: _timed_epochs(eager, batches, clips, epochs, n, device)}
    if device.type == "cuda":
        try:
            longest = max(int(x.shape[1]) for x, _, _ in batches)
            full, _ = _batches(cache, datas[0], configs[0].batch_size, device, pad_to=longest)
            graphed = PlainHeads(configs, datas, device, capturable=True)
            graphed.capture(full)
            full_clips = len(full) * configs[0].batch_size
            variants["cuda_graph"] = lambda: _timed_epochs(graphed, full, full_clips, epochs, n, device)
        except Exception as e:  # noqa: BLE001 - untested where written
            variants["cuda_graph"] = f"failed: {type(e).__name__}: {str(e)[:300]}"
    else:
        variants["cuda_graph"] = SKIPPED_CUDA
    if args.compile and n == 1:
        try:
            comp = PlainHeads(configs, datas, device, compile_model=True)
            variants["compiled"] = lambda: _timed_epochs(comp, batches, clips, epochs, n, device)
        except Exception as e:  # noqa: BLE001
            variants["compiled"] = f"failed: {type(e).__name__}: {str(e)[:300]}"
    elif n == 1:
        variants["compiled"] = SKIPPED_COMPILE
    return variants, clips


def _split(variants):
    return ({k: v for k, v in variants.items() if callable(v)}, {k: v for k, v in variants.items() if not callable(v)})


def _cache(args, work: Path) -> Path:
    from conilium.testing import write_synthetic_cache

    path = work / "head-cache"
    if not (path / "manifest.json").is_file():
        t = time.perf_counter()
        write_synthetic_cache(path, clips=args.head_clips, dim=args.dim, stored_layers=(24,), all_layers=25,
                              frames=tuple(args.frames), seed=2, clips_per_shard=256, signal=0.3)
        log(f"  synthetic cache: {args.head_clips} clips × {args.dim} dims, frames {args.frames[0]}–"
            f"{args.frames[1]}, in {time.perf_counter() - t:.1f} s")
    return path


def one_head(args, device: torch.device, work: Path) -> dict:
    from conilium.cache.reader import FeatureCache
    from conilium.heads.config import TrainConfig
    from conilium.heads.train import train_head

    cache_dir = _cache(args, work)
    config = TrainConfig(cache=str(cache_dir), loss="wbce", labels="S", epochs=args.epochs, hidden=256,
                         pooling="attentive", layers="weighted", preload="yes", device=device.type,
                         threads=args.threads, batch_size=16)
    with FeatureCache(config.cache) as cache:
        data = _prepared(config, cache)
        variants, clips = _head_variants(args, device, [config], [data], cache, "head")
        calls, plains = _split(variants)

        def ours_with(graphs: str):
            def run() -> float:
                return _conilium_rate(train_head(replace(config, cuda_graphs=graphs), work / "head-run",
                                                 overwrite=True, progress=False), 1)
            return run

        # train-head as it runs: on CUDA its steps captured as CUDA graphs (--cuda-graphs auto);
        # beside it, the eager steps (--cuda-graphs off)
        if device.type == "cuda":
            calls = dict(calls, conilium_eager=ours_with("off"))
        ours_r, got = _alternate(args.repeats, ours_with("auto"), calls, "one head")
    got.update(plains)
    return _row("clips/s", ours_r, got, {"train_clips": clips, "batch_size": 16, "epochs": args.epochs,
                                         "timed_epochs": args.epochs - 1, "hidden": 256,
                                         "head": "attentive pooling, weighted layers, wbce on S targets"})


def grid(args, device: torch.device, work: Path) -> dict:
    from conilium.cache.reader import FeatureCache
    from conilium.heads.grid import expand_spec, load_spec
    from conilium.heads.train import plan_passes, train_heads

    cache_dir = _cache(args, work)
    runs = expand_spec(load_spec(preset="table2"), cache=cache_dir,
                       overrides={"epochs": args.epochs, "device": device.type, "preload": "yes",
                                  "threads": args.threads, "hidden": 256})
    passes = plan_passes([c for _, c, _ in runs])
    configs = [c for _, c, _ in runs]
    with FeatureCache(str(cache_dir)) as cache:
        datas = [_prepared(c, cache) for c in configs]
        if any(d.train_names != datas[0].train_names for d in datas):
            raise RuntimeError("the table2 runs do not train on the same clips")
        variants, clips = _head_variants(args, device, configs, datas, cache, "grid")
        calls, plains = _split(variants)

        def conilium(stack: str, graphs: str = "auto"):
            def run() -> float:
                res = train_heads([(replace(c, stack_heads=stack, cuda_graphs=graphs), work / "grid" / name)
                                   for name, c, _ in runs],
                                  overwrite=True, progress=False)
                bad = [r for r in res if not isinstance(r, dict)]
                if bad:
                    raise RuntimeError(f"train_heads failed: {bad[0]}")
                if (res[0]["training"].get("stacking") or {}).get("heads", 1) != (len(runs) if stack == "on" else 1):
                    raise RuntimeError(f"stack_heads={stack}: the heads were stacked otherwise: {res[0]['training']}")
                return _conilium_rate(res[0], len(runs))
            return run

        # conilium's grid as train-grid runs it: the five heads as one stacked module (--stack-heads
        # auto: on CUDA); beside it, the heads one by one (--stack-heads off)
        calls = dict(calls, conilium_one_by_one=conilium("off"))
        if device.type == "cuda":  # stacked, its steps eager (--cuda-graphs off)
            calls = dict(calls, conilium_stacked_eager=conilium("on", "off"))
        ours_r, got = _alternate(args.repeats, conilium("on"), calls, "grid")
    got.update(plains)
    return _row("clip·heads/s", ours_r, got, {"runs": [n for n, _, _ in runs], "passes": len(passes),
                                              "train_clips": clips, "epochs": args.epochs,
                                              "timed_epochs": args.epochs - 1, "hidden": 256})


# ------------------------------------------------------------------------------ 4. fine-tuning
def finetuning(args, device: torch.device, work: Path) -> dict:
    from conilium.extract.encoder import freeze_front_end, use_fused_attention
    from conilium.extract.upstreams import load_upstream
    from conilium.finetune import EndToEndModel, FinetuneConfig
    from conilium.finetune.model import default_head_config
    from conilium.heads.model import EmotionHead
    from conilium.runtime import CompiledCall, autocast, precision_dtype
    from conilium.training.loop import make_optimizer
    from conilium.training.losses import loss_fn

    warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask and attn_mask")
    weights = work / "weights"
    config = FinetuneConfig(corpus="", out="", upstream=args.upstream)
    torch.manual_seed(0)
    upstream, _ = load_upstream(args.upstream, random_init=True, seed=0, random_root=weights)
    freeze_front_end(upstream)
    torch.manual_seed(0)
    ours_model = EndToEndModel(upstream, EmotionHead(default_head_config(upstream, config))).to(device).train()
    ours_opt, opt_name = make_optimizer([p for p in ours_model.parameters() if p.requires_grad], lr=config.lr,
                                        weight_decay=config.weight_decay)
    dtype = precision_dtype("auto", device)
    fn = loss_fn("wbce")

    plain_up, _ = load_upstream(args.upstream, random_init=True, seed=0, random_root=weights)
    plain_up.freeze_feature_encoder()
    use_fused_attention(plain_up)
    plain_up.to(device).train()
    plain_head = torch.nn.Linear(plain_up.config.hidden_size, 8).to(device)
    plain_params = [p for p in list(plain_up.parameters()) + list(plain_head.parameters()) if p.requires_grad]
    plain_opt = torch.optim.AdamW(plain_params, lr=config.lr, fused=True)

    batch, n = args.ft_batch, int(args.ft_seconds * 16000)
    g = torch.Generator().manual_seed(0)
    waves = (0.1 * torch.randn(batch, n, generator=g)).to(device)
    lengths = torch.full((batch,), n, dtype=torch.long, device=device)
    targets = torch.softmax(torch.randn(batch, 8, generator=g), dim=1).to(device)
    class_w = torch.ones(8, device=device)

    def ours_step_of(forward):
        def step() -> None:  # fit_batch on one process: no read-back before backward
            with autocast(device, dtype):
                logits = forward(waves, lengths)
            loss = fn(logits.float(), targets, class_w)
            loss.backward()
            ours_opt.step()
            ours_opt.zero_grad(set_to_none=True)
            torch.stack([loss.detach().float()]).tolist()  # the loop's one read-back per step
        return step

    ours_step = ours_step_of(ours_model)

    def plain_step() -> None:
        with _amp(device):
            h = plain_up(waves).last_hidden_state
            logits = plain_head(h.mean(dim=1))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), targets)
        loss.backward()
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)
        loss.item()

    def rate(step):
        def run() -> float:
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.ft_steps):
                step()
            sync(device)
            return batch * args.ft_seconds * args.ft_steps / (time.perf_counter() - t0)
        return run

    for _ in range(args.ft_warmup):
        ours_step()
        plain_step()
    variants = {"eager": rate(plain_step)}
    if args.compile:  # finetune-best --compile: the model's forward and backward through torch.compile
        try:
            compiled_step = ours_step_of(CompiledCall(ours_model, what="the model", without="(benchmark)"))
            for _ in range(args.ft_warmup):
                compiled_step()
            variants["conilium --compile (not a plain loop)"] = rate(compiled_step)
        except Exception as e:  # noqa: BLE001
            variants["conilium --compile (not a plain loop)"] = f"failed: {type(e).__name__}: {str(e)[:300]}"
    sync(device)
    timed, untimed = _split(variants)
    ours_r, got = _alternate(args.repeats, rate(ours_step), timed, "fine-tuning")
    got.update(untimed)
    trainable = sum(p.numel() for p in ours_model.parameters() if p.requires_grad)
    return _row("audio s/s", ours_r, got, {
        "upstream": args.upstream, "batch_size": batch, "clip_seconds": args.ft_seconds,
        "steps_per_measurement": args.ft_steps, "warmup_steps": args.ft_warmup,
        "precision": "float32" if dtype == "float32" else f"{dtype} autocast",
        "conilium_optimizer": opt_name, "conilium_trainable_parameters": int(trainable),
        "plain_trainable_parameters": int(sum(p.numel() for p in plain_params))})


# ------------------------------------------------------------------------------ main
ROWS = ("extraction", "head", "grid", "finetune")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu", "auto"], default="auto")
    ap.add_argument("--small", action="store_true",
                    help="tiny sizes (demo-wavlm, 48 clips, 96-dim caches): a CPU smoke check")
    ap.add_argument("--compile", action="store_true", help="also the torch.compile variants of the plain loops")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"which rows (default: {','.join(ROWS)})")
    ap.add_argument("--repeats", type=int, default=None, help="measurements per row (default 3)")
    ap.add_argument("--upstream", default=None, help="registry name, random init (default wavlm-large; --small demo-wavlm)")
    ap.add_argument("--layers", default="last", help="extraction: layers cached (last or all)")
    ap.add_argument("--extract-clips", type=int, default=None, help="demo clips extracted (default 256; --small 48)")
    ap.add_argument("--batch-seconds", type=float, default=None, help="extraction's padded-audio bound (its default)")
    ap.add_argument("--head-clips", type=int, default=None, help="synthetic cache clips (default 1000; --small 600)")
    ap.add_argument("--dim", type=int, default=None, help="synthetic cache width (default 1024; --small 96)")
    ap.add_argument("--frames", type=int, nargs=2, default=None, help="frames a clip (default 150 400; --small 40 120)")
    ap.add_argument("--epochs", type=int, default=None, help="head epochs, the first untimed (default 4; --small 3)")
    ap.add_argument("--ft-batch", type=int, default=None, help="fine-tuning clips a step (default 16; --small 2)")
    ap.add_argument("--ft-seconds", type=float, default=None, help="fine-tuning clip length (default 8; --small 4)")
    ap.add_argument("--ft-steps", type=int, default=None, help="fine-tuning steps a measurement (default 10; --small 3)")
    ap.add_argument("--ft-warmup", type=int, default=2, help="untimed fine-tuning steps of each loop")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; --small on CPU: 1)")
    ap.add_argument("--workdir", type=Path, default=None, help="where corpus, caches and weights go (temp)")
    ap.add_argument("--json", type=Path, default=None, help="default bench/results/gpu_<device>.json")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    small = args.small
    defaults = dict(repeats=(3, 3), upstream=("demo-wavlm", "wavlm-large"), extract_clips=(48, 256),
                    head_clips=(600, 1000), dim=(96, 1024), frames=([40, 120], [150, 400]), epochs=(3, 4),
                    ft_batch=(2, 16), ft_seconds=(4.0, 8.0), ft_steps=(3, 10))
    for k, (s, full) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, s if small else full)
    if args.epochs < 2:
        ap.error("--epochs: at least 2 (the first is not timed)")
    if args.threads is None and small and device.type == "cpu":
        # one thread: on a small shared CPU, conilium's thread-invariant layers (which switch to
        # one thread and back around each small op when torch has more) make 2-thread timings erratic
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = set(rows) - set(ROWS)
    if unknown:
        ap.error(f"--rows: unknown {', '.join(sorted(unknown))}; choose from {', '.join(ROWS)}")
    out_path = args.json or HERE / "results" / f"gpu_{device.type}.json"
    t_start = time.perf_counter()
    res = {"bench": "gpu",
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "device": device.type,
                       "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                       "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                       "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS"), "python": platform.python_version()},
           "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "command": " ".join(["python", "bench/bench_gpu.py", *(sys.argv[1:] if argv is None else argv)]),
           "rows": {}}
    work = Path(tempfile.mkdtemp(prefix="bench_gpu_", dir=args.workdir))
    funcs = {"extraction": extraction, "head": one_head, "grid": grid, "finetune": finetuning}
    try:
        for name in ROWS:
            if name not in rows:
                continue
            t = time.perf_counter()
            log(f"== {name} ({device.type})")
            try:
                res["rows"][name] = funcs[name](args, device, work)
            except Exception as e:  # noqa: BLE001 - one row's failure leaves the others
                res["rows"][name] = {"failed": f"{type(e).__name__}: {str(e)[:500]}"}
                log(f"  {name} failed: {res['rows'][name]['failed']}")
            res["rows"][name]["seconds"] = round(time.perf_counter() - t, 1)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    res["goals"] = goals(res)
    print_table(res)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(res, indent=2) + "\n")
    log(f"written to {out_path}")
    return res


#: The GPU targets this benchmark is measured against (one H100/H200-class card, batch 16):
#: (row, what, unit, target); "conilium" is the row's own median, "ratio" its median over the
#: plain fused loop's, "best option" the fastest of conilium's --compute-dtype bfloat16-weights and
#: --compile variants.
GOALS = (("extraction", "ratio", "× the plain fused forward", 0.8),
         ("extraction", "conilium", "audio s/s", 3000.0),
         ("extraction", "best option", "audio s/s (bf16 weights or --compile)", 4000.0),
         ("head", "conilium", "clips/s", 20000.0),
         ("grid", "conilium", "clip·heads/s", 30000.0),
         ("finetune", "conilium", "audio s/s", 1500.0))


def goals(res: dict) -> list:
    """Each of :data:`GOALS` with what was measured and whether it is met (None: not measured)."""
    out = []
    for row_name, what, unit, target in GOALS:
        row = res["rows"].get(row_name) or {}
        value = None
        if "conilium" in row:
            if what == "conilium":
                value = row["conilium"]["median"]
            elif what == "ratio":
                plain = row["plain"].get("eager")
                value = plain.get("ratio_median") if isinstance(plain, dict) else None
            else:
                options = [v["median"] for k, v in row["plain"].items()
                           if isinstance(v, dict) and k.startswith(("conilium --compute-dtype", "conilium --compile"))]
                value = max(options) if options else None
        out.append({"row": row_name, "what": what, "unit": unit, "target": target,
                    "measured": None if value is None else round(float(value), 3),
                    "met": None if value is None else bool(value >= target)})
    return out


def print_table(res: dict) -> None:
    m = res["machine"]
    print(f"conilium / plain loop on {m['gpu'] or 'cpu'} (torch {m['torch']}, {m['torch_threads']} threads), "
          f"{res['args']['repeats']} repeats, {res['wall_seconds']:.0f} s in all")
    print(f"{'row':<11} {'unit':<13} {'conilium (min/median)':>22}  {'plain variant':<13} "
          f"{'plain (min/median)':>20}  {'ratio (median)':>14}")
    for name, row in res["rows"].items():
        if "failed" in row:
            print(f"{name:<11} failed: {row['failed']}")
            continue
        c = row["conilium"]
        first = True
        for var, p in row["plain"].items():
            lead = (f"{name:<11} {row['unit']:<13} {c['min']:>10.1f}/{c['median']:<11.1f}" if first
                    else " " * 48)
            first = False
            if isinstance(p, str):
                print(f"{lead}  {var:<13} {p}")
            else:
                print(f"{lead}  {var:<13} {p['min']:>9.1f}/{p['median']:<10.1f}  {p['ratio_median']:>14.3f}")
    where = "" if m["device"] == "cuda" else " (targets for a GPU: on a CPU they only show the wiring)"
    print(f"targets{where}:")
    for g in res.get("goals", []):
        verdict = "not measured" if g["met"] is None else ("met" if g["met"] else "NOT met")
        got = "—" if g["measured"] is None else f"{g['measured']:,.1f}"
        print(f"  {g['row']:<11} {g['what']:<12} {got:>12} / {g['target']:,.1f} {g['unit']}: {verdict}")


if __name__ == "__main__":
    main()

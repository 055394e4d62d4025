"""What the one training loop costs: train-head's epochs through conilium.training.loop against
a plain PyTorch loop doing the same steps on the same tensors, in one process, in turn.

    python bench/bench_loop.py [--clips 600] [--dim 256] [--epochs 4] [--repeats 5] [--device cpu] [--threads 1]

Both train the same head (attentive pooling, weighted layers, WBCE on S targets, fused AdamW,
batch 16) on the Train clips of a synthetic cache (conilium.testing), preloaded. The plain
loop gets its batches already padded and on the device (``BatchReader`` once, outside the
timing), so it measures model + loss + optimiser only; conilium's figure is train-head's own
``train_seconds`` (training steps, not the Development scoring). Prints clips/s of each and
their ratio, min and median over ``--repeats`` alternating measurements (the machine is
shared: compare within one run). Set OPENBLAS_NUM_THREADS=1 on a 2-core machine.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def plain_loop(cache, config, device, epochs: int) -> float:
    """Clips per second of a plain loop over the same head, loss and optimiser."""
    from conilium.heads.batches import BatchReader
    from conilium.heads.data import ClipDataset
    from conilium.heads.model import EmotionHead
    from conilium.heads.prepare import head_config_for, prepare
    from conilium.training.loop import make_optimizer
    from conilium.training.losses import loss_fn

    data = prepare(config, cache=cache)
    ds = ClipDataset(cache, data.train_names, data.selection, None, preload=True)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
    index = [order[i:i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    reader = BatchReader(ds, device, max_batch=config.batch_size)
    batches = [(x.clone(), None if n is None else n.clone(), torch.as_tensor(i, device=device))
               for x, n, i in reader(index)]
    torch.manual_seed(config.seed)
    model = EmotionHead(head_config_for(config, data.selection)).to(device).train()
    opt, _ = make_optimizer(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    fn = loss_fn(config.loss)
    targets = torch.as_tensor(np.asarray(data.train_targets, dtype=np.float32), device=device)
    weights = torch.as_tensor(data.weights, device=device)
    t0 = time.perf_counter()
    for _ in range(epochs):
        for x, n, idx in batches:
            loss = fn(model(x, n), targets[idx], weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss.item()  # a plain loop reads its loss back too
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(ds) * epochs / (time.perf_counter() - t0)


def conilium_loop(config, out: Path) -> float:
    """Clips per second of train-head's training steps (its own timing of them)."""
    from conilium.heads.train import train_head

    m = train_head(config, out, overwrite=True, progress=False)
    steps = sum(h["train_seconds"] for h in m["history"])
    return m["training"]["clips"] * len(m["history"]) / steps


def main(argv=None) -> None:
    from conilium.cache.reader import FeatureCache
    from conilium.heads.config import TrainConfig
    from conilium.testing import write_synthetic_cache

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", type=int, default=600)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads of both loops")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_synthetic_cache(root / "cache", clips=args.clips, dim=args.dim, frames=(100, 300), seed=0)
        config = TrainConfig(cache=str(root / "cache"), loss="wbce", labels="S", epochs=args.epochs, hidden=256,
                             preload="yes", device=args.device, threads=args.threads)
        ours, plain = [], []
        with FeatureCache(config.cache) as cache:
            for r in range(args.repeats):
                ours.append(conilium_loop(config, root / "run"))
                plain.append(plain_loop(cache, config, device, args.epochs))
                print(f"repeat {r + 1}: conilium {ours[-1]:8.1f} clips/s, plain loop {plain[-1]:8.1f} clips/s, "
                      f"ratio {ours[-1] / plain[-1]:.3f}")
    ratios = [a / b for a, b in zip(ours, plain)]
    print(f"conilium's loop / plain loop, clips/s: min {min(ratios):.3f}, median {statistics.median(ratios):.3f} "
          f"({args.repeats} repeats, {args.clips} clips x {args.dim} dims, {args.epochs} epochs, {device})")


if __name__ == "__main__":
    main()

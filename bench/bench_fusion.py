"""Audio only, text only and audio + text fusion heads on the same clips: Development macro-F1.

    python bench/bench_fusion.py --audio CACHE --text CACHE [--out DIR] [--epochs 40] [--seed 0] [--device cpu]

Trains four train-head runs with the same options (WBCE on S targets, attentive pooling,
weighted layers, train-head's defaults otherwise): on the audio cache, on the text cache, a
fusion head on both (the audio cache primary) and its cross-attention variant, and prints
each run's Development macro-F1 and training time. On the demo corpus (random-weight upstreams, synthetic words) the figures show
the pipeline working; they say nothing of what text adds on MSP-Podcast.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--audio", required=True, help="audio feature cache (extract-features)")
    p.add_argument("--text", required=True, help="text feature cache of the same clips")
    p.add_argument("--out", default=None, help="where the runs go (default: a temporary folder)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    from conilium.heads.train import TrainConfig, train_head

    out = Path(args.out or tempfile.mkdtemp(prefix="bench-fusion-"))
    common = dict(loss="wbce", labels="S", epochs=args.epochs, seed=args.seed, device=args.device)
    runs = {"audio": TrainConfig(cache=args.audio, **common),
            "text": TrainConfig(cache=args.text, **common),
            "fusion": TrainConfig(cache=args.audio, more_caches=(args.text,), **common),
            "cross": TrainConfig(cache=args.audio, more_caches=(args.text,), fusion="cross-attention", **common)}
    print(f"{'run':8s} {'dev macro-F1':>12s} {'best epoch':>10s} {'seconds':>8s}")
    for name, config in runs.items():
        t = time.time()
        m = train_head(config, out / name, overwrite=True, progress=False)
        print(f"{name:8s} {m['f1_macro']:12.4f} {m['best_epoch']:10d} {time.time() - t:8.1f}")
    print(f"runs in {out}")


if __name__ == "__main__":
    main()

"""An untrained finetune-best model directory of the demo-wavlm upstream, for tests and benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional


def write_demo_model_dir(root, *, max_seconds: float, normalize: Mapping, offsets: Optional[Mapping] = None,
                         seed: int = 0) -> Path:
    """Write ``root/model``: demo-wavlm with seeded random weights (saved in ``root/weights``) and
    an untrained attentive head (hidden 32, no dropout, torch seed ``seed``), through the same
    :func:`~conilium.finetune.model.save_model_dir` as finetune-best, with ``max_seconds``,
    ``normalize`` (e.g. ``{"mode": "utterance"}``) and the decision ``offsets``; returns its path."""
    import torch

    from conilium.extract.upstreams import load_upstream
    from conilium.finetune.model import EndToEndModel, save_model_dir
    from conilium.heads.model import EmotionHead, HeadConfig

    root = Path(root)
    upstream, identity = load_upstream("demo-wavlm", random_init=True, random_root=root / "weights")
    torch.manual_seed(seed)
    model = EndToEndModel(upstream, EmotionHead(HeadConfig(dim=96, layers=0, hidden=32, dropout=0.0)))
    return save_model_dir(root / "model", model, {
        "max_seconds": max_seconds, "normalize": dict(normalize), "offsets": dict(offsets or {}), "loss": "wbce",
        "labels": "S", "upstream": identity})

"""Fixtures for tests and benchmarks: complete on-disk artefacts built without a corpus or an upstream.

:func:`write_synthetic_cache` writes a feature cache of random frames with a class signal,
through the same writer as extract-features; :func:`write_demo_model_dir` an untrained
finetune-best model directory of demo-wavlm. The package sits above every stage (it writes
caches) and no stage imports it.
"""

from .cache import write_synthetic_cache
from .model import write_demo_model_dir

__all__ = ["write_demo_model_dir", "write_synthetic_cache"]

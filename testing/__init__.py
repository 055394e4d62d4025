"""Fixtures for tests and benchmarks: complete on-disk artefacts built without a corpus or an upstream.

:func:`write_synthetic_cache` writes a feature cache of random frames with a class signal,
through the same writer as extract-features. The package sits above every stage (it writes
caches) and no stage imports it.
"""

from .cache import write_synthetic_cache

__all__ = ["write_synthetic_cache"]

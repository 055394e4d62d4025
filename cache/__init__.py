"""The versioned HDF5 feature cache: writing it (:class:`CacheWriter`), reading it (:class:`FeatureCache`),
telling what a directory is (:func:`check_cache_dir`), upgrading an older format (:func:`upgrade_cache`)."""

from .store import FORMAT_VERSION, FeatureCache, check_cache_dir, load_manifest, not_a_cache, write_shard  # noqa: F401
from .upgrade import upgrade_cache  # noqa: F401
from .writer import CacheWriter  # noqa: F401

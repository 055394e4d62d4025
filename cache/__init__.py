"""The versioned HDF5 feature cache: writing it (:class:`CacheWriter`), reading it (:class:`FeatureCache`)."""

from .store import FORMAT_VERSION, FeatureCache, load_manifest, write_shard  # noqa: F401
from .writer import CacheWriter  # noqa: F401

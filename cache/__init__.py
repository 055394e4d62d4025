"""Stage-1 output: the versioned HDF5 feature cache (:class:`FeatureCache`)."""

from .store import FeatureCache, load_manifest, write_shard  # noqa: F401

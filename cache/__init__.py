"""The versioned HDF5 feature cache: the shard format (:mod:`.shards`), writing a cache
(:class:`CacheWriter`, :mod:`.writer`), reading it (:class:`FeatureCache`, :mod:`.reader`),
upgrading an older format (:func:`upgrade_cache`). The directory itself, its manifest and
what kind of directory a path is are :class:`conilium.dirs.CacheDir` and :func:`conilium.dirs.dir_kind`.

Layout of a cache directory::

    manifest.json        settings, upstream identity, corpus fingerprint, normalisation
                         statistics, skipped clips, shards + checksums, the clips.json
                         checksum, and last its own checksum (written last)
    extraction.json      the same settings, written when extraction starts
    clips.json           every clip's metadata and annotations, its shard and frame count
                         (noise-augmented copies ``<FileName>#aug<k>`` add "source" and
                         "augmentation")
    upstream/            the upstream's weights when they were made here (--random-init)
    shards/shard-00000.h5 …
    shards/shard-00000.json  sidecar of a finished shard (its clips, checksum, settings key)

Hidden-state indices (``manifest["layers"]``): 0 is the input of the first transformer
layer (projected CNN features plus positional convolution), ``i`` the output of layer
``i``, and the last one the model's ``last_hidden_state``.
"""

from conilium.dirs import check_cache_dir, not_a_cache  # noqa: F401

from .reader import FeatureCache, load_manifest  # noqa: F401
from .shards import FORMAT_VERSION, write_shard  # noqa: F401
from .upgrade import upgrade_cache  # noqa: F401
from .writer import CacheWriter  # noqa: F401

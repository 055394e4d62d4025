"""Stage 1: upstream registry, planning and extract-features.

The names below load their module on first use, so that importing a light module of
the package (:mod:`.registry`, which ``extract-features --help`` reads) loads neither
torch, transformers nor h5py.
"""

from conilium.util import lazy_exports

#: The package's names → the module that defines them.
_EXPORTS = {
    "extract_features": ".extract",
    "ExtractStats": ".pipeline",
    "ExtractConfig": ".plan",
    "NoiseAugmentation": ".plan",
    "parse_layers": ".plan",
    "VerifyReport": ".verify",
    "verify_cache": ".verify",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

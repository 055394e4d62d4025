"""Stage 1: upstream registry, planning and extract-features.

The names below load their module on first use, so that importing a light module of
the package (:mod:`.registry`, which ``extract-features --help`` reads) loads neither
torch, transformers nor h5py.
"""

import importlib

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


def __getattr__(name):
    # PEP 562: a name above loads its module on first use
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))

"""End-to-end fine-tuning (``finetune-best``) and prediction on new audio (``predict``).

The upstream's one forward (:class:`conilium.extract.encoder.UpstreamEncoder`) and a
pooling head (:mod:`conilium.heads.model`) trained together on the audio:
:mod:`.config` (what defines a run), :mod:`.model` (the model and its directory),
:mod:`.data` (audio batches and batch plans), :mod:`.warmstart` (starting points),
:mod:`.train` (prepare → build → fit → export) and :mod:`.predict`; the commands are
:mod:`conilium.cli.finetune`.

The names below load their module on first use, so that importing :mod:`.config`
(which ``finetune-best --help`` reads) does not load torch.
"""

import importlib

#: The package's names → the module that defines them.
_EXPORTS = {
    "FinetuneConfig": ".config",
    "EndToEndModel": ".model",
    "load_model_dir": ".model",
    "save_model_dir": ".model",
    "Predictor": ".predict",
    "finetune": ".train",
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

"""End-to-end fine-tuning (``finetune-best``) and prediction on new audio (``predict``).

The upstream's one forward (:class:`conilium.extract.encoder.UpstreamEncoder`) and a
pooling head (:mod:`conilium.heads.model`) trained together on the audio:
:mod:`.config` (what defines a run), :mod:`.model` (the model and its directory),
:mod:`.data` (audio batches and batch plans), :mod:`.warmstart` (starting points),
:mod:`.train` (prepare → build → fit → export), :mod:`.predict` (its results and writers, without
torch, in :mod:`.results`), :mod:`.onnx` (ONNX export) and :mod:`.onnx_predict` (onnxruntime,
without torch); the commands are
:mod:`conilium.cli.finetune`.

The names below load their module on first use, so that importing :mod:`.config`
(which ``finetune-best --help`` reads) does not load torch.
"""

from conilium.util import lazy_exports

#: The package's names → the module that defines them.
_EXPORTS = {
    "FinetuneConfig": ".config",
    "EndToEndModel": ".model",
    "load_model_dir": ".model",
    "save_model_dir": ".model",
    "Predictor": ".predict",
    "OnnxPredictor": ".onnx_predict",
    "export_onnx": ".onnx",
    "finetune": ".train",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

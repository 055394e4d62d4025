"""End-to-end fine-tuning (``finetune-best``) and prediction on new audio (``predict``).

The upstream's one forward (:class:`conilium.extract.encoder.UpstreamEncoder`) and a
pooling head (:mod:`conilium.heads.model`) trained together on the audio:
:mod:`.config` (what defines a run), :mod:`.model` (the model and its directory),
:mod:`.data` (audio batches and batch plans), :mod:`.warmstart` (starting points),
:mod:`.train` (prepare → build → fit → export), :mod:`.predict` and :mod:`.cli`.
"""

from .config import FinetuneConfig  # noqa: F401
from .model import EndToEndModel, load_model_dir, save_model_dir  # noqa: F401
from .predict import Predictor  # noqa: F401
from .train import finetune  # noqa: F401

"""``predict --onnx``: an exported model (:mod:`.onnx`) run with onnxruntime, without torch.

>>> from conilium.finetune.onnx_predict import OnnxPredictor
>>> OnnxPredictor("models/best.onnx").predict(["a.wav", "b.flac"])

The graph's ``conilium`` metadata says everything predict needs besides the graph: how the
audio is read (truncation, normalisation, rescaling of loud float files), the fewest samples
the upstream takes, the classes, attribute columns and decision offsets. Inputs go through
the same planning, signal path, length-sorted batches and results as
:class:`~conilium.finetune.predict.Predictor` (:mod:`.results`), so the outputs have the same
rows and columns. Nothing here imports torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
from tqdm import tqdm

from conilium.audio import SignalPath
from conilium.classes import class_names
from conilium.errors import AudioError, ConfigError

from .results import FilePrediction, fill_predictions, length_batches, plan_inputs, read_clip

#: the metadata_props key holding the model's description (JSON)
META_KEY = "conilium"
#: the version of that description
ONNX_FORMAT = 1
_NEEDED = ("classes", "attributes", "offsets", "signal", "min_samples", "outputs")


def _session(path: Path, providers: Optional[Sequence[str]] = None):
    """An onnxruntime session of ``path``; a file that is missing or not a valid ONNX model is an
    error naming it."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError("predict --onnx needs onnxruntime: pip install 'conilium[onnx]'") from None
    if not path.is_file():
        raise ConfigError(f"--onnx {path}: file not found")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # onnxruntime's own warnings (e.g. about unused initialisers) stay quiet
    try:
        return ort.InferenceSession(str(path), sess_options=opts,
                                    providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as e:  # onnxruntime raises its own exception types for a damaged file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--onnx {path}: not a readable ONNX model ({first[:300]}); export it again with "
                          f"conilium finetune export") from None


def _metadata_of(session, path: Path) -> dict:
    props = session.get_modelmeta().custom_metadata_map
    if META_KEY not in props:
        raise ConfigError(f"--onnx {path}: no '{META_KEY}' metadata (classes, decision offsets, how to read the "
                          f"audio); only models written by conilium finetune export can be run")
    try:
        meta = json.loads(props[META_KEY])
    except ValueError as e:
        raise ConfigError(f"--onnx {path}: its '{META_KEY}' metadata is not valid JSON ({e})") from None
    missing = [k for k in _NEEDED if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ConfigError(f"--onnx {path}: its '{META_KEY}' metadata lacks {', '.join(missing)}; export it again "
                          f"with conilium finetune export")
    if int(meta.get("format", 0)) > ONNX_FORMAT:
        raise ConfigError(f"--onnx {path}: written by a newer conilium (metadata format {meta.get('format')}); "
                          f"upgrade conilium")
    return meta


def read_metadata(path) -> dict:
    """The ``conilium`` metadata of an exported model, with a clear error when it has none."""
    path = Path(path)
    return _metadata_of(_session(path), path)


def providers_for(device: str) -> list:
    """onnxruntime's execution providers for ``--device`` (auto: CUDA when onnxruntime has it; cuda:N
    that GPU)."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in have:
            raise ConfigError(f"--device {device}: this onnxruntime has no CUDA provider (install onnxruntime-gpu)")
        index = device.partition(":")[2]
        if index:  # cuda:N
            if not index.isdigit():
                raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, not {device!r}")
            return [("CUDAExecutionProvider", {"device_id": int(index)}), "CPUExecutionProvider"]
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "auto":
        return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in have else []) + ["CPUExecutionProvider"]
    raise ConfigError(f"--device must be auto, cpu or cuda, not {device!r}")


class OnnxPredictor:
    """An exported model (``conilium finetune export``) that predicts files in length-sorted batches
    with onnxruntime; options and results as :class:`~conilium.finetune.predict.Predictor`'s."""

    def __init__(self, path, *, device: str = "auto", batch_size: int = 8, max_seconds: Optional[float] = None,
                 rescale_loud: Optional[bool] = None, max_whole_seconds: float = 120.0):
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"--onnx {self.path}: file not found")
        self.session = _session(self.path, providers_for(device))
        self.info = meta = _metadata_of(self.session, self.path)
        self.classes = tuple(meta["classes"])
        # exports before class names were recorded: MSP-Podcast's for its eight, else the codes
        self.class_names = tuple(meta.get("class_names") or class_names(self.classes))
        self.attributes = tuple(meta["attributes"])
        self.offsets = np.asarray(meta["offsets"], dtype=np.float64)
        if len(self.offsets) != len(self.classes):
            raise ConfigError(f"--onnx {self.path}: {len(self.offsets)} decision offsets for {len(self.classes)} "
                              f"classes in its metadata")
        self.outputs = list(meta["outputs"])
        have = [o.name for o in self.session.get_outputs()]
        if sorted(have) != sorted(self.outputs):
            raise ConfigError(f"--onnx {self.path}: the graph's outputs {have} are not those its metadata names "
                              f"({self.outputs})")
        self.batch_size = max(1, int(batch_size))
        sig = meta["signal"]
        ms = sig.get("max_seconds") if max_seconds is None else max_seconds
        self.signal = SignalPath(max_seconds=float(ms) if ms else None, normalize=sig.get("normalize", "none"),
                                 stats=sig.get("stats"),
                                 rescale_loud=bool(sig.get("rescale_loud")) if rescale_loud is None
                                 else bool(rescale_loud))
        self.max_seconds = self.signal.max_seconds
        self.max_whole_seconds = float(max_whole_seconds)
        self._min_samples = int(meta["min_samples"])

    def scores(self, waves: Sequence[np.ndarray]) -> np.ndarray:
        """Class scores then attribute values (float64, one row per waveform) of one batch."""
        lengths = np.array([len(w) for w in waves], dtype=np.int64)
        x = np.zeros((len(waves), int(lengths.max())), dtype=np.float32)
        for i, w in enumerate(waves):
            x[i, : len(w)] = w
        got = dict(zip([o.name for o in self.session.get_outputs()],
                       self.session.run(None, {"waves": x, "lengths": lengths})))
        return np.concatenate([got[name].astype(np.float64) for name in self.outputs], axis=1)

    def predict(self, inputs: Sequence, *, progress: bool = False) -> List[FilePrediction]:
        """Results in the order of ``inputs`` (paths, or waveforms in memory as for
        :meth:`Predictor.predict <conilium.finetune.predict.Predictor.predict>`)."""
        plan = plan_inputs(inputs, self.classes, class_set_names=self.class_names, max_seconds=self.max_seconds,
                           max_whole_seconds=self.max_whole_seconds)
        results = plan.results
        scores = {}
        batches = length_batches(plan.todo, plan.seconds, self.batch_size)
        for batch in tqdm(batches, desc="predicting", unit="batch", disable=not progress, leave=False):
            ok, waves = [], []
            for i in batch:
                try:
                    x, peak = read_clip(self.signal, Path(plan.names[i]), None, wave=plan.waves[i],
                                        min_samples=self._min_samples)
                except AudioError as e:
                    results[i].error = e.reason
                    continue
                results[i].peak = peak
                ok.append(i)
                waves.append(x)
            if ok:
                scores.update(zip(ok, self.scores(waves)))
        fill_predictions(results, scores, self.classes, self.offsets, self.attributes)
        return results

    def predict_segments(self, inputs: Sequence, segment: str = "vad", **options):
        """Each audio file of ``inputs`` cut into segments and each segment predicted
        (:func:`~conilium.finetune.segments.segment_and_predict`, its options)."""
        from .segments import segment_and_predict

        return segment_and_predict(self, inputs, segment, **options)

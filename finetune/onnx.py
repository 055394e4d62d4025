"""ONNX export: a finetune-best model, or a train-head run on its cache's upstream, as one graph.

``conilium finetune export MODEL --onnx OUT.onnx`` (or ``--run RUN``) writes one ONNX graph
from zero-padded 16 kHz waveforms to what ``predict`` reports:

* inputs ``waves`` (float32, ``[batch, samples]``, each clip zero-padded to the longest)
  and ``lengths`` (int64, ``[batch]``, each clip's samples), both axes dynamic;
* outputs ``probabilities`` (float32, ``[batch, classes]``: sigmoid or softmax, as the
  loss sees them) and, for a model that predicts them, ``attributes`` (``[batch, 3]``:
  arousal, valence, dominance on the corpus's 1–7 scale).

The graph is the model's own forward (:class:`ExportGraph`): the upstream through the one
:class:`~conilium.extract.encoder.UpstreamEncoder` made traceable (no length read back into
Python; a group-normalised CNN normalises each clip over its own frames), the hidden
states the head reads (the chosen layers, or every layer's mean and standard deviation over
the clip's frames for a ``--pooled-stats`` head), then the head, in float32. What ``predict``
needs besides lives in the model's ``metadata_props`` under ``conilium`` (JSON: classes,
attribute columns, decision offsets, truncation, normalisation and reading of the audio, the
fewest samples the upstream takes, where the model came from, and the check below), so
:mod:`.onnx_predict` runs it with onnxruntime alone.

The export is checked before the file appears: onnxruntime runs the graph on batches of
different sizes and clip lengths (zero-padded, clips of different lengths in one batch) and
its outputs are compared with PyTorch's prediction of the same clips; the export fails, and
writes nothing, when a probability differs by more than :data:`PROBABILITY_TOLERANCE` or an
attribute by more than :data:`ATTRIBUTE_TOLERANCE`.

Only the wav2vec 2.0 family (WavLM, wav2vec 2.0, HuBERT) is exported; a Whisper upstream is
refused with a message saying so.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

import conilium
from conilium import SAMPLE_RATE
from conilium.errors import ConfigError, ConiliumError
from conilium.heads.audio import Loaded, RunModel, load_run
from conilium.heads.predict import predict_batches
from conilium.runtime import valid_mask
from conilium.targets import from_unit
from conilium.training.losses import activation
from conilium.util import atomic_path

from .model import EndToEndModel
from .onnx_predict import META_KEY, ONNX_FORMAT, read_metadata
from .predict import load_model_source, min_samples

#: onnxruntime's probabilities may differ from PyTorch's by at most this (absolute) ...
PROBABILITY_TOLERANCE = 1e-4
#: ... and its attributes (1–7 scale) by at most this, or the export fails
ATTRIBUTE_TOLERANCE = 1e-3
#: the ONNX operator set the graph is written with
OPSET = 17
#: the batches the export is checked on: each clip's length in samples (16 kHz), padded to the longest
CHECK_BATCHES: Tuple[Tuple[int, ...], ...] = ((24000, 16800, 9600), (32000,), (7200, 20000))


class ExportGraph(nn.Module):
    """``(waves, lengths)`` → ``(probabilities[, attributes])`` of a model, traceable for any batch
    size and length.

    ``encoder`` is the model's :class:`~conilium.extract.encoder.UpstreamEncoder` (made traceable
    here), ``head`` its head; ``layers`` the hidden states the head reads (``kind="frames"``), or
    for ``kind="pooled"`` the positions (None: all) of the per-layer statistics it reads, computed
    as extraction computes them for the cache (mean and standard deviation over valid frames).
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, *, loss: str, num_classes: int, attributes: int,
                 kind: str = "frames", layers: Optional[Sequence[int]] = None,
                 positions: Optional[Sequence[int]] = None):
        super().__init__()
        encoder.make_traceable()
        self.encoder = encoder
        self.head = head
        self.kind = kind
        self.layers = tuple(int(i) for i in layers) if layers is not None else (encoder.last,)
        self.positions = None if positions is None else [int(i) for i in positions]
        self.sigmoid = activation(loss) == "sigmoid"
        self.num_classes = int(num_classes)
        self.attributes = int(attributes)

    @property
    def output_names(self) -> List[str]:
        return (["probabilities"] if self.num_classes else []) + (["attributes"] if self.attributes else [])

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor):
        if self.kind == "pooled":
            states, frames = self.encoder.hidden_states(waves, lengths, range(self.encoder.num_hidden_states))
            m = valid_mask(frames, states.shape[1])[:, :, None, None].to(states.dtype)
            n = m.sum(dim=1)
            mean = (states * m).sum(dim=1) / n
            var = (((states - mean[:, None]) ** 2) * m).sum(dim=1) / n
            pooled = torch.stack([mean, var.sqrt()], dim=2)  # (B, L, 2, D), as the cache holds them
            if self.positions is not None:
                pooled = pooled[:, self.positions]
            logits = self.head(pooled.flatten(2))
        else:
            states, frames = self.encoder.hidden_states(waves, lengths, self.layers)
            logits = self.head(states, frames)
        out = []
        c = self.num_classes
        if c:
            z = logits[:, :c]
            out.append(torch.sigmoid(z) if self.sigmoid else torch.softmax(z, dim=1))
        if self.attributes:
            out.append(from_unit(logits[:, c:].clamp(0.0, 1.0)))
        return tuple(out) if len(out) > 1 else out[0]


def export_graph(loaded: Loaded) -> ExportGraph:
    """The :class:`ExportGraph` of what ``predict`` would run (a model directory's or a run's model)."""
    model = loaded.model
    nc, na = len(loaded.classes), len(loaded.attributes)
    if model.encoder.whisper_input is not None:
        raise ConfigError("ONNX export takes a wav2vec 2.0-family upstream (WavLM, wav2vec 2.0, HuBERT); this model's "
                          "upstream is a Whisper encoder, which is not exported")
    if isinstance(model, EndToEndModel):
        return ExportGraph(model.encoder, model.head, loss=loaded.loss, num_classes=nc, attributes=na,
                           layers=model.layers)
    if isinstance(model, RunModel):
        if model.pooled:
            return ExportGraph(model.encoder, model.head, loss=loaded.loss, num_classes=nc, attributes=na,
                               kind="pooled", positions=model.positions)
        return ExportGraph(model.encoder, model.head, loss=loaded.loss, num_classes=nc, attributes=na,
                           layers=model.upstream_layers)
    raise ConfigError(f"cannot export a {type(model).__name__}")


def check_inputs(batches: Sequence[Sequence[int]] = CHECK_BATCHES, *, seed: int = 0,
                 least: int = 0) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Zero-padded batches of seeded test signals (a few tones in noise, unit variance): ``(waves,
    lengths)`` per batch, every clip at least ``least`` samples."""
    rng = np.random.default_rng(seed)
    out = []
    for sizes in batches:
        sizes = [max(int(n), int(least)) for n in sizes]
        waves = np.zeros((len(sizes), max(sizes)), dtype=np.float32)
        for i, n in enumerate(sizes):
            t = np.arange(n) / SAMPLE_RATE
            x = sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi)) for f in rng.uniform(80, 2000, 4))
            x = x + rng.normal(0.0, 0.5, n)
            waves[i, :n] = (x / x.std()).astype(np.float32)
        out.append((waves, np.array(sizes, dtype=np.int64)))
    return out


def _torch_scores(loaded: Loaded, waves: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """PyTorch's scores of one batch, through predict's own loop (class scores, then attributes)."""
    batch = [((torch.from_numpy(waves), torch.from_numpy(lengths)), list(range(len(lengths))))]
    got = predict_batches(loaded.model, batch, loaded.loss, device=torch.device("cpu"), dtype="float32")
    return np.stack([got[i] for i in range(len(lengths))])


def compare(session, loaded: Loaded, inputs: Sequence[Tuple[np.ndarray, np.ndarray]]) -> Dict[str, float]:
    """Largest absolute difference between onnxruntime's and PyTorch's probabilities and attributes
    over ``inputs``."""
    c = len(loaded.classes)
    diff = {"probabilities": 0.0, "attributes": 0.0}
    names = [o.name for o in session.get_outputs()]
    for waves, lengths in inputs:
        want = _torch_scores(loaded, waves, lengths)
        got = dict(zip(names, session.run(None, {"waves": waves, "lengths": lengths})))
        if c:
            diff["probabilities"] = max(diff["probabilities"],
                                        float(np.max(np.abs(got["probabilities"].astype(np.float64) - want[:, :c]))))
        if loaded.attributes:
            diff["attributes"] = max(diff["attributes"],
                                     float(np.max(np.abs(got["attributes"].astype(np.float64) - want[:, c:]))))
    return diff


def _metadata(loaded: Loaded, *, source: dict, least: int, frame_rate: float, outputs: List[str]) -> dict:
    s = loaded.signal
    return {
        "format": ONNX_FORMAT,
        "conilium_version": conilium.__version__,
        "source": source,
        "classes": list(loaded.classes),
        "class_names": list(loaded.class_names),
        "attributes": list(loaded.attributes),
        "offsets": [float(v) for v in loaded.offsets],
        "loss": loaded.loss,
        "activation": activation(loaded.loss),
        "sample_rate": SAMPLE_RATE,
        "signal": {"max_seconds": s.max_seconds, "normalize": s.normalize,
                   "stats": None if s.stats is None else {k: float(v) for k, v in dict(s.stats).items()},
                   "rescale_loud": bool(s.rescale_loud)},
        "min_samples": int(least),
        "frame_rate": float(frame_rate),
        "inputs": {"waves": "float32 [batch, samples], zero-padded", "lengths": "int64 [batch], samples"},
        "outputs": outputs,
    }


def export_onnx(out, *, model_dir=None, run=None, check: bool = True, opset: int = OPSET,
                tolerance: float = PROBABILITY_TOLERANCE, attribute_tolerance: float = ATTRIBUTE_TOLERANCE) -> dict:
    """Write the ONNX graph of a finetune-best model directory (``model_dir``) or a train-head run
    (``run``, on its cache's upstream) to ``out`` and return its metadata (with ``check``: the
    largest differences from PyTorch, the tolerances and the export's seconds).

    The file appears only once written and checked: a difference above the tolerance is a
    :class:`~conilium.errors.ConiliumError` giving both numbers, and leaves nothing at ``out``.
    """
    import onnx
    import onnxruntime as ort

    if (model_dir is None) == (run is None):
        raise ConfigError("export a finetune-best model directory or a train-head run: give one of the two")
    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise ConfigError(f"--onnx {out}: the file name must end in .onnx")
    t0 = time.perf_counter()
    cpu = torch.device("cpu")
    if run is None:
        loaded = load_model_source(model_dir, device=cpu, precision="float32")
        source = {"kind": "model", "path": str(model_dir), "upstream": loaded.info.get("upstream_family")}
    else:
        loaded = load_run(run, device=cpu, precision="float32")
        source = {"kind": "run", "path": str(run), "head_run": loaded.info.get("head_run"),
                  "offsets_from": loaded.info.get("offsets_from"),
                  "upstream": {k: v for k, v in (loaded.info.get("upstream") or {}).items()
                               if isinstance(v, (str, int, float, bool)) or v is None}}
    least = min_samples(loaded.model)
    graph = export_graph(loaded).eval()
    meta = _metadata(loaded, source=source, least=least, frame_rate=loaded.model.encoder.frame_rate,
                     outputs=graph.output_names)
    inputs = check_inputs(least=least)
    example = tuple(torch.from_numpy(a) for a in inputs[0])
    dynamic = {"waves": {0: "batch", 1: "samples"}, "lengths": {0: "batch"}}
    dynamic.update({name: {0: "batch"} for name in graph.output_names})
    with atomic_path(out, suffix=".onnx.tmp") as tmp:
        with warnings.catch_warnings(), torch.no_grad():
            # the tracer warns about each Python-side check it freezes (a clip too short, layer lists)
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(graph, example, str(tmp), input_names=["waves", "lengths"],
                                  output_names=graph.output_names, dynamic_axes=dynamic, opset_version=opset,
                                  dynamo=False, do_constant_folding=True)
            except (RuntimeError, TypeError, ValueError, torch.onnx.errors.OnnxExporterError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ConiliumError(f"{out}: torch.onnx.export cannot export the {source['kind']} {source['path']} "
                                    f"({first[:300]}); nothing written") from e
        proto = onnx.load(str(tmp))
        seconds = time.perf_counter() - t0
        if check:
            session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
            diff = compare(session, loaded, inputs)
            meta["check"] = {"batches": [list(map(int, lengths)) for _, lengths in inputs],
                             "max_abs_diff_probabilities": diff["probabilities"],
                             "max_abs_diff_attributes": diff["attributes"],
                             "tolerance_probabilities": tolerance, "tolerance_attributes": attribute_tolerance}
            if diff["probabilities"] > tolerance or diff["attributes"] > attribute_tolerance:
                raise ConiliumError(
                    f"{out}: the ONNX graph does not reproduce the PyTorch model: largest difference "
                    f"{diff['probabilities']:.3g} in the probabilities (tolerance {tolerance:g}) and "
                    f"{diff['attributes']:.3g} in the attributes (tolerance {attribute_tolerance:g}) on test "
                    f"batches of {meta['check']['batches']} samples; nothing written")
        meta["export_seconds"] = round(seconds, 3)
        onnx.helper.set_model_props(proto, {META_KEY: json.dumps(meta)})
        proto.producer_name = "conilium"
        proto.producer_version = conilium.__version__
        proto.doc_string = (f"conilium {source['kind']} {source['path']}: waves [batch, samples] float32 16 kHz "
                            f"zero-padded + lengths [batch] int64 -> {', '.join(graph.output_names)}; metadata "
                            f"'{META_KEY}' (JSON) says how to read audio and decide")
        onnx.save(proto, str(tmp))
    read_metadata(out)  # what predict --onnx will read back
    return meta

"""predict: emotion probabilities of audio files, from a finetune-best model directory or
from a train-head run.

>>> from conilium.finetune.predict import Predictor
>>> results = Predictor("models/wavlm-wbce-S").predict(["a.wav", "b.flac"])
>>> results[0].prediction, results[0].probabilities
>>> Predictor(run="runs/wbce-S").predict(["a.wav"])        # a head trained on a feature cache

Any file soundfile reads is accepted: other sample rates are resampled to 16 kHz,
several channels are averaged, and the audio is truncated and normalised as in
training (the model directory, or the cache the run's head was trained on, says how),
through the same signal path, upstream forward and prediction loop as training's
scoring. The predicted emotion is ``argmax(probabilities + offsets)`` with the decision
offsets tuned on the development set (a model directory's; a run's when it is the
output of ``conilium-eval tune-thresholds``; all zero otherwise). A file that cannot be
read, or is too short for the upstream, gets an error instead of a prediction; the
others are still predicted.

Both kinds of source come down to one :class:`Loaded`: a module callable on
``(waves, lengths)`` that returns logits, the signal path, classes, decision offsets and
loss. A run whose head predicts the attributes (``train-head --task attributes|joint``)
gives them too: ``EmoAct, EmoVal, EmoDom`` on the corpus's 1–7 scale, after the class
columns (an attributes-only run has no class columns and no Prediction).

For a run, that module is :class:`RunModel`: the upstream its cache names, run as
extraction ran it (:class:`~conilium.extract.encoder.UpstreamRunner`: the run's
hidden-state layers, or every layer's mean and standard deviation over frames for a
``--pooled-stats`` head, in the cache's compute dtype), then the run's head.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, TextIO, Tuple

import numpy as np
import soundfile as sf
import torch
from torch import nn
from torch.utils.data import DataLoader

from conilium import CLASSES
from conilium.audio import SignalPath
from conilium.dirs import CacheDir, Manifest, ModelDir, RunDir
from conilium.errors import AudioError, ConfigError, ConiliumError
from conilium.extract.encoder import hidden_shape
from conilium.heads.predict import predict_batches
from conilium.runtime import COMPUTE_DTYPES, resolve_device
from conilium.runtime import compute_dtype as pick_compute_dtype
from conilium.util import atomic_path, read_json

from .config import precision_dtype
from .data import AudioClips, collate_waves
from .model import load_model_dir, offsets_array

OUTPUT_FORMATS = ("csv", "json")
#: Decision offsets of a run written by ``conilium-eval tune-thresholds`` (:mod:`conilium.evaluate.thresholds`,
#: which sits above this stage: the file is read, the module is not imported).
THRESHOLDS_FILE = RunDir.THRESHOLDS


def min_samples(model: nn.Module) -> int:
    """The fewest samples for which the upstream (``model.encoder``) outputs a frame."""
    n = 1
    while model.encoder.frames_for(n) < 1:
        n *= 2
    lo, hi = n // 2, n
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if model.encoder.frames_for(mid) >= 1 else (mid, hi)
    return hi


def predict_clips(model: nn.Module, dataset: AudioClips, indices: Sequence[int], loss: str, *,
                  device: torch.device, batch_size: int, precision: str = "auto", num_workers: int = 0,
                  progress: bool = False, desc: str = "predicting",
                  on_error: Optional[Callable[[int, AudioError], None]] = None) -> Dict[int, np.ndarray]:
    """Class scores (sigmoid or softmax, as the loss sees them) of dataset items ``indices``,
    in batches of clips of similar duration. A clip that cannot be read stops it, unless
    ``on_error(index, error)`` takes it."""
    dur = dataset.durations
    order = sorted(indices, key=lambda i: (0.0 if dur is None else float(dur[i]), i))
    batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate_waves, num_workers=num_workers)

    def inputs():
        for waves, lengths, idx, errors in loader:
            for i, error in errors:
                if on_error is None:
                    raise ConiliumError(str(error))
                on_error(i, error)
            if idx:
                yield (waves, lengths), idx

    return predict_batches(model, inputs(), loss, device=device, dtype=precision_dtype(precision, device),
                           progress=progress, desc=desc, total=len(batches))


@dataclass
class FilePrediction:
    """One file's result: class probabilities and predicted letter, or the reason it failed."""

    file: str
    probabilities: Optional[np.ndarray] = None
    prediction: Optional[str] = None
    error: Optional[str] = None
    #: arousal, valence, dominance (corpus scale) for a model that predicts them
    attributes: Optional[np.ndarray] = None

    @property
    def ok(self) -> bool:
        return self.error is None


# ----------------------------------------------------------------------------- what is predicted with

@dataclass
class Loaded:
    """What :class:`Predictor` predicts with, whatever it was loaded from.

    ``model`` maps zero-padded waveforms (B, N) and their lengths in samples to logits
    (B, classes), in eval mode on the device; ``signal`` reads files as in training;
    ``offsets`` are added to the probabilities before the argmax; ``precision`` is the
    prediction loop's (:func:`~conilium.finetune.config.precision_dtype`); ``info``
    describes the source (a model directory's ``conilium_model.json``, or the run, its
    head run, its upstream and where its offsets come from).
    """

    model: nn.Module
    signal: SignalPath
    classes: Tuple[str, ...]
    offsets: np.ndarray
    loss: str
    precision: str = "auto"
    info: dict = field(default_factory=dict)
    #: attribute columns the model outputs after its class scores (empty: none)
    attributes: Tuple[str, ...] = ()


def load_model_source(model_dir, *, device: torch.device, precision: str = "auto") -> Loaded:
    """A finetune-best model directory: its end-to-end model, truncation, normalisation and offsets."""
    model, info = load_model_dir(model_dir, device=device)
    norm = info["normalize"]
    ms = info["max_seconds"]
    signal = SignalPath(max_seconds=float(ms) if ms else None, normalize=norm["mode"], stats=norm.get("stats"),
                        # models written before the option read audio as False does
                        rescale_loud=bool(info.get("rescale_loud", False)))
    return Loaded(model, signal, tuple(info["classes"]), offsets_array(info), info["loss"], precision, info)


class RunModel(nn.Module):
    """A train-head run's head on the upstream of the cache it was trained on.

    The upstream runs as extraction ran it for the cache: through
    :class:`~conilium.extract.encoder.UpstreamRunner` (the one upstream forward,
    :class:`~conilium.extract.encoder.UpstreamEncoder`, in ``compute_dtype``), giving the
    hidden states ``upstream_layers`` (``kind="frames"``) or, for a ``--pooled-stats``
    head (``kind="pooled"``), every hidden state's mean and standard deviation over the
    clip's frames, of which the head reads ``positions`` (None: all), as it read them
    from the cache. The head then runs in float32. Only the rounding of the frames the
    cache stores (float16 by default) differs from what the head saw in training.
    """

    def __init__(self, upstream: nn.Module, head: nn.Module, *, kind: str, upstream_layers: Sequence[int],
                 positions: Optional[Sequence[int]] = None, device: Optional[torch.device] = None,
                 compute_dtype: str = "float32", whisper_input: str = "30s"):
        super().__init__()
        from conilium.extract.encoder import UpstreamRunner

        if kind not in ("frames", "pooled"):
            raise ConfigError(f"unknown head input {kind!r}; expected frames or pooled")
        self.pooled = kind == "pooled"
        self.upstream_layers = [int(i) for i in upstream_layers]
        self.positions = None if positions is None else [int(i) for i in positions]
        # a pooled-statistics head reads no frames: one layer's are kept, and dropped
        device = torch.device("cpu") if device is None else device
        self.runner = UpstreamRunner(upstream, device=device, compute_dtype=compute_dtype,
                                     layers=[0] if self.pooled else self.upstream_layers, pooled_stats=self.pooled,
                                     whisper_input=whisper_input)
        self.encoder = self.runner.encoder  # a submodule: moved, switched to eval, asked for frame counts
        self.encoder.check_layers(self.upstream_layers)
        self.head = head.to(device)

    @property
    def attribute_outputs(self) -> int:
        """The head's attribute outputs (the last columns of the output; 0: none)."""
        return int(getattr(self.head, "attribute_outputs", 0) or 0)

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        device = waves.device
        counts = [int(n) for n in lengths.tolist()]
        out = self.runner([waves[i, :n].detach().float().cpu().numpy() for i, n in enumerate(counts)])
        if self.pooled:
            p = np.stack([pooled for _, pooled in out])  # (B, all hidden states, 2, D), as the cache holds them
            if self.positions is not None:
                p = p[:, self.positions]
            x = torch.from_numpy(np.ascontiguousarray(p.reshape(p.shape[0], p.shape[1], -1), dtype=np.float32))
            return self.head(x.to(device))
        frames = [f for f, _ in out]  # (T_i, len(upstream_layers), D) each
        n = torch.tensor([len(f) for f in frames], dtype=torch.long)
        x = torch.zeros((len(frames), int(n.max()), *frames[0].shape[1:]), dtype=torch.float32)
        for i, f in enumerate(frames):
            x[i, : len(f)] = torch.from_numpy(f)
        return self.head(x.to(device), n.to(device))


def find_head_run(run_dir) -> Tuple[Path, Optional[Path]]:
    """The train-head run holding the head of ``run_dir`` (itself, or the run a
    ``conilium-eval tune-thresholds`` output was tuned from, followed through
    ``source_run``), and the ``thresholds.json`` whose offsets apply (``run_dir``'s, or None)."""
    run_dir = Path(run_dir)
    where = f"--run {run_dir}"
    if not run_dir.is_dir():
        raise ConfigError(f"{where}: directory not found")
    if ModelDir(run_dir).is_model():
        raise ConfigError(f"{where}: a finetune-best model directory; predict with --model {run_dir}")
    run = RunDir(run_dir)
    thresholds = run.thresholds_path if run.thresholds_path.is_file() else None
    here, seen = run_dir, []
    while not RunDir(here).has_checkpoint():
        seen.append(here.resolve())
        config = RunDir(here).config()  # no or a damaged config.json: a RunError naming it
        kind, source = config.get("kind"), config.get("source_run")
        if kind == "thresholds" and source:
            nxt = Path(source)
            if not nxt.is_dir():
                raise ConfigError(f"{where}: tuned from run {source}, which is not there any more (the head is "
                                  f"in that run's {RunDir.CHECKPOINT})")
            if nxt.resolve() in seen:
                raise ConfigError(f"{where}: its source runs form a loop ({' -> '.join(map(str, seen))})")
            here = nxt
            continue
        what = {"ensemble": "an ensemble of runs, with no single head to apply (predict with its member runs)",
                "finetune": "a finetune-best run (predict with --model on its model directory)"}.get(
                    kind, f"not a finished train-head run (no {RunDir.CHECKPOINT})")
        raise ConfigError(f"{where}: {here} is {what}" if here != run_dir else f"{where}: {what}")
    return here, thresholds


def read_offsets(path, classes: Sequence[str]) -> np.ndarray:
    """The decision offsets of a ``thresholds.json``, in the order of ``classes``."""
    try:
        data = read_json(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read the decision offsets ({e})") from None
    offsets = data.get("offsets") if isinstance(data, dict) else None
    if not isinstance(offsets, dict):
        raise ConfigError(f"{path}: no 'offsets' (class -> offset); rerun conilium-eval tune-thresholds")
    missing = [c for c in classes if c not in offsets]
    if missing:
        raise ConfigError(f"{path}: no decision offset for class(es) {', '.join(missing)}")
    try:
        return np.array([float(offsets[c]) for c in classes], dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"{path}: decision offsets must be numbers") from None


def _run_cache(head_run: Path, ckpt: Mapping) -> Optional[str]:
    cache = (ckpt.get("train_config") or {}).get("cache") or RunDir(head_run).cache
    return str(cache) if cache else None


def load_run_upstream(head_run: Path, ckpt: Mapping, where: str) -> Tuple[nn.Module, dict]:
    """The upstream the run's cache was extracted with (its manifest's identity): from the hub at
    the recorded revision, the local directory, or the random weights kept in the cache's
    ``upstream/`` folder. Its weights hash must equal the recorded one, when one was recorded."""
    from conilium.extract.upstreams import load_upstream, random_init_dir

    UPSTREAM_DIR = CacheDir.UPSTREAM
    ident = Manifest(ckpt.get("cache_manifest") or {}).upstream
    source = ident.get("source")
    if source == "hub":
        name = ident.get("model_id") or ident.get("name")
        model, got = load_upstream(str(name), revision=ident.get("revision"))
        place = f"{name}" + (f" at revision {ident['revision']}" if ident.get("revision") else "")
    elif source == "local":
        path = ident.get("path")
        if not path or not Path(path).is_dir():
            raise ConfigError(f"{where}: the cache was extracted with the local upstream {path}, which is not "
                              f"there any more")
        model, got = load_upstream(str(path))
        place = str(path)
    elif source == "random-init":
        cache = _run_cache(head_run, ckpt)
        rel = ident.get("path") or (f"{UPSTREAM_DIR}/"
                                    f"{random_init_dir(str(ident.get('name')), int(ident.get('seed', 0)), '.').name}")
        folder = Path(cache or ".") / rel
        if not cache or not (folder / "config.json").is_file():
            raise ConfigError(f"{where}: the head was trained on features of a randomly initialised "
                              f"{ident.get('name')} (seed {ident.get('seed')}), whose weights are kept in the "
                              f"cache's {UPSTREAM_DIR}/ folder; {folder} is not there (the run names cache "
                              f"{cache}: predict from where train-head ran, with the cache in place)")
        model, got = load_upstream(str(folder))
        place = str(folder)
    else:
        raise ConfigError(f"{where}: the cache manifest in {RunDir(head_run).checkpoint_path} names no upstream "
                          f"({ident or 'nothing'}); cannot tell which upstream to run")
    want, have = ident.get("weights_sha256"), got.get("weights_sha256")
    if want and have and want != have:
        raise ConfigError(f"{where}: the upstream weights at {place} (sha256 {have[:12]}…) are not those the "
                          f"cache was extracted with ({want[:12]}…); the head was trained on features of other "
                          f"weights (was the cache's upstream replaced?)")
    return model, dict(ident, loaded_from=place)


def load_run(run_dir, *, device: torch.device, precision: str = "auto") -> Loaded:
    """A train-head run (or its ``tune-thresholds`` output): its head on the upstream, signal
    path and layers of the cache it was trained on, and its decision offsets when tuned.

    ``precision`` "auto" runs the upstream in the cache's compute dtype (float32 on CPU);
    "float32" or "bfloat16" choose it. The head always runs in float32, as train-head scored it.
    """
    from conilium.heads.train import load_head

    run_dir = Path(run_dir)
    where = f"--run {run_dir}"
    head_run, thresholds = find_head_run(run_dir)
    head, ckpt = load_head(head_run)
    manifest = Manifest(ckpt.get("cache_manifest") or {})
    inp = ckpt.get("input") or {}
    layers = [int(i) for i in inp.get("upstream_layers") or []]
    if inp.get("kind") not in ("frames", "pooled") or not layers:
        raise ConfigError(f"{where}: {RunDir(head_run).checkpoint_path} does not say which upstream layers the head "
                          f"read; train the head again with this version of train-head")
    upstream, ident = load_run_upstream(head_run, ckpt, where)
    if head.config.dim != hidden_shape(upstream)[1]:
        raise ConfigError(f"{where}: head width {head.config.dim} differs from the hidden size "
                          f"{hidden_shape(upstream)[1]} of upstream {ident.get('loaded_from')}")
    stored = manifest.compute_dtype
    if precision == "auto":
        compute = pick_compute_dtype(stored if stored in COMPUTE_DTYPES else "auto", device, strict=False)
    else:
        compute = precision_dtype(precision, device)
    model = RunModel(upstream, head, kind=inp["kind"], upstream_layers=layers, positions=inp.get("positions"),
                     device=device, compute_dtype=compute,
                     whisper_input=manifest.whisper_input or "30s").to(device).eval()
    n_states = manifest.num_hidden_states
    if n_states is not None and n_states != model.encoder.num_hidden_states:
        raise ConfigError(f"{where}: the cache's upstream has {n_states} hidden states, "
                          f"{ident.get('loaded_from')} has {model.encoder.num_hidden_states}")
    from conilium.targets import ATTRIBUTE_COLUMNS

    classes = tuple(ckpt.get("classes") or CLASSES) if head.config.num_classes else ()
    attributes = tuple(ATTRIBUTE_COLUMNS) if model.attribute_outputs else ()
    offsets = read_offsets(thresholds, classes) if thresholds else np.zeros(len(classes))
    mode = manifest.normalize
    signal = SignalPath(max_seconds=manifest.max_seconds, normalize=mode,
                        stats=manifest.normalize_stats if mode == "global" else None,
                        rescale_loud=manifest.rescale_loud)
    info = {"run": str(run_dir), "head_run": str(head_run), "offsets_from": None if thresholds is None
            else str(thresholds), "upstream": ident, "input": inp, "compute_dtype": compute,
            "loss": ckpt.get("loss"), "labels": ckpt.get("labels")}
    # the head as train-head scored it: float32, whatever the upstream computed in
    return Loaded(model, signal, classes, offsets, ckpt["loss"], "float32", info, attributes)


# ----------------------------------------------------------------------------- the predictor

class Predictor:
    """A finetune-best model directory (``model_dir``) or a train-head run (``run``) that
    predicts files in length-sorted batches, one code path for both (:class:`Loaded`).

    ``max_seconds`` None truncates as in training (the model's, or the run's cache's); 0
    reads whole files. ``rescale_loud`` None reads audio as in training (float audio at
    integer scale refused, or rescaled when the model or cache was made with
    ``rescale_loud``); True or False decides here.
    """

    def __init__(self, model_dir=None, *, run=None, device: str = "auto", batch_size: int = 8,
                 max_seconds: Optional[float] = None, precision: str = "auto", num_workers: int = 0,
                 rescale_loud: Optional[bool] = None):
        if (model_dir is None) == (run is None):
            raise ConfigError("predict from a finetune-best model directory or from a train-head run: give one "
                              "of the two")
        self.device = resolve_device(device)
        loaded = (load_model_source(model_dir, device=self.device, precision=precision) if run is None
                  else load_run(run, device=self.device, precision=precision))
        self.loaded = loaded
        self.model = loaded.model
        self.info = loaded.info
        self.classes = loaded.classes
        self.attributes = loaded.attributes
        self.offsets = loaded.offsets
        self.loss = loaded.loss
        self.batch_size = max(1, int(batch_size))
        base = loaded.signal
        ms = base.max_seconds if max_seconds is None else max_seconds
        self.signal = SignalPath(max_seconds=float(ms) if ms else None, normalize=base.normalize, stats=base.stats,
                                 rescale_loud=base.rescale_loud if rescale_loud is None else bool(rescale_loud))
        self.max_seconds = self.signal.max_seconds
        self.precision = loaded.precision
        self.num_workers = num_workers
        self._min_samples = min_samples(self.model)

    def _seconds(self, path: str) -> float:
        """Duration as read (truncated), from the header; 0 when unreadable (the read reports it)."""
        try:
            info = sf.info(path)
            seconds = info.frames / info.samplerate
        except Exception:
            return 0.0
        return min(seconds, self.max_seconds) if self.max_seconds else seconds

    def predict(self, files: Sequence, *, progress: bool = False) -> List[FilePrediction]:
        """Results in the order of ``files``."""
        files = [str(f) for f in files]
        results: List[FilePrediction] = [FilePrediction(f) for f in files]
        ds = AudioClips(files, [None] * len(files), signal=self.signal,
                        durations=[self._seconds(f) for f in files], min_samples=self._min_samples)

        def failed(i: int, error: AudioError) -> None:
            results[i].error = error.reason

        scores = predict_clips(self.model, ds, range(len(files)), self.loss, device=self.device,
                               batch_size=self.batch_size, precision=self.precision, num_workers=self.num_workers,
                               progress=progress, on_error=failed)
        c = len(self.classes)
        for i, p in scores.items():
            if c:
                results[i].probabilities = p[:c]
                results[i].prediction = self.classes[int(np.argmax(p[:c] + self.offsets))]
            if self.attributes:
                results[i].attributes = p[c:]
        return results


def read_list(path) -> List[str]:
    """Audio paths of a list file: one per line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ConfigError(f"--list {path}: cannot read ({e.strerror or e})") from None
    return [s.strip() for s in lines if s.strip() and not s.strip().startswith("#")]


def output_format(path) -> str:
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in OUTPUT_FORMATS:
        raise ConfigError(f"--out {path}: the file name must end in .csv or .json (it picks the format)")
    return suffix


def write_csv(f: TextIO, results: Iterable[FilePrediction], classes: Sequence[str],
              attributes: Sequence[str] = ()) -> None:
    """``FileName``, one probability column per class, ``Prediction``, the attribute columns
    (``EmoAct, EmoVal, EmoDom``, for a model that predicts them), ``Error`` (empty when
    predicted). A model without classes has no class columns and no ``Prediction``."""
    w = csv.writer(f)
    w.writerow(["FileName", *classes, *(["Prediction"] if classes else []), *attributes, "Error"])
    for r in results:
        row = [r.file]
        if classes:
            row += [f"{v:.6f}" for v in r.probabilities] if r.ok else [""] * len(classes)
            row.append(r.prediction or "")
        if attributes:
            row += [f"{v:.6f}" for v in r.attributes] if r.ok else [""] * len(attributes)
        w.writerow([*row, r.error or ""])


def to_json(results: Iterable[FilePrediction], classes: Sequence[str], attributes: Sequence[str] = ()) -> list:
    out = []
    for r in results:
        item = {"file": r.file}
        if classes:
            item["probabilities"] = (None if not r.ok else
                                     {c: round(float(v), 6) for c, v in zip(classes, r.probabilities)})
            item["prediction"] = r.prediction
        if attributes:
            item["attributes"] = None if not r.ok else {a: round(float(v), 6) for a, v in zip(attributes, r.attributes)}
        item["error"] = r.error
        out.append(item)
    return out


def write_results(out, results: Sequence[FilePrediction], classes: Sequence[str],
                  attributes: Sequence[str] = ()) -> None:
    """Write CSV or JSON by the suffix of ``out``, atomically."""
    fmt = output_format(out)
    with atomic_path(out, suffix=f".{fmt}.tmp") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            if fmt == "csv":
                write_csv(f, results, classes, attributes)
            else:
                json.dump(to_json(results, classes, attributes), f, indent=2)
                f.write("\n")


def results_csv(results: Sequence[FilePrediction], classes: Sequence[str], attributes: Sequence[str] = ()) -> str:
    buf = io.StringIO()
    write_csv(buf, results, classes, attributes)
    return buf.getvalue()

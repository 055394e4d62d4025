"""A train-head run applied to audio: its head on the upstream, layers, truncation and
normalisation of the cache it was trained on (:func:`load_run`), as :class:`Loaded`, the
one shape of what ``predict`` predicts with (a finetune-best model directory comes down to
it too, :func:`conilium.finetune.predict.load_model_source`).

For a run, the model is :class:`RunModel`: the upstream its cache names, run as extraction
ran it, then the head on the hidden states it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from conilium.audio import SignalPath
from conilium.classes import class_names as names_of_classes
from conilium.dirs import CacheDir, ModelDir, RunDir
from conilium.errors import ConfigError
from conilium.extract.encoder import hidden_shape
from conilium.runtime import COMPUTE_DTYPES, precision_dtype
from conilium.runtime import compute_dtype as pick_compute_dtype
from conilium.util import read_json

from .outputs import HeadCheckpoint, load_head


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
    #: a fusion run's model (:class:`FusionRunModel`) also takes each clip's transcript
    needs_text: bool = False
    #: the names of ``classes`` (not given: :func:`~conilium.classes.class_names` of the codes alone)
    class_names: Tuple[str, ...] = ()

    def __post_init__(self):
        if not self.class_names:
            self.class_names = names_of_classes(self.classes)


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
                "stack": "a stacking of runs, with no single head to apply (predict with its member runs)",
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


def _run_cache(head_run: Path, ckpt: HeadCheckpoint) -> Optional[str]:
    return ckpt.cache or RunDir(head_run).cache


def upstream_dtype(manifest, precision: str, device: torch.device) -> str:
    """The dtype a cache's upstream runs in to predict: ``precision`` "auto", the cache's own
    compute dtype (extraction's bfloat16 weights: autocast; float32 on CPU), else ``precision``."""
    if precision != "auto":
        return precision_dtype(precision, device)
    stored = manifest.compute_dtype
    return pick_compute_dtype(stored if stored in COMPUTE_DTYPES else "auto", device, strict=False)


def load_run_upstream(head_run: Path, ckpt: HeadCheckpoint, where: str) -> Tuple[nn.Module, dict]:
    """The upstream the run's cache was extracted with (its manifest's identity): from the hub at
    the recorded revision, the local directory, or the random weights kept in the cache's
    ``upstream/`` folder. Its weights hash must equal the recorded one, when one was recorded."""
    ident = ckpt.cache_manifest.upstream
    if ckpt.cache_manifest.text:
        raise ConfigError(f"{where}: the head was trained on a text upstream's cache ({ident.get('name')}: features "
                          f"of the clips' transcripts, one frame per token); it cannot predict from audio")
    return load_cache_upstream(ckpt.cache_manifest, _run_cache(head_run, ckpt), where,
                               RunDir(head_run).checkpoint_path)


def load_cache_upstream(manifest, cache: Optional[str], where: str, checkpoint) -> Tuple[nn.Module, dict]:
    """The audio upstream a cache (its ``manifest``, at path ``cache``) was extracted with: see
    :func:`load_run_upstream`."""
    from conilium.extract.upstreams import load_upstream

    ident = manifest.upstream
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
        folder = random_init_folder(ident, cache, where)
        model, got = load_upstream(str(folder))
        place = str(folder)
    else:
        raise ConfigError(f"{where}: the cache manifest in {checkpoint} names no upstream "
                          f"({ident or 'nothing'}); cannot tell which upstream to run")
    want, have = ident.get("weights_sha256"), got.get("weights_sha256")
    if want and have and want != have:
        raise ConfigError(f"{where}: the upstream weights at {place} (sha256 {have[:12]}…) are not those the "
                          f"cache was extracted with ({want[:12]}…); the head was trained on features of other "
                          f"weights (was the cache's upstream replaced?)")
    return model, dict(ident, loaded_from=place)


def random_init_folder(ident: dict, cache: Optional[str], where: str) -> Path:
    """The cache's ``upstream/`` folder holding the random weights it was extracted with."""
    from conilium.extract.upstreams import random_init_dir

    UPSTREAM_DIR = CacheDir.UPSTREAM
    rel = ident.get("path") or (f"{UPSTREAM_DIR}/"
                                f"{random_init_dir(str(ident.get('name')), int(ident.get('seed', 0)), '.').name}")
    folder = Path(cache or ".") / rel
    if not cache or not (folder / "config.json").is_file():
        raise ConfigError(f"{where}: the head was trained on features of a randomly initialised "
                          f"{ident.get('name')} (seed {ident.get('seed')}), whose weights are kept in the "
                          f"cache's {UPSTREAM_DIR}/ folder; {folder} is not there (the run names cache "
                          f"{cache}: predict from where train-head ran, with the cache in place)")
    return folder


def load_run(run_dir, *, device: torch.device, precision: str = "auto", fusion: bool = False) -> Loaded:
    """A train-head run (or its ``tune-thresholds`` output): its head on the upstream, signal
    path and layers of the cache it was trained on, and its decision offsets when tuned.

    ``precision`` "auto" runs the upstream in the cache's compute dtype (float32 on CPU);
    "float32" or "bfloat16" choose it. The head always runs in float32, as train-head scored it.

    A fusion run (``fusion=True`` only: other readers, e.g. the ONNX export, refuse it) gives a
    :class:`FusionRunModel` (:func:`load_fusion_run`), which also takes each clip's tokens.
    """
    run_dir = Path(run_dir)
    where = f"--run {run_dir}"
    head_run, thresholds = find_head_run(run_dir)
    head, ckpt = load_head(head_run, fusion=fusion)
    if ckpt.branches:
        return load_fusion_run(run_dir, head_run, thresholds, head, ckpt, device=device, precision=precision)
    manifest, inp, layers = ckpt.cache_manifest, ckpt.input, ckpt.upstream_layers
    if inp.get("kind") not in ("frames", "pooled") or not layers:
        raise ConfigError(f"{where}: {RunDir(head_run).checkpoint_path} does not say which upstream layers the head "
                          f"read; train the head again with this version of train-head")
    upstream, ident = load_run_upstream(head_run, ckpt, where)
    if head.config.dim != hidden_shape(upstream)[1]:
        raise ConfigError(f"{where}: head width {head.config.dim} differs from the hidden size "
                          f"{hidden_shape(upstream)[1]} of upstream {ident.get('loaded_from')}")
    compute = upstream_dtype(manifest, precision, device)
    model = RunModel(upstream, head, kind=inp["kind"], upstream_layers=layers, positions=inp.get("positions"),
                     device=device, compute_dtype=compute,
                     whisper_input=manifest.whisper_input or "30s").to(device).eval()
    n_states = manifest.num_hidden_states
    if n_states is not None and n_states != model.encoder.num_hidden_states:
        raise ConfigError(f"{where}: the cache's upstream has {n_states} hidden states, "
                          f"{ident.get('loaded_from')} has {model.encoder.num_hidden_states}")
    from conilium.targets import ATTRIBUTE_COLUMNS

    classes = tuple(ckpt.classes) if head.config.num_classes else ()
    attributes = tuple(ATTRIBUTE_COLUMNS) if model.attribute_outputs else ()
    offsets = read_offsets(thresholds, classes) if thresholds else np.zeros(len(classes))
    mode = manifest.normalize
    signal = SignalPath(max_seconds=manifest.max_seconds, normalize=mode,
                        stats=manifest.normalize_stats if mode == "global" else None,
                        rescale_loud=manifest.rescale_loud)
    info = {"run": str(run_dir), "head_run": str(head_run), "offsets_from": None if thresholds is None
            else str(thresholds), "upstream": ident, "input": inp, "compute_dtype": compute,
            "loss": ckpt.loss, "labels": ckpt.labels}
    # the head as train-head scored it: float32, whatever the upstream computed in
    return Loaded(model, signal, classes, offsets, ckpt.loss, "float32", info, attributes,
                  class_names=names_of_classes(classes, manifest.get("classes")))


# ----------------------------------------------------------------------------- fusion runs


class TextBranch:
    """A text cache's upstream as its extraction ran it (:class:`~conilium.extract.text.TextRunner`:
    its tokenizer, token limit, layers and compute dtype): texts -> token ids -> token states."""

    def __init__(self, runner, identity: dict):
        self.runner = runner
        self.identity = identity

    def token_ids(self, text: str) -> List[int]:
        return self.runner.token_ids(text)[0]


class FusionRunModel(nn.Module):
    """A fusion run's head (:class:`~conilium.heads.model.FusionHead`) on the upstreams of its
    caches, each run as its extraction ran it: an audio cache's (:class:`UpstreamRunner`) on the
    clip's waveform, a text cache's (:class:`TextBranch`) on the tokens of the clip's transcript.

    ``forward(waves, lengths, *tokens)``: ``tokens`` holds, for each text branch in order, the
    batch's zero-padded token ids (B, T) and their counts (B,) (:meth:`tokenize`); the head gets
    one ``(frames, lengths)`` pair per branch, in the order of its caches, as in training.
    """

    def __init__(self, branches: Sequence, head: nn.Module, *, device: torch.device):
        super().__init__()
        self.kinds = ["text" if isinstance(b, TextBranch) else "audio" for b in branches]
        self.audio = [b for b in branches if not isinstance(b, TextBranch)]
        self.texts = [b for b in branches if isinstance(b, TextBranch)]
        # submodules: moved, switched to eval; the first audio encoder answers frame counts
        self.encoders = nn.ModuleList([r.encoder for r in self.audio])
        self.text_models = nn.ModuleList([t.runner.model for t in self.texts])
        self.encoder = self.audio[0].encoder
        self.head = head.to(device)

    @property
    def attribute_outputs(self) -> int:
        return int(getattr(self.head, "attribute_outputs", 0) or 0)

    def token_ids(self, text: str) -> List[List[int]]:
        """The token ids of ``text`` for each text branch (its tokenizer, cut at its token limit)."""
        return [t.token_ids(text) for t in self.texts]

    @staticmethod
    def tokenize(ids: Sequence[List[List[int]]]) -> Tuple[torch.Tensor, ...]:
        """A batch's :meth:`token_ids` (one list per clip) as ``forward``'s ``tokens``."""
        out = []
        for k in range(len(ids[0]) if ids else 0):
            rows = [clip[k] for clip in ids]
            n = torch.tensor([len(r) for r in rows], dtype=torch.long)
            x = torch.zeros((len(rows), int(n.max())), dtype=torch.long)
            for i, r in enumerate(rows):
                x[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            out += [x, n]
        return tuple(out)

    @staticmethod
    def _pad(frames: Sequence[np.ndarray], device: torch.device):
        n = torch.tensor([len(f) for f in frames], dtype=torch.long)
        x = torch.zeros((len(frames), int(n.max()), *frames[0].shape[1:]), dtype=torch.float32)
        for i, f in enumerate(frames):
            x[i, : len(f)] = torch.from_numpy(np.asarray(f, dtype=np.float32))
        return x.to(device), n.to(device)

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor, *tokens: torch.Tensor) -> torch.Tensor:
        device = waves.device
        counts = [int(n) for n in lengths.tolist()]
        clips = [waves[i, :n].detach().float().cpu().numpy() for i, n in enumerate(counts)]
        audio = iter([self._pad([f for f, _ in r(clips)], device) for r in self.audio])
        text = []
        for k, t in enumerate(self.texts):
            ids, n = tokens[2 * k], tokens[2 * k + 1]
            rows = [ids[i, : int(c)].tolist() for i, c in enumerate(n.tolist())]
            text.append(self._pad([f for f, _ in t.runner(rows)], device))
        text = iter(text)
        return self.head(tuple(next(text) if kind == "text" else next(audio) for kind in self.kinds))


def load_text_branch(manifest, cache: Optional[str], where: str, checkpoint, *, layers: Sequence[int],
                     device: torch.device, precision: str) -> TextBranch:
    """The text upstream a text cache was extracted with (encoder and tokenizer, from the hub at the
    recorded revision, the local directory or the cache's ``upstream/`` folder), checked against
    the weights and tokenizer hashes the manifest records, run on the same layers, token limit and
    compute dtype as extraction."""
    from transformers import AutoModel, AutoTokenizer

    from conilium.extract.text import TextRunner, token_limit, tokenizer_identity
    from conilium.extract.upstreams import hub_access, weights_hash

    ident, text = manifest.upstream, manifest.text or {}
    source, access, revision = ident.get("source"), {}, None
    if source == "hub":
        src = str(ident.get("model_id") or ident.get("name"))
        revision = ident.get("revision")
        access = hub_access(str(ident.get("name")), src, revision)
        place = src + (f" at revision {revision}" if revision else "")
    elif source == "local":
        src = ident.get("path")
        if not src or not Path(src).is_dir():
            raise ConfigError(f"{where}: the text cache {cache} was extracted with the local text upstream {src}, "
                              f"which is not there any more")
        place = src
    elif source == "random-init":
        src = place = str(random_init_folder(ident, cache, where))
    else:
        raise ConfigError(f"{where}: the text cache manifest in {checkpoint} names no upstream "
                          f"({ident or 'nothing'}); cannot tell which text encoder to run")
    if source != "hub":
        want, have = ident.get("weights_sha256"), weights_hash(src)
        if want and want != have:
            raise ConfigError(f"{where}: the text encoder weights at {place} (sha256 {have[:12]}…) are not those "
                              f"the text cache {cache} was extracted with ({want[:12]}…)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, revision=revision, **access)
        model = AutoModel.from_pretrained(src, revision=revision, **access)
    except (OSError, ValueError, ImportError) as e:
        raise ConfigError(f"{where}: could not load the text upstream {place} with its tokenizer: {e}") from None
    want = (text.get("tokenizer") or {}).get("sha256")
    have = tokenizer_identity(tokenizer, "")["sha256"]
    if want and want != have:
        raise ConfigError(f"{where}: the tokenizer at {place} (sha256 {have[:12]}…) is not the one the text cache "
                          f"{cache} was extracted with ({want[:12]}…)")
    max_tokens = int(text.get("max_tokens") or token_limit(model, tokenizer))
    compute = upstream_dtype(manifest, precision, device)
    runner = TextRunner(model.eval(), tokenizer, device=device, compute_dtype=compute, layers=list(layers),
                        pooled_stats=False, max_tokens=max_tokens)
    n_states = manifest.num_hidden_states
    if n_states is not None and n_states != runner.num_hidden_states:
        raise ConfigError(f"{where}: the text cache's upstream has {n_states} hidden states, {place} has "
                          f"{runner.num_hidden_states}")
    if max(layers) >= runner.num_hidden_states:
        raise ConfigError(f"{where}: the head reads hidden states {list(layers)} of {place}, which has "
                          f"{runner.num_hidden_states}")
    return TextBranch(runner, dict(ident, loaded_from=place, compute_dtype=compute, max_tokens=max_tokens))


def load_fusion_run(run_dir: Path, head_run: Path, thresholds: Optional[Path], head: nn.Module,
                    ckpt: HeadCheckpoint, *, device: torch.device, precision: str) -> Loaded:
    """A fusion run (:func:`load_run`): its head on the upstream of each of its caches, in the
    cache's order; the audio is read through the signal path of its audio cache(s)."""
    from conilium.dirs import Manifest
    from conilium.extract.encoder import UpstreamRunner
    from conilium.targets import ATTRIBUTE_COLUMNS

    where = f"--run {run_dir}"
    checkpoint = RunDir(head_run).checkpoint_path
    branches, idents, signal = [], [], None
    for k, b in enumerate(ckpt.branches):
        manifest = Manifest(b.get("cache_manifest") or (ckpt.cache_manifest if k == 0 else {}))
        cache = b.get("cache") or (_run_cache(head_run, ckpt) if k == 0 else None)
        inp = b.get("input") or {}
        layers = [int(i) for i in inp.get("upstream_layers") or []]
        if inp.get("kind") != "frames" or not layers:
            raise ConfigError(f"{where}: {checkpoint} does not say which upstream layers branch {k} of the fusion "
                              f"head read (cache {cache}); train the head again with this version of train-head")
        if manifest.text:
            branch = load_text_branch(manifest, cache, where, checkpoint, layers=layers, device=device,
                                      precision=precision)
            dim, ident = branch.runner.dim, branch.identity
        else:
            upstream, ident = load_cache_upstream(manifest, cache, where, checkpoint)
            compute = upstream_dtype(manifest, precision, device)
            branch = UpstreamRunner(upstream, device=device, compute_dtype=compute, layers=layers,
                                    whisper_input=manifest.whisper_input or "30s")
            branch.encoder.check_layers(layers)
            n_states = manifest.num_hidden_states
            if n_states is not None and n_states != branch.num_hidden_states:
                raise ConfigError(f"{where}: the cache {cache} has {n_states} hidden states, "
                                  f"{ident.get('loaded_from')} has {branch.num_hidden_states}")
            dim, ident = branch.dim, dict(ident, compute_dtype=compute)
            mode = manifest.normalize
            path = SignalPath(max_seconds=manifest.max_seconds, normalize=mode,
                              stats=manifest.normalize_stats if mode == "global" else None,
                              rescale_loud=manifest.rescale_loud)
            if signal is None:
                signal = path
            elif (path.max_seconds, path.normalize, path.stats, path.rescale_loud) != \
                    (signal.max_seconds, signal.normalize, signal.stats, signal.rescale_loud):
                raise ConfigError(f"{where}: the audio caches of the fusion run read audio differently (truncation "
                                  f"or normalisation); predict reads each file once, as its first audio cache did")
        want = int((b.get("head_config") or {}).get("dim", dim))
        if want != dim:
            raise ConfigError(f"{where}: branch {k} of the head is {want} wide, the hidden size of "
                              f"{ident.get('loaded_from')} is {dim}")
        branches.append(branch)
        idents.append(ident)
    if signal is None:
        raise ConfigError(f"{where}: none of the fusion run's caches is an audio upstream's; predict reads audio")
    model = FusionRunModel(branches, head, device=device).to(device).eval()
    classes = tuple(ckpt.classes) if head.config.num_classes else ()
    attributes = tuple(ATTRIBUTE_COLUMNS) if model.attribute_outputs else ()
    offsets = read_offsets(thresholds, classes) if thresholds else np.zeros(len(classes))
    info = {"run": str(run_dir), "head_run": str(head_run), "offsets_from": None if thresholds is None
            else str(thresholds), "upstream": idents[0], "fusion": ckpt.fusion,
            "branches": [{"cache": b.get("cache"), "upstream": i, "input": b.get("input")}
                         for b, i in zip(ckpt.branches, idents)],
            "input": ckpt.input, "loss": ckpt.loss, "labels": ckpt.labels}
    return Loaded(model, signal, classes, offsets, ckpt.loss, "float32", info, attributes, needs_text=True,
                  class_names=names_of_classes(classes, ckpt.cache_manifest.get("classes")))

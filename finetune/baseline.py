"""The MSP-Podcast challenge baseline's released checkpoint files, as a starting point.

The baseline's categorical model (msplabresearch/MSP-Podcast_Challenge) saves three
PyTorch state dicts in its model directory:

* ``final_ssl.pt`` — the upstream's ``state_dict()`` (a transformers WavLM model for
  ``wavlm-large``);
* ``final_pool.pt`` — its attentive statistics pooling: ``sap_linear.weight``,
  ``sap_linear.bias``, ``attention``;
* ``final_ser.pt`` — its classifier: ``fc.0.0.*`` (Linear), ``fc.0.1.*`` (LayerNorm),
  ``out.0.*`` (Linear to the 8 classes);

and ``train_norm_stat.pkl``, the (mean, std) of its training audio. The ``best_*.pt``
names of some releases are accepted too. :func:`load_baseline` puts these weights into
an upstream and an :class:`~conilium.heads.model.EmotionHead`, whose parameter names
are the baseline's, so that the model computes the baseline's outputs before any
training: last hidden state → attentive pooling over the clip's frames → classifier.

The baseline truncates clips to 12 seconds; :class:`~conilium.finetune.config.FinetuneConfig`
keeps that truncation when it starts from these files and no ``max_seconds`` is given.
Two details differ from the baseline's code and do not change a single clip's output:
the baseline pools ``floor((samples − 1) / 320) + 1`` frames, which for a clip alone is
every frame the upstream outputs, while in a padded batch it can take one padded
frame; here the valid frames are exactly the upstream's output frames of the clip,
whatever its batch. The baseline normalises with ``(x − mean) / (std + 1e-6)``; the
statistics read from ``train_norm_stat.pkl`` fold that epsilon into ``std`` so that
:func:`conilium.audio.normalize` (which adds 1e-7) gives the same numbers.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

from conilium.errors import ConfigError
from conilium.extract.encoder import hidden_shape
from conilium.heads.model import EmotionHead, HeadConfig

from .config import BASELINE_MAX_SECONDS

SSL_FILE, POOL_FILE, SER_FILE = "final_ssl.pt", "final_pool.pt", "final_ser.pt"
NORM_FILE = "train_norm_stat.pkl"
POOL_KEYS = ("sap_linear.weight", "sap_linear.bias", "attention")
SER_KEYS = ("fc.0.0.weight", "fc.0.0.bias", "fc.0.1.weight", "fc.0.1.bias", "out.0.weight", "out.0.bias")
_BASELINE_EPS, _NORMALIZE_EPS = 1e-6, 1e-7


def baseline_files(folder) -> Dict[str, Path]:
    """``{"ssl", "pool", "ser"}`` → file, preferring ``final_*.pt`` over ``best_*.pt``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"--baseline-ckpt {folder}: directory not found")
    out = {}
    for part in ("ssl", "pool", "ser"):
        for prefix in ("final", "best"):
            p = folder / f"{prefix}_{part}.pt"
            if p.is_file():
                out[part] = p
                break
        else:
            raise ConfigError(f"--baseline-ckpt {folder}: {part} weights not found (expected final_{part}.pt, "
                              f"as the MSP-Podcast challenge baseline saves them, with final_ssl.pt, "
                              f"final_pool.pt and final_ser.pt side by side)")
    return out


def read_state_dict(path) -> Dict[str, torch.Tensor]:
    """A state dict saved with ``torch.save`` (tensors only), ``module.`` prefixes removed."""
    path = Path(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors of a damaged or foreign file
        raise ConfigError(f"{path}: not a PyTorch state dict ({type(e).__name__}: {e})") from None
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(f"{path}: expected a state dict (parameter name → tensor)")
    if sd and all(k.startswith("module.") for k in sd):  # saved from DataParallel / DDP
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def _match_weight_norm(sd: Dict[str, torch.Tensor], expected: List[str]) -> Dict[str, torch.Tensor]:
    """Rename the positional convolution's weight-norm tensors between the two spellings
    transformers used (``weight_g``/``weight_v`` and ``parametrizations.weight.original0/1``)."""
    want = set(expected)
    pairs = ((".weight_g", ".parametrizations.weight.original0"), (".weight_v", ".parametrizations.weight.original1"))
    out = {}
    for k, v in sd.items():
        if k not in want:
            for a, b in pairs:
                if k.endswith(a) and k[: -len(a)] + b in want:
                    k = k[: -len(a)] + b
                    break
                if k.endswith(b) and k[: -len(b)] + a in want:
                    k = k[: -len(b)] + a
                    break
        out[k] = v
    return out


def _load_strict(module: torch.nn.Module, sd: Mapping[str, torch.Tensor], path: Path, what: str) -> None:
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:4])}{' …' if len(missing) > 4 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:4])}{' …' if len(unexpected) > 4 else ''}")
        if shapes:
            parts.append(f"shape mismatch {', '.join(shapes[:3])}{' …' if len(shapes) > 3 else ''}")
        raise ConfigError(f"{path} does not fit the {what}: {'; '.join(parts)}. Use --upstream with the "
                          f"architecture the baseline was trained with (wavlm-large for the released model)")
    module.load_state_dict({k: sd[k] for k in own})


def head_config(pool: Mapping[str, torch.Tensor], ser: Mapping[str, torch.Tensor], pool_path: Path,
                ser_path: Path) -> HeadConfig:
    """The :class:`HeadConfig` the baseline's pooling and classifier files describe."""
    for keys, sd, path in ((POOL_KEYS, pool, pool_path), (SER_KEYS, ser, ser_path)):
        missing = [k for k in keys if k not in sd]
        if missing:
            raise ConfigError(f"{path}: missing key(s) {', '.join(missing)}; expected {', '.join(keys)}")
    extra = sorted(k for k in ser if k not in SER_KEYS)
    if extra:
        raise ConfigError(f"{ser_path}: unexpected key(s) {', '.join(extra[:4])}: only a classifier with one "
                          f"hidden layer (fc.0) is supported")
    dim = int(pool["sap_linear.weight"].shape[0])
    hidden, in_dim = (int(x) for x in ser["fc.0.0.weight"].shape)
    if in_dim != 2 * dim:
        raise ConfigError(f"{ser_path}: classifier input {in_dim} is not twice the pooling width {dim}")
    return HeadConfig(dim=dim, num_layers=1, layers=0, pooling="attentive", hidden=hidden,
                      dropout=0.5, num_classes=int(ser["out.0.weight"].shape[0]))


class _NumbersOnly(pickle.Unpickler):
    """Unpickles numbers and numpy scalars/arrays only (the baseline's (mean, std) tuple)."""

    _ALLOWED = {("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_norm_stats(folder) -> Optional[Dict[str, float]]:
    """The baseline's ``train_norm_stat.pkl`` as ``{"mean", "std"}`` for ``normalize``, or None."""
    path = Path(folder) / NORM_FILE
    if not path.is_file():
        return None
    try:
        mean, std = _NumbersOnly(io.BytesIO(path.read_bytes())).load()
        mean, std = float(np.asarray(mean)), float(np.asarray(std))
    except Exception as e:
        raise ConfigError(f"{path}: expected the baseline's (mean, std) pair ({type(e).__name__}: {e})") from None
    return {"mean": mean, "std": std + _BASELINE_EPS - _NORMALIZE_EPS, "source": str(path)}


def load_baseline(folder, upstream: torch.nn.Module) -> Tuple[EmotionHead, Optional[List[int]], dict]:
    """Load the baseline's files into ``upstream`` (in place) and a new head.

    Returns ``(head, layers, info)``: layers None (the last hidden state), and info with
    the files read, ``baseline_max_seconds`` (the 12 s truncation the baseline was trained
    and is scored with, which fine-tuning keeps unless ``--max-seconds`` is given) and, when
    ``train_norm_stat.pkl`` is there, ``normalize_stats``.
    """
    files = baseline_files(folder)
    ssl = read_state_dict(files["ssl"])
    ssl = _match_weight_norm(ssl, list(upstream.state_dict()))
    _load_strict(upstream, ssl, files["ssl"], f"upstream {type(upstream).__name__}")
    pool, ser = read_state_dict(files["pool"]), read_state_dict(files["ser"])
    cfg = head_config(pool, ser, files["pool"], files["ser"])
    _, dim = hidden_shape(upstream)
    if cfg.dim != dim:
        raise ConfigError(f"{files['pool']}: pooling width {cfg.dim} differs from the upstream's hidden size {dim}")
    head = EmotionHead(cfg)
    _load_strict(head.pooling, pool, files["pool"], "attentive statistics pooling")
    _load_strict(head.classifier, ser, files["ser"], "classifier")
    info = {"path": str(Path(folder).resolve()), "files": {k: v.name for k, v in files.items()},
            "baseline_max_seconds": BASELINE_MAX_SECONDS}
    stats = read_norm_stats(folder)
    if stats is not None:
        info["normalize_stats"] = stats
    return head, None, info

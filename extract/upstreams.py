"""Upstream loading; the registry itself is :mod:`.registry` (plain data, no torch).

A registry name maps to a Hugging Face model id and the transformers configuration of
that architecture, so that ``--random-init`` can build the very same architecture with
seeded random weights and no download (for benchmarks and tests). Small ``demo-*``
architectures of each family exist only as random-init models, for the demo corpus
and the tests.

Every model, downloaded or random, is loaded through ``from_pretrained``: random
weights are first saved with ``save_pretrained`` into a directory (beside the cache),
then loaded back from there, so every later stage and every process sees identical
weights through the one code path a real user takes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from urllib.parse import urlparse
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from transformers import AutoConfig, AutoModel, HubertConfig, Wav2Vec2Config, WavLMConfig, WhisperConfig

from conilium.dirs import ModelDir
from conilium.errors import ConfigError, OutputError
from conilium.util import output_error

from . import whisper
from .registry import FINETUNED_MARKER, UPSTREAMS, UpstreamSpec  # noqa: F401 (re-exported)

#: Architecture family (:attr:`UpstreamSpec.family`) → its transformers configuration class.
FAMILIES = {"wavlm": WavLMConfig, "wav2vec2": Wav2Vec2Config, "hubert": HubertConfig, "whisper": WhisperConfig}


def random_init_dir(name: str, seed: int, root) -> Path:
    return Path(root) / f"{name}-random-seed{seed}"


def build_random_upstream(name: str, out_dir, *, seed: int = 0) -> Path:
    """Save the ``name`` architecture with seeded random weights via ``save_pretrained``.

    Reuses ``out_dir`` when it already holds those weights (written for the same name
    and seed), so that concurrent processes and later stages share identical weights.
    """
    if name not in UPSTREAMS:
        raise ConfigError(f"--random-init needs a registered upstream name, one of {', '.join(UPSTREAMS)}; "
                          f"got {name!r}")
    out_dir = Path(out_dir)
    spec = UPSTREAMS[name]
    # The marker names the architecture too, so weights saved by an older definition
    # of the same registry name are never silently reused.
    marker = {"name": name, "seed": seed, "architecture": json.loads(json.dumps(spec.config))}
    if (out_dir / "config.json").is_file():
        cfg = AutoConfig.from_pretrained(out_dir)
        made = getattr(cfg, "conilium_random_init", None)
        if made != marker:
            raise ConfigError(f"{out_dir} holds random weights made as {made}, not as {marker}; "
                              f"remove that folder (and caches built from it) to rebuild them")
        return out_dir
    config = FAMILIES[spec.family](**spec.config)
    config.conilium_random_init = marker
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        # Whisper: the encoder alone (the upstream never runs the decoder)
        model = whisper.encoder_from_config(config) if spec.family == "whisper" else AutoModel.from_config(config)
    finally:
        torch.random.set_rng_state(gen_state)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    try:
        model.save_pretrained(tmp)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if not (out_dir / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process won the race: its weights are identical
    except BaseException as e:
        # read-only, no permission, full disk (told by the free space, before the half-saved files go)
        err = output_error(e, tmp, where=out_dir.parent)
        shutil.rmtree(tmp, ignore_errors=True)  # no half-saved weights left behind
        if err is None or err is e:
            raise
        raise OutputError(out_dir, err.reason, err.hint) from e
    return out_dir


def resolve_upstream(name: str, *, random_init: bool = False, seed: int = 0,
                     random_root=None) -> Tuple[str, dict]:
    """Where to load ``name`` from, and its identity for the cache manifest.

    ``name`` is a registry name, a Hugging Face model id, a local model directory, or a
    model directory written by finetune-best (its ``upstream/`` is used; with a LoRA
    ``adapter/`` beside it, the identity names the adapter too and :func:`load_upstream`
    merges it in).
    """
    if random_init:
        if random_root is None:
            raise ConfigError("--random-init needs a directory to save the random weights into")
        path = build_random_upstream(name, random_init_dir(name, seed, random_root), seed=seed)
        return str(path), {"name": name, "source": "random-init", "seed": seed,
                           "weights_sha256": weights_hash(path)}
    p = Path(name)
    if p.is_dir():
        _refuse_unfinished_model(p)
        adapter = model_dir_adapter(p) if (p / FINETUNED_MARKER).is_file() else None
        if (p / FINETUNED_MARKER).is_file():
            p = p / "upstream"
        if not (p / "config.json").is_file():
            raise ConfigError(f"{name}: not a transformers model directory (no config.json)")
        if adapter is not None:
            # the model is the base weights with the adapter merged in: the path names the model
            # directory (loading it again applies the adapter), the hash covers both folders
            return str(p), {"name": name, "source": "local", "path": str(Path(name).resolve()),
                            "adapter": str(adapter.resolve()), "weights_sha256": weights_hash(p, adapter)}
        return str(p), {"name": name, "source": "local", "path": str(p.resolve()),
                        "weights_sha256": weights_hash(p)}
    spec = UPSTREAMS.get(name)
    if spec is not None and spec.model_id is None:
        raise ConfigError(f"{name} is a demo architecture with no released weights: use --random-init")
    model_id = spec.model_id if spec else name
    return model_id, {"name": name, "source": "hub", "model_id": model_id}


def _refuse_unfinished_model(p: Path) -> None:
    """A :class:`ConfigError` when ``p`` is a finetune-best model directory whose training did
    not finish (a checkpoint, no model description): it holds no model to extract with yet."""
    model = ModelDir(p)
    if model.is_unfinished():
        raise ConfigError(f"{p} is a finetune-best model directory whose training did not finish "
                          f"({model.LAST_CHECKPOINT}, no {model.MARKER}): there is no fine-tuned model in it yet; "
                          f"finish it (rerun finetune-best with the same options and --resume --out {p}), then "
                          f"pass it to --upstream")


def model_dir_adapter(model_dir) -> Optional[Path]:
    """The LoRA adapter folder of a finetune-best model directory (None for a fully fine-tuned one)."""
    from .lora import ADAPTER_DIR, check_adapter_dir

    marker = Path(model_dir) / FINETUNED_MARKER
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{marker}: unreadable model description ({e})") from None
    lora = info.get("lora") if isinstance(info, dict) else None
    if not lora:
        return None
    return check_adapter_dir(Path(model_dir) / str(lora.get("adapter") or ADAPTER_DIR))


def weights_hash(model_dir, *more_dirs) -> str:
    """SHA-256 over a model directory's weight and config files (then those of ``more_dirs``,
    e.g. a LoRA adapter folder, in order)."""
    h = hashlib.sha256()
    files = [q for d in (model_dir, *more_dirs)
             for q in sorted(q for q in Path(d).iterdir()
                             if q.is_file() and (q.suffix in (".safetensors", ".bin", ".json")))]
    for q in files:
        h.update(q.name.encode())
        with open(q, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def download_command(model_id: str) -> str:
    """The command of the installed huggingface_hub that fetches ``model_id`` into the local cache."""
    import huggingface_hub

    major, minor = (int(x) for x in huggingface_hub.__version__.split(".")[:2])
    return f"hf download {model_id}" if (major, minor) >= (0, 34) else f"huggingface-cli download {model_id}"


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face hub's endpoint opens within ``timeout`` seconds."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                      timeout=timeout):
            return True
    except OSError:
        return False


def hub_access(name: str, model_id: str, revision: Optional[str] = None) -> Dict:
    """How to load a hub model: ``{}`` (the hub is reachable), ``{"local_files_only": True}``
    (offline, but in the local cache), or a :class:`ConfigError` in seconds saying how to get
    the weights (offline and not cached) — instead of transformers' retries."""
    from huggingface_hub import constants, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(model_id, "config.json", revision=revision), str)
    if constants.HF_HUB_OFFLINE or not hub_reachable():
        if cached:
            return {"local_files_only": True}
        raise ConfigError(
            f"upstream {name!r} ({model_id}): the Hugging Face hub is not reachable from here and the weights are "
            f"not in the local cache ({constants.HF_HUB_CACHE}). On a machine with network run "
            f"`{download_command(model_id)}`" + (f" --revision {revision}" if revision else "") + " and copy "
            "that cache here (or set HF_HOME to it), or pass a local model directory to --upstream; for "
            "timing or tests without weights add --random-init.")
    return {}


def check_upstream(name: str, *, random_init: bool = False, revision: Optional[str] = None) -> None:
    """Fail in seconds, before anything is written, when ``name`` cannot be loaded here."""
    if random_init:
        if name not in UPSTREAMS:
            raise ConfigError(f"--random-init needs a registered upstream name ({', '.join(UPSTREAMS)}), "
                              f"not {name!r}")
        return
    p = Path(name)
    if p.is_dir():
        resolve_upstream(name)
        return
    spec = UPSTREAMS.get(name)
    if spec is not None and spec.model_id is None:
        raise ConfigError(f"{name} is a demo architecture with no released weights: use --random-init")
    hub_access(name, spec.model_id if spec else name, revision)


def upstream_family(name: str, *, random_init: bool = False, revision: Optional[str] = None) -> str:
    """The transformers ``model_type`` of ``name`` without loading its weights (the registry's
    family, or the model's config.json); call :func:`check_upstream` first."""
    spec = UPSTREAMS.get(name)
    if spec is not None and (random_init or not Path(name).is_dir()):
        return spec.family
    p = Path(name)
    if p.is_dir():
        if (p / FINETUNED_MARKER).is_file():
            p = p / "upstream"
        return AutoConfig.from_pretrained(str(p)).model_type
    return AutoConfig.from_pretrained(name, revision=revision, **hub_access(name, name, revision)).model_type


def load_upstream(name: str, *, random_init: bool = False, seed: int = 0, random_root=None,
                  revision: Optional[str] = None, config_overrides: Optional[Dict] = None):
    """Load an upstream through ``from_pretrained``; returns ``(model, identity)``.

    ``config_overrides`` (e.g. ``{"layerdrop": 0.0}``) replace values of the model's
    configuration before it is built (``from_pretrained``'s config keyword arguments).
    A Whisper model loads as its encoder alone (:func:`.whisper.load_encoder`, which maps
    the wav2vec 2.0 family's override names onto Whisper's).

    A finetune-best model directory trained with LoRA loads as its base upstream with the
    adapter merged in (:func:`.lora.merge_adapter`): the model it was fine-tuned into.

    Honours ``HF_HUB_OFFLINE``. Without network and without local weights the error
    says how to get them.
    """
    source, identity = resolve_upstream(name, random_init=random_init, seed=seed, random_root=random_root)
    access = hub_access(name, source, revision) if identity["source"] == "hub" else {}
    try:
        if whisper.is_whisper(AutoConfig.from_pretrained(source, revision=revision, **access)):
            model = whisper.load_encoder(source, revision=revision, overrides=config_overrides, **access)
        else:
            model = AutoModel.from_pretrained(source, revision=revision, **access, **(config_overrides or {}))
    except OSError as e:
        raise ConfigError(
            f"could not load upstream {name!r} ({source}): {e}\n"
            f"The weights are neither reachable nor in the local Hugging Face cache. On a machine with "
            f"network run `{download_command(source)}` and copy the Hugging Face cache here, or pass a "
            f"local model directory to --upstream. For timing or tests without weights, add --random-init.") from None
    if identity.get("adapter"):
        from .lora import merge_adapter  # peft: only for a LoRA model directory

        model = merge_adapter(model, identity["adapter"])
    if identity["source"] == "hub":
        identity["revision"] = revision or getattr(model.config, "_commit_hash", None)
    identity["family"] = model.config.model_type
    return model, identity


def frame_rate(config) -> float:
    """Output frames per second of the CNN encoder (Whisper: of the encoder) at 16 kHz."""
    if whisper.is_whisper(config):
        return float(whisper.SAMPLE_RATE / whisper.SAMPLES_PER_FRAME)
    stride = 1
    for s in config.conv_stride:
        stride *= s
    return 16000 / stride


def num_frames(model, num_samples: int) -> int:
    """Frames the upstream outputs for ``num_samples`` input samples."""
    if whisper.is_whisper(model):
        return whisper.frames_for(num_samples)
    return int(model._get_feat_extract_output_lengths(torch.tensor(num_samples)).item())

"""Text upstreams: a transformers text encoder run once over a corpus's transcripts, into the
same versioned, checksummed feature cache as a speech upstream.

``extract-features --upstream roberta-large`` (or ``roberta-base``, ``modernbert-large``,
``deberta-v3-large``, a local directory holding any encoder of :data:`~.registry.TEXT_MODEL_TYPES`
with its tokenizer, or ``demo-text --random-init``) tokenizes each clip's transcript
(``Transcripts/<clip stem>.txt``, :mod:`conilium.transcripts`) with the model's own tokenizer
(its special tokens included) and stores the hidden states of the selected layers, one frame
per token: ``hidden_states`` of the transformers model (index 0: the embeddings, i: the output
of layer i), exactly as the model returns them. The manifest has no frame rate
(``"frame_rate": null``), no audio truncation and no normalisation; its ``"text"`` records the
fingerprint of the transcripts (SHA-256 over every clip's name and text, in clip order), the
tokenizer (its name, class and a SHA-256 of its content: the fast tokenizer's serialisation and
its special tokens) and the token limit. Reusing or resuming the cache with other transcripts
or another tokenizer is a :class:`~conilium.errors.CacheError` naming what differs.

A clip without a transcript is an error listing how many and which; with ``skip_bad`` such
clips are left out and listed in the manifest's ``skipped``. A transcript longer than the
model's token limit is cut there, and the clips cut are named.

``demo-text``: a RoBERTa-style encoder (3 layers, 64 wide) with seeded random weights and a
word-level tokenizer (the ``tokenizers`` library) whose vocabulary is the demo corpus's words
(:mod:`conilium.demo`), lower-cased, with ``<s> … </s>`` around each text; both are saved with
``save_pretrained`` beside the cache (``upstream/``) and loaded back with ``from_pretrained``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from tqdm import tqdm

import conilium
from conilium.cache.writer import UPSTREAM_DIR, CacheWriter
from conilium.errors import CacheError, ConfigError, CorpusError, OutputError
from conilium.locking import lock_directory
from conilium.runtime import autocast, resolve_device, valid_mask
from conilium.runtime import compute_dtype as pick_compute_dtype
from conilium.util import check_writable, output_error, output_errors

from .plan import ExtractConfig, parse_layers
from .registry import TEXT_MODEL_TYPES, TEXT_UPSTREAMS, UPSTREAMS

#: Tokens per batch (clips x longest clip) on CPU and CUDA.
BATCH_TOKENS = {"cpu": 2048, "cuda": 32768}


def is_text_upstream(name: str) -> bool:
    """True for a text upstream: a name of :data:`TEXT_UPSTREAMS`, or a local model directory
    whose ``model_type`` is a text encoder's (:data:`TEXT_MODEL_TYPES`). Hub ids outside the
    registry are taken for speech upstreams, as before text upstreams existed."""
    if name in TEXT_UPSTREAMS:
        return True
    if name in UPSTREAMS:
        return False
    cfg = Path(name) / "config.json"
    if not cfg.is_file():
        return False
    try:
        model_type = json.loads(cfg.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, OSError, AttributeError):
        return False
    return model_type in TEXT_MODEL_TYPES


# ----------------------------------------------------------------------------- demo-text


def demo_vocabulary() -> List[str]:
    """The words of the demo corpus's synthetic transcripts and common punctuation, sorted."""
    from conilium.demo import CUE_WORDS, FILLER_WORDS

    return sorted({w.lower() for w in FILLER_WORDS} | {w for words in CUE_WORDS.values() for w in words}
                  | set(".,!?;:'\"-"))


def build_demo_tokenizer(max_tokens: int = 128):
    """A word-level ``PreTrainedTokenizerFast`` over :func:`demo_vocabulary` (lower-cased, split at
    whitespace and punctuation, unknown words ``<unk>``), adding ``<s>`` and ``</s>`` as RoBERTa does."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors, trainers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.train_from_iterator([" ".join(demo_vocabulary())],
                            trainers.WordLevelTrainer(special_tokens=special, show_progress=False))
    tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")),
                                                      ("<s>", tok.token_to_id("<s>")))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", cls_token="<s>", sep_token="</s>", mask_token="<mask>",
                                   model_max_length=max_tokens)


def build_demo_text(out_dir, *, seed: int = 0, name: str = "demo-text") -> Path:
    """Save ``demo-text`` (seeded random weights and its tokenizer) into ``out_dir`` with
    ``save_pretrained``; reuses ``out_dir`` when it holds the same (name, seed, architecture, vocabulary)."""
    from transformers import AutoConfig, AutoModel, RobertaConfig

    out_dir = Path(out_dir)
    spec = TEXT_UPSTREAMS[name]
    vocab = demo_vocabulary()
    marker = {"name": name, "seed": seed, "architecture": json.loads(json.dumps(spec.config)),
              "vocabulary_sha256": hashlib.sha256("\n".join(vocab).encode()).hexdigest()}
    if (out_dir / "config.json").is_file():
        made = getattr(AutoConfig.from_pretrained(out_dir), "conilium_random_init", None)
        if made != marker:
            raise ConfigError(f"{out_dir} holds random weights made as {made}, not as {marker}; "
                              f"remove that folder (and caches built from it) to rebuild them")
        return out_dir
    tokenizer = build_demo_tokenizer(spec.config["max_position_embeddings"] - 2)
    config = RobertaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **spec.config)
    config.conilium_random_init = marker
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = AutoModel.from_config(config)
    finally:
        torch.random.set_rng_state(state)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if not (out_dir / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process saved the same
    except BaseException as e:
        err = output_error(e, tmp, where=out_dir.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        if err is None or err is e:
            raise
        raise OutputError(out_dir, err.reason, err.hint) from e
    return out_dir


# ----------------------------------------------------------------------------- loading


def tokenizer_identity(tokenizer, name: str) -> dict:
    """Name, class and SHA-256 of a tokenizer's content (what decides the token ids)."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode("utf-8"))
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode("utf-8"))
    return {"name": name, "class": type(tokenizer).__name__, "sha256": h.hexdigest()}


def check_text_upstream(name: str, *, random_init: bool = False, revision: Optional[str] = None) -> None:
    """Fail in seconds, before anything is written, when the text upstream ``name`` cannot be
    loaded here (a name that takes no --random-init, no such directory, a hub model neither
    reachable nor cached: the error says how to get it)."""
    from .upstreams import hub_access

    spec = TEXT_UPSTREAMS.get(name)
    if random_init:
        if spec is None or spec.model_id is not None:
            demos = [n for n, s in TEXT_UPSTREAMS.items() if s.model_id is None]
            raise ConfigError(f"--random-init of a text upstream: only {', '.join(demos)} (a released encoder's "
                              f"tokenizer comes with its weights); got {name!r}")
        return
    if Path(name).is_dir():
        return
    if spec is None:
        raise ConfigError(f"{name!r} is not a text upstream: use {', '.join(TEXT_UPSTREAMS)} or a local model "
                          f"directory")
    if spec.model_id is None:
        raise ConfigError(f"{name} is a demo architecture with no released weights: use --random-init")
    hub_access(name, spec.model_id, revision)


def load_text_upstream(name: str, *, random_init: bool = False, seed: int = 0, random_root=None,
                       revision: Optional[str] = None):
    """``(model, tokenizer, identity, tokenizer identity)`` of a text upstream, via ``from_pretrained``."""
    from transformers import AutoModel, AutoTokenizer

    from .upstreams import hub_access, weights_hash

    spec = TEXT_UPSTREAMS.get(name)
    access: dict = {}
    if random_init:
        if spec is None or spec.model_id is not None:
            demos = [n for n, s in TEXT_UPSTREAMS.items() if s.model_id is None]
            raise ConfigError(f"--random-init of a text upstream: only {', '.join(demos)} (a released encoder's "
                              f"tokenizer comes with its weights); got {name!r}")
        if random_root is None:
            raise ConfigError("--random-init needs a directory to save the random weights into")
        path = build_demo_text(Path(random_root) / f"{name}-random-seed{seed}", seed=seed, name=name)
        source = str(path)
        identity = {"name": name, "source": "random-init", "seed": seed, "weights_sha256": weights_hash(path),
                    "path": f"{UPSTREAM_DIR}/{path.name}"}
    elif Path(name).is_dir():
        source = name
        identity = {"name": name, "source": "local", "path": str(Path(name).resolve()),
                    "weights_sha256": weights_hash(name)}
    else:
        if spec is None:
            raise ConfigError(f"{name!r} is not a text upstream: use {', '.join(TEXT_UPSTREAMS)} or a local model "
                              f"directory")
        if spec.model_id is None:
            raise ConfigError(f"{name} is a demo architecture with no released weights: use --random-init")
        source = spec.model_id
        access = hub_access(name, source, revision)
        identity = {"name": name, "source": "hub", "model_id": source}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, **access)
        model = AutoModel.from_pretrained(source, revision=revision, **access)
    except (OSError, ValueError, ImportError) as e:
        raise ConfigError(f"could not load text upstream {name!r} ({source}) with its tokenizer: {e}") from None
    if identity["source"] == "hub":
        identity["revision"] = revision or getattr(model.config, "_commit_hash", None)
    identity["family"] = model.config.model_type
    tok_name = identity.get("model_id") or identity["name"]
    return model.eval(), tokenizer, identity, tokenizer_identity(tokenizer, tok_name)


def token_limit(model, tokenizer) -> int:
    """Most tokens the model takes per text: the tokenizer's limit, else the model's positions."""
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:
        return limit
    return int(getattr(model.config, "max_position_embeddings", 512))


class TextRunner:
    """Token-level hidden states of a text encoder: ``runner(token_id_lists)`` returns, per text,
    ``(frames (tokens, layers, dim) float32, pooled (all hidden states, 2, dim) or None)``."""

    def __init__(self, model, tokenizer, *, device: torch.device, compute_dtype: str, layers: List[int],
                 pooled_stats: bool, max_tokens: int):
        self.model = model.to(device)
        self.tokenizer = tokenizer
        self.device = device
        self.compute_dtype = compute_dtype
        self.num_hidden_states = int(model.config.num_hidden_layers) + 1
        self.dim = int(model.config.hidden_size)
        self.layers = list(layers)
        self.pooled_stats = pooled_stats
        self.max_tokens = max_tokens
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else 0)

    def token_ids(self, text: str) -> Tuple[List[int], bool]:
        """The token ids of ``text`` (special tokens included) and whether it was cut at the limit."""
        full = self.tokenizer(text, truncation=False)["input_ids"]
        if len(full) <= self.max_tokens:
            return list(full), False
        return list(self.tokenizer(text, truncation=True, max_length=self.max_tokens)["input_ids"]), True

    @torch.inference_mode()
    def __call__(self, ids: List[List[int]]) -> List[Tuple[np.ndarray, Optional[np.ndarray]]]:
        lengths = torch.tensor([len(x) for x in ids])
        t_max = int(lengths.max())
        x = torch.full((len(ids), t_max), self.pad_id, dtype=torch.long)
        for i, row in enumerate(ids):
            x[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask = valid_mask(lengths, t_max).long()
        with autocast(self.device, self.compute_dtype):
            out = self.model(input_ids=x.to(self.device), attention_mask=mask.to(self.device),
                             output_hidden_states=True)
        wanted = list(range(self.num_hidden_states)) if self.pooled_stats else self.layers
        states = torch.stack([out.hidden_states[i] for i in wanted], dim=2).float()  # (B, T, L, D)
        pooled = None
        if self.pooled_stats:
            m = mask.to(states.device)[:, :, None, None].float()
            n = m.sum(dim=1)
            mean = (states * m).sum(dim=1) / n
            var = (((states - mean[:, None]) ** 2) * m).sum(dim=1) / n
            pooled = torch.stack([mean, var.sqrt()], dim=2).cpu().numpy()
        kept = states if len(self.layers) == states.shape[2] else states[:, :, self.layers]
        kept = kept.cpu().numpy()
        return [(kept[i, :n], None if pooled is None else pooled[i]) for i, n in enumerate(lengths.tolist())]


# ----------------------------------------------------------------------------- extraction


def check_text_config(config: ExtractConfig) -> ExtractConfig:
    """``config`` for a text upstream (no audio truncation, no normalisation), or a ConfigError
    for an audio-only option."""
    if config.augmentation is not None:
        raise ConfigError(f"--augment-noise applies to audio upstreams; {config.upstream} is a text encoder")
    if config.whisper_input is not None:
        raise ConfigError(f"--whisper-input applies to Whisper encoders only; {config.upstream} is a text encoder")
    if config.compile:
        raise ConfigError(f"--compile applies to audio upstreams; {config.upstream} is a text encoder")
    if config.compute_dtype == "bfloat16-weights":
        raise ConfigError(f"--compute-dtype bfloat16-weights applies to wav2vec 2.0-family audio upstreams; "
                          f"{config.upstream} is a text encoder (--compute-dtype bfloat16: autocast, on CUDA)")
    if config.normalize not in ("auto", "none"):
        raise ConfigError(f"--normalize {config.normalize} applies to audio upstreams; {config.upstream} is a text "
                          f"encoder")
    return dataclasses.replace(config, normalize="none", max_seconds=None, rescale_loud=False)


def extract_text_features(config: ExtractConfig, corpus, out, *, device: str = "auto",
                          batch_tokens: Optional[int] = None, skip_bad: bool = False, allow_symlinks: bool = False,
                          overwrite: bool = False, verbose: bool = True,
                          wait_for_lock: Union[bool, float] = False) -> Path:
    """Extract the token-level hidden states of the text upstream ``config.upstream`` over the
    transcripts of ``corpus`` (a root or a loaded Corpus) into the cache directory ``out``
    (see the module's docstring); returns ``out``. ``batch_tokens`` bounds a batch's padded
    tokens (default :data:`BATCH_TOKENS`)."""
    from .extract import _select_clips

    t0 = time.perf_counter()
    config = check_text_config(config)
    check_text_upstream(config.upstream, random_init=config.random_init, revision=config.revision)
    out = Path(out)
    dev = resolve_device(device)
    cdtype = pick_compute_dtype(config.compute_dtype, dev)
    if batch_tokens is None:
        batch_tokens = BATCH_TOKENS[dev.type]
    corpus = _select_clips(corpus, config, skip_bad, allow_symlinks)
    transcripts = corpus.transcripts()
    skipped: Dict[str, str] = dict(corpus.skipped)
    if transcripts.missing:
        if not skip_bad:
            raise CorpusError(f"{transcripts.missing_summary()}; a text upstream needs every clip's transcript "
                              f"(pass --skip-bad to leave these clips out and list them, or make them with "
                              f"conilium corpus transcribe)")
        for n in transcripts.missing:
            skipped[n] = "no transcript"
    names = [n for n in corpus.clips if n in transcripts.texts]
    if not names:
        raise CorpusError(f"{corpus.root}: no clip has a transcript")
    with lock_directory(out, what="feature cache", wait=wait_for_lock):
        check_writable(out, what="feature cache")
        with CacheWriter(out) as cache:
            with output_errors(out):
                cache.begin(overwrite=overwrite)
            from .extract import _hf_bars

            with _hf_bars(verbose):
                model, tokenizer, identity, tok_identity = load_text_upstream(
                    config.upstream, random_init=config.random_init, seed=config.seed,
                    random_root=cache.upstream_dir, revision=config.revision)
            max_tokens = token_limit(model, tokenizer)
            runner = TextRunner(model, tokenizer, device=dev, compute_dtype=cdtype,
                                layers=parse_layers(config.layers, int(model.config.num_hidden_layers) + 1),
                                pooled_stats=config.pooled_stats, max_tokens=max_tokens)
            settings = _settings(config, identity, runner, corpus, {
                "transcripts_fingerprint": transcripts.fingerprint(names), "transcripts": len(names),
                "tokenizer": tok_identity, "max_tokens": max_tokens, "special_tokens": True})
            found = cache.existing_settings(settings)
            complete = False
            if found is not None:
                settings, complete = found
            else:
                settings = cache.write_settings(settings)
            shards = [names[i:i + config.shard_size] for i in range(0, len(names), config.shard_size)]
            todo = [i for i, s in enumerate(shards) if cache.valid_shard(i, s) is None]
            if complete and not todo:
                _say(verbose, f"{out}: cache already complete with these settings; nothing to do")
                return out
            _say(verbose, f"extracting {len(names)} transcripts with {config.upstream} ({identity.get('family')}) on "
                          f"{dev.type} ({cdtype}) into {len(shards)} shard(s); layers {runner.layers}, {config.dtype}"
                 + (f"; resuming: {len(shards) - len(todo)} complete shard(s) kept" if len(todo) < len(shards) else ""))
            cut: List[str] = []
            bar = tqdm(total=sum(len(shards[i]) for i in todo), desc=f"extract {config.upstream}", unit="clip",
                       disable=not verbose, file=sys.stderr, dynamic_ncols=True)
            try:
                for i in todo:
                    cache.write_shard(i, _shard_items(runner, shards[i], transcripts.texts, batch_tokens, cut, bar))
            finally:
                bar.close()
            if cut:
                _say(verbose, f"{len(cut)} transcript(s) longer than {max_tokens} tokens were cut there: "
                              + ", ".join(cut[:10]) + (f", … and {len(cut) - 10} more" if len(cut) > 10 else ""))
            entries, records = [], []
            for i, shard_names in enumerate(shards):
                rec = cache.valid_shard(i, shard_names, check_hash=False)
                if rec is None:
                    raise CacheError(f"{out}: shard {i} is missing or damaged after extraction; rerun extract-features")
                entries.append(rec["entry"])
                for n in shard_names:
                    r = corpus.clips[n].to_json()
                    r["shard"], r["num_frames"] = i, rec["num_frames"][n]
                    records.append(r)
            with output_errors(out):
                cache.finish(records, shards=entries, skipped=skipped)
    _say(verbose, f"{out}: {len(names)} clip(s) extracted, {len(skipped)} skipped; {time.perf_counter() - t0:.1f} s")
    return out


def _shard_items(runner: TextRunner, names: List[str], texts: Dict[str, str], batch_tokens: int, cut: List[str],
                 bar):
    """``(name, frames, pooled)`` of a shard's clips in shard order, computed in batches of
    similar length (at most ``batch_tokens`` padded tokens)."""
    ids = {}
    for n in names:
        ids[n], was_cut = runner.token_ids(texts[n])
        if was_cut:
            cut.append(n)
    order = sorted(names, key=lambda n: len(ids[n]))
    done: Dict[str, Tuple[np.ndarray, Optional[np.ndarray]]] = {}
    batch: List[str] = []
    for n in order + [None]:
        if n is not None and (not batch or (len(batch) + 1) * len(ids[n]) <= batch_tokens):
            batch.append(n)
            continue
        for name, result in zip(batch, runner([ids[b] for b in batch])):
            done[name] = result
        bar.update(len(batch))
        batch = [n] if n is not None else []
    for n in names:
        frames, pooled = done.pop(n)
        yield n, frames, pooled


def _settings(config: ExtractConfig, identity: dict, runner: TextRunner, corpus, text: dict) -> dict:
    return {
        "upstream": identity,
        "layers": runner.layers,
        "layers_spec": config.layers,
        "num_hidden_states": runner.num_hidden_states,
        "dim": runner.dim,
        "dtype": config.dtype,
        "compute_dtype": runner.compute_dtype,
        "frame_rate": None,  # frames are tokens
        "max_seconds": None,
        "normalize": "none",
        "pooled_stats": config.pooled_stats,
        "corpus_root": str(Path(corpus.root).resolve()),
        "corpus_fingerprint": corpus.fingerprint(),
        "splits": list(config.splits) if config.splits else None,
        "augmentation": None,
        "shard_size": config.shard_size,
        "code_version": conilium.__version__,
        "config": config.to_json(),
        "normalize_stats": None,
        "text": text,
    }


def _say(verbose: bool, msg: str) -> None:
    if verbose:
        tqdm.write(msg, file=sys.stderr)

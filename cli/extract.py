"""``conilium extract``: ``features`` (alias ``extract-features``) and ``verify`` (alias
``verify-cache``).

Several processes share the shards of one cache: ``torchrun --nproc_per_node K -m
conilium.cli.extract ARGS`` (this module runs ``extract-features``), or ``torchrun
--nproc_per_node K $(which extract-features) ARGS``.
"""

from __future__ import annotations

import sys

import click

from conilium.corpus import ALLOW_SYMLINKS_HELP
from conilium.errors import ConiliumError
from conilium.extract.registry import TEXT_UPSTREAMS, UPSTREAMS, WHISPER_INPUTS

from .common import (CONTEXT, GROUP_QUIET, POSITIVE, POSITIVE_INT, SEED, Command, Group, Number, check_corpus_arg,
                     fail, lock_wait, quiet_option, refuse_dir, version_option, wait_for_lock_option)

_UPSTREAM_HELP = ("registry name (" + ", ".join(UPSTREAMS) + "), a Hugging Face model id, a local model "
                  "directory, or a model directory written by finetune-best; or a text encoder run over the "
                  "transcripts, one frame per token (" + ", ".join(TEXT_UPSTREAMS) + ", or a local directory "
                  "holding one with its tokenizer)")


@click.command(cls=Command, context_settings=CONTEXT)
@click.option("--corpus", "corpus", required=True, type=click.Path(file_okay=False, path_type=str),
              help="Corpus root: the MSP-Podcast layout (Audios/, Labels/) or a corpus.csv/corpus.jsonl manifest.")
@click.option("--upstream", required=True, help=_UPSTREAM_HELP)
@click.option("--out", required=True, type=click.Path(path_type=str),
              help="The cache directory to write (created; resumed when it holds a partial cache).")
@click.option("--layers", default="last", show_default=True,
              help="Hidden states to store: last, all, or indices like 6,12,24 (0 = input of the first "
                   "transformer layer, i = output of layer i; the highest = the model's last hidden state).")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="Storage type of frames; values beyond float16's range are an error.")
@click.option("--pooled-stats/--no-pooled-stats", default=False, show_default=True,
              help="Also store every layer's mean and std over frames (small; for layer probing).")
@click.option("--max-seconds", type=POSITIVE, default=8.0, show_default=True,
              help="Truncate clips to this many seconds (the paper: 8; the challenge baseline: 12).")
@click.option("--normalize", type=click.Choice(["auto", "global", "utterance", "none"]), default="auto",
              show_default=True, help="Waveform normalisation; global = mean/std over the Train audio; auto = global, "
                                      "or none for a Whisper encoder (its log-mel front end takes the audio as is).")
@click.option("--whisper-input", type=click.Choice(WHISPER_INPUTS), default=None,
              help="A Whisper encoder's input: 30s (the model's own window, every clip zero-padded to 30 s; "
                   "the default) or clip (cut to the clip, positional embeddings sliced: faster, but "
                   "features the model never saw in training). Whisper only.")
@click.option("--random-init", is_flag=True,
              help="Use the architecture with seeded random weights (no download; for benchmarks and tests).")
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="Seed of --random-init weights and of noise augmentation.")
@click.option("--revision", default=None, help="Model revision (branch, tag or commit) on the Hugging Face hub.")
@click.option("--splits", default=None, help="Only these splits, comma-separated (e.g. Train,Development).")
@click.option("--batch-seconds", type=Number(0), default=None,
              help="Bound on a batch's padded audio (clips x longest clip), in seconds; 0: one clip at a "
                   "time [default: 0 on CPU, where batching only adds padding; 300 on CUDA].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto: CUDA when available (one GPU per rank under torchrun), else CPU.")
@click.option("--compute-dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16", "bfloat16-weights"]),
              default="auto", show_default=True,
              help="auto: float32 on CPU, bfloat16 autocast on CUDA (float16 without bf16). bfloat16-weights: the "
                   "upstream's weights and activations in bfloat16, no autocast (wav2vec 2.0 family; any device, "
                   "meant for GPUs; frames within a few percent of float32's).")
@click.option("--compile", "compile_", is_flag=True,
              help="Run the audio upstream's forward through torch.compile (dynamic shapes; needs a C++ compiler "
                   "on CPU), meant for GPUs: the first batch waits for the compilation (about 6 s for "
                   "demo-wavlm on 2 CPU cores, where it gains nothing on the demo). Its frames differ from "
                   "the eager forward's in the last bits: recorded in the manifest, and a cache begun with it "
                   "is resumed or reused only with it.")
@click.option("--length-buckets", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Pad each batch up to one of a few lengths (8 per doubling: at most 1/8 more audio, never "
                   "beyond the longest clip) so that a GPU sees few distinct shapes, each new one costing it new "
                   "kernel plans. auto: on CUDA only. The frames are the same within float rounding.")
@click.option("--shard-size", type=POSITIVE_INT, default=256, show_default=True, help="Clips per HDF5 shard.")
@click.option("--workers", type=POSITIVE_INT, default=2, show_default=True, help="Audio decoding threads.")
@click.option("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads (default: torch's choice).")
@click.option("--skip-bad", is_flag=True,
              help="Leave out unreadable, empty or NaN clips and list them in the manifest, instead of stopping.")
@click.option("--allow-symlinks", is_flag=True, help=ALLOW_SYMLINKS_HELP)
@click.option("--augment-noise", type=click.Path(file_okay=False, exists=True, path_type=str), default=None,
              help="Folder of noise recordings (e.g. MUSAN): add noisy copies of Train clips to the cache.")
@click.option("--augment-fraction", type=Number(0, 1, open_min=True), default=0.8, show_default=True,
              help="Share of Train clips that get noisy copies.")
@click.option("--snr-db", default="5:20", show_default=True, help="SNR range LOW:HIGH in dB for the noisy copies.")
@click.option("--copies", type=POSITIVE_INT, default=1, show_default=True, help="Noisy copies per chosen clip.")
@click.option("--rescale-loud", is_flag=True,
              help="Divide float audio stored at integer scale (samples far beyond [-1, 1], e.g. int16 values) "
                   "back to [-1, 1] instead of stopping at such a file. Part of the cache's settings.")
@click.option("--overwrite", is_flag=True, help="Delete an existing cache in --out and rebuild it.")
@click.option("--no-space-check", is_flag=True,
              help="Extract even when the projected cache size exceeds the free disk space.")
@wait_for_lock_option("the cache directory")
@quiet_option("No progress bar or messages.")
@version_option
def extract_features_cmd(corpus, upstream, out, layers, dtype, pooled_stats, max_seconds, normalize, whisper_input,
                         random_init,
                         seed, revision, splits, batch_seconds, device, compute_dtype, compile_, length_buckets, shard_size,
                         workers, threads,
                         skip_bad, allow_symlinks, augment_noise, augment_fraction, snr_db, copies, rescale_loud, overwrite,
                         no_space_check, wait_for_lock, quiet):
    """Run an upstream over a corpus once and store its hidden states in an HDF5 feature cache.

    \b
    Example:
      extract-features --corpus MSP-PODCAST-1.11 --upstream wavlm-large --out cache/wavlm-large
      extract-features --corpus demo --upstream demo-wavlm --random-init --layers all \\
          --pooled-stats --out cache/demo-wavlm
      extract-features --corpus MSP-PODCAST-1.11 --upstream whisper-large-v3 --layers all \\
          --out cache/whisper-large-v3

    The cache (manifest.json, clips.json, shards/*.h5) carries the clips' annotations, so
    training heads needs only the cache directory. An interrupted run resumes where it
    stopped when rerun with the same options; under `torchrun --nproc_per_node K` the
    ranks share the shards. Check a cache with `verify-cache CACHE_DIR`.

    A text upstream (roberta-base, roberta-large, modernbert-large, deberta-v3-large, a local
    text encoder with its tokenizer, or demo-text with --random-init) runs over the clips'
    transcripts (Transcripts/<clip stem>.txt) instead: one frame per token, no frame rate;
    the manifest records the transcripts' fingerprint and the tokenizer, and a cache made
    from other transcripts is refused. The audio options (--max-seconds, --normalize,
    --augment-noise, --batch-seconds) do not apply; --skip-bad leaves out clips without a
    transcript.
    """
    from conilium.audio import parse_snr
    from conilium.extract import ExtractConfig, NoiseAugmentation, extract_features  # torch etc.: only when run

    check_corpus_arg(corpus)
    refuse_dir(out, "a feature cache", "choose a new or empty directory for --out (extract-features writes a "
               "feature cache there)", accept=("cache", "cache-unfinished", "empty"))
    try:
        config = ExtractConfig(
            upstream, layers=layers, dtype=dtype, max_seconds=max_seconds, normalize=normalize,
            pooled_stats=pooled_stats, random_init=random_init, seed=seed, revision=revision,
            compute_dtype=compute_dtype, shard_size=shard_size,
            splits=[s.strip() for s in splits.split(",") if s.strip()] if splits else None,
            augmentation=NoiseAugmentation(augment_noise, augment_fraction, parse_snr(snr_db), copies)
            if augment_noise else None, rescale_loud=rescale_loud, whisper_input=whisper_input, compile=compile_)
        if threads:
            import torch

            torch.set_num_threads(threads)
        path = extract_features(config, corpus, out, batch_seconds=batch_seconds, device=device, workers=workers,
                                skip_bad=skip_bad, allow_symlinks=allow_symlinks, overwrite=overwrite, check_space=not no_space_check,
                                verbose=not quiet, wait_for_lock=lock_wait(wait_for_lock),
                                length_buckets={"auto": None, "on": True, "off": False}[length_buckets])
    except ConiliumError as e:
        fail(e)
    if not quiet:
        click.echo(str(path))


@click.command(cls=Command, context_settings=CONTEXT)
@click.argument("cache_dir", type=click.Path(path_type=str))
@click.option("--quick", is_flag=True, help="Check sizes and HDF5 contents only, not the SHA-256 checksums.")
@quiet_option("No progress bar; print only problems.")
@version_option
def verify_cache_cmd(cache_dir, quick, quiet):
    """Check every shard of a feature cache against its manifest.

    Verifies that the manifest is complete, that every shard exists with the recorded
    size and SHA-256 checksum and holds exactly the clips clips.json assigns to it, with
    the recorded number of frames, and (without --quick) that no stored value is NaN or
    infinite. Exits with status 1 and lists the problems otherwise.
    """
    from conilium.extract.verify import verify_cache  # h5py: only when run

    try:
        report = verify_cache(cache_dir, checksums=not quick, verbose=not quiet)
    except ConiliumError as e:
        fail(e)
    if report.problems:
        for p in report.problems:
            click.echo(f"PROBLEM: {p}", err=True)
        raise click.ClickException(f"{cache_dir}: {len(report.problems)} problem(s) found in "
                                   f"{report.shards} shard(s); rerun extract-features with the same options "
                                   f"to repair damaged shards")
    if not quiet:
        click.echo(f"{cache_dir}: OK ({report.shards} shard(s), {report.clips} clip(s), "
                   f"{report.bytes / 1e6:.1f} MB{', checksums verified' if not quick else ''})")


@click.command(cls=Command, context_settings=CONTEXT)
@click.argument("cache_dir", type=click.Path(path_type=str))
@quiet_option("No progress bar.")
@version_option
def upgrade_cache_cmd(cache_dir, quiet):
    """Convert a format-1 feature cache to format 2 in place (frames unchanged).

    An interrupted conversion resumes when rerun; the result equals a fresh extraction
    with the same settings, byte for byte.

    \b
    Example:
      conilium extract upgrade cache/wavlm-large
    """
    from conilium.cache.upgrade import upgrade_cache  # h5py: only when run

    try:
        upgrade_cache(cache_dir, verbose=not quiet)
    except ConiliumError as e:
        fail(e)
    if not quiet:
        click.echo(f"{cache_dir}: format 2")


@click.group("extract", cls=Group, context_settings=CONTEXT,
             short_help="Corpus -> feature cache (stage 1); check a cache.")
@quiet_option(GROUP_QUIET)
@version_option
def extract_group(quiet):
    """Stage 1: run an upstream over a corpus once into an HDF5 feature cache, and check a cache.

    \b
      features   corpus -> feature cache         (also installed as extract-features)
      verify     check a cache's shards          (also installed as verify-cache)
      upgrade    convert a format-1 cache to format 2 in place
    """


extract_group.add_command(extract_features_cmd, "features")
extract_group.add_command(verify_cache_cmd, "verify")
extract_group.add_command(upgrade_cache_cmd, "upgrade")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(extract_features_cmd())

"""``conilium finetune``: ``train`` (alias ``finetune-best``: fine-tuning, then threshold
tuning) and ``predict`` (alias ``predict``), thin layers over :mod:`conilium.finetune`.

The threshold tuning after fine-tuning is chained here, not in the library: the finetune
stage does not import :mod:`conilium.evaluate`, this package sits above both.

Several processes: ``torchrun --nproc_per_node K -m conilium.cli.finetune ARGS``
(this module runs ``finetune-best``), or ``torchrun --nproc_per_node K $(which finetune-best) ARGS``.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import click

from conilium import CLASSES
from conilium.audio import NORMALIZE_MODES
from conilium.errors import ConiliumError
from conilium.extract.registry import WHISPER_INPUTS
from conilium.finetune.config import BASELINE_MAX_SECONDS, DEFAULT_MAX_SECONDS, PRECISIONS, FinetuneConfig
from conilium.heads.config import LOSS_PROPERTIES

from .common import (CONTEXT, DROPOUT, FRACTION, GROUP_QUIET, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT,
                     SEED, Group, check_corpus_arg, fail, lock_wait, quiet_option, refuse_dir, version_option,
                     wait_for_lock_option)

_D = FinetuneConfig(corpus="", out="")


def _quiet_library_warnings(quiet: bool = False) -> None:
    # raised inside transformers' WavLM attention on every padded batch; harmless
    warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask and attn_mask")
    if quiet:  # transformers' own "Loading weights" bars
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


@click.command(context_settings=CONTEXT)
@click.option("--corpus", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Corpus root in the MSP-Podcast layout (Audios/, Labels/).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Model directory to write (upstream/, head.pt, conilium_model.json; also a run directory: "
                   "config.json, metrics.json, predictions/<Split>.csv, tuned/).")
@click.option("--upstream", default=_D.upstream, show_default=True,
              help="Registry name (wavlm-large, wav2vec2-large-robust, wav2vec2-base, hubert-large, demo-*), "
                   "a Hugging Face model id or a local model directory.")
@click.option("--random-init", is_flag=True,
              help="The --upstream architecture with seeded random weights, no download (timing, tests, demo-*).")
@click.option("--random-init-seed", type=SEED, default=_D.random_init_seed, show_default=True,
              help="Seed of the random weights (use the one the cache was extracted with, for --init-head).")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) of --upstream.")
@click.option("--loss", type=click.Choice(list(LOSS_PROPERTIES)), default=_D.loss, show_default=True,
              help="wbce (the paper's best), wce, bce, kld or focal.")
@click.option("--labels", type=click.Choice(["hard", "P", "S", "P*", "S*"]), default=_D.labels, show_default=True,
              help="Training targets: S (share of primary + secondary labels, the paper's best), P, hard, P*, S*.")
@click.option("--sampler", type=click.Choice(["none", "balanced"]), default="none", show_default=True,
              help="balanced: draw clips with weight 1/f(class), with replacement (class weights then off).")
@click.option("--lr", type=POSITIVE, default=_D.lr, show_default=True, help="AdamW learning rate.")
@click.option("--weight-decay", type=NON_NEGATIVE, default=_D.weight_decay, show_default=True)
@click.option("--batch-size", type=POSITIVE_INT, default=_D.batch_size, show_default=True,
              help="Clips per optimiser step, over all processes and accumulation steps.")
@click.option("--grad-accum", type=POSITIVE_INT, default=_D.grad_accum, show_default=True,
              help="Split each process's share of a batch into this many forward/backward passes (less memory).")
@click.option("--epochs", type=POSITIVE_INT, default=_D.epochs, show_default=True,
              help="Maximum epochs; the best epoch by development macro-F1 is kept.")
@click.option("--patience", type=POSITIVE_INT, default=None,
              help="Stop after this many epochs without improvement.")
@click.option("--seed", type=SEED, default=_D.seed, show_default=True)
@click.option("--max-seconds", type=POSITIVE, default=None,
              help=f"Truncate every clip to this many seconds  [default: {DEFAULT_MAX_SECONDS:g}; "
                   f"{BASELINE_MAX_SECONDS:g} with --baseline-ckpt, the challenge baseline's]")
@click.option("--normalize", type=click.Choice(("auto",) + NORMALIZE_MODES), default=_D.normalize,
              show_default=True,
              help="Waveform normalisation: global (mean/std over the Train audio, kept in the model), "
                   "utterance, none; auto = global, or none for a Whisper encoder.")
@click.option("--whisper-input", type=click.Choice(WHISPER_INPUTS), default=None,
              help="A Whisper encoder's input: 30s (its own window; the default) or clip (cut to the clip, "
                   "positional embeddings sliced). Whisper only; with --init-head, the head's cache decides.")
@click.option("--rescale-loud", is_flag=True,
              help="Divide float audio stored at integer scale (samples far beyond [-1, 1], e.g. int16 values) "
                   "back to [-1, 1] instead of stopping at such a file; kept in the model for predict.")
@click.option("--dropout", type=DROPOUT, default=_D.dropout, show_default=True, help="Head dropout.")
@click.option("--hidden", type=POSITIVE_INT, default=_D.hidden, show_default=True, help="Classifier hidden width.")
@click.option("--upstream-dropout", type=DROPOUT, default=None,
              help="Replace the upstream's dropout probabilities (default: the pretrained model's).")
@click.option("--layerdrop", type=DROPOUT, default=None, help="Replace the upstream's LayerDrop probability.")
@click.option("--mask-time-prob", type=DROPOUT, default=None,
              help="SpecAugment time-mask probability in the upstream (0 turns it off; default: the model's).")
@click.option("--augment-noise", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder of noise recordings (e.g. MUSAN noise): mix one into a fraction of training clips.")
@click.option("--augment-fraction", type=FRACTION, default=_D.augment_fraction, show_default=True,
              help="Share of training clips that get noise, drawn anew each epoch.")
@click.option("--snr-db", default="5:20", show_default=True, help="SNR range LOW:HIGH (dB) of the added noise.")
@click.option("--init-head", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Start from the head of a train-head run on this upstream's frozen cache (its layer choice, "
                   "truncation and normalisation are used).")
@click.option("--baseline-ckpt", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Start from the challenge baseline's final_ssl.pt, final_pool.pt, final_ser.pt in this folder.")
@click.option("--lora-rank", type=POSITIVE_INT, default=None,
              help="Train LoRA adapters of this rank (and the head) instead of the upstream, which stays frozen; "
                   "the model directory keeps the base upstream/ and the adapter/.")
@click.option("--lora-alpha", type=POSITIVE, default=None,
              help="LoRA scale numerator: adapters are scaled by alpha / rank  [default: 2 x --lora-rank]")
@click.option("--lora-dropout", type=DROPOUT, default=None, help="Dropout on the adapters' input  [default: 0]")
@click.option("--lora-layers", default=None, metavar="SPEC",
              help="Transformer layers (from 0) that get adapters, e.g. 0-11 or 8,9,10,11  [default: all]")
@click.option("--lora-modules", default=None, metavar="LIST",
              help="Linear layers of each transformer layer that get adapters: q, k, v, o (attention), fc1, fc2 "
                   "(feed-forward) or a module path inside the layer  [default: q,k,v,o]")
@click.option("--max-train-clips", type=POSITIVE_INT, default=None,
              help="Use only the first N training clips (quick trials).")
@click.option("--no-thresholds", is_flag=True, help="Do not tune decision offsets on the development set.")
@click.option("--skip-bad", is_flag=True, help="Leave out (and list) clips whose audio is missing or unreadable.")
@click.option("--device", default=_D.device, show_default=True, help="auto, cpu or cuda.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=_D.precision, show_default=True,
              help="auto: bf16 autocast on CUDA, float32 on CPU.")
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute transformer activations (less memory).")
@click.option("--num-workers", type=NON_NEGATIVE_INT, default=_D.num_workers, show_default=True,
              help="DataLoader processes decoding audio.")
@click.option("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads per process.")
@click.option("--keep-checkpoints", is_flag=True,
              help="Keep checkpoints/ (last and best epoch) after training, to continue later with --resume.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run in --out from its last completed epoch (from the start when no "
                   "epoch was completed, so scripts may always pass it).")
@click.option("--overwrite", is_flag=True, help="Start over in an --out that holds a run.")
@wait_for_lock_option("the model directory")
@quiet_option("No progress bars.")
@version_option
def finetune_best_cmd(corpus, out, upstream, random_init, random_init_seed, revision, loss, labels, sampler, lr,
                      weight_decay, batch_size, grad_accum, epochs, patience, seed, max_seconds, normalize,
                      whisper_input, rescale_loud, dropout, hidden, upstream_dropout, layerdrop, mask_time_prob, augment_noise,
                      augment_fraction, snr_db, init_head, baseline_ckpt, lora_rank, lora_alpha, lora_dropout,
                      lora_layers, lora_modules, max_train_clips, no_thresholds, skip_bad,
                      device, precision, gradient_checkpointing, num_workers, threads, keep_checkpoints, resume,
                      overwrite, wait_for_lock, quiet):
    """Fine-tune an upstream and an attentive head end to end on a corpus (the paper's best system).

    \b
    Defaults are the paper's: WavLM-large with its CNN encoder frozen, attentive statistics
    pooling, WBCE on S targets, AdamW 1e-5, batch 16, at most 40 epochs, best epoch by
    development macro-F1, 8-second clips (12 with --baseline-ckpt, as the challenge baseline);
    then decision offsets tuned on the development set.

    \b
    Examples:
      finetune-best --corpus MSP-PODCAST-1.11 --out models/wavlm-wbce-S
      finetune-best --corpus demo --out models/demo --upstream demo-wavlm --random-init --epochs 2
      torchrun --nproc_per_node 4 -m conilium.cli.finetune --corpus C --out M --gradient-checkpointing
      finetune-best --corpus C --out M --resume          # after an interruption
      finetune-best --corpus C --out M --lora-rank 8 --lora-layers 12-23 --lr 1e-4   # LoRA adapters only
      finetune-best --corpus C --out M --upstream whisper-large-v3 --lora-rank 16 --lr 1e-4

    \b
    Then: predict --model M a.wav b.flac; extract-features --upstream M ...; conilium-eval on M.
    """
    from conilium.audio import parse_snr
    from conilium.finetune.train import finetune  # torch, transformers: only when run

    check_corpus_arg(corpus)
    refuse_dir(out, "a finetune-best model directory", "choose a new or empty directory for --out (models/<name>, "
               "say)", accept=("model", "model-unfinished", "finetune-run", "finetune-run-unfinished", "empty"))
    if init_head is not None:
        refuse_dir(init_head, "a train-head run directory", "pass a directory train-head wrote to --init-head",
                   accept=("run",))
    _quiet_library_warnings(quiet)
    try:
        config = FinetuneConfig(
            corpus=str(corpus), out=str(out), upstream=upstream, random_init=random_init,
            random_init_seed=random_init_seed, revision=revision, loss=loss, labels=labels,
            sampler=None if sampler == "none" else sampler, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
            grad_accum=grad_accum, epochs=epochs, patience=patience, seed=seed, max_seconds=max_seconds,
            normalize=normalize, rescale_loud=rescale_loud, dropout=dropout, hidden=hidden,
            upstream_dropout=upstream_dropout,
            layerdrop=layerdrop, mask_time_prob=mask_time_prob,
            augment_noise=None if augment_noise is None else str(augment_noise),
            augment_fraction=augment_fraction, snr_db=parse_snr(snr_db),
            init_head=None if init_head is None else str(init_head),
            baseline_ckpt=None if baseline_ckpt is None else str(baseline_ckpt),
            lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_layers=lora_layers,
            lora_modules=lora_modules, whisper_input=whisper_input, max_train_clips=max_train_clips, tune_thresholds=not no_thresholds, skip_bad=skip_bad,
            precision=precision, gradient_checkpointing=gradient_checkpointing, device=device,
            num_workers=num_workers, keep_checkpoints=keep_checkpoints, threads=threads)
        if baseline_ckpt is not None and max_seconds is None and not quiet:
            click.echo(f"--baseline-ckpt: clips truncated at {config.max_seconds:g} s, as the challenge baseline "
                       f"was trained (--max-seconds to change it)", err=True)
        metrics = finetune(config, resume=resume, overwrite=overwrite, progress=not quiet,
                           wait_for_lock=lock_wait(wait_for_lock))
        if metrics and config.tune_thresholds:
            metrics["thresholds"] = tune_model_thresholds(config)
    except ConiliumError as e:
        fail(e)
    if metrics:
        th = metrics.get("thresholds") or {}
        tuned = f", tuned {th['f1_macro_tuned']:.4f}" if th.get("f1_macro_tuned") is not None else ""
        click.echo(f"{out}: best epoch {metrics['best_epoch']}, {metrics.get('split')} macro-F1 "
                   f"{metrics['f1_macro']:.4f}{tuned}")


def tune_model_thresholds(config: FinetuneConfig) -> dict:
    """Tune the decision offsets of a finished model directory on its development predictions
    (``conilium-eval tune-thresholds OUT OUT/tuned``) and record them in the model."""
    from conilium.evaluate.thresholds import tune_run
    from conilium.finetune.model import set_decision_offsets
    from conilium.finetune.train import TUNED_DIR
    from conilium.runs import prediction_path, read_predictions

    out = Path(config.out)
    refs = read_predictions(prediction_path(out, config.dev_split)).reference
    # stratified folds: no more than the clips of the most frequent class (scikit-learn's bound)
    k = min(5, max([sum(1 for r in refs if r == c) for c in CLASSES]))
    tuned = tune_run(out, out / TUNED_DIR, tune_split=config.dev_split, k=k if k >= 2 else 0, seed=config.seed,
                     overwrite=True)
    cv = tuned.get("cross_validation")
    thresholds = {
        "offsets": tuned["offsets"],
        "tune_split": config.dev_split,
        "f1_macro_untuned": tuned["untuned"][config.dev_split]["f1_macro"],
        "f1_macro_tuned": tuned["splits"][config.dev_split]["f1_macro"],
        "f1_macro_cross_validated": cv["f1_macro_pooled"] if cv else None,
        "tuned_run": TUNED_DIR,
    }
    set_decision_offsets(out, tuned["offsets"], thresholds)
    return thresholds


@click.command(context_settings=CONTEXT)
@click.option("--model", "model_dir", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="Model directory written by finetune-best.")
@click.option("--run", "run_dir", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="Run directory written by train-head (or its conilium-eval tune-thresholds output, whose "
                   "decision offsets then apply): its head on the upstream, layers, truncation and normalisation "
                   "of the cache it was trained on. Instead of --model.")
@click.argument("audio", nargs=-1, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--list", "list_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Text file with one audio path per line (blank lines and # comments skipped).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write FILE.csv or FILE.json (format from the suffix); default: CSV on standard output.")
@click.option("--batch-size", type=POSITIVE_INT, default=8, show_default=True)
@click.option("--max-seconds", type=NON_NEGATIVE, default=None,
              help="Truncate files to this many seconds (default: as in training, the model's or the run's "
                   "cache's; 0: whole files).")
@click.option("--rescale-loud/--no-rescale-loud", default=None,
              help="Divide float audio stored at integer scale back to [-1, 1] instead of refusing such a file "
                   "(default: as the model or the run's cache was made, --rescale-loud).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@quiet_option("No progress bar.")
@version_option
def predict_cmd(model_dir, run_dir, audio, list_file, out, batch_size, max_seconds, rescale_loud, device, quiet):
    """Predict the emotion of audio files with a finetune-best model or a train-head run.

    \b
    --model MODEL_DIR: the fine-tuned model. --run RUN: a head trained on a feature cache,
    applied to the upstream the cache was extracted with (a random-init upstream is read
    from the cache's upstream/ folder, so the cache must be where train-head found it).
    Any file soundfile reads works (WAV, FLAC, OGG, ...; any sample rate; stereo is averaged).
    Output columns: FileName, one probability per class (A S H U F D C N), Prediction
    (argmax after the decision offsets tuned on the development set: the model's, or the
    run's when RUN is a conilium-eval tune-thresholds output; none otherwise), then for a
    run trained with --task attributes or joint EmoAct, EmoVal, EmoDom (1-7 scale; an
    attributes-only run has no class columns nor Prediction), Error.
    A file that cannot be read is reported by name on standard error and in the output
    (Error column), and the others are still predicted.

    \b
    Exit status: 0 when at least one file was predicted, 1 when every file failed,
    2 for usage errors (no file given, bad --out suffix, both or neither of --model and --run).

    \b
    Examples:
      predict --model models/wavlm-wbce-S a.wav b.flac --out predictions.csv
      predict --run runs/wbce-S-tuned a.wav b.flac --out predictions.csv
    """
    if (model_dir is None) == (run_dir is None):
        raise click.UsageError("give --model MODEL_DIR (finetune-best) or --run RUN (train-head), one of the two")
    from conilium.finetune.predict import Predictor, output_format, read_list, results_csv, write_results  # torch

    if run_dir is None:
        refuse_dir(model_dir, "a finetune-best model directory", "pass a directory finetune-best wrote (train one "
                   "with finetune-best --corpus CORPUS --out MODEL_DIR), or a train-head run to --run",
                   accept=("model",))
    else:
        refuse_dir(run_dir, "a train-head run directory", "pass a directory train-head (or conilium-eval "
                   "tune-thresholds) wrote to --run; a finetune-best model directory goes to --model",
                   accept=("run",))
    _quiet_library_warnings(quiet)
    files = [str(a) for a in audio]
    try:
        if list_file is not None:
            files += read_list(list_file)
        if not files:
            raise click.UsageError("no audio file given: pass files as arguments or --list FILE")
        if out is not None:
            output_format(out)
        predictor = Predictor(model_dir, run=run_dir, device=device, batch_size=batch_size, max_seconds=max_seconds,
                              rescale_loud=rescale_loud)
        results = predictor.predict(files, progress=not quiet)
        if out is not None:
            write_results(out, results, predictor.classes, predictor.attributes)
        else:
            click.echo(results_csv(results, predictor.classes, predictor.attributes), nl=False)
    except click.UsageError:
        raise
    except ConiliumError as e:
        if "--out" in str(e) or "--list" in str(e):
            raise click.UsageError(str(e)) from None
        fail(e)
    failed = [r for r in results if not r.ok]
    for r in failed:
        click.echo(f"predict: {r.file}: {r.error}", err=True)
    n_ok = len(results) - len(failed)
    if out is not None:
        click.echo(f"{out}: {n_ok} file(s) predicted, {len(failed)} failed", err=True)
    if n_ok == 0:
        sys.exit(1)



@click.group("finetune", cls=Group, context_settings=CONTEXT,
             short_help="Corpus -> fine-tuned model (end to end) -> predictions on audio.")
@quiet_option(GROUP_QUIET)
@version_option
def finetune_group(quiet):
    """End to end: fine-tune an upstream and a head on the audio, then predict with the model.

    \b
      train     corpus -> model directory, thresholds tuned   (also installed as finetune-best)
      predict   model directory or head run + audio files -> predictions   (also installed as predict)
    """


finetune_group.add_command(finetune_best_cmd, "train")
finetune_group.add_command(predict_cmd, "predict")


if __name__ == "__main__":  # pragma: no cover
    finetune_best_cmd()

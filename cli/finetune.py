"""``conilium finetune``: ``train`` (alias ``finetune-best``: fine-tuning, then threshold
tuning) and ``predict`` (alias ``predict``), thin layers over :mod:`conilium.finetune`.

The threshold tuning after fine-tuning is chained here, not in the library: the finetune
stage does not import :mod:`conilium.evaluate`, this package sits above both.

Several processes: ``torchrun --nproc_per_node K -m conilium.cli.finetune ARGS``
(this module runs ``finetune-best``), or ``torchrun --nproc_per_node K $(which finetune-best) ARGS``.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import click

from conilium.errors import ConiliumError
from conilium.finetune.config import RECORDED_KEYS, FinetuneConfig

from .common import (CONTEXT, GROUP_QUIET, NON_NEGATIVE, POSITIVE, POSITIVE_INT, Command, Group, Number,
                     check_corpus_arg, fail, lock_wait, quiet_option, refuse_dir, version_option, wait_for_lock_option)
from .options import config_from_command, config_options


def _quiet_library_warnings(quiet: bool = False) -> None:
    # raised inside transformers' WavLM attention on every padded batch; harmless
    warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask and attn_mask")
    if quiet:  # transformers' own "Loading weights" bars
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


@click.command(cls=Command, context_settings=CONTEXT)
@click.option("--corpus", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Corpus root: the MSP-Podcast layout (Audios/, Labels/) or a corpus.csv/corpus.jsonl manifest; required, unless --config names one.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Model directory to write (upstream/, head.pt, conilium_model.json; also a run directory: "
                   "config.json, metrics.json, predictions/<Split>.csv, tuned/).")
@config_options(FinetuneConfig)
@click.option("--snr-db", default=None, show_default="5:20", help="SNR range LOW:HIGH (dB) of the added noise.")
@click.option("--no-thresholds", is_flag=True, help="Do not tune decision offsets on the development set.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run in --out from its last completed epoch (from the start when no "
                   "epoch was completed, so scripts may always pass it).")
@click.option("--overwrite", is_flag=True, help="Start over in an --out that holds a run.")
@wait_for_lock_option("the model directory")
@quiet_option("No progress bars.")
@version_option
def finetune_best_cmd(corpus, out, snr_db, no_thresholds, resume, overwrite, wait_for_lock, quiet, **options):
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

    if corpus is not None:
        check_corpus_arg(corpus)
    refuse_dir(out, "a finetune-best model directory", "choose a new or empty directory for --out (models/<name>, "
               "say)", accept=("model", "model-unfinished", "finetune-run", "finetune-run-unfinished", "empty"))
    _quiet_library_warnings(quiet)
    try:
        config = config_from_command(
            FinetuneConfig, options, required=("corpus",), ignore_file_keys=RECORDED_KEYS,
            given={"corpus": corpus, "out": out, "snr_db": None if snr_db is None else parse_snr(snr_db),
                   "tune_thresholds": False if no_thresholds else None})
        if config.init_head is not None:
            refuse_dir(config.init_head, "a train-head run directory", "pass a directory train-head wrote to "
                       "--init-head", accept=("run",))
        if config.baseline_ckpt is not None and options.get("max_seconds") is None and not quiet:
            click.echo(f"--baseline-ckpt: clips truncated at {config.max_seconds:g} s, as the challenge baseline "
                       f"was trained (--max-seconds to change it)", err=True)
        metrics = finetune(config, resume=resume, overwrite=overwrite, progress=not quiet,
                           wait_for_lock=lock_wait(wait_for_lock))
        if metrics and config.tune_thresholds:
            metrics["thresholds"] = tune_model_thresholds(config)
    except ConiliumError as e:
        fail(e)
    if metrics:
        click.echo(finetune_summary(metrics, out))


def finetune_summary(metrics: dict, out) -> str:
    """finetune-best's last line: the best epoch's score, and with tuned decision offsets the
    tuned score in-sample (as the paper reports it) beside its honest K-fold estimate."""
    th = metrics.get("thresholds") or {}
    line = f"{out}: best epoch {metrics['best_epoch']}, {metrics.get('split')} macro-F1 {metrics['f1_macro']:.4f}"
    if th.get("f1_macro_tuned") is not None:
        line += f"; thresholds tuned: {th['f1_macro_tuned']:.4f} in-sample"
        cv = th.get("f1_macro_cross_validated")
        line += (f", {cv:.4f} K-fold estimate" if cv is not None else
                 " (too few Development clips per class for a K-fold estimate)")
    return line


def tune_model_thresholds(config: FinetuneConfig) -> dict:
    """Tune the decision offsets of a finished model directory on its development predictions
    (``conilium-eval tune-thresholds OUT OUT/tuned``) and record them in the model."""
    from conilium.evaluate.thresholds import tune_run
    from conilium.finetune.model import set_decision_offsets
    from conilium.finetune.train import TUNED_DIR
    from conilium.runs import prediction_path, read_predictions

    out = Path(config.out)
    dev = read_predictions(prediction_path(out, config.dev_split))
    refs, classes = dev.reference, dev.classes
    # stratified folds: no more than the clips of the most frequent class (scikit-learn's bound)
    k = min(5, max([sum(1 for r in refs if r == c) for c in classes]))
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


@click.command(cls=Command, context_settings=CONTEXT)
@click.option("--model", "model_dir", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="Model directory written by finetune-best.")
@click.option("--run", "run_dir", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="Run directory written by train-head (or its conilium-eval tune-thresholds output, whose "
                   "decision offsets then apply): its head on the upstream, layers, truncation and normalisation "
                   "of the cache it was trained on. Instead of --model.")
@click.option("--onnx", "onnx_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="An ONNX file written by 'conilium finetune export', run with onnxruntime (torch is not "
                   "loaded). Instead of --model or --run.")
@click.argument("audio", nargs=-1, type=click.Path(path_type=Path))
@click.option("--list", "list_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Text file with one audio path per line (blank lines and # comments skipped).")
@click.option("--glob", "pattern", default="*", show_default=True,
              help="For a folder among AUDIO: the audio files below it (recursively) whose names match this "
                   "pattern, e.g. '*.wav'.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Write FILE.csv, FILE.json or FILE.parquet (format from the suffix); default: CSV on standard "
                   "output. With --inputs: the job folder (required).")
@click.option("--inputs", type=click.Path(exists=True, path_type=Path), default=None,
              help="Many files as a resumable job: a list file (one path a line) or a folder (its audio files "
                   "matching --glob, walked in sorted order), predicted in chunks into --out DIR/shards/"
                   "part-NNNNNN.parquet with DIR/index.jsonl; a rerun skips the chunks done. Under torchrun each "
                   "process takes every K-th chunk. Instead of AUDIO and --list.")
@click.option("--shard-files", type=POSITIVE_INT, default=1000, show_default=True,
              help="With --inputs: files per chunk (one Parquet shard each).")
@click.option("--backend", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="With --inputs: 'local' (this process, or torchrun's processes) or 'ray' (actors on a ray "
                   "cluster, each loading the model once).")
@click.option("--address", default=None,
              help="With --backend ray: the cluster's address (host:6379, or auto); default: a local ray.")
@click.option("--n-jobs", type=POSITIVE_INT, default=1, show_default=True,
              help="With --backend ray: the number of actors.")
@click.option("--gpus-per-job", type=NON_NEGATIVE, default=0.0, show_default=True,
              help="With --backend ray: the GPUs each actor asks ray for (1: one GPU each; 0: CPU).")
@click.option("--batch-size", type=POSITIVE_INT, default=8, show_default=True)
@click.option("--max-seconds", type=NON_NEGATIVE, default=None,
              help="Truncate files to this many seconds (default: as in training, the model's or the run's "
                   "cache's; 0: whole files).")
@click.option("--max-whole-seconds", type=POSITIVE, default=120.0, show_default=True,
              help="With --max-seconds 0: longer files get an error instead of exhausting the memory (the "
                   "upstream's memory grows with the square of the length).")
@click.option("--rescale-loud/--no-rescale-loud", default=None,
              help="Divide float audio stored at integer scale back to [-1, 1] instead of refusing such a file "
                   "(default: as the model or the run's cache was made, --rescale-loud).")
@click.option("--segment", "segment", default=None, metavar="vad|fixed:SECONDS[:HOP]",
              help="Cut each recording into segments and predict each: 'vad' speech segments found by Silero VAD "
                   "(the silero-vad package), 'fixed:8' windows of 8 s, 'fixed:8:4' every 4 s. One row per "
                   "segment, with Start and End (seconds); long files are read block by block.")
@click.option("--min-segment", type=POSITIVE, default=1.0, show_default=True,
              help="With --segment: shorter speech segments (or a last partial window) are dropped.")
@click.option("--max-segment", type=POSITIVE, default=None,
              help="With --segment vad: longer speech is cut, at a pause where there is one, into pieces of at "
                   "most this many seconds [default: the model's --max-seconds, else 30].")
@click.option("--pad", type=NON_NEGATIVE, default=0.1, show_default=True,
              help="With --segment vad: seconds of context kept on each side of a speech segment.")
@click.option("--vad-threshold", type=Number(0, 1, open_min=True, open_max=True), default=0.5, show_default=True,
              help="With --segment vad: Silero's speech probability above which a 32 ms window is speech.")
@click.option("--transcripts", "transcripts", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None,
              help="With --run of a fusion run (audio + text caches): the folder holding each audio file's "
                   "transcript as <audio file stem>.txt (UTF-8) [default: the corpus layout, Transcripts/ beside "
                   "the Audios/ folder holding the file].")
@click.option("--asr", "asr", default=None, metavar="MODEL",
              help="With --run of a fusion run: each file's text heard by this Whisper model (whisper-large-v3, a "
                   "hub id or a local model directory) over the whole file, decoded as 'conilium corpus "
                   "transcribe' decodes (greedy, the language detected), instead of read from transcripts.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@quiet_option("No progress bar.")
@version_option
def predict_cmd(model_dir, run_dir, onnx_file, audio, list_file, pattern, out, inputs, shard_files, backend, address,
                n_jobs, gpus_per_job, batch_size, max_seconds, max_whole_seconds, rescale_loud, segment, min_segment,
                max_segment, pad, vad_threshold, transcripts, asr, device, quiet):
    """Predict the emotion of audio files with a finetune-best model or a train-head run.

    \b
    --model MODEL_DIR: the fine-tuned model. --run RUN: a head trained on a feature cache,
    applied to the upstream the cache was extracted with (a random-init upstream is read
    from the cache's upstream/ folder, so the cache must be where train-head found it).
    --onnx FILE.onnx: either of them exported by 'conilium finetune export', run with
    onnxruntime without torch (same columns; probabilities within 1e-4 of PyTorch's).
    Any file soundfile reads works (WAV, FLAC, OGG, ...; any sample rate; stereo is averaged);
    a folder stands for the audio files below it that match --glob.
    Output columns: FileName, one probability per class (A S H U F D C N), Prediction
    (argmax after the decision offsets tuned on the development set: the model's, or the
    run's when RUN is a conilium-eval tune-thresholds output; none otherwise), then for a
    run trained with --task attributes or joint EmoAct, EmoVal, EmoDom (1-7 scale; an
    attributes-only run has no class columns nor Prediction), Error.
    A file that cannot be read is reported by name on standard error and in the output
    (Error column), and the others are still predicted.

    \b
    A fusion run (train-head --cache AUDIO --cache TEXT) also reads each file's transcript,
    tokenized and encoded by the text cache's own upstream: <stem>.txt in --transcripts
    FOLDER, else Transcripts/ beside the Audios/ folder holding the file (the corpus
    layout); with --asr MODEL, the words a Whisper model hears in the file instead. A file
    without a transcript (or in which the model hears no words) gets an error (Error column)
    and the others are still predicted. --segment and --onnx do not take a fusion run.

    \b
    With --segment, each row is a segment of a recording (FileName, Start, End, then the
    columns above); a recording in which the VAD finds no speech gets no row and is named on
    standard error.

    \b
    Exit status: 0 when at least one file was predicted, 1 when every file failed,
    2 for usage errors (no file given, bad --out suffix, not exactly one of --model, --run, --onnx,
    --transcripts or --asr without a fusion run, both of them, --segment with a fusion run).

    \b
    Examples:
      predict --model models/wavlm-wbce-S a.wav b.flac --out predictions.csv
      predict --run runs/wbce-S-tuned a.wav b.flac --out predictions.csv
      predict --model models/wavlm-wbce-S recordings/ --glob '*.flac' --out predictions.parquet
      predict --onnx models/wavlm-wbce-S.onnx a.wav b.flac --out predictions.csv
      predict --run runs/audio+text a.wav b.wav --transcripts texts/ --out predictions.csv
      predict --run runs/audio+text a.wav b.wav --asr whisper-large-v3 --out predictions.csv
      predict --model models/wavlm-wbce-S podcast.flac --segment vad --out segments.csv
      predict --model models/wavlm-wbce-S --inputs files.txt --out job/     (resumable; Parquet shards)
      torchrun --nproc_per_node 4 $(which predict) --model M --inputs recordings/ --out job/
    """
    if sum(x is not None for x in (model_dir, run_dir, onnx_file)) != 1:
        raise click.UsageError("give --model MODEL_DIR (finetune-best) or --run RUN (train-head) or --onnx FILE "
                               "(conilium finetune export), one of the three")
    # the results and writers need no torch; the predictors load it (Predictor) or not (OnnxPredictor)
    from conilium.finetune.results import (SHORT_SECONDS, audio_files, output_format, read_list, results_csv,
                                           write_results)

    for given, option in ((transcripts, "--transcripts"), (asr, "--asr")):
        if given is not None and run_dir is None:
            raise click.UsageError(f"{option}: only a fusion run (--run of train-head --cache AUDIO --cache TEXT) "
                                   f"reads transcripts; --model and --onnx predict from audio alone")
    if model_dir is not None:
        refuse_dir(model_dir, "a finetune-best model directory", "pass a directory finetune-best wrote (train one "
                   "with finetune-best --corpus CORPUS --out MODEL_DIR), or a train-head run to --run",
                   accept=("model",))
    elif run_dir is not None:
        refuse_dir(run_dir, "a train-head run directory", "pass a directory train-head (or conilium-eval "
                   "tune-thresholds) wrote to --run; a finetune-best model directory goes to --model",
                   accept=("run",))
    if onnx_file is None:  # transformers' warnings; predict --onnx loads neither transformers nor torch
        _quiet_library_warnings(quiet)
    if inputs is not None or (backend, address, shard_files, n_jobs, gpus_per_job) != ("local", None, 1000, 1, 0):
        if segment is not None:
            raise click.UsageError("--segment cuts recordings one by one; it is not available with --inputs (a job "
                                   "of many files): run predict --segment on the long recordings, --inputs on clips")
        if asr is not None:
            raise click.UsageError("--asr is not available with --inputs (a job of many files): transcribe the "
                                   "files first (conilium corpus transcribe) or predict them without --inputs")
        if transcripts is not None:
            raise click.UsageError("--transcripts is not available with --inputs (a job of many files); a fusion "
                                   "run's job reads each file's transcript from the corpus layout (Transcripts/ "
                                   "beside Audios/)")
        from .scale import predict_job  # the job: chunks, shards, index, torchrun, ray

        predict_job(model_dir, run_dir, onnx_file, audio, list_file, pattern, out, inputs, shard_files, backend,
                    address, n_jobs, gpus_per_job, batch_size, max_seconds, max_whole_seconds, rescale_loud, device, quiet)
        return
    if out is not None and out.is_dir():
        raise click.UsageError(f"--out {out}: a folder; give a file (FILE.csv, FILE.json or FILE.parquet), or "
                               f"--inputs for a job folder")
    try:
        files = [f for a in audio for f in (audio_files(a, pattern) if a.is_dir() else [str(a)])]
        if list_file is not None:
            files += read_list(list_file)
        if not files:
            raise click.UsageError("no audio file given: pass files as arguments or --list FILE")
        if out is not None:
            output_format(out)
        if onnx_file is not None:
            from conilium.finetune.onnx_predict import OnnxPredictor

            predictor = OnnxPredictor(onnx_file, device=device, batch_size=batch_size, max_seconds=max_seconds,
                                      max_whole_seconds=max_whole_seconds, rescale_loud=rescale_loud)
        else:
            from conilium.finetune.predict import Predictor  # torch

            predictor = Predictor(model_dir, run=run_dir, device=device, batch_size=batch_size,
                                  max_seconds=max_seconds, max_whole_seconds=max_whole_seconds,
                                  rescale_loud=rescale_loud, transcripts=transcripts, asr=asr)
            if segment is not None and predictor.needs_text:
                from conilium.finetune.segments import SEGMENT_FUSION

                raise click.UsageError(SEGMENT_FUSION)
        no_speech = []
        if segment is None:
            results = predictor.predict(files, progress=not quiet)
        else:
            from conilium.finetune.segments import parse_segment, predict_segments

            spec = parse_segment(segment, min_segment=min_segment, pad=pad, threshold=vad_threshold,
                                 max_segment=max_segment or predictor.max_seconds or 30.0)
            segmented = predict_segments(predictor, files, spec, progress=not quiet)
            results, no_speech = segmented.results, segmented.no_speech
        if out is not None:
            write_results(out, results, predictor.classes, predictor.attributes, segments=segment is not None)
        else:
            click.echo(results_csv(results, predictor.classes, predictor.attributes, segments=segment is not None),
                       nl=False)
    except click.UsageError:
        raise
    except ConiliumError as e:
        if "--out" in str(e) or "--list" in str(e) or str(e).startswith(("--transcripts", "--asr:")):
            raise click.UsageError(str(e)) from None
        fail(e)
    failed = [r for r in results if not r.ok]
    for r in failed:
        at = "" if r.start is None else f" [{r.start:.3f}-{r.end:.3f} s]"
        click.echo(f"predict: {r.file}{at}: {r.error}", err=True)
    for f in no_speech:
        click.echo(f"predict: {f}: no speech found ({spec.describe()}); no rows written for it", err=True)
    n_ok = len(results) - len(failed)
    unit = "file(s)" if segment is None else "segment(s)"
    cut = [r for r in results if r.warning and "truncated" in r.warning]
    if cut:
        click.echo(f"predict: {len(cut)} {unit} longer than {predictor.max_seconds:g} s: only their beginning was "
                   f"used (Seconds and Warning columns; --max-seconds 0 reads whole files)", err=True)
    for word, what in (("silent", "silent"), ("very short", f"shorter than {SHORT_SECONDS:g} s")):
        said = [r.file if r.start is None else f"{r.file} [{r.start:.3f}-{r.end:.3f} s]"
                for r in results if r.warning and word in r.warning]
        if said:
            more = f" and {len(said) - 3} more" if len(said) > 3 else ""
            click.echo(f"predict: {len(said)} {unit} {what}, their predictions mean little (Warning column): "
                       f"{', '.join(said[:3])}{more}", err=True)
    if out is not None:
        if segment is None:
            click.echo(f"{out}: {n_ok} file(s) predicted, {len(failed)} failed", err=True)
        else:
            click.echo(f"{out}: {n_ok} segment(s) of {segmented.files - len(no_speech)} recording(s) predicted, "
                       f"{len(failed)} failed, {len(no_speech)} without speech", err=True)
    if n_ok == 0 and (failed or segment is None):
        sys.exit(1)


@click.command(cls=Command, context_settings=CONTEXT)
@click.argument("model_dir", required=False, type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--run", "run_dir", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="A train-head run (or its conilium-eval tune-thresholds output) instead of MODEL_DIR: its head "
                   "on the upstream of the cache it was trained on, as predict --run runs it.")
@click.option("--onnx", "onnx_file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The ONNX file to write (FILE.onnx).")
@click.option("--no-check", is_flag=True,
              help="Skip the comparison of onnxruntime's outputs with PyTorch's (not recommended).")
@quiet_option("No summary line.")
@version_option
def export_cmd(model_dir, run_dir, onnx_file, no_check, quiet):
    """Export a finetune-best model, or a train-head run with its cache's upstream, as one ONNX graph.

    \b
    The graph takes waves (float32 [batch, samples], 16 kHz, each clip zero-padded to the
    longest) and lengths (int64 [batch], samples), batch and length dynamic, and gives
    probabilities ([batch, classes]) and, for a model that predicts them, attributes
    ([batch, 3]: arousal, valence, dominance, 1-7). The classes, decision offsets and how to
    read the audio (truncation, normalisation) are in the ONNX metadata ('conilium', JSON),
    so 'predict --onnx FILE' gives what predict --model/--run gives, without torch.
    Before the file is written, onnxruntime and PyTorch predict the same test batches
    (clips of different lengths, padded in one batch); the export fails, writing nothing,
    when a probability differs by more than 1e-4 (an attribute by more than 1e-3).
    Upstreams of the wav2vec 2.0 family (WavLM, wav2vec 2.0, HuBERT) are exported; Whisper
    is not. Needs onnx and onnxruntime: pip install 'conilium[onnx]'.

    \b
    Examples:
      conilium finetune export models/wavlm-wbce-S --onnx models/wavlm-wbce-S.onnx
      conilium finetune export --run runs/wbce-S-tuned --onnx wbce-S.onnx
      predict --onnx models/wavlm-wbce-S.onnx a.wav b.flac --out predictions.csv
      predict --run runs/audio+text a.wav b.wav --transcripts texts/ --out predictions.csv
      predict --model models/wavlm-wbce-S podcast.flac --segment vad --out segments.csv
    """
    if (model_dir is None) == (run_dir is None):
        raise click.UsageError("give MODEL_DIR (finetune-best) or --run RUN (train-head), one of the two")
    if onnx_file.suffix.lower() != ".onnx":
        raise click.UsageError(f"--onnx {onnx_file}: the file name must end in .onnx")
    if run_dir is None:
        refuse_dir(model_dir, "a finetune-best model directory", "pass a directory finetune-best wrote, or a "
                   "train-head run to --run", accept=("model",))
    else:
        refuse_dir(run_dir, "a train-head run directory", "pass a directory train-head (or conilium-eval "
                   "tune-thresholds) wrote to --run; a finetune-best model directory is MODEL_DIR",
                   accept=("run",))
    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        fail(ConiliumError(f"conilium finetune export needs {' and '.join(missing)}: pip install 'conilium[onnx]'"))
    _quiet_library_warnings(True)
    from conilium.finetune.onnx import export_onnx  # torch, transformers, onnx

    try:
        meta = export_onnx(onnx_file, model_dir=model_dir, run=run_dir, check=not no_check)
    except ConiliumError as e:
        fail(e)
    if not quiet:
        check = meta.get("check")
        said = ("not checked" if check is None else
                f"onnxruntime within {check['max_abs_diff_probabilities']:.1e} of PyTorch's probabilities"
                + (f", {check['max_abs_diff_attributes']:.1e} of its attributes" if meta["attributes"] else ""))
        click.echo(f"{onnx_file}: {', '.join(meta['outputs'])} for {len(meta['classes'])} class(es), exported in "
                   f"{meta['export_seconds']:.1f} s; {said}", err=True)


@click.group("finetune", cls=Group, context_settings=CONTEXT,
             short_help="Corpus -> fine-tuned model (end to end) -> predictions on audio.")
@quiet_option(GROUP_QUIET)
@version_option
def finetune_group(quiet):
    """End to end: fine-tune an upstream and a head on the audio, then predict with the model.

    \b
      train     corpus -> model directory, thresholds tuned   (also installed as finetune-best)
      predict   model directory, head run or ONNX file + audio files -> predictions   (also installed as predict)
      export    model directory or head run -> one ONNX graph for predict --onnx (onnxruntime, no torch)
    """


finetune_group.add_command(finetune_best_cmd, "train")
finetune_group.add_command(predict_cmd, "predict")
finetune_group.add_command(export_cmd, "export")


if __name__ == "__main__":  # pragma: no cover
    finetune_best_cmd()

"""``predict --inputs``: the command's side of :mod:`conilium.finetune.scale` (options checked,
the job run here, under torchrun or on ray, and what happened said on standard error)."""

from __future__ import annotations

import sys

import click

from conilium.errors import ConiliumError

from .common import fail


def predict_job(model_dir, run_dir, onnx_file, audio, list_file, pattern, out, inputs, shard_files, backend, address,
                n_jobs, gpus_per_job, batch_size, max_seconds, max_whole_seconds, rescale_loud, device, quiet) -> None:
    """Run ``predict --inputs``; exit status 1 when this process's chunks hold no predicted file."""
    from conilium.finetune.scale import PredictorSpec, process_rank, run_job, run_job_ray

    if inputs is None:
        raise click.UsageError("--shard-files, --backend, --address, --n-jobs and --gpus-per-job are for a job: give "
                               "--inputs LIST_OR_FOLDER and --out DIR")
    if audio or list_file is not None:
        raise click.UsageError("--inputs takes the place of AUDIO and --list: give the files in one of the two ways")
    if out is None:
        raise click.UsageError("--inputs needs --out DIR: the job folder (shards, index, job.json)")
    if backend != "ray" and (address is not None or n_jobs != 1 or gpus_per_job):
        raise click.UsageError("--address, --n-jobs and --gpus-per-job are for --backend ray (under torchrun, "
                               "--nproc_per_node says how many processes)")
    kind, path = (("model", model_dir) if model_dir is not None else ("run", run_dir) if run_dir is not None
                  else ("onnx", onnx_file))
    try:
        spec = PredictorSpec(kind, str(path), device=device, batch_size=batch_size, max_seconds=max_seconds,
                             max_whole_seconds=max_whole_seconds, rescale_loud=rescale_loud)
        if backend == "ray":
            rank, world = 0, 1
            summary = run_job_ray(spec, inputs, out, pattern=pattern, shard_files=shard_files, address=address,
                                  workers=n_jobs, gpus_per_worker=gpus_per_job, progress=not quiet)
        else:
            rank, world = process_rank()
            summary = run_job(spec, inputs, out, pattern=pattern, shard_files=shard_files, rank=rank, world=world,
                              progress=not quiet)
    except ConiliumError as e:
        if str(e).startswith(("--out", "--inputs")):
            raise click.UsageError(str(e)) from None
        fail(e)
    who = f"predict (process {rank + 1} of {world})" if world > 1 else "predict"
    if summary.failed:
        names = "; ".join(f"{f}: {err}" for f, err in summary.failed_files)
        more = f" (and {summary.failed - len(summary.failed_files)} more)" if summary.failed > len(summary.failed_files) \
            else ""
        click.echo(f"{who}: {summary.failed} file(s) failed, listed with their error in the Error column: "
                   f"{names}{more}", err=True)
    state = "complete" if summary.complete else "not complete yet (other processes may still be predicting)"
    click.echo(f"{who}: {out}: {summary.predicted} file(s) predicted, {summary.failed} failed in {summary.shards} "
               f"shard(s) ({summary.predicted_now} predicted now, {summary.skipped} already done); the job is {state}",
               err=True)
    if summary.files and summary.predicted == 0:
        sys.exit(1)

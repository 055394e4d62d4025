"""``python -m conilium.study`` (``run_all.sh``): the whole study's command line."""

import click

from conilium.errors import ConiliumError

from .steps import StudyConfig, run_study


def _seeds(value):
    if value is None:
        return ()
    from conilium.heads.grid import seed_names

    try:
        return tuple(seed_names(value))
    except ConiliumError as e:
        raise click.BadParameter(str(e)) from None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--corpus", type=click.Path(exists=True, file_okay=False), default=None,
              help="MSP-Podcast corpus root (Audios/, Labels/). Default: generate the demo corpus "
                   "and use small random-weight upstreams.")
@click.option("--out", default="results", show_default=True, help="Results folder (REPORT.md, runs, caches).")
@click.option("--cache-dir", default=None, help="Where feature caches go (default: <out>/cache).")
@click.option("--demo-clips", default=400, show_default=True, help="Clips of the demo corpus.")
@click.option("--seed", default=0, show_default=True)
@click.option("--seeds", default=None, metavar="S1,S2,...", callback=lambda ctx, param, value: _seeds(value),
              help="Train every head configuration once per seed (train-grid --seeds); the report shows each "
                   "row's mean ± sd over its seeds, the later steps (thresholds, ensembles, fine-tuning) use "
                   "the first seed's runs. Default: one seed, --seed.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--batch-seconds", type=float, default=None, help="extract-features: audio seconds per batch.")
@click.option("--batch-size", type=int, default=None, help="train-head batch size.")
@click.option("--epochs", type=int, default=None, help="train-head epochs (demo: 20; real: 40).")
@click.option("--finetune-epochs", type=int, default=None, help="finetune-best epochs (demo: 2; real: 40).")
@click.option("--finetune-batch-size", type=int, default=None)
@click.option("--n-jobs", default=2, show_default=True, help="Heads trained at the same time.")
@click.option("--skip-bad", is_flag=True, help="Leave out unreadable clips (listed) instead of stopping.")
@click.option("--allow-symlinks", is_flag=True,
              help="Read audio through symbolic links in Audios/ that point outside it (refused by default).")
@click.option("--skip-finetune", is_flag=True, help="Leave out the end-to-end fine-tuning and prediction.")
@click.option("--paper-only", is_flag=True,
              help="Only the paper's experiments: leave out the rows beyond it (Whisper upstream, "
                   "arousal/valence/dominance, X/O clips, LoRA).")
@click.option("--noise", type=click.Path(exists=True, file_okay=False), default=None,
              help="Noise recordings (e.g. MUSAN's noise folder) for the augmentation run of section 3.2 "
                   "(real corpora; the demo writes its own).")
@click.option("-q", "--quiet", is_flag=True,
              help="Every step without its progress bars (the step lines and timings stay): for logs.")
def study_cmd(**kw):
    """The whole CONILIUM study in one command: corpus description, feature caches of four
    upstreams, the heads of the paper's Tables 1-3 and section 3.4 (on frozen features),
    threshold adjustment, ensembles (unweighted and weighted), Easy/Difficult analysis,
    end-to-end fine-tuning, Table 2's heads again on the fine-tuned upstream's features,
    prediction, and <out>/REPORT.md with our numbers beside the paper's, the setting
    of every row stated.

    \b
    Examples:
      ./run_all.sh                                   # demo corpus, about 4–6 minutes on 2 idle cores
      ./run_all.sh --corpus /data/MSP-PODCAST-1.11 --device cuda --cache-dir /scratch/cache
      ./run_all.sh --seeds 0,1,2                     # every head thrice: mean ± sd per row

    Rerunning resumes: complete caches and runs are reused.
    """
    try:
        run_study(StudyConfig(**kw))
    except ConiliumError as e:
        raise click.ClickException(str(e)) from None


if __name__ == "__main__":
    study_cmd(prog_name="run_all.sh")

"""``conilium corpus``: ``make-demo`` (alias ``make-demo-corpus``) and ``describe`` (alias
``describe-corpus``)."""

from __future__ import annotations

from pathlib import Path

import click

from conilium.corpus import ALLOW_SYMLINKS_HELP
from conilium.demo import MIN_CLIPS
from conilium.errors import ConiliumError

from .common import (CONTEXT, GROUP_QUIET, SEED, Command, Group, check_corpus_arg, fail, quiet_option,
                     version_option)


@click.command(cls=Command, context_settings=CONTEXT)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory to create for the corpus (Audios/ and Labels/ go inside).")
@click.option("--clips", type=click.IntRange(min=MIN_CLIPS), default=300, show_default=True,
              help="Number of clips, split 60/25/15 % into Train, Development and Test3.")
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="Random seed; the same seed and --clips give byte-identical files.")
@click.option("--noise-out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write noise recordings (white, pink, brown, babble, hum) into this directory, "
                   "for extract-features --augment-noise.")
@click.option("--noise-files", type=click.IntRange(min=1), default=8, show_default=True,
              help="Number of noise recordings written with --noise-out.")
@click.option("--overwrite", is_flag=True,
              help="Replace --out (and --noise-out) if it already exists and is not empty.")
@quiet_option("No progress bar or messages.")
@version_option
def make_demo_corpus_cmd(out, clips, seed, noise_out, noise_files, overwrite, quiet):
    """Write a small synthetic corpus in the MSP-Podcast release layout.

    The corpus stands in for MSP-Podcast to try every stage of the pipeline, or to test
    it, without the real data: speech-like 16 kHz WAV clips whose prosody follows a
    hidden emotion mixture, each judged by 5 to 7 simulated annotators (primary and
    secondary emotions, A/V/D scores), with the consensus label of their majority vote.
    Test3 clips are unlabelled, as in the real release.

    \b
    Example:
      make-demo-corpus --out demo --clips 300 --seed 0 --noise-out demo-noise
      describe-corpus --corpus demo --out demo-report

    \b
    Layout written:
      OUT/Audios/MSP-PODCAST_XXXX_YYYY.wav
      OUT/Labels/labels_consensus.csv   one row per clip (EmoClass, EmoAct/Val/Dom, SpkrID, Gender, Split_Set)
      OUT/Labels/labels_detailed.csv    one row per annotation (FileName, EmoDetail)
    """
    from conilium.demo import make_demo_corpus

    try:
        make_demo_corpus(out, clips=clips, seed=seed, noise_dir=noise_out, noise_files=noise_files,
                         overwrite=overwrite, verbose=not quiet)
    except ConiliumError as e:
        fail(e)
    if not quiet:
        click.echo(f"Wrote a demo corpus of {clips} clips (seed {seed}) to {out}")
        click.echo(f"  {out / 'Audios'}/ ({clips} WAV files)")
        click.echo(f"  {out / 'Labels'}/labels_consensus.csv, labels_detailed.csv")
        if noise_out is not None:
            click.echo(f"  {noise_out}/ ({noise_files} noise recordings)")


@click.command(cls=Command, context_settings=CONTEXT)
@click.option("--corpus", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Corpus root in the MSP-Podcast layout (Audios/, Labels/).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for the report (created if missing; its files are replaced).")
@click.option("--skip-bad", is_flag=True,
              help="Leave out clips whose audio is missing or unreadable (listed in the report) instead of stopping.")
@click.option("--allow-symlinks", is_flag=True, help=ALLOW_SYMLINKS_HELP)
@quiet_option("Print nothing but errors.")
@version_option
def describe_corpus_cmd(corpus, out, skip_bad, allow_symlinks, quiet):
    """Summarise a corpus: labels, annotators, agreement, durations, and two figures.

    \b
    Writes into OUT:
      summary.json       every figure below, machine-readable
      summary.md         the same as Markdown tables
      durations.png      clip durations per split, with the 8 s mark (the paper's Figure 1)
      cooccurrence.png   mean S target of the clips of each consensus class (the paper's Figure 3)

    The summary gives clips per split and consensus class (O: Other won, X: no
    agreement), annotators per clip, agreement per split (mean top share of the P and S
    targets, share of clips passing P* >= 0.6 and S* >= 0.5, Krippendorff's alpha of the
    primary labels), the words that map to no target class, clip durations, and how many
    clips have a transcript (Transcripts/<clip stem>.txt, UTF-8; the first missing ones named).

    \b
    Example:
      describe-corpus --corpus MSP-PODCAST-1.11 --out reports/msp-1.11
    """
    from conilium.describe import OUTPUT_FILES, describe_corpus  # matplotlib: only when run

    check_corpus_arg(corpus)
    try:
        summary = describe_corpus(corpus, out, skip_bad=skip_bad, allow_symlinks=allow_symlinks)
    except ConiliumError as e:
        fail(e)
    if quiet:
        return
    per_split = ", ".join(f"{s} {n}" for s, n in summary["clips_per_split"].items())
    click.echo(f"{corpus}: {summary['clips']} clips ({per_split})")
    if summary["skipped"]:
        click.echo(f"  skipped {len(summary['skipped'])} clip(s) with bad audio (listed in summary.md)")
    for split, counts in summary["consensus"].items():
        if split != "all":
            click.echo(f"  {split}: " + " ".join(f"{k}={v}" for k, v in counts.items() if v))
    t = summary["transcripts"]
    if t["folder"]:
        click.echo(f"  transcripts: {t['with_transcript']} of {t['clips']} clips"
                   + (f" ({t['missing']} missing, listed in summary.md)" if t["missing"] else ""))
    click.echo(f"Wrote {', '.join(str(out / name) for name in OUTPUT_FILES)}")


@click.group("corpus", cls=Group, context_settings=CONTEXT,
             short_help="A demo corpus; a corpus's counts, agreement and figures.")
@quiet_option(GROUP_QUIET)
@version_option
def corpus_group(quiet):
    """The corpus: a synthetic demo corpus in the MSP-Podcast layout, and a summary of any corpus.

    \b
      make-demo   write a demo corpus          (also installed as make-demo-corpus)
      describe    counts, agreement, figures   (also installed as describe-corpus)
    """


corpus_group.add_command(make_demo_corpus_cmd, "make-demo")
corpus_group.add_command(describe_corpus_cmd, "describe")

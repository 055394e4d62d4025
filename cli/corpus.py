"""``conilium corpus``: ``make-demo`` (alias ``make-demo-corpus``), ``describe`` (alias
``describe-corpus``) and ``convert`` (a manifest from IEMOCAP's or CREMA-D's layout)."""

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
              help="Corpus root: the MSP-Podcast layout (Audios/, Labels/) or a corpus.csv/corpus.jsonl manifest.")
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
    primary labels), the words that map to no target class, and clip durations.

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
    click.echo(f"Wrote {', '.join(str(out / name) for name in OUTPUT_FILES)}")


@click.command(cls=Command, context_settings=CONTEXT)
@click.option("--from", "source", required=True, type=click.Choice(["iemocap", "crema-d"]),
              help="The source corpus's layout.")
@click.argument("src", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Corpus root to write corpus.jsonl and classes.json into (default: SRC); its audio files are "
                   "hard-linked (or copied) from SRC under the same paths.")
@quiet_option("No messages.")
@version_option
def convert_corpus_cmd(source, src, out, quiet):
    """Write a corpus manifest (corpus.jsonl + classes.json) from a public corpus's own layout.

    \b
      iemocap   SRC holds Session1..Session5 (dialog/EmoEvaluation/*.txt, sentences/wav/);
                classes ang, hap (+ excited), sad, neu; Session 4 Development, 5 Test1
      crema-d   SRC holds AudioWAV/ and finishedResponses.csv (voice-only ratings) or
                processedResults/tabulatedVotes.csv; classes A D F H N S; actors by id:
                …0 Test1, …1 Development
    \b
    Every annotator's label is kept; the manifest is then read as any corpus. Example:
      conilium corpus convert --from iemocap /data/IEMOCAP_full_release --out /data/iemocap
      extract-features --corpus /data/iemocap --upstream wavlm-large --out cache/iemocap-wavlm
    """
    from conilium.convert import convert_corpus

    try:
        summary = convert_corpus(source, src, out)
    except ConiliumError as e:
        fail(e)
    if not quiet:
        per_split = ", ".join(f"{s} {sum(c.values())}" for s, c in summary["splits"].items())
        click.echo(f"{summary['manifest']}: {summary['clips']} clips ({per_split}); classes "
                   f"{' '.join(summary['classes'])}")


@click.group("corpus", cls=Group, context_settings=CONTEXT,
             short_help="A demo corpus; a corpus's counts, agreement and figures.")
@quiet_option(GROUP_QUIET)
@version_option
def corpus_group(quiet):
    """The corpus: a synthetic demo corpus in the MSP-Podcast layout, and a summary of any corpus.

    \b
      make-demo   write a demo corpus          (also installed as make-demo-corpus)
      describe    counts, agreement, figures   (also installed as describe-corpus)
      convert     a manifest from IEMOCAP's or CREMA-D's layout
    """


corpus_group.add_command(make_demo_corpus_cmd, "make-demo")
corpus_group.add_command(describe_corpus_cmd, "describe")
corpus_group.add_command(convert_corpus_cmd, "convert")

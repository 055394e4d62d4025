"""``conilium corpus``: ``make-demo`` (alias ``make-demo-corpus``), ``describe`` (alias
``describe-corpus``) and ``convert`` (a manifest from IEMOCAP's or CREMA-D's layout)."""

from __future__ import annotations

from pathlib import Path

import click

from conilium.corpus import ALLOW_SYMLINKS_HELP
from conilium.demo import MIN_CLIPS
from conilium.errors import ConiliumError

from .common import (CONTEXT, GROUP_QUIET, SEED, Command, Count, Group, check_corpus_arg, fail, quiet_option,
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
      OUT/Transcripts/MSP-PODCAST_XXXX_YYYY.txt   synthetic words, some of them cues of the emotion
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
        click.echo(f"  {out / 'Transcripts'}/ ({clips} synthetic transcripts)")
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


@click.command(cls=Command, context_settings=CONTEXT)
@click.option("--corpus", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Corpus root in the MSP-Podcast layout; transcripts go to its Transcripts/.")
@click.option("--asr", required=True, metavar="MODEL",
              help="Whisper model: a registry name (whisper-large-v3, whisper-large-v3-turbo, whisper-small, …), "
                   "a Hugging Face id or a local model directory (WhisperForConditionalGeneration + processor).")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) of --asr.")
@click.option("--beams", type=Count(1), default=1, show_default=True,
              help="Beam width: 1 is greedy decoding; never sampled.")
@click.option("--batch-size", type=Count(1), default=8, show_default=True,
              help="Pieces of audio (at most 30 s each) decoded at once.")
@click.option("--max-new-tokens", type=Count(1), default=None,
              help="Most tokens written per 30 s piece [default: half the decoder's positions, 224 for Whisper].")
@click.option("--language", default=None,
              help="Language code given to the model (e.g. en); by default the model detects it.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto: CUDA when available, else CPU.")
@click.option("--overwrite", is_flag=True,
              help="Transcribe every clip again, replacing Transcripts/ files (else a rerun skips the clips done).")
@click.option("--skip-bad", is_flag=True,
              help="Leave clips whose audio is missing or unreadable untranscribed (listed) instead of stopping.")
@click.option("--allow-symlinks", is_flag=True, help=ALLOW_SYMLINKS_HELP)
@quiet_option("No progress bar or messages.")
@version_option
def transcribe_cmd(corpus, asr, revision, beams, batch_size, max_new_tokens, language, device, overwrite, skip_bad,
                   allow_symlinks, quiet):
    """Write a transcript of every clip with a Whisper model: Transcripts/<clip stem>.txt.

    transformers' WhisperForConditionalGeneration and WhisperProcessor (from_pretrained),
    greedy or beam-search decoding on batches. A clip longer than 30 s (Whisper's window)
    is cut into the fewest equal pieces of at most 30 s, transcribed piece by piece and
    joined with a space (a word across a cut may be split).

    Resumable: every transcript is written atomically, one file per clip, and a rerun skips
    the clips done. Transcripts/transcription.json records the model (id or path, revision,
    hub commit or weights' SHA-256), the settings and the clips in which it heard no words
    (they get no file and count as missing); a rerun with other settings is refused unless
    --overwrite.

    \b
    Example:
      conilium corpus transcribe --corpus MSP-PODCAST-1.11 --asr whisper-large-v3 --language en --device cuda
    """
    from conilium.extract.asr import transcribe_corpus

    check_corpus_arg(corpus)
    try:
        transcribe_corpus(corpus, asr, revision=revision, num_beams=beams, batch_size=batch_size,
                          max_new_tokens=max_new_tokens, language=language, device=device, overwrite=overwrite,
                          skip_bad=skip_bad, allow_symlinks=allow_symlinks, verbose=not quiet)
    except ConiliumError as e:
        fail(e)


@click.group("corpus", cls=Group, context_settings=CONTEXT,
             short_help="A demo corpus; a corpus's counts, agreement and figures; transcripts.")
@quiet_option(GROUP_QUIET)
@version_option
def corpus_group(quiet):
    """The corpus: a synthetic demo corpus in the MSP-Podcast layout, and a summary of any corpus.

    \b
      make-demo   write a demo corpus          (also installed as make-demo-corpus)
      describe    counts, agreement, figures   (also installed as describe-corpus)
      convert     a manifest from IEMOCAP's or CREMA-D's layout
      transcribe  transcripts by a Whisper model (Transcripts/<clip stem>.txt)
    """


corpus_group.add_command(make_demo_corpus_cmd, "make-demo")
corpus_group.add_command(describe_corpus_cmd, "describe")
corpus_group.add_command(convert_corpus_cmd, "convert")
corpus_group.add_command(transcribe_cmd, "transcribe")

"""describe-corpus: summary files and figures, and the make-demo-corpus / describe-corpus CLI."""

import json
from pathlib import Path
from collections import Counter

import numpy as np
import pytest
from click.testing import CliRunner

from conilium import CLASSES
from conilium.cli.corpus import describe_corpus_cmd, make_demo_corpus_cmd
from conilium.corpus import Annotation, Clip, ignored_word_counts, load_corpus
from conilium.describe import OUTPUT_FILES, describe_corpus, primary_alpha
from conilium.targets import secondary_target

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def described(demo_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return out, describe_corpus(demo_corpus, out), load_corpus(demo_corpus)


def test_writes_all_files(described):
    out, summary, _ = described
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES)
    for name in ("durations.png", "cooccurrence.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    assert json.loads((out / "summary.json").read_text()) == summary
    md = (out / "summary.md").read_text()
    for heading in ("Consensus labels", "Annotators per clip", "Agreement", "Durations", "Ignored words"):
        assert f"## {heading}" in md
    assert "| Development |" in md


def test_counts_match_corpus(described):
    _, summary, corpus = described
    assert summary["clips"] == len(corpus) == 300
    assert summary["clips_per_split"] == {"Train": 180, "Development": 75, "Test3": 45}
    for split in ("Train", "Development"):
        expected = Counter(c.emo_class for c in corpus.split(split))
        assert {k: v for k, v in summary["consensus"][split].items() if v} == dict(expected)
    assert summary["consensus"]["Test3"]["unlabelled"] == 45
    assert sum(summary["consensus"]["all"].values()) == 300
    assert summary["ignored_words"] == dict(ignored_word_counts(corpus))


def test_annotators_agreement_durations(described):
    _, summary, corpus = described
    train = summary["annotators_per_clip"]["Train"]
    assert (train["min"], train["max"]) == (5, 7)
    assert sum(train["histogram"].values()) == train["clips"] == 180
    assert summary["annotators_per_clip"]["Test3"]["without_annotations"] == 45

    for split in ("Train", "Development"):
        a = summary["agreement"][split]
        assert a["clips"] == len(corpus.split(split))
        for key in ("mean_top_p", "mean_top_s", "p_star_share", "s_star_share"):
            assert 0.0 < a[key] <= 1.0
        assert a["mean_top_s"] < a["mean_top_p"]  # secondaries spread the votes
        assert 0.0 < a["krippendorff_alpha"] < 1.0
    assert summary["agreement"]["Test3"]["clips"] == 0
    assert summary["agreement"]["Test3"]["krippendorff_alpha"] is None

    d = np.array([c.duration for c in corpus])
    stats = summary["durations"]["all"]
    assert stats["mean"] == pytest.approx(d.mean(), abs=1e-3)
    assert stats["max"] == pytest.approx(d.max(), abs=1e-3)
    assert stats["longer_than_8s"] == pytest.approx(np.mean(d > 8), abs=1e-4)


def test_cooccurrence_is_mean_s_target(described):
    _, summary, corpus = described
    cooc = summary["cooccurrence"]
    assert cooc["rows"] == cooc["columns"] == list(CLASSES)
    for i, letter in enumerate(CLASSES):
        clips = [c for c in corpus if c.emo_class == letter]
        assert cooc["clips"][i] == len(clips)
        expected = np.mean([secondary_target(c.annotations) for c in clips], axis=0)
        np.testing.assert_allclose(cooc["matrix"][i], expected, atol=1e-4)
        assert int(np.argmax(cooc["matrix"][i])) == i  # each class is mostly perceived as itself


def test_accepts_a_loaded_corpus(small_demo_corpus, tmp_path):
    corpus = load_corpus(small_demo_corpus)
    summary = describe_corpus(corpus, tmp_path / "report")
    assert summary["clips"] == 60
    assert (tmp_path / "report" / "cooccurrence.png").read_bytes().startswith(PNG_SIGNATURE)


def _clip(name, primaries):
    annotations = tuple(Annotation(worker=f"W{i}", primary=p) for i, p in enumerate(primaries))
    return Clip(name=name, split="Train", emo_class=None, speaker=None, gender="Unknown", duration=1.0,
                annotations=annotations)


def test_primary_alpha():
    assert primary_alpha([_clip("a", ["Neutral"] * 3), _clip("b", ["Sad", "Sad"])]) == 1.0
    assert primary_alpha([_clip("a", ["Neutral"] * 3), _clip("b", ["Neutral"] * 2)]) is None  # one category
    assert primary_alpha([_clip("a", ["Neutral"])]) is None  # no pairable unit
    # Other and non-target words form one category
    assert primary_alpha([_clip("a", ["Other-bored", "Amused"]), _clip("b", ["Angry", "Angry"])]) == 1.0
    mixed = primary_alpha([_clip("a", ["Neutral", "Neutral", "Sad"]), _clip("b", ["Sad", "Sad", "Sad"]),
                           _clip("c", ["Happy", "Neutral", "Happy"])])
    assert 0.0 < mixed < 1.0


def test_cli_make_and_describe(tmp_path):
    runner = CliRunner()
    corpus, report = tmp_path / "demo", tmp_path / "report"
    result = runner.invoke(make_demo_corpus_cmd, ["--out", str(corpus), "--clips", "20", "--seed", "3",
                                                  "--noise-out", str(tmp_path / "noise"), "--noise-files", "2"])
    assert result.exit_code == 0, result.output
    assert str(corpus) in result.output
    assert len(list((tmp_path / "noise").iterdir())) == 2

    result = runner.invoke(describe_corpus_cmd, ["--corpus", str(corpus), "--out", str(report)])
    assert result.exit_code == 0, result.output
    assert "20 clips" in result.output
    assert all(str(report / name) in result.output for name in OUTPUT_FILES)

    result = runner.invoke(make_demo_corpus_cmd, ["--out", str(corpus), "--clips", "20"])
    assert result.exit_code == 1
    assert "Error:" in result.output and "--overwrite" in result.output
    result = runner.invoke(make_demo_corpus_cmd, ["--out", str(corpus), "--clips", "20", "--overwrite", "-q"])
    assert result.exit_code == 0 and result.output == ""


def test_cli_missing_corpus_is_a_clean_error(tmp_path):
    result = CliRunner().invoke(describe_corpus_cmd, ["--corpus", str(tmp_path / "nowhere"),
                                                      "--out", str(tmp_path / "report")])
    assert result.exit_code == 1
    assert result.output.strip().startswith("Error:") and "corpus directory not found" in result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)


def test_cli_help():
    for command in (make_demo_corpus_cmd, describe_corpus_cmd):
        result = CliRunner().invoke(command, ["--help"])
        assert result.exit_code == 0
        assert "Example:" in result.output


def test_durations_figure_keeps_the_8s_label_clear_of_the_legend(described):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from conilium.describe import plot_durations

    out, _, corpus = described
    md = (out / "summary.md").read_text()
    for name in ("durations.png", "cooccurrence.png"):  # a caption under each figure
        assert md.split(f"]({name})", 1)[1].lstrip("\n").startswith("*")
    fig = plot_durations(corpus)
    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent(renderer)
    label = next(t for t in ax.texts if "8 s" in t.get_text()).get_window_extent(renderer)
    axes = ax.get_window_extent(renderer)
    assert not legend.overlaps(label)
    assert legend.y1 < axes.y0  # below the axes: it hides no bar either
    assert axes.x0 <= label.x0 and label.x1 <= axes.x1 and label.y1 <= axes.y1 + 1  # inside, not clipped
    assert [t.get_text() for t in ax.get_legend().get_texts()][0].startswith("Train (n=")


def test_the_corpus_audio_folder_given_as_corpus_names_the_root_to_pass(small_demo_corpus, tmp_path):
    audios = Path(small_demo_corpus) / "Audios"
    r = CliRunner().invoke(describe_corpus_cmd, ["--corpus", str(audios), "--out", str(tmp_path / "d")])
    assert r.exit_code == 1
    assert "is the corpus's audio folder, not the corpus; pass its parent" in r.output
    assert str(Path(small_demo_corpus).resolve()) in r.output and "empty directory" not in r.output
    assert not (tmp_path / "d").exists()

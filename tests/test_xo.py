"""X (no agreement) and O (other) clips in training: train-head --train-on-xo."""

import csv
import json

import numpy as np
import pytest

from conilium.corpus import Annotation, Clip
from conilium.errors import ConfigError
from conilium.targets import class_weights, primary_target, secondary_target, training_set

SMALL = dict(hidden=256, dropout=0.2, device="cpu", epochs=3)


def _train_clips(cache_dir, split="Train"):
    from conilium.cache.reader import FeatureCache

    with FeatureCache(cache_dir) as cache:
        return [cache.clips[n] for n in cache.split(split)]


def _clip(name, emo, annotations):
    return Clip(name=name, split="Train", emo_class=emo, speaker=None, gender="Unknown", duration=1.0,
                annotations=tuple(Annotation(f"W{i}", p, tuple(s)) for i, (p, s) in enumerate(annotations)))


def test_counts_on_the_demo_corpus(demo_cache):
    clips = _train_clips(demo_cache)
    xo = [c for c in clips if c.emo_class in ("X", "O")]
    with_label = [c for c in xo if secondary_target(c.annotations) is not None]
    kept, targets, counts = training_set(clips, "S", include_xo=True)
    assert counts["added_X"] == sum(c.emo_class == "X" for c in with_label)
    assert counts["added_O"] == sum(c.emo_class == "O" for c in with_label)
    assert counts["xo_no_target_label"] == len(xo) - len(with_label)
    assert counts["non_target_consensus"] == 0
    base, _, base_counts = training_set(clips, "S")
    assert len(kept) == len(base) + len(with_label)
    assert base_counts["non_target_consensus"] == len(xo)
    # on the 300-clip demo corpus: 7 X and 1 O Train clips, each with a target-class label
    assert (counts["added_X"], counts["added_O"], counts["xo_no_target_label"]) == (7, 1, 0)


def test_an_x_clip_trains_on_its_soft_vector(demo_cache):
    clips = _train_clips(demo_cache)
    for kind, vector in (("S", secondary_target), ("P", primary_target)):
        kept, targets, _ = training_set(clips, kind, include_xo=True)
        x = next(i for i, c in enumerate(kept) if c.emo_class == "X")
        assert np.array_equal(targets[x], vector(kept[x].annotations))


def test_clips_without_a_target_label_stay_out_and_the_agreement_filter_applies():
    other_only = _clip("o", "O", [("Other", ["Other-bored"]), ("Other", [])])
    split_x = _clip("x", "X", [("Angry", []), ("Sad", []), ("Happy", []), ("Neutral", [])])
    agreed_x = _clip("y", "X", [("Angry", ["Angry"]), ("Angry", []), ("Other", []), ("Sad", [])])
    kept, _, counts = training_set([other_only, split_x, agreed_x], "S", include_xo=True)
    assert [c.name for c in kept] == ["x", "y"] and counts["xo_no_target_label"] == 1
    kept, _, counts = training_set([other_only, split_x, agreed_x], "S*", include_xo=True)
    assert [c.name for c in kept] == ["y"] and counts["low_agreement"] == 1 and counts["added_X"] == 1
    with pytest.raises(ConfigError, match="--train-on-xo"):
        training_set([split_x], "hard", include_xo=True)


def test_default_off_is_unchanged(demo_cache):
    clips = _train_clips(demo_cache)
    a = training_set(clips, "S")
    b = training_set(clips, "S", include_xo=False)
    assert [c.name for c in a[0]] == [c.name for c in b[0]] and np.array_equal(a[1], b[1])
    assert list(a[2]) == ["non_target_consensus", "no_annotations", "fallback_to_hard", "low_agreement"]
    assert all(c.scoreable for c in a[0])


@pytest.fixture(scope="module")
def xo_run(demo_cache, tmp_path_factory):
    from conilium.heads.train import TrainConfig, train_head

    out = tmp_path_factory.mktemp("xo") / "wbce-S-xo"
    return out, train_head(TrainConfig(cache=str(demo_cache), loss="wbce", labels="S", train_on_xo=True, **SMALL),
                           out, progress=False)


def test_run_counts_weights_and_scores(xo_run, demo_cache):
    from conilium.heads.train import TrainConfig, plan_passes, prepare

    run, m = xo_run
    clips = _train_clips(demo_cache)
    xo = m["training"]["xo"]
    assert xo == {"added_X": 7, "added_O": 1, "left_out_no_target_label": 0}
    scoreable = [c for c in clips if c.scoreable]
    assert m["training"]["clips"] == len(scoreable) + 8
    # X/O clips count in no class weight: the weights are those of the scoreable clips alone
    expected = class_weights([c.emo_class for c in scoreable])
    assert np.allclose(list(m["training"]["class_weights"].values()), expected)
    cfg = TrainConfig(cache=str(demo_cache), loss="wbce", labels="S", train_on_xo=True, **SMALL)
    plain = TrainConfig(cache=str(demo_cache), loss="wbce", labels="S", **SMALL)
    assert np.array_equal(prepare(cfg).weights, prepare(plain).weights)
    assert plan_passes([plain, cfg]) == [[0], [1]]  # other training clips: another pass
    # never scored: Development scores keep the eight consensus classes only
    dev = _train_clips(demo_cache, "Development")
    assert m["n"] == sum(c.scoreable for c in dev) < len(dev)
    with open(run / "predictions" / "Development.csv", newline="") as f:
        refs = [row["Reference"] for row in csv.DictReader(f)]
    assert {"X", "O"} & set(refs)  # predicted, shown, not scored


def test_refused_with_hard_targets_and_summary_line(demo_cache, tmp_path):
    from click.testing import CliRunner

    from conilium.cli.heads import train_head_cmd
    from conilium.heads.train import TrainConfig, train_head

    for kw in (dict(labels="hard", loss="wbce"), dict(labels="hard", loss="wce")):
        with pytest.raises(ConfigError, match="--train-on-xo needs soft targets"):
            train_head(TrainConfig(cache=str(demo_cache), train_on_xo=True, **kw), tmp_path / "x", progress=False)
    with pytest.raises(ConfigError, match="--train-on-xo"):
        train_head(TrainConfig(cache=str(demo_cache), train_on_xo=True, sampler="balanced"), tmp_path / "y",
                   progress=False)
    r = CliRunner().invoke(train_head_cmd, ["--cache", str(demo_cache), "--out", str(tmp_path / "h"), "--loss",
                                            "wce", "--labels", "hard", "--train-on-xo", "-q"])
    assert r.exit_code != 0 and "--train-on-xo needs soft targets" in r.output and "--loss wce" in r.output
    r = CliRunner().invoke(train_head_cmd, ["--cache", str(demo_cache), "--out", str(tmp_path / "s"), "--labels", "S",
                                            "--train-on-xo", "--epochs", "2", "--hidden", "64", "--device", "cpu",
                                            "-q"])
    assert r.exit_code == 0, r.output
    assert "trained on 7 X and 1 O clip(s) too (0 left out: no target-class label)" in r.output
    assert json.loads((tmp_path / "s" / "config.json").read_text())["train_on_xo"] is True


def test_report_and_study_show_the_xo_row(xo_run, small_demo_corpus, tmp_path):
    from conilium.evaluate.report import build_report
    from conilium.study import XO_ROW, Study, StudyConfig

    run, _ = xo_run
    md = build_report({"tables": {"table2": {"WBCE(S) + X/O": str(run)}}}, tmp_path / "r").read_text()
    assert "WBCE(S) + X/O *(not in paper)*" in md
    assert "WBCE(S) + X/O: 7 X and 1 O clips added" in md and "never scored" in md
    study = Study(StudyConfig(out=str(tmp_path / "results")))
    study.corpus = small_demo_corpus
    spec = study._report_spec(tmp_path / "t1", tmp_path / "tuned", {}, tmp_path / "ed", tmp_path / "model")
    assert spec["tables"]["table2"][XO_ROW[0]] == str(study.runs / "extra" / XO_ROW[1])
    assert set(spec["tables"]["attributes"]) == {"Attributes", "WBCE(S) + attributes"}

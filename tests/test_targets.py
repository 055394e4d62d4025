"""Training targets: the paper's Figure 2, P*/S* filtering and class weights."""

import numpy as np
import pytest

from conilium import CLASSES
from conilium.corpus import Annotation, Clip
from conilium.errors import ConfigError
from conilium.targets import (DEFAULT_READING, agreement, class_weights, passes_agreement, primary_target,
                              secondary_target, training_set)


def vec(**shares):
    y = np.zeros(len(CLASSES))
    for c, v in shares.items():
        y[CLASSES.index(c)] = v
    return y


FIGURE2 = (
    Annotation("W1", "Neutral", ("Neutral", "Sad")),
    Annotation("W2", "Neutral", ("Neutral", "Other")),
    Annotation("W3", "Sad", ("Sad", "Surprise")),
    Annotation("W4", "Neutral", ("Neutral", "Sad", "Other")),
)


def clip(name, emo, annotations, split="Train"):
    return Clip(name=name, split=split, emo_class=emo, speaker="1", gender="Male", duration=3.0,
                annotations=tuple(annotations))


def test_figure2_primary_and_secondary_targets():
    np.testing.assert_allclose(primary_target(FIGURE2), vec(N=3 / 4, S=1 / 4), atol=1e-7)
    np.testing.assert_allclose(secondary_target(FIGURE2), vec(N=3 / 7, S=3 / 7, U=1 / 7), atol=1e-7)


def test_other_and_non_target_words_are_ignored_and_targets_sum_to_one():
    anns = (Annotation("W1", "Other-bored", ("Frustrated", "Happy")),
            Annotation("W2", "Angry", ("Concerned", "Other")),
            Annotation("W3", "Angry", ()))
    p, s = primary_target(anns), secondary_target(anns)
    np.testing.assert_allclose(p, vec(A=1.0), atol=1e-7)
    # W1 contributes {H}, W2 {A}, W3 {A}
    np.testing.assert_allclose(s, vec(A=2 / 3, H=1 / 3), atol=1e-7)
    assert p.sum() == pytest.approx(1.0) and s.sum() == pytest.approx(1.0)


def test_clip_with_only_other_has_no_soft_target():
    anns = (Annotation("W1", "Other", ("Other-x",)),)
    assert primary_target(anns) is None and secondary_target(anns) is None


def test_agreement_filters_keep_only_high_agreement_training_clips():
    high_p = clip("a.wav", "N", [Annotation(f"W{i}", w, ()) for i, w in enumerate(["Neutral"] * 3 + ["Sad"] * 2)])
    low_p = clip("b.wav", "N", [Annotation(f"W{i}", w, ()) for i, w in enumerate(["Neutral"] * 2 + ["Sad", "Happy"])])
    # top P share 3/5 = 0.6 passes P*; 2/4 = 0.5 fails it
    assert passes_agreement(high_p, "P*") and not passes_agreement(low_p, "P*")
    # Figure 2 clip: top S share 3/7 (targets) or 3/9 (all labels, two Others) < 0.5 fails S*
    fig2 = clip("c.wav", "N", FIGURE2)
    assert not passes_agreement(fig2, "S*")
    assert passes_agreement(fig2, "S*", {"S*": 0.4, "over": "targets"})
    assert not passes_agreement(fig2, "S*", {"S*": 0.4, "over": "all"})
    kept, y, counts = training_set([high_p, low_p, fig2], "P*")
    assert [c.name for c in kept] == ["a.wav", "c.wav"]  # Figure 2's top P share is 3/4
    assert counts["low_agreement"] == 1
    kept, _, _ = training_set([high_p, low_p, fig2], "P")
    assert len(kept) == 3


def test_training_set_excludes_other_and_no_agreement_consensus():
    clips = [clip("n.wav", "N", FIGURE2), clip("o.wav", "O", FIGURE2), clip("x.wav", "X", FIGURE2)]
    kept, y, counts = training_set(clips, "hard")
    assert [c.name for c in kept] == ["n.wav"]
    np.testing.assert_array_equal(y[0], vec(N=1.0))
    assert counts["non_target_consensus"] == 2


def test_soft_targets_fall_back_to_consensus_for_clips_without_annotations():
    clips = [clip("a.wav", "H", []), clip("b.wav", "N", FIGURE2)]
    kept, y, counts = training_set(clips, "S")
    assert len(kept) == 2 and counts["fallback_to_hard"] == 1
    np.testing.assert_array_equal(y[0], vec(H=1.0))
    kept, _, counts = training_set(clips, "S*")  # no annotations: no agreement to measure
    assert [c.name for c in kept] == []


def test_class_weights_are_inverse_frequency():
    labels = ["N"] * 6 + ["H"] * 3 + ["A"] * 1 + ["O", "X"]  # O and X not counted
    w = class_weights(labels)
    n_total, n_classes = 10, len(CLASSES)
    assert w[CLASSES.index("N")] == pytest.approx(n_total / (n_classes * 6))
    assert w[CLASSES.index("H")] == pytest.approx(n_total / (n_classes * 3))
    assert w[CLASSES.index("A")] == pytest.approx(n_total / (n_classes * 1))
    # unseen classes are counted as seen once (finite weight)
    assert w[CLASSES.index("F")] == pytest.approx(n_total / n_classes)
    with pytest.raises(ConfigError):
        class_weights(["O", "X"])


def test_unknown_target_kind_is_an_error():
    with pytest.raises(ConfigError, match="unknown target kind"):
        training_set([], "Q")


def test_agreement_readings_all_annotators_or_target_labels_only():
    # primaries N, N, Other, Other-bored, S: the paper's "agreed upon by at least 60 % of annotators"
    # counts all five annotators (2/5); the P target vector alone gives 2/3
    anns = [Annotation("W1", "Neutral", ("Sad",)), Annotation("W2", "Neutral", ()),
            Annotation("W3", "Other", ("Neutral",)), Annotation("W4", "Other-bored", ("Frustrated",)),
            Annotation("W5", "Sad", ("Neutral", "Other"))]
    c = clip("d.wav", "N", anns)
    assert DEFAULT_READING == "all"
    assert agreement(c, "P*", "all") == pytest.approx(2 / 5)
    assert agreement(c, "P*", "targets") == pytest.approx(2 / 3)
    assert not passes_agreement(c, "P*") and passes_agreement(c, "P*", reading="targets")
    # perceived sets {N,S}, {N}, {N}+Other, Other, {S,N}+Other: N 4, S 2; 6 target labels + 3 Others
    assert agreement(c, "S*", "targets") == pytest.approx(4 / 6)
    assert agreement(c, "S*", "all") == pytest.approx(4 / 9)
    assert not passes_agreement(c, "S*") and passes_agreement(c, "S*", {"over": "targets"})
    # The training set follows the reading given in the thresholds mapping (TrainConfig.thresholds).
    assert [x.name for x in training_set([c], "P*", thresholds={"over": "targets"})[0]] == ["d.wav"]
    assert training_set([c], "P*")[0] == []
    # Without Other anywhere the two readings agree.
    fig2_no_other = clip("e.wav", "N", [Annotation("W1", "Neutral", ("Sad",)), Annotation("W2", "Neutral", ()),
                                        Annotation("W3", "Sad", ())])
    for kind in ("P*", "S*"):
        assert agreement(fig2_no_other, kind, "all") == pytest.approx(agreement(fig2_no_other, kind, "targets"))
    with pytest.raises(ConfigError, match="agreement reading 'annotator'"):
        training_set([c], "S*", reading="annotator")


def test_train_config_carries_the_reading():
    from conilium.heads.config import TrainConfig

    assert TrainConfig(cache="c").thresholds == {"P*": 0.6, "S*": 0.5, "over": "all"}
    cfg = TrainConfig.from_dict({"cache": "c", "labels": "P*", "agreement_over": "targets"})
    assert cfg.thresholds["over"] == "targets" and cfg.to_json()["agreement_over"] == "targets"

"""The names a prediction's label is given: a class set's own, never MSP-Podcast's name of a
letter another class set uses for another class."""

from conilium import CLASSES
from conilium.classes import MSP_PODCAST, build_class_set, class_names
from conilium.finetune.results import FilePrediction

FRUSTRATION = build_class_set([("F", "Frustration", ()), ("N", "Neutral", ()), ("S", "Surprise", ())])


def test_class_names_come_from_the_recorded_set_with_the_same_codes():
    assert class_names(CLASSES) == MSP_PODCAST.names
    assert class_names(("F", "N", "S"), FRUSTRATION.to_json()) == ("Frustration", "Neutral", "Surprise")
    assert class_names(("F", "N", "S"), FRUSTRATION) == ("Frustration", "Neutral", "Surprise")
    # nothing recorded, or a set of other codes: the codes themselves, not MSP-Podcast's Fear and Sad
    assert class_names(("F", "N", "S")) == ("F", "N", "S")
    assert class_names(("F", "N", "S"), MSP_PODCAST.to_json()) == ("F", "N", "S")
    assert class_names(("F", "N", "S"), {"classes": "malformed"}) == ("F", "N", "S")


def test_a_file_prediction_is_labelled_with_its_class_sets_names():
    msp = FilePrediction("a.wav", prediction="F", classes=CLASSES)
    assert msp.label == "Fear"
    own = FilePrediction("a.wav", prediction="F", classes=("F", "N", "S"), names=FRUSTRATION.names)
    assert own.label == "Frustration"
    unnamed = FilePrediction("a.wav", prediction="S", classes=("F", "N", "S"))
    assert unnamed.label == "S"
    assert FilePrediction("a.wav", error="unreadable").label is None

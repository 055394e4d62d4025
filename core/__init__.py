"""conilium: speech emotion recognition on multi-annotator corpora.

The root package holds what every stage shares: the eight target classes, the
corpus reader (:mod:`conilium.corpus`), the training targets built from all
annotators (:mod:`conilium.targets`) and audio decoding (:mod:`conilium.audio`).
Stages live in sub-packages: :mod:`conilium.extract`, :mod:`conilium.cache`,
:mod:`conilium.heads`, :mod:`conilium.evaluate`.
"""

__version__ = "0.1.0"

#: The eight target classes, in the challenge baseline's order.
CLASSES = ("A", "S", "H", "U", "F", "D", "C", "N")

#: Full emotion word of each class letter.
CLASS_NAMES = {
    "A": "Angry",
    "S": "Sad",
    "H": "Happy",
    "U": "Surprise",
    "F": "Fear",
    "D": "Disgust",
    "C": "Contempt",
    "N": "Neutral",
}

#: Consensus letters that are not target classes: O (other), X (no agreement).
NON_TARGET_CONSENSUS = ("O", "X")

SAMPLE_RATE = 16000

"""Choices and defaults of the evaluation options, in a module that imports neither numpy
nor scikit-learn, so that ``conilium-eval --help`` reads them without loading the
evaluation code; :mod:`.ensemble`, :mod:`.thresholds` and :mod:`.difficulty` import them
from here."""

#: How ``ensemble`` combines runs: mean probability, or majority vote.
METHODS = ("mean", "vote")
#: Coordinate-ascent rounds over the classes of threshold tuning.
DEFAULT_ROUNDS = 3
#: Primaries outside the eight classes (Other) in Krippendorff's alpha: a ninth category, or excluded.
OTHER_MODES = ("category", "exclude")
#: Bootstrap draws of ``metrics`` and ``compare`` unless told otherwise, and the fewest they accept.
DEFAULT_DRAWS = 2000
MIN_DRAWS = 1000
#: Coverage of the bootstrap intervals.
LEVEL = 0.95

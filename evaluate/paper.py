"""Published numbers, each with its source: the CONILIUM paper (the seed) and the two
other papers a reader compares it with.

* :data:`TABLES` holds **only the seed paper's numbers** (Shamsi, Gauder, Tahon, Odyssey
  2024): every score is an F1 on the MSP-Podcast development set with WavLM-large unless
  the row says otherwise; ``None`` where the seed gives no figure. Every seed number comes
  from an end-to-end fine-tuned upstream (:data:`PAPER_SETTING`). Table 4's test row is the
  challenge's leaderboard score on its unlabelled test set, which only the organisers
  could compute.
* :data:`EXTERNAL` holds numbers the seed does **not** give — the challenge baseline's
  and the challenge winner's — with the paper each comes from (:data:`SOURCES`). They
  never go into a "paper" column.
* :data:`FINDINGS` holds the seed's conclusions as checkable comparisons of rows, so a
  report can say, computed from the numbers, whether a run agrees.
* :data:`CORPUS`, :data:`TRAINING_SET_SIZES`, :data:`UPSTREAM_DISAGREEMENT` and
  :data:`EASY_DIFFICULT`: the seed's other numbers (sections 2, 3.5, 3.6 and 4).

Row labels in a report spec are matched to the seed's rows by :func:`match_row`
(case, spaces, ``L_`` prefixes and a few spellings are ignored).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

CITATION = ("M. Shamsi, L. Gauder, M. Tahon, \"The CONILIUM proposition for Odyssey Emotion Challenge: "
            "Leveraging major class with complex annotations\", Odyssey 2024, pp. 281-287, "
            "doi:10.21437/odyssey.2024-40")


@dataclass(frozen=True)
class Source:
    key: str
    short: str
    citation: str


#: Where a published number comes from.
SOURCES: Dict[str, Source] = {s.key: s for s in (
    Source("seed", "Shamsi et al. 2024 (CONILIUM, the paper this project implements)", CITATION),
    Source("challenge", "Goncalves et al. 2024 (the challenge's baseline paper; the paper's reference [17])",
           "L. Goncalves, A. N. Salman, A. Reddy Naini, L. Moro-Velazquez, T. Thebaud, L. P. Garcia, N. Dehak, "
           "B. Sisman, C. Busso, \"Odyssey 2024 - Speech Emotion Recognition Challenge: Dataset, Baseline "
           "Framework, and Results\", Odyssey 2024"),
    Source("winner", "Chen et al. 2024 (the challenge winner's paper)",
           "M. Chen, H. Zhang, Y. Li, et al., \"1st Place Solution to Odyssey Emotion Recognition Challenge "
           "Task1: Tackling Class Imbalance Problem\", Odyssey 2024, pp. 260-265, arXiv:2405.20064"),
)}

#: How every seed number was trained (section 3): the whole model, end to end.
PAPER_SETTING = ("end to end: the upstream fine-tuned with an attentive-statistics-pooling head, AdamW, "
                 "lr 1e-5, batch 16, at most 40 epochs, best development checkpoint (section 3)")


@dataclass(frozen=True)
class PaperRow:
    label: str
    macro: Optional[float]
    micro: Optional[float]
    aliases: Tuple[str, ...] = ()
    note: str = ""
    where: str = ""  # where in the seed paper


@dataclass(frozen=True)
class PaperTable:
    key: str
    title: str
    caption: str
    rows: Tuple[PaperRow, ...]


_TABLE2_ROWS = (PaperRow("WCE", 0.302, 0.402, ("wce(hard)", "wce hard"), where="Table 2"),
                PaperRow("WBCE(P)", 0.340, 0.503, where="Table 2"),
                PaperRow("WBCE(S)", 0.350, 0.517, where="Table 2"),
                PaperRow("KLD(P)", 0.322, 0.481, where="Table 2"),
                PaperRow("KLD(S)", 0.337, 0.502, where="Table 2"))

#: The seed paper's tables, and only its numbers.
TABLES: Dict[str, PaperTable] = {t.key: t for t in (
    PaperTable("table1", "Table 1: upstream models",
               "F1 on the development set for each upstream model (weighted cross-entropy, hard labels), and "
               "the noise-augmentation run of section 3.2 (MUSAN noise on 80 % of the training clips).",
               (PaperRow("WavLM-large", 0.302, 0.402, ("wavlm", "wavlm large"), where="Table 1"),
                PaperRow("Wav2vec2-large", 0.282, 0.374, ("wav2vec2 large robust", "wav2vec2-large-robust"),
                         where="Table 1"),
                PaperRow("Wav2vec2-base", 0.272, 0.390, ("wav2vec2 base",), where="Table 1"),
                PaperRow("Hubert-large", 0.297, 0.424, ("hubert", "hubert large"), where="Table 1"),
                PaperRow("Wav2vec2-base + noise", 0.286, None,
                         ("wav2vec2-base + musan", "wav2vec2-base+augmentation", "wav2vec2-base augmented"),
                         "micro not published", where="section 3.2"))),
    PaperTable("table2", "Table 2: loss functions and targets",
               "F1 on the development set, WavLM-large, for each loss and training target "
               "(P: primary labels of all annotators, S: all perceived labels).", _TABLE2_ROWS),
    PaperTable("sampler", "Section 3.4: class-balancing sampler",
               "F1 on the development set, WavLM-large: unweighted BCE, and a sampler drawing each clip with "
               "weight 1/(frequency of its class) (the loss's class weights then off).",
               (PaperRow("WBCE(P)", 0.340, 0.503, (), "Table 2", where="Table 2"),
                PaperRow("BCE(P)", 0.331, None, ("bce(p) unweighted",), "unweighted, no sampler",
                         where="section 3.4"),
                PaperRow("BCE(P) + sampler", 0.334, None, ("bce(p)+sampler", "bce(p) sampler"),
                         where="section 3.4"),
                PaperRow("KLD(S)", 0.337, 0.502, (), "Table 2, no sampler", where="Table 2"),
                PaperRow("KLD(S) + sampler", 0.347, None, ("kld(s)+sampler", "kld(s) sampler"),
                         where="section 3.4"))),
    PaperTable("table3", "Table 3: high-agreement training subsets",
               "F1 on the development set when only clips with high annotator agreement are used for "
               "training (P*: the same primary label agreed upon by at least 60 % of annotators; S*: at least "
               "50 % of the perceived-labels list the same). After section 3.4 the KLD runs use the sampler.",
               (PaperRow("WBCE(P*)", 0.317, 0.491, where="Table 3"),
                PaperRow("WBCE(S*)", 0.312, 0.511, where="Table 3"),
                PaperRow("KLD(P*)", 0.314, 0.483, where="Table 3"),
                PaperRow("KLD(S*)", 0.326, 0.487, where="Table 3"))),
    PaperTable("ensemble", "Section 3.6: ensemble voting",
               "Voting over the probabilities of three upstream models trained with WBCE(P), development set, "
               "unweighted and weighted (the paper gives one number, 0.338 / 0.523, and says the macro-F1 "
               "dropped \"regardless of whether the voting is weighted or not\").",
               (PaperRow("Ensemble", 0.338, 0.523, ("ensemble voting", "vote", "mean", "ensemble (3 upstreams)",
                                                    "ensemble (mean)"), where="section 3.6"),
                PaperRow("Ensemble (weighted)", None, None, ("weighted ensemble", "ensemble weighted"),
                         "weighted voting: no number published", where="section 3.6"))),
    PaperTable("table4", "Table 4: best system",
               "WavLM-large, WBCE(S), decision thresholds adjusted on the development set (section 3.7). The "
               "paper's development row was tuned and scored on the same split; its test row is the challenge "
               "leaderboard on the unlabelled test set. The paper gives no number for the baseline: it says "
               "its best system is \"a 6% and 9% absolute improvement\" (macro, micro) over it on the "
               "development set.",
               (PaperRow("Development", 0.361, 0.496, ("dev",), "thresholds tuned on this split",
                         where="Table 4"),
                PaperRow("Test", 0.335, 0.347, ("test",), "challenge leaderboard", where="Table 4"),
                PaperRow("Baseline (Development)", None, None, ("baseline_dev", "baseline dev", "baseline"),
                         "no number in the paper; its best system is +6 % / +9 % absolute over it",
                         where="section 5"))),
    PaperTable("table2_finetuned",
               "Table 2 (fine-tuned features): the same heads on the fine-tuned upstream's features",
               "Frozen-then-fine-tuned: the upstream of finetune-best (WavLM-large after end-to-end WBCE(S) "
               "training) is run over the corpus once more and Table 2's heads are trained on its features. "
               "The paper has no such table; its columns repeat Table 2 (every number of the paper is end to end).",
               _TABLE2_ROWS),
)}


@dataclass(frozen=True)
class Published:
    """A number published outside the seed paper."""

    label: str
    split: str
    macro: Optional[float]
    micro: Optional[float]
    source: str  # key of SOURCES
    where: str
    note: str = ""


#: Numbers the seed does not give, each with its own source (never in a "paper" column).
EXTERNAL: Tuple[Published, ...] = (
    Published("Challenge baseline (WavLM-large, attentive pooling, WCE, 12 s)", "Development", 0.307, None,
              "challenge", "results", "as recorded in the design card; not checked against the paper here"),
    Published("Challenge baseline", "Test (challenge test set)", 0.311, None, "challenge", "results",
              "as recorded in the design card; not checked against the paper here"),
    Published("Challenge winner (ensemble of 7 models, focal loss)", "Test (challenge test set)", 0.357, 0.373,
              "winner", "abstract: macro-F1 35.69 %, accuracy 37.32 %",
              "micro-F1 equals accuracy for one label per clip"),
)


@dataclass(frozen=True)
class Finding:
    """One of the seed's conclusions as a comparison of rows.

    ``kind="greater"``: the seed found ``rows[0]`` above ``rows[1]`` on ``metric``;
    ``kind="best"``: the seed found ``rows[0]`` the best of ``rows``. A row reference is
    ``"table:label"`` (a table key of :data:`TABLES`). ``metric`` is ``macro``, ``micro`` or
    ``macro_kfold`` (a tuned row's K-fold estimate; an untuned row's own macro-F1).
    ``paper_delta``: the seed's difference where it states one without both numbers.
    """

    table: str
    where: str
    text: str
    kind: str
    rows: Tuple[str, ...]
    metric: str = "macro"
    paper_delta: Optional[float] = None


FINDINGS: Tuple[Finding, ...] = (
    Finding("table1", "section 3.1", "WavLM-large is the best upstream", "best",
            ("table1:WavLM-large", "table1:Wav2vec2-large", "table1:Wav2vec2-base", "table1:Hubert-large")),
    Finding("table1", "section 3.2", "noise augmentation helps Wav2vec2-base", "greater",
            ("table1:Wav2vec2-base + noise", "table1:Wav2vec2-base")),
    Finding("table2", "section 3.3", "WBCE(S) is the best loss and target", "best",
            ("table2:WBCE(S)", "table2:WCE", "table2:WBCE(P)", "table2:KLD(P)", "table2:KLD(S)")),
    Finding("table2", "section 3.3", "soft P targets beat hard labels (WBCE)", "greater",
            ("table2:WBCE(P)", "table2:WCE")),
    Finding("table2", "section 3.3", "soft P targets beat hard labels (KLD)", "greater",
            ("table2:KLD(P)", "table2:WCE")),
    Finding("table2", "section 3.3", "S targets beat P targets (WBCE)", "greater",
            ("table2:WBCE(S)", "table2:WBCE(P)")),
    Finding("table2", "section 3.3", "S targets beat P targets (KLD)", "greater", ("table2:KLD(S)", "table2:KLD(P)")),
    Finding("table2", "section 3.3", "class weights matter: WBCE beats KLD (P)", "greater",
            ("table2:WBCE(P)", "table2:KLD(P)")),
    Finding("table2", "section 3.3", "class weights matter: WBCE beats KLD (S)", "greater",
            ("table2:WBCE(S)", "table2:KLD(S)")),
    Finding("sampler", "section 3.4", "dropping the class weights costs about 1 % (WBCE(P) above BCE(P))", "greater",
            ("sampler:WBCE(P)", "sampler:BCE(P)")),
    Finding("sampler", "section 3.4", "the sampler helps unweighted BCE(P) slightly", "greater",
            ("sampler:BCE(P) + sampler", "sampler:BCE(P)")),
    Finding("sampler", "section 3.4", "BCE(P) with the sampler stays below WBCE(P)", "greater",
            ("sampler:WBCE(P)", "sampler:BCE(P) + sampler")),
    Finding("sampler", "section 3.4", "the sampler helps KLD(S)", "greater",
            ("sampler:KLD(S) + sampler", "sampler:KLD(S)")),
    Finding("table3", "section 3.5", "the high-agreement subset scores below all of P (WBCE)", "greater",
            ("table2:WBCE(P)", "table3:WBCE(P*)")),
    Finding("table3", "section 3.5", "the high-agreement subset scores below all of S (WBCE)", "greater",
            ("table2:WBCE(S)", "table3:WBCE(S*)")),
    Finding("table3", "section 3.5", "the high-agreement subset scores below all of P (KLD)", "greater",
            ("table2:KLD(P)", "table3:KLD(P*)")),
    Finding("table3", "section 3.5", "the high-agreement subset scores below all of S (KLD)", "greater",
            ("table2:KLD(S)", "table3:KLD(S*)")),
    Finding("ensemble", "section 3.6", "the ensemble lowers macro-F1 below WavLM-large alone (WBCE(P))", "greater",
            ("table2:WBCE(P)", "ensemble:Ensemble")),
    Finding("ensemble", "section 3.6", "weighted voting lowers macro-F1 too", "greater",
            ("table2:WBCE(P)", "ensemble:Ensemble (weighted)")),
    Finding("ensemble", "section 3.6", "the ensemble raises micro-F1 (it favours frequent classes)", "greater",
            ("ensemble:Ensemble", "table2:WBCE(P)"), metric="micro"),
    Finding("table4", "section 3.7", "adjusting the decision thresholds raises macro-F1 (tuned and scored on "
            "the development set)", "greater", ("table4:Development", "table2:WBCE(S)")),
    Finding("table4", "section 3.7", "adjusting the decision thresholds raises macro-F1 — here the K-fold "
            "estimate (thresholds fitted on the other folds)", "greater", ("table4:Development", "table2:WBCE(S)"),
            metric="macro_kfold"),
    Finding("table4", "section 3.7", "adjusting the decision thresholds lowers micro-F1", "greater",
            ("table2:WBCE(S)", "table4:Development"), metric="micro"),
    Finding("table4", "section 3.7", "the test score is below the development score (slight overfitting)",
            "greater", ("table4:Development", "table4:Test")),
    Finding("table4", "section 5", "the best system is 6 % (macro) above the baseline system on development",
            "greater", ("table4:Development", "table4:Baseline (Development)"), paper_delta=0.06),
    Finding("table4", "section 5", "the best system is 9 % (micro) above the baseline system on development",
            "greater", ("table4:Development", "table4:Baseline (Development)"), metric="micro", paper_delta=0.09),
)

#: Section 2: clips and durations (mean, sd in seconds) per split; the test set is unlabelled.
CORPUS = {
    "Train": {"clips": 68360, "mean": 5.8, "sd": 2.4},
    "Development": {"clips": 19815, "mean": 5.76, "sd": 2.3},
    "Test": {"clips": 2347, "mean": 6.0, "sd": 2.34},
}
#: Section 4: scoreable development clips (consensus among the eight classes).
DEV_SCOREABLE = 15341

#: Section 3.5: training clips of each target set.
TRAINING_SET_SIZES = {"P": 54651, "S": 53523, "P*": 30647, "S*": 25514}

#: Section 4: the three upstreams' predictions "differ more than 30% of the time".
UPSTREAM_DISAGREEMENT = 0.30

#: The seed's per-class F1 of a row (row reference → class letter → F1), for the report's
#: per-class chart. Empty: the seed publishes no per-class figure in its text; its Figure 4
#: shows development-set confusion matrices (baseline, WBCE(P), WBCE(S), WBCE(S) with
#: thresholds adjusted) as an image only, and section 3.7 says in words that the
#: adjustment helps the less frequent classes.
PER_CLASS_F1: Dict[str, Dict[str, float]] = {}
PER_CLASS_SOURCE = ("the paper publishes no per-class F1: its Figure 4 gives the development-set confusion "
                    "matrices as an image, without numbers in its text")

#: Section 4 (Easy/Difficult analysis of three models on the development set).
EASY_DIFFICULT = {
    "n": 15341,
    "easy": 5179,
    "difficult": 5433,
    "duration_mean": {"easy": 5.65, "difficult": 5.80},
    "duration_sd": {"easy": 2.27, "difficult": 2.32},
    "alpha": {"easy": 0.54, "difficult": 0.38},
    "mean_clips_per_speaker": {"easy": 10, "difficult": 2},
    "gender_clips": {"Female": 7619, "Male": 7421},
    "difficult_clips_of_difficult_speakers": {"Female": 2586, "Male": 1794},
    "easy_clips_of_easy_speakers": {"Female": 1771, "Male": 2414},
}


def _norm(label: str) -> str:
    s = label.strip().lower()
    s = re.sub(r"^l_", "", s)
    s = s.replace("_", " ").replace("−", "-")
    s = re.sub(r"\s+", " ", s)
    s = s.replace(" (", "(").replace("( ", "(").replace(" )", ")").replace(" + ", "+").replace("+ ", "+")
    s = s.replace(" +", "+")
    return s


def match_row(table: str, label: str) -> Optional[PaperRow]:
    """The seed's row of ``table`` that a report row label refers to, or None."""
    t = TABLES.get(table)
    if t is None:
        return None
    key = _norm(label)
    for row in t.rows:
        if key == _norm(row.label) or key in {_norm(a) for a in row.aliases}:
            return row
    return None


def row_ref(ref: str) -> Tuple[str, str]:
    """``"table2:WBCE(S)"`` → ``("table2", "WBCE(S)")``."""
    table, _, label = ref.partition(":")
    if table not in TABLES or not label:
        raise ValueError(f"bad row reference {ref!r}")
    return table, label


def paper_value(ref: str, metric: str = "macro") -> Optional[float]:
    """The seed's number of a row reference (``macro_kfold`` reads ``macro``: the seed has no K-fold)."""
    table, label = row_ref(ref)
    row = match_row(table, label)
    if row is None:
        return None
    return row.micro if metric == "micro" else row.macro

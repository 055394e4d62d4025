"""The numbers published in the CONILIUM paper (Shamsi, Gauder, Tahon, Odyssey 2024).

Every score is an F1 on the MSP-Podcast development set with WavLM-large unless the row
says otherwise; ``None`` where the paper gives no figure. Table 4's test row is the
challenge's leaderboard score on its unlabelled test set (Test3), which only the
organisers could compute.

:data:`TABLES` maps a table key (as used in a report spec) to its title, the split the
paper scored, and its rows in the paper's order: ``(label, macro, micro, aliases)``.
Row labels in a report spec are matched to the paper's rows by :func:`match_row`
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
class PaperRow:
    label: str
    macro: Optional[float]
    micro: Optional[float]
    aliases: Tuple[str, ...] = ()
    note: str = ""


@dataclass(frozen=True)
class PaperTable:
    key: str
    title: str
    caption: str
    rows: Tuple[PaperRow, ...]


TABLES: Dict[str, PaperTable] = {t.key: t for t in (
    PaperTable("table1", "Table 1: upstream models",
               "F1 on the development set for each upstream model (weighted cross-entropy, hard labels). "
               "Section 3.2: MUSAN noise on 80% of training clips helped only Wav2vec2-base.",
               (PaperRow("WavLM-large", 0.302, 0.402, ("wavlm", "wavlm large")),
                PaperRow("Wav2vec2-large", 0.282, 0.374, ("wav2vec2 large robust", "wav2vec2-large-robust")),
                PaperRow("Wav2vec2-base", 0.272, 0.390, ("wav2vec2 base",)),
                PaperRow("Hubert-large", 0.297, 0.424, ("hubert", "hubert large")),
                PaperRow("Wav2vec2-base + noise", 0.286, None,
                         ("wav2vec2-base + musan", "wav2vec2-base+augmentation", "wav2vec2-base augmented"),
                         "section 3.2, micro not published"))),
    PaperTable("table2", "Table 2: loss functions and targets",
               "F1 on the development set, WavLM-large, for each loss and training target "
               "(P: primary labels of all annotators, S: all perceived labels).",
               (PaperRow("WCE", 0.302, 0.402, ("wce(hard)", "wce hard")),
                PaperRow("WBCE(P)", 0.340, 0.503),
                PaperRow("WBCE(S)", 0.350, 0.517),
                PaperRow("KLD(P)", 0.322, 0.481),
                PaperRow("KLD(S)", 0.337, 0.502))),
    PaperTable("sampler", "Section 3.4: class-balancing sampler",
               "Macro-F1 on the development set, WavLM-large. Dropping the class weights (WBCE(P) to BCE(P)) "
               "cost about 1% macro-F1; a class-balanced sampler helped BCE(P) a little and KLD(S) more.",
               (PaperRow("WBCE(P)", 0.340, 0.503, (), "Table 2"),
                PaperRow("BCE(P)", 0.331, None, ("bce(p) unweighted",), "unweighted, no sampler"),
                PaperRow("BCE(P) + sampler", 0.334, None, ("bce(p)+sampler", "bce(p) sampler")),
                PaperRow("KLD(S)", 0.337, 0.502, (), "Table 2, no sampler"),
                PaperRow("KLD(S) + sampler", 0.347, None, ("kld(s)+sampler", "kld(s) sampler")))),
    PaperTable("table3", "Table 3: high-agreement training subsets",
               "F1 on the development set when only clips with high annotator agreement are used for "
               "training (P*: at least 60% of primaries agree; S*: at least 50% of perceived labels agree).",
               (PaperRow("WBCE(P*)", 0.317, 0.491),
                PaperRow("WBCE(S*)", 0.312, 0.511),
                PaperRow("KLD(P*)", 0.314, 0.483),
                PaperRow("KLD(S*)", 0.326, 0.487))),
    PaperTable("ensemble", "Section 3.6: ensemble voting",
               "Voting over the probabilities of three upstream models trained with WBCE(P) "
               "(development set); it lowered macro-F1 compared with WavLM-large alone.",
               (PaperRow("Ensemble", 0.338, 0.523, ("ensemble voting", "vote", "mean", "ensemble (3 upstreams)")),)),
    PaperTable("table4", "Table 4: best system",
               "WavLM-large, WBCE(S), decision thresholds adjusted on the development set. The paper's test "
               "row is the challenge leaderboard on its unlabelled test set; the challenge baseline scored "
               "0.307 (development) and 0.311 (test), the challenge winner 0.357 (test).",
               (PaperRow("Development", 0.361, 0.496, ("dev",)),
                PaperRow("Test", 0.335, 0.347, ("test",)),
                PaperRow("Baseline (Development)", 0.307, None, ("baseline_dev", "baseline dev")),
                PaperRow("Baseline (Test)", 0.311, None, ("baseline_test", "baseline test")))),
)}

#: The challenge baseline (Goncalves et al., Odyssey 2024) and winner, macro-F1.
BASELINE = {"Development": 0.307, "Test": 0.311}
CHALLENGE_WINNER_TEST = 0.357

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
    """The paper's row of ``table`` that a report row label refers to, or None."""
    t = TABLES.get(table)
    if t is None:
        return None
    key = _norm(label)
    for row in t.rows:
        if key == _norm(row.label) or key in {_norm(a) for a in row.aliases}:
            return row
    return None

"""The whole study in one command (``run_all.sh``).

Every step is one of the project's own commands, run as a subprocess and printed
before it runs, so the log doubles as a recipe a user can replay by hand. A step whose
output is already complete is not redone: caches are resumed by ``extract-features``
itself, head runs by ``train-grid``, and derived runs, analyses and the model are kept
when their directory exists. A failing step stops the study with its name.

With no corpus the study runs on the built-in demo corpus with small random-weight
upstreams of each family, standing in for the paper's upstreams; with ``--corpus`` it
runs on a real MSP-Podcast copy with the real upstreams.

Tables 1-3, the sampler runs and the ensembles are heads on frozen cached features (not
the paper's end-to-end fine-tuning); ``finetune-best`` then trains the best configuration
end to end, its upstream's features are extracted once more (``extract-features
--upstream MODEL_DIR``) and Table 2's heads are trained on them (frozen-then-fine-tuned).
The report states each row's setting. With ``--seeds`` every head grid trains each
configuration once per seed (``train-grid --seeds``), the report rows list every seed's run
(mean ± sd beside the first seed's scores) and the later steps use the first seed's runs.

Beyond the paper (left out with ``--paper-only``): a Whisper encoder upstream
(whisper-large-v3; demo-whisper on the demo corpus) in Table 1's style, WCE on hard labels
from frozen features, reported as its own row with no paper number and kept out of the
paper's comparisons (the three best upstreams of section 3.6 are chosen among the paper's four);
on Table 2's cache, a head on arousal, valence and dominance alone (``--task attributes``),
one jointly with WBCE(S) (``--task joint``), both in the report's attributes table, and
WBCE(S) also trained on X and O clips (``--train-on-xo``), a Table 2 row of its own with its
X/O counts.
"""

from .steps import (ATTRIBUTE_ROWS, BEYOND_UPSTREAMS, DEMO_UPSTREAMS, EXTRA_SPEC, REAL_UPSTREAMS, SAMPLER_ROWS,
                    TABLE2_ROWS, TABLE3_ROWS, XO_ROW, StepFailed, Study, StudyConfig, run_study)

__all__ = ["ATTRIBUTE_ROWS", "BEYOND_UPSTREAMS", "DEMO_UPSTREAMS", "EXTRA_SPEC", "REAL_UPSTREAMS", "SAMPLER_ROWS",
           "TABLE2_ROWS", "TABLE3_ROWS", "XO_ROW", "StepFailed", "Study", "StudyConfig", "run_study"]

"""run_all.sh's driver: a failing step stops the study and is named."""

import pytest

from conilium.study import StepFailed, Study, StudyConfig


def test_failing_step_is_named_and_stops_the_study(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "Labels").mkdir(parents=True)
    (corpus / "Labels" / "labels_consensus.csv").write_text("FileName,EmoClass\nx.wav,N\n")  # columns missing
    study = Study(StudyConfig(corpus=str(corpus), out=str(tmp_path / "results"), skip_finetune=True))
    with pytest.raises(StepFailed, match=r"step 1 \(describe the corpus \(Figures 1 and 3\)\) failed .*describe-corpus"):
        study.execute()
    assert not (tmp_path / "results" / "cache").exists()  # nothing after the failing step ran
    assert not (tmp_path / "results" / "REPORT.md").exists()

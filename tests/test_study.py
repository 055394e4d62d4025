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


def test_frozen_then_finetuned_loop_and_weighted_ensemble_are_in_the_study(small_demo_corpus, tmp_path):
    """After finetune-best: features of the fine-tuned model directory (its own weights, no
    --random-init), Table 2's heads on them, their own report table; and section 3.6's
    weighted ensemble beside the unweighted one."""
    from conilium.study import TABLE2_ROWS
    from conilium.util import write_json

    study = Study(StudyConfig(out=str(tmp_path / "results")))  # the demo: random-weight upstreams
    study.corpus = small_demo_corpus
    steps = []
    study.run = lambda name, argv, skip_if=None: steps.append((name, [str(a) for a in argv]))
    model = tmp_path / "results" / "models" / "finetuned"
    assert study.frozen_then_finetuned(model) is None and not steps  # no model directory: nothing to do
    model.mkdir(parents=True)
    write_json(model / "conilium_model.json", {})
    grid = study.frozen_then_finetuned(model)
    (name1, extract), (name2, train) = steps
    assert extract[0] == "extract-features" and extract[extract.index("--upstream") + 1] == str(model)
    assert "--random-init" not in extract
    cache = extract[extract.index("--out") + 1]
    assert train[0] == "train-grid" and train[train.index("--cache") + 1] == cache
    assert train[train.index("--preset") + 1] == "table2" and train[train.index("--out") + 1] == str(grid)

    steps.clear()
    members = []
    for i, f1 in enumerate((0.3, 0.2, 0.1)):
        members.append(tmp_path / f"m{i}")
        write_json(members[-1] / "metrics.json", {"f1_macro": f1})
    ens = study.ensembles(members)
    assert set(ens) == {"Ensemble", "Ensemble (weighted)"}
    weighted = steps[1][1]
    assert weighted[weighted.index("--weights") + 1] == "0.3000,0.2000,0.1000"

    t1 = tmp_path / "results" / "runs" / "table1"
    spec = study._report_spec(t1, tmp_path / "tuned", ens, tmp_path / "ed", model, grid)
    assert spec["tables"]["table2_finetuned"] == {label: str(grid / d) for label, d in TABLE2_ROWS.items()}
    assert spec["tables"]["ensemble"]["Ensemble (weighted)"] == str(ens["Ensemble (weighted)"])
    assert "table2_finetuned" not in study._report_spec(t1, tmp_path / "tuned", ens, tmp_path / "ed", model)["tables"]


@pytest.mark.parametrize("quiet", [False, True])
def test_steps_show_their_progress_unless_the_study_is_quiet(small_demo_corpus, tmp_path, quiet):
    """./run_all.sh shows each step's progress bars (extraction, grid passes, fine-tuning,
    predict); ./run_all.sh --quiet passes --quiet to every one of them."""
    study = Study(StudyConfig(out=str(tmp_path / "results"), quiet=quiet))
    study.corpus = small_demo_corpus
    steps = []
    study.run = lambda name, argv, skip_if=None: steps.append([str(a) for a in argv])
    study.extract("features", "demo-wavlm", tmp_path / "cache", [])
    study.grid("grid", tmp_path / "grid", preset="table2")
    study.end_to_end(tmp_path / "model", tmp_path / "best-run")
    assert [argv[0] for argv in steps] == ["extract-features", "train-grid", "finetune-best", "finetune-best",
                                           "predict"]
    assert all(("--quiet" in argv) == quiet for argv in steps)

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


def test_study_seeds_train_every_head_grid_per_seed_and_the_report_rows_carry_them(small_demo_corpus, tmp_path):
    """./run_all.sh --seeds 0,1,2: every head grid gets train-grid --seeds (no --set seed=), the
    later steps use the first seed's runs, and each head row of the report spec lists every
    seed's run; without --seeds the grids and the spec are as before (one seed, --seed)."""
    from conilium.study import TABLE2_ROWS
    from conilium.util import write_json

    def study_of(**kw):
        s = Study(StudyConfig(out=str(tmp_path / "results"), **kw))
        s.corpus = small_demo_corpus
        s.steps = []
        s.run = lambda name, argv, skip_if=None: s.steps.append([str(a) for a in argv])
        return s

    one, three = study_of(seed=4), study_of(seed=4, seeds=(0, 1, 2))
    for s in (one, three):
        s.grid("grid", tmp_path / "grid", preset="table2")
    (plain,), (seeded,) = one.steps, three.steps
    assert "--seeds" not in plain and plain[plain.index("--set") + 1] == "seed=4"
    assert seeded[seeded.index("--seeds") + 1] == "0,1,2" and not any(a.startswith("seed=") for a in seeded)
    i, j = plain.index("seed=4"), seeded.index("--seeds")
    assert plain[:i - 1] + plain[i + 1:] == seeded[:j] + seeded[j + 2:]  # the rest as without seeds

    t2 = three.runs / "table2"
    assert three.head(t2, "wbce-S") == t2 / "wbce-S-seed0" and one.head(t2, "wbce-S") == t2 / "wbce-S"
    # Table 1's ranking averages each upstream's seeds
    t1 = three.runs / "table1"
    for i, name in enumerate(three.upstreams.values()):
        for seed, f1 in zip((0, 1, 2), (0.1 * i, 0.5 - 0.1 * i, 0.2)):
            write_json(t1 / f"{name}-wce-hard-seed{seed}" / "metrics.json", {"f1_macro": f1})
    assert three.mean_dev_f1(t1, "demo-wavlm-wce-hard") == pytest.approx((0.0 + 0.5 + 0.2) / 3)

    ens = {"Ensemble": tmp_path / "ens", "Ensemble (weighted)": tmp_path / "ens-w"}
    spec = three._report_spec(t1, tmp_path / "tuned", ens, tmp_path / "ed", tmp_path / "model")
    for label, d in TABLE2_ROWS.items():
        assert spec["tables"]["table2"][label] == {"run": str(t2 / f"{d}-seed0"),
                                                   "seeds": [str(t2 / f"{d}-seed{s}") for s in (0, 1, 2)]}
    assert spec["tables"]["table4"]["dev"] == str(tmp_path / "tuned")  # one tuned run, of the first seed
    assert spec["tables"]["table4"]["Baseline (Development)"]["seeds"][2].endswith("demo-wavlm-wce-hard-seed2")
    plain_spec = one._report_spec(one.runs / "table1", tmp_path / "tuned", ens, tmp_path / "ed", tmp_path / "model")
    assert all(isinstance(v, str) for rows in plain_spec["tables"].values() for v in rows.values())
    assert plain_spec["tables"]["table2"] == {**{label: str(one.runs / "table2" / d) for label, d in TABLE2_ROWS.items()},
                                              "WBCE(S) + X/O": str(one.runs / "extra" / "wbce-S-xo")}

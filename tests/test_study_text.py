"""The study's rows beyond the paper on the transcripts' text: a text-only head and audio + text
fusion heads on WBCE(S), and the report's account of what the text adds to the audio."""

import json

import pytest

from conilium.study import Study, StudyConfig
from conilium.study.steps import MODALITY_ROWS


@pytest.fixture(scope="module")
def small_caches(small_demo_corpus, tmp_path_factory):
    """demo-wavlm and demo-text caches of the 60-clip demo corpus (random weights, last layer)."""
    from conilium.extract import ExtractConfig, extract_features

    base = tmp_path_factory.mktemp("study_text")
    audio = extract_features(ExtractConfig("demo-wavlm", random_init=True, layers="last"), small_demo_corpus,
                             base / "demo-wavlm", device="cpu", verbose=False)
    text = extract_features(ExtractConfig("demo-text", random_init=True, layers="last"), small_demo_corpus,
                            base / "demo-text", device="cpu", verbose=False)
    return audio, text


def _recording(study):
    steps = []
    study.run = lambda name, argv, skip_if=None: steps.append([str(a) for a in argv])
    return steps


def test_the_study_extracts_the_text_and_trains_text_and_fusion_heads(small_demo_corpus, tmp_path):
    study = Study(StudyConfig(out=str(tmp_path / "results")))  # the demo
    study.corpus = small_demo_corpus
    steps = _recording(study)
    audio_cache = study.cache("WavLM-large")
    grid = study.text_heads(audio_cache)
    extract, train = steps
    text_cache = study.cache_dir / "demo-text"
    assert extract[0] == "extract-features" and extract[extract.index("--upstream") + 1] == "demo-text"
    assert "--random-init" in extract and extract[extract.index("--out") + 1] == str(text_cache)
    assert train[0] == "train-grid" and train[train.index("--out") + 1] == str(grid)
    spec = json.loads((grid / "spec.json").read_text())
    assert spec["common"] == {"loss": "wbce", "labels": "S"}
    runs = {r["name"]: r for r in spec["runs"]}
    assert runs["text-wbce-S"] == {"name": "text-wbce-S", "cache": str(text_cache)}
    for name, fusion in (("fusion-wbce-S", "concat"), ("cross-wbce-S", "cross-attention")):
        assert runs[name]["cache"] == str(audio_cache) and runs[name]["more_caches"] == [str(text_cache)]
        assert runs[name]["fusion"] == fusion

    ens = {"Ensemble": tmp_path / "e", "Ensemble (weighted)": tmp_path / "w"}
    t1 = study.runs / "table1"
    table2 = study._report_spec(t1, tmp_path / "tuned", ens, tmp_path / "ed", tmp_path / "m", None,
                                grid)["tables"]["table2"]
    for label, (run, _) in MODALITY_ROWS.items():
        assert table2[f"{label} (beyond the paper)"] == str(grid / run)
    assert "WBCE(S)" in table2  # the audio row the text rows are compared with


def test_the_text_rows_are_left_out_with_paper_only_or_without_every_transcript(small_demo_corpus, tmp_path,
                                                                                capsys):
    import shutil

    plain = Study(StudyConfig(out=str(tmp_path / "a"), paper_only=True))
    steps = _recording(plain)
    assert plain.text_heads(tmp_path / "cache") is None and steps == []
    # a real corpus (given by path): its transcripts decide
    corpus = tmp_path / "corpus"
    shutil.copytree(small_demo_corpus, corpus)
    real = Study(StudyConfig(corpus=str(corpus), out=str(tmp_path / "b"), skip_finetune=True))
    steps = _recording(real)
    assert real.text_heads(tmp_path / "cache") == real.runs / "modalities"  # every clip has one
    assert [argv[0] for argv in steps] == ["extract-features", "train-grid"]
    assert steps[0][steps[0].index("--upstream") + 1] == "roberta-large" and "--random-init" not in steps[0]
    one = sorted((corpus / "Transcripts").glob("*.txt"))[0]
    one.unlink()  # one clip without its transcript: a fusion head could not read it
    steps.clear()
    assert real.text_heads(tmp_path / "cache") is None and steps == []
    out = capsys.readouterr().out
    assert "1 of 60 clip(s) have no transcript" in out and one.stem in out and "left out" in out
    shutil.rmtree(corpus / "Transcripts")
    assert real.text_heads(tmp_path / "cache") is None and steps == []


def test_the_report_says_what_the_text_adds_against_audio_alone(small_caches, tmp_path):
    from conilium.evaluate.report import build_report
    from conilium.heads.config import TrainConfig
    from conilium.heads.train import train_head
    from conilium.dirs import RunDir

    audio, text = small_caches
    common = dict(loss="wbce", labels="S", epochs=2, hidden=16, device="cpu", threads=1)
    runs = {"WBCE(S)": TrainConfig(cache=str(audio), **common),
            "Text only, WBCE(S) (beyond the paper)": TrainConfig(cache=str(text), **common),
            "Audio + text (concat), WBCE(S) (beyond the paper)":
                TrainConfig(cache=str(audio), more_caches=(str(text),), **common)}
    dirs = {}
    for i, (label, config) in enumerate(runs.items()):
        dirs[label] = tmp_path / f"run{i}"
        train_head(config, dirs[label], progress=False)
    md = build_report({"tables": {"table2": {k: str(v) for k, v in dirs.items()}}, "bootstrap_draws": 1000},
                      tmp_path / "report").read_text()
    assert "**Audio and text**" in md and "say nothing of what the words add on MSP-Podcast" in md
    assert "demo-wavlm + demo-text, concat fusion" in md  # the fusion row's setting names both upstreams
    rows = json.loads((tmp_path / "report" / "report.json").read_text())["modalities"]
    assert [(r["label"], r["modality"]) for r in rows] == [
        ("Text only, WBCE(S) (beyond the paper)", "text"),
        ("Audio + text (concat), WBCE(S) (beyond the paper)", "audio + text")]
    f1 = {label: float(RunDir(d).metrics()["f1_macro"]) for label, d in dirs.items()}
    for r in rows:
        d = r["difference"]
        assert r["against"] == "WBCE(S)" and d["n"] == RunDir(dirs["WBCE(S)"]).metrics()["n"]
        assert d["difference"] == pytest.approx(f1[r["label"]] - f1["WBCE(S)"], abs=1e-9)
        assert d["low"] <= d["difference"] <= d["high"]
        assert f"{r['label']} ({r['modality']}): {r['f1_macro']:.3f}" in md

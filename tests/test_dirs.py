"""The typed directories: file names, reading what earlier versions wrote, and telling kinds apart."""

import json

import pytest

from conilium.dirs import (CacheDir, GridDir, Manifest, ModelDir, ReportDir, RunDir, RunError, StudyDir, check_cache_dir,
                           describe_dir, dir_kind, not_a_cache)
from conilium.errors import CacheError, ConfigError


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def test_an_old_manifest_reads_with_the_defaults_it_had():
    m = Manifest({"format": 2, "layers": [0, 3], "dim": 8, "upstream": {"name": "demo-wavlm", "source": "hub"}})
    assert (m.layers, m.dim, m.dtype, m.pooled_stats) == ([0, 3], 8, "float16", False)
    assert (m.normalize, m.compute_dtype, m.max_seconds, m.num_hidden_states) == ("none", "float32", None, None)
    assert (m.whisper_input, m.rescale_loud, m.shards) == (None, False, [])
    assert m.upstream["name"] == "demo-wavlm" and m["dim"] == 8  # still the dict it was read as
    assert Manifest({"upstream": "not an object"}).upstream == {}


def test_a_sealed_manifest_checks_and_an_edited_one_does_not():
    m = Manifest({"format": 2, "complete": True, "layers": [1], "dim": 4}).sealed()
    assert m.problem() is None and list(m)[-1] == "manifest_sha256"
    edited = Manifest(dict(m, dim=5))
    assert "checksum" in edited.problem()
    assert "incomplete" in Manifest({"format": 2}).problem()
    assert "format 1" in Manifest({"format": 1}).problem()


def test_a_cache_dir_refuses_a_damaged_or_edited_manifest(tmp_path):
    cache = CacheDir(tmp_path / "c")
    with pytest.raises(CacheError, match="cache directory not found"):
        cache.read_manifest()
    cache.path.mkdir()
    (cache.path / "extraction.json").write_text("{}")
    with pytest.raises(CacheError, match="extraction did not finish"):
        cache.read_manifest()
    cache.manifest_path.write_text("{not json")
    with pytest.raises(CacheError, match=r"manifest.json: corrupt manifest"):
        cache.read_manifest()
    good = Manifest({"format": 2, "complete": True, "dim": 4}).sealed()
    cache.write_manifest(good)
    assert cache.read_manifest() == good and isinstance(cache.read_manifest(), Manifest)
    cache.write_manifest(dict(good, dim=5))
    with pytest.raises(CacheError, match="edited or damaged"):
        cache.read_manifest()
    cache.write_manifest(dict(good, format=1))
    with pytest.raises(CacheError, match="extract upgrade"):
        cache.read_manifest()
    assert cache.shard_file(3) == "shards/shard-00003.h5"
    assert cache.sidecar_path(3) == cache.path / "shards" / "shard-00003.json"


def test_a_run_dir_reads_its_files_and_names_the_damaged_one(tmp_path):
    run = RunDir(tmp_path / "run")
    with pytest.raises(RunError, match="no config.json"):
        run.config()
    run.path.mkdir()
    run.config_path.write_text("[1, 2")
    with pytest.raises(RunError, match="config.json: damaged run configuration"):
        run.config()
    assert run.config_or_none() is None and run.kind is None and run.cache is None
    run.write_config({"cache": "caches/a", "loss": "wbce"})
    assert run.config()["loss"] == "wbce" and run.cache == "caches/a" and run.kind is None
    assert not run.is_complete() and run.metrics_or_none() is None
    with pytest.raises(RunError, match="metrics.json"):
        run.metrics()
    run.write_metrics({"f1_macro": 0.5})
    assert run.is_complete() and run.metrics()["f1_macro"] == 0.5
    _write(run.prediction_path("Development"), {})
    assert run.splits() == ["Development"]


def test_a_model_dir_describes_itself_or_says_why_not(tmp_path):
    model = ModelDir(tmp_path / "m")
    with pytest.raises(ConfigError, match="not a finetune-best model directory"):
        model.info()
    info = {"classes": list("ASHUFDCN"), "max_seconds": 8, "normalize": {"mode": "none"}, "loss": "wce",
            "head_config": {}, "layers": [1], "upstream": {"name": "demo-wavlm"}}
    model.path.mkdir()
    model.write_info(dict(info, format=3))
    with pytest.raises(ConfigError, match="newer than this conilium reads"):
        model.info()
    model.write_info({k: v for k, v in info.items() if k != "loss"})
    with pytest.raises(ConfigError, match="missing field 'loss'"):
        model.info()
    model.write_info(info)  # written before "format" existed: format 1
    assert model.info()["layers"] == [1] and model.upstream == {"name": "demo-wavlm"} and model.is_model()


def test_one_place_tells_every_kind(tmp_path, small_demo_corpus):
    cache = tmp_path / "cache"
    CacheDir(cache).path.mkdir()
    CacheDir(cache).write_manifest({"format": 2})
    run = tmp_path / "runs" / "a"
    RunDir(run).path.mkdir(parents=True)
    RunDir(run).write_config({"cache": str(cache)})
    assert dir_kind(run) == "run-unfinished"
    RunDir(run).write_metrics({})
    model = tmp_path / "model"
    ModelDir(model).path.mkdir()
    (model / "config.json").write_text(json.dumps({"kind": "finetune"}))
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints").mkdir(parents=True)
    (unfinished / "checkpoints" / "last.pt").write_bytes(b"")
    grid = tmp_path / "grid"
    grid.mkdir()
    GridDir(grid).write_plan([{"name": "a"}], [["a"]])
    assert json.loads((grid / "grid.json").read_text())["passes"] == [["a"]]
    (tmp_path / "empty").mkdir()
    assert dir_kind(cache) == "cache" and dir_kind(run) == "run" and dir_kind(unfinished) == "model-unfinished"
    assert dir_kind(model) == "finetune-run-unfinished"
    ModelDir(model).write_info({})
    assert dir_kind(model) == "model" and dir_kind(grid) == "grid" and dir_kind(small_demo_corpus) == "corpus"
    assert dir_kind(tmp_path / "empty") == "empty" and dir_kind(tmp_path / "nowhere") is None
    assert describe_dir(tmp_path / "runs") == f"a folder of run directories ({run})"
    assert dir_kind(cache / "manifest.json") == "file"
    # the same answer, for a directory given as a feature cache
    assert not_a_cache(cache) is None
    assert f"this run was trained on --cache {cache}" in not_a_cache(run)
    assert "finetune-best model directory (unfinished)" in not_a_cache(unfinished)
    assert "train-grid output directory" in not_a_cache(grid)
    assert "folder of caches" not in not_a_cache(tmp_path / "empty")
    with pytest.raises(CacheError, match="is a corpus"):
        check_cache_dir(small_demo_corpus)


def test_the_study_folder_names_its_files(tmp_path):
    study = StudyDir(tmp_path)
    study.write_settings({"demo": True})
    study.write_spec({"tables": {}})
    assert json.loads((tmp_path / "study.json").read_text()) == {"demo": True}
    assert study.spec_path.name == "report_spec.json" and study.report_path.name == "REPORT.md"
    assert study.markdown_path == study.report_path  # one name for every report


def test_a_report_folder_is_known_by_its_report_md_and_by_an_earlier_versions_report_md(tmp_path):
    new, old = tmp_path / "new", tmp_path / "old"
    new.mkdir()
    old.mkdir()
    (new / "REPORT.md").write_text("# report\n")
    (old / "report.md").write_text("# report\n")
    assert ReportDir(new).markdown_path.name == "REPORT.md"
    assert dir_kind(new) == "report" and dir_kind(old) == "report"
    assert describe_dir(old) == "a report folder"

"""The command line under bad input: every numeric option checked (a usage error naming the
option, never a traceback), a directory of another kind named for what it is, --wait-for-lock
on every command that locks its output, --rescale-loud through fine-tuning and prediction."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conilium import CLASSES
from conilium.cli import main
from conilium.cli.common import describe_dir, dir_kind
from conilium.extract.upstreams import load_upstream
from conilium.finetune.config import FinetuneConfig
from conilium.finetune.model import EndToEndModel, save_model_dir
from conilium.heads.model import EmotionHead, HeadConfig
from conilium.heads.train import TrainConfig, train_head
from conilium.locking import LOCK_FILE, lock_directory
from conilium.runs import write_run_outputs
from conilium.testing import write_synthetic_cache

from test_reliability_extract import loud_corpus  # noqa: F401  (a corpus with a float clip at int16 scale)

pytestmark = pytest.mark.usefixtures("two_torch_threads")


def _invoke(args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), (args, repr(r.exception), r.output)
    assert "Traceback" not in r.output
    return r


# ----------------------------------------------------------------------------- numeric options

EXTRACT = ["extract", "features", "--corpus", "{d}/corpus", "--upstream", "demo-wavlm", "--out", "{d}/cache"]
HEAD = ["heads", "train", "--cache", "{d}/cache", "--out", "{d}/run"]
GRID = ["heads", "grid", "--preset", "table2", "--cache", "{d}/cache", "--out", "{d}/grid"]
FINETUNE = ["finetune", "train", "--corpus", "{d}/corpus", "--out", "{d}/model"]
PREDICT = ["finetune", "predict", "--model", "{d}", "{d}/a.wav"]
TUNE = ["eval", "tune-thresholds", "{d}/run", "{d}/tuned"]

BAD = [  # (command, option, value): each refused while the command line is read
    (EXTRACT, "--threads", "-1"), (EXTRACT, "--threads", "0"), (EXTRACT, "--workers", "0"),
    (EXTRACT, "--shard-size", "0"), (EXTRACT, "--batch-seconds", "-1"), (EXTRACT, "--max-seconds", "-1"),
    (EXTRACT, "--max-seconds", "nan"), (EXTRACT, "--seed", "-1"), (EXTRACT, "--copies", "0"),
    (EXTRACT, "--augment-fraction", "1.5"), (EXTRACT, "--wait-for-lock=nan", None),
    (HEAD, "--threads", "-1"), (HEAD, "--batch-size", "0"), (HEAD, "--epochs", "0"), (HEAD, "--lr", "0"),
    (HEAD, "--lr", "inf"), (HEAD, "--weight-decay", "-0.1"), (HEAD, "--num-workers", "-1"),
    (HEAD, "--dropout", "1"), (HEAD, "--hidden", "0"), (HEAD, "--patience", "0"), (HEAD, "--seed", "-1"),
    (HEAD, "--p-threshold", "0"), (HEAD, "--s-threshold", "1.5"), (HEAD, "--preload-budget-gb", "-1"),
    (HEAD, "--wait-for-lock", "x"),
    (GRID, "--n-jobs", "0"), (GRID, "--threads-per-job", "0"),
    (FINETUNE, "--threads", "-1"), (FINETUNE, "--batch-size", "0"), (FINETUNE, "--grad-accum", "0"),
    (FINETUNE, "--epochs", "0"), (FINETUNE, "--lr", "-1e-5"), (FINETUNE, "--max-seconds", "0"),
    (FINETUNE, "--num-workers", "-1"), (FINETUNE, "--seed", "-1"), (FINETUNE, "--random-init-seed", "-1"),
    (FINETUNE, "--augment-fraction", "2"), (FINETUNE, "--layerdrop", "1"), (FINETUNE, "--mask-time-prob", "-0.1"),
    (FINETUNE, "--max-train-clips", "0"), (FINETUNE, "--hidden", "0"), (FINETUNE, "--patience", "0"),
    (PREDICT, "--batch-size", "0"), (PREDICT, "--max-seconds", "-1"),
    (TUNE, "-k", "1"), (TUNE, "-k", "-1"), (TUNE, "--rounds", "0"), (TUNE, "--seed", "-1"),
    (["eval", "ensemble", "{d}/a", "{d}/b", "--out", "{d}/e"], "--weights", "-1,2"),
    (["eval", "ensemble", "{d}/a", "{d}/b", "--out", "{d}/e"], "--weights", "nan,1"),
    (["corpus", "make-demo", "--out", "{d}/demo"], "--seed", "-1"),
]


@pytest.mark.parametrize("command,option,value", BAD, ids=[f"{c[0]}-{c[1]} {o} {v}" for c, o, v in BAD])
def test_bad_numbers_are_usage_errors_naming_the_option(command, option, value, tmp_path):
    (tmp_path / "a.wav").write_bytes(b"")
    args = [a.format(d=tmp_path) for a in command] + [option] + ([value] if value is not None else [])
    r = _invoke(args)
    assert r.exit_code == 2, r.output
    name = option.split("=")[0]
    assert f"Invalid value for '{name}'" in r.output or f"'{name}'" in r.output or f"/ '{name}'" in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav"]  # nothing was started


# ----------------------------------------------------------------------------- directories of another kind

@pytest.fixture(scope="module")
def dirs(tmp_path_factory, small_demo_corpus):
    """A feature cache, a train-head run, a grid-like folder of runs, an unfinished run, a
    run with a damaged config.json, and a corpus."""
    root = tmp_path_factory.mktemp("kinds")
    cache = write_synthetic_cache(root / "cache", clips=40, dim=8, seed=1, signal=0.5)
    run = root / "run"
    train_head(TrainConfig(cache=str(cache.path), device="cpu", epochs=1, hidden=8), run, progress=False)
    grid = root / "grid"
    grid.mkdir()
    (grid / "results.csv").write_text("name,status\n")
    unfinished = root / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text(json.dumps({"loss": "wbce"}))
    damaged = root / "damaged"
    damaged.mkdir()
    (damaged / "config.json").write_text("{not json")
    (damaged / "predictions").mkdir()
    return {"cache": cache.path, "run": run, "grid": grid, "unfinished": unfinished, "damaged": damaged,
            "corpus": Path(small_demo_corpus), "root": root}


def test_describe_dir_names_every_kind(dirs):
    assert describe_dir(dirs["cache"]) == "a feature cache"
    assert describe_dir(dirs["run"]) == "a run directory"
    assert describe_dir(dirs["corpus"]) == "a corpus (Audios/, Labels/)"
    assert describe_dir(dirs["grid"]).startswith("a train-grid output directory")
    assert dir_kind(dirs["unfinished"]) == "run-unfinished" and "did not finish" in describe_dir(dirs["unfinished"])
    assert describe_dir(dirs["root"]) == f"a folder of run directories ({dirs['damaged']}, {dirs['run']})"
    assert describe_dir(dirs["root"] / "nowhere") is None


@pytest.mark.parametrize("words,what,expected", [
    (["eval", "metrics", "{cache}"], "{cache} is a feature cache, not a run directory", "train-head --cache {cache}"),
    (["eval", "metrics", "{corpus}"], "{corpus} is a corpus (Audios/, Labels/), not a run directory",
     "finetune-best --corpus {corpus}"),
    (["eval", "metrics", "{grid}"], "{grid} is a train-grid output directory", "run directories inside it"),
    (["eval", "metrics", "{unfinished}"], "{unfinished} is a run directory whose training did not finish",
     "finish its training"),
    (["eval", "tune-thresholds", "{cache}", "{root}/t"], "{cache} is a feature cache, not a run directory", ""),
    (["eval", "ensemble", "{run}", "{corpus}", "--out", "{root}/e"], "{corpus} is a corpus", ""),
    (["eval", "submission", "{cache}", "--out", "{root}/s.csv"], "{cache} is a feature cache, not a run", ""),
    (["eval", "easy-difficult", "{run}", "{run}", "--out", "{root}/ed", "--cache", "{run}"],
     "{run} is a train-head run directory", "not a feature cache"),
    (["eval", "easy-difficult", "{run}", "{run}", "--out", "{root}/ed", "--corpus", "{cache}"],
     "{cache} is a feature cache, not a corpus", "--corpus"),
    (["extract", "features", "--corpus", "{cache}", "--upstream", "demo-wavlm", "--out", "{root}/c"],
     "{cache} is a feature cache, not a corpus", "--corpus"),
    (["extract", "features", "--corpus", "{corpus}", "--upstream", "demo-wavlm", "--out", "{run}"],
     "{run} is a run directory, not a feature cache", "--out"),
    (["extract", "verify", "{corpus}"], "{corpus} is a corpus (Audios/, Labels/), not a feature cache", ""),
    (["finetune", "predict", "--model", "{run}", "{root}/a.wav"],
     "{run} is a run directory, not a finetune-best model directory", "finetune-best"),
    (["finetune", "train", "--corpus", "{run}", "--out", "{root}/m"], "{run} is a run directory, not a corpus", ""),
    (["finetune", "train", "--corpus", "{corpus}", "--out", "{cache}"],
     "{cache} is a feature cache, not a finetune-best model directory", "--out"),
    (["finetune", "train", "--corpus", "{corpus}", "--out", "{root}/m", "--init-head", "{cache}"],
     "{cache} is a feature cache, not a train-head run directory", "--init-head"),
    (["heads", "grid", "--preset", "table2", "--cache", "{corpus}", "--out", "{root}/g"],
     "{corpus} is a corpus (Audios/, Labels/), not a feature cache", "--cache"),
    (["heads", "train", "--cache", "{cache}", "--out", "{corpus}"],
     "{corpus} is a corpus (Audios/, Labels/), not a train-head run directory", "--out"),
    (["corpus", "describe", "--corpus", "{cache}", "--out", "{root}/d"], "{cache} is a feature cache, not a corpus",
     ""),
])
def test_a_directory_of_another_kind_is_named_for_what_it_is(dirs, words, what, expected):
    before = {p: p.stat().st_mtime_ns for k in ("cache", "run", "corpus") for p in dirs[k].rglob("*")}
    r = _invoke([w.format(**dirs) for w in words])
    assert r.exit_code == 1, r.output
    assert what.format(**dirs) in r.output and expected.format(**dirs) in r.output, r.output
    after = {p: p.stat().st_mtime_ns for k in ("cache", "run", "corpus") for p in dirs[k].rglob("*")}
    assert after == before  # nothing written into the directory given by mistake


def test_a_damaged_run_config_is_an_error_naming_the_file(dirs):
    r = _invoke(["eval", "metrics", dirs["damaged"]])
    assert r.exit_code == 1 and f"{dirs['damaged'] / 'config.json'}: unreadable" in r.output, r.output


# ----------------------------------------------------------------------------- --wait-for-lock

def test_train_head_and_finetune_best_wait_for_the_lock_on_request(dirs, tmp_path):
    for name, args in (("train-head run directory", ["heads", "train", "--cache", dirs["cache"], "--epochs", "1",
                                                     "--hidden", "8", "--device", "cpu", "-q"]),
                       ("finetune-best model directory", ["finetune", "train", "--corpus", dirs["corpus"],
                                                          "--upstream", "demo-wavlm", "--random-init",
                                                          "--device", "cpu", "-q"])):
        out = tmp_path / name.split()[0]
        with lock_directory(out, what=name):
            r = _invoke(args + ["--out", out])  # at once
            assert r.exit_code == 1 and "--wait-for-lock waits for it" in r.output, r.output
            t0 = time.monotonic()
            r = _invoke(args + ["--out", out, "--wait-for-lock", "0.5"])
            assert r.exit_code == 1, r.output
            assert time.monotonic() - t0 >= 0.5
            assert f"this {name} is being written by another process" in r.output
            assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]


# ----------------------------------------------------------------------------- --rescale-loud

def test_finetune_best_rescale_loud_is_kept_in_the_model_and_predict_follows_it(loud_corpus, tmp_path):  # noqa: F811
    root, name = loud_corpus
    model = tmp_path / "model"
    args = ["finetune", "train", "--corpus", root, "--out", model, "--upstream", "demo-wavlm", "--random-init",
            "--epochs", "1", "--max-seconds", "1", "--hidden", "16", "--batch-size", "4", "--num-workers", "0",
            "--device", "cpu", "--no-thresholds", "-q"]
    r = _invoke(args)
    assert r.exit_code == 1 and "--rescale-loud" in r.output and name in r.output, r.output
    r = _invoke(args + ["--rescale-loud", "--overwrite"])
    assert r.exit_code == 0, r.output
    assert json.loads((model / "conilium_model.json").read_text())["rescale_loud"] is True
    assert json.loads((model / "config.json").read_text())["rescale_loud"] is True

    loud = Path(root) / "Audios" / name
    r = _invoke(["finetune", "predict", "--model", model, loud, "-q"])
    assert r.exit_code == 0 and f"{loud}," in r.output, r.output
    r = _invoke(["finetune", "predict", "--model", model, loud, "--no-rescale-loud", "-q"])
    assert r.exit_code == 1 and "--rescale-loud" in r.output, r.output

    from conilium.finetune.predict import Predictor

    info = json.loads((model / "conilium_model.json").read_text())
    del info["rescale_loud"]  # a model written before the option: audio read as before
    (model / "conilium_model.json").write_text(json.dumps(info))
    assert Predictor(model).signal.rescale_loud is False
    assert Predictor(model, rescale_loud=True).signal.rescale_loud is True


def test_resume_accepts_a_checkpoint_written_before_rescale_loud(tmp_path):
    from conilium.finetune.rundir import check_out_dir

    out = tmp_path / "model"
    config = FinetuneConfig(corpus="corpus", out=str(out))
    saved = config.to_json()
    del saved["rescale_loud"]
    (out / "checkpoints").mkdir(parents=True)
    torch.save({"config": saved, "model": {}, "optimizer": {}, "history": [], "best": {"f1_macro": 0.1, "epoch": 1},
                "sampler": {"next_epoch": 2}}, out / "checkpoints" / "last.pt")
    ckpt, clear = check_out_dir(out, config, resume=True, overwrite=False)
    assert ckpt is not None and not clear
    with pytest.raises(Exception, match="rescale_loud was False, now True"):
        check_out_dir(out, FinetuneConfig(corpus="corpus", out=str(out), rescale_loud=True), resume=True,
                       overwrite=False)


def test_resume_from_a_damaged_last_checkpoint_names_it_and_the_way_out(tmp_path):
    from conilium.errors import TrainingError
    from conilium.finetune.rundir import check_out_dir

    out = tmp_path / "model"
    config = FinetuneConfig(corpus="corpus", out=str(out))
    last = out / "checkpoints" / "last.pt"
    last.parent.mkdir(parents=True)
    torch.save({"config": config.to_json(), "model": {"w": torch.zeros(1000)}, "optimizer": {}, "history": [],
                "best": {"f1_macro": 0.1, "epoch": 1}, "sampler": {"next_epoch": 2}}, last)
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # cut short, as by a full disk
    with pytest.raises(TrainingError, match=rf"{last}: cannot read the checkpoint .*start over with --overwrite"):
        check_out_dir(out, config, resume=True, overwrite=False)
    torch.save({"config": config.to_json()}, last)
    with pytest.raises(TrainingError, match=rf"{last}: not a training checkpoint \(no model, optimizer"):
        check_out_dir(out, config, resume=True, overwrite=False)


# ----------------------------------------------------------------------------- finetune-best's threshold tuning

def test_threshold_tuning_after_finetuning_a_tiny_development_set(tmp_path):
    """finetune-best tunes offsets with K folds no larger than its development set allows: three
    clips of three classes used to stop it with scikit-learn's ValueError."""
    from conilium.cli.finetune import tune_model_thresholds

    out = tmp_path / "model"
    upstream, identity = load_upstream("demo-wavlm", random_init=True, random_root=tmp_path / "weights")
    model = EndToEndModel(upstream, EmotionHead(HeadConfig(dim=96, layers=0, hidden=8, dropout=0.0)))
    save_model_dir(out, model, {"max_seconds": 1.0, "normalize": {"mode": "none", "stats": None},
                                "offsets": {c: 0.0 for c in CLASSES}, "loss": "wbce", "labels": "S",
                                "upstream": identity})
    (out / "config.json").write_text(json.dumps({"kind": "finetune"}))
    probs = np.random.default_rng(0).dirichlet(np.ones(8), size=3)
    write_run_outputs(out, {"Development": (["a.wav", "b.wav", "c.wav"], probs, ["A", "S", "H"])})
    th = tune_model_thresholds(FinetuneConfig(corpus="corpus", out=str(out)))
    assert th["f1_macro_cross_validated"] is None and th["tune_split"] == "Development"
    assert json.loads((out / "conilium_model.json").read_text())["thresholds"]["tuned_run"] == "tuned"

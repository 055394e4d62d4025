"""A run written from one folder is read from any other: its config.json (and its checkpoint) record
the cache as an absolute path, so that predict --run, conilium-eval, --config and a rerun find it."""

import json
import os

import pytest
from click.testing import CliRunner

from conilium.cli import main
from conilium.demo import make_demo_corpus

pytestmark = pytest.mark.usefixtures("two_torch_threads")


def _invoke(args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), (args, repr(r.exception), r.output)
    assert r.exit_code == 0, (args, r.output)
    return r


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project folder with a corpus and a cache of a random-weight upstream (its weights in the cache)."""
    root = tmp_path_factory.mktemp("project")
    make_demo_corpus(root / "corpus", clips=12, seed=6)
    here = os.getcwd()
    os.chdir(root)
    try:
        _invoke(["extract", "features", "--corpus", "corpus", "--upstream", "demo-wav2vec2-base", "--random-init",
                 "--out", "cache/demo", "--max-seconds", "2", "--device", "cpu", "--threads", "1", "-q"])
    finally:
        os.chdir(here)
    return root


def test_a_run_trained_with_a_relative_cache_is_used_from_another_folder(project, tmp_path, monkeypatch):
    monkeypatch.chdir(project)
    train = ["heads", "train", "--cache", "cache/demo", "--out", "runs/r", "--epochs", "1", "--hidden", "8",
             "--device", "cpu", "-q"]
    _invoke(train)
    run = project / "runs" / "r"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    wav = sorted((project / "corpus" / "Audios").glob("*.wav"))[0]
    _invoke(["finetune", "predict", "--run", run, wav, "--out", "p.csv", "-q"])
    assert wav.name in (elsewhere / "p.csv").read_text()
    _invoke(["eval", "easy-difficult", run, run, "--out", "ed", "-q"])  # the clips from the run's cache
    assert any((elsewhere / "ed").iterdir())
    r = _invoke(train[:2] + ["--config", run / "config.json", "--out", run])  # the same run: done
    assert "complete already with these options" in r.output
    _invoke(train[:2] + ["--config", run / "config.json", "--out", "again"])  # its cache found from here
    assert (elsewhere / "again" / "metrics.json").is_file()
    recorded = json.loads((run / "config.json").read_text())["cache"]
    assert os.path.isabs(recorded) and os.path.samefile(recorded, project / "cache" / "demo")

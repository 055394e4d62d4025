"""The training core shared by train-head and finetune-best: the loop, best-epoch selection,
the non-finite stop, options declared once (click options, --config, --set)."""

import dataclasses
import json
import math

import click
import pytest
import torch
from click.testing import CliRunner

from conilium.errors import ConfigError
from conilium.finetune.config import FinetuneConfig
from conilium.heads.config import TrainConfig
from conilium.training import loop
from conilium.training.config import RunConfig, check_fields, differing_fields, option_meta, runtime_fields


# ----------------------------------------------------------------------------- the loop

class _Line(loop.Recipe):
    """Fits y = 2x with one weight per trainee; ``poison`` trainees get a NaN loss at ``poison_step``."""

    def __init__(self, dev_values, poison=(), poison_epoch=2):
        self.dev_values, self.poison, self.poison_epoch = dev_values, set(poison), poison_epoch
        self.ends = []

    def epoch_batches(self, epoch):
        x = torch.linspace(-1, 1, 8).reshape(4, 2)
        return [(x[i], 2 * x[i]) for i in range(4)], 4

    def fit_batch(self, trainee, batch, *, epoch, step):
        x, y = batch
        loss = ((trainee.model(x.reshape(-1, 1)).reshape(-1) - y) ** 2).mean()
        if trainee.name in self.poison and epoch == self.poison_epoch and step == 3:
            loss = loss * float("nan")
        trainee.optimizer.zero_grad()
        loss.backward()
        trainee.optimizer.step()
        return [(loss.detach(), len(x))]

    def loss_name(self, trainee):
        return "mse"

    def evaluate(self, trainees, epoch):
        return [{"dev_score": self.dev_values[t.name][epoch - 1]} for t in trainees]

    def on_epoch_end(self, trainee, record, improved):
        self.ends.append((trainee.name, record["epoch"], improved))


def _trainee(name, epochs, patience=None):
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1, bias=False)
    opt, impl = loop.make_optimizer(model.parameters(), lr=0.1, weight_decay=0.0)
    return loop.Trainee(name, model, opt, epochs=epochs, optimizer_name=impl,
                        selection=loop.Selection("dev_score", patience))


def test_fit_keeps_the_best_epoch_stops_on_patience_and_records_history():
    recipe = _Line({"a": [0.1, 0.5, 0.4, 0.3, 0.9], "b": [0.2, 0.3, 0.4, 0.5, 0.6]})
    a, b = _trainee("a", 5, patience=2), _trainee("b", 3)
    loop.fit(recipe, [a, b], progress=False)
    assert [r["epoch"] for r in a.history] == [1, 2, 3, 4]  # two epochs without a better score after epoch 2
    assert a.best_epoch == 2 and a.selection.best_value == 0.5
    assert [r["epoch"] for r in b.history] == [1, 2, 3] and b.best_epoch == 3
    assert ("a", 2, True) in recipe.ends and ("a", 3, False) in recipe.ends
    # the running loss is the clip-weighted mean of the step losses, and it falls as the weight learns 2
    assert a.history[-1]["train_loss"] < a.history[0]["train_loss"]
    assert abs(a.model.weight.item() - 2.0) < abs(0.0 - 2.0)
    assert a.optimizer_name.startswith("AdamW")


def test_a_nonfinite_loss_stops_only_its_trainee_with_a_clear_error():
    recipe = _Line({"a": [0.1] * 3, "b": [0.1] * 3}, poison=("a",))
    a, b = _trainee("a", 3), _trainee("b", 3)
    loop.fit(recipe, [a, b], progress=False)
    assert isinstance(a.error, loop.TrainingError)
    assert "mse loss is nan at epoch 2, step 3" in str(a.error) and "lower --lr" in str(a.error)
    assert [r["epoch"] for r in a.history] == [1]  # the broken epoch is not recorded
    assert b.error is None and [r["epoch"] for r in b.history] == [1, 2, 3]


def test_a_resumed_selection_counts_the_epochs_since_the_best():
    history = [{"epoch": e, "dev_score": v} for e, v in [(1, 0.2), (2, 0.4), (3, 0.3), (4, 0.35)]]
    sel = loop.Selection.resumed("dev_score", 3, history, 0.4, 2)
    assert sel.since_best == 2 and not sel.exhausted
    assert not sel.update({"epoch": 5, "dev_score": 0.1}) and sel.exhausted


# ----------------------------------------------------------------------------- configs declared once

def test_the_shared_fields_are_declared_once_for_heads_and_fine_tuning():
    shared = [f.name for f in dataclasses.fields(RunConfig)]
    head = {f.name: f for f in dataclasses.fields(TrainConfig)}
    ft = {f.name: f for f in dataclasses.fields(FinetuneConfig)}
    assert set(shared) <= set(head) and set(shared) <= set(ft)
    for name in ("loss", "labels", "sampler", "agreement_over", "p_threshold", "seed", "patience"):
        # the same choices, bounds and help in both commands
        assert option_meta(head[name]) == option_meta(ft[name]), name
    assert TrainConfig(cache="c").lr == 1e-3 and FinetuneConfig(corpus="c", out="o").lr == 1e-5
    from conilium.heads.model import POOLINGS
    from conilium.training.config import LOSS_PROPERTIES, POOLING_NAMES
    from conilium.training.losses import LOSSES

    assert tuple(POOLINGS) == POOLING_NAMES and tuple(LOSSES) == tuple(LOSS_PROPERTIES)  # the names --help shows
    assert set(runtime_fields(TrainConfig)) == {"device", "num_workers", "threads", "preload", "preload_budget_gb",
                                                "verify", "stack_heads", "cuda_graphs"}
    assert {"precision", "eval_batch_size", "keep_checkpoints"} <= set(runtime_fields(FinetuneConfig))


@pytest.mark.parametrize("kw, message", [
    (dict(lr=float("inf")), "--lr must be a positive number, not inf"),
    (dict(weight_decay=-1.0), "--weight-decay must be a number >= 0"),
    (dict(epochs=2.5), "--epochs must be at least 1, not 2.5"),
    (dict(dropout=1.0), r"--dropout must be in \[0, 1\), not 1.0"),
    (dict(sampler="uniform"), "unknown --sampler 'uniform'; expected one of none, balanced"),
    (dict(agreement_over="some"), "unknown --agreement-over"),
    (dict(seed=-1), "--seed must be in"),
])
def test_bounds_and_choices_come_from_the_field_declarations(kw, message):
    for config in (TrainConfig(cache="c", **kw), FinetuneConfig(corpus="c", out="o", **kw)):
        with pytest.raises(ConfigError, match=message):
            check_fields(config)


def test_differing_fields_reads_missing_keys_as_defaults_and_ignores_runtime_fields():
    a = TrainConfig(cache="c").to_json()
    old = {k: v for k, v in a.items() if k not in ("agreement_over", "task")}  # written before these existed
    assert differing_fields(TrainConfig, a, old) == []
    assert differing_fields(TrainConfig, a, dict(a, device="cuda", num_workers=3)) == []
    assert differing_fields(TrainConfig, a, dict(a, lr=0.5, seed=2)) == ["lr", "seed"]


# ----------------------------------------------------------------------------- options made from the fields

def _command(cls, **given):
    from conilium.cli.options import config_from_command, config_options

    seen = {}

    @click.command()
    @config_options(cls)
    def cmd(**options):
        seen["config"] = config_from_command(cls, options, given=given)

    return cmd, seen


def test_every_field_has_its_option_with_the_same_default():
    for cls, given in ((TrainConfig, {"cache": "c"}), (FinetuneConfig, {"corpus": "c", "out": "o"})):
        cmd, seen = _command(cls, **given)
        result = CliRunner().invoke(cmd, [])
        assert result.exit_code == 0, result.output
        assert seen["config"] == cls.from_dict(given)  # no option changes a default
        flags = {p.name for p in cmd.params}
        made = {f.name for f in dataclasses.fields(cls) if (option_meta(f) or {}).get("cli")}
        assert made <= flags and {"config_file", "sets"} <= flags


def test_config_file_then_options_then_set(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TrainConfig(cache="cache/a", lr=0.5, epochs=7, seed=3, sampler="balanced").to_json()))
    cmd, seen = _command(TrainConfig)
    result = CliRunner().invoke(cmd, ["--config", str(path), "--epochs", "9", "--set", "seed=5", "--set",
                                      "sampler=none", "--labels", "P"])
    assert result.exit_code == 0, result.output
    c = seen["config"]
    assert (c.cache, c.lr, c.epochs, c.seed, c.sampler, c.labels) == ("cache/a", 0.5, 9, 5, None, "P")


def test_an_out_of_range_option_is_a_usage_error_naming_it():
    cmd, _ = _command(FinetuneConfig, corpus="c", out="o")
    result = CliRunner().invoke(cmd, ["--augment-fraction", "1.5"])
    assert result.exit_code == 2 and "--augment-fraction" in result.output
    result = CliRunner().invoke(cmd, ["--set", "no_such_option=1"])
    assert result.exit_code != 0 and "no_such_option" in str(result.exception)


def test_train_head_reruns_from_a_runs_config_json(tmp_path):
    from conilium.cli.heads import train_head_cmd
    from conilium.testing import write_synthetic_cache
    from conilium.heads.train import load_config

    cache = tmp_path / "cache"
    write_synthetic_cache(cache, clips=40, dim=8, seed=1)
    args = ["--cache", str(cache), "--epochs", "2", "--hidden", "8", "--loss", "kld", "--labels", "P", "-q"]
    first = CliRunner().invoke(train_head_cmd, args + ["--out", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(train_head_cmd, ["--config", str(tmp_path / "a" / "config.json"), "--out",
                                                str(tmp_path / "b"), "-q"])
    assert again.exit_code == 0, again.output
    assert load_config(tmp_path / "b") == load_config(tmp_path / "a")
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert a["f1_macro"] == b["f1_macro"] and a["best_epoch"] == b["best_epoch"]
    assert all(math.isfinite(r["train_loss"]) for r in b["history"])


def test_finetune_best_reads_a_runs_config_json_and_the_recorded_keys_beside_it(tmp_path, monkeypatch,
                                                                                  small_demo_corpus):
    from conilium.cli.finetune import finetune_best_cmd
    from conilium.finetune import train as ft

    seen = []
    monkeypatch.setattr(ft, "finetune", lambda config, **kw: seen.append(config) or {})
    before = FinetuneConfig(corpus=str(small_demo_corpus), out=str(tmp_path / "old"), upstream="demo-wavlm",
                            random_init=True, lr=3e-5, labels="P", epochs=3, lora_rank=4)
    recorded = {**before.to_json(), "kind": "finetune", "upstream_identity": {"name": "demo-wavlm"},
                "world_size": 1, "normalize_used": "global", "max_seconds_used": 8.0}
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    result = CliRunner().invoke(finetune_best_cmd, ["--config", str(tmp_path / "config.json"), "--out",
                                                    str(tmp_path / "new"), "--epochs", "5", "--no-thresholds",
                                                    "-q"])
    assert result.exit_code == 0, result.output
    assert seen[0] == dataclasses.replace(before, out=str(tmp_path / "new"), epochs=5, tune_thresholds=False)
    result = CliRunner().invoke(finetune_best_cmd, ["--out", str(tmp_path / "x"), "-q"])
    assert result.exit_code == 2 and "Missing option '--corpus'" in result.output


def test_finetune_best_summary_gives_the_k_fold_estimate_beside_the_in_sample_tuned_score():
    from conilium.cli.finetune import finetune_summary

    m = {"best_epoch": 3, "split": "Development", "f1_macro": 0.31,
         "thresholds": {"f1_macro_tuned": 0.36, "f1_macro_cross_validated": 0.33}}
    assert finetune_summary(m, "models/m") == ("models/m: best epoch 3, Development macro-F1 0.3100; thresholds "
                                               "tuned: 0.3600 in-sample, 0.3300 K-fold estimate")
    m["thresholds"]["f1_macro_cross_validated"] = None
    assert finetune_summary({**m, "thresholds": None}, "m") == "m: best epoch 3, Development macro-F1 0.3100"
    assert finetune_summary(m, "m").endswith("(too few Development clips per class for a K-fold estimate)")

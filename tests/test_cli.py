"""The command line: one ``conilium`` root with a group per stage, the tools' own names as
aliases of the very same commands, ``--version`` and ``-q/--quiet`` everywhere, and a
``--help`` that loads no heavy library."""

import configparser
import importlib
import json
import subprocess
import sys
from pathlib import Path

import click
from click.testing import CliRunner

import conilium
from conilium.cli import ALIASES, STAGES, main

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "h5py", "sklearn", "matplotlib")


def console_scripts() -> dict:
    """setup.cfg's console scripts: name → the click command they run."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    out = {}
    for line in cfg["options.entry_points"]["console_scripts"].strip().splitlines():
        name, target = (s.strip() for s in line.split("="))
        module, attribute = target.split(":")
        out[name] = getattr(importlib.import_module(module), attribute)
    return out


def resolve(words):
    """The command ``conilium WORDS...`` runs."""
    command, ctx = main, click.Context(main)
    for word in words:
        command = command.get_command(ctx, word)
        assert command is not None, f"conilium {' '.join(words)}: no such command"
        ctx = click.Context(command, parent=ctx)
    return command


def every_command():
    """(words, command) for the root, every group and every command under it."""
    todo = [([], main)]
    while todo:
        words, command = todo.pop(0)
        yield words, command
        if isinstance(command, click.Group):
            ctx = click.Context(command)
            todo += [(words + [name], command.get_command(ctx, name)) for name in command.list_commands(ctx)]


def test_groups_follow_the_data_flow():
    assert main.list_commands(click.Context(main)) == ["corpus", "extract", "heads", "finetune", "eval"]
    assert list(STAGES) == main.list_commands(click.Context(main))
    names = {" ".join(words) for words, _ in every_command()}
    for words in ("corpus make-demo", "corpus describe", "extract features", "extract verify", "heads train",
                  "heads grid", "finetune train", "finetune predict", "eval tune-thresholds", "eval ensemble",
                  "eval easy-difficult", "eval report", "eval submission", "eval metrics", "eval stack"):
        assert words in names
    help_text = CliRunner().invoke(main, ["--help"]).output
    for alias in ALIASES:
        assert alias in help_text  # the root's help names every alias and its twin


def test_every_console_script_is_conilium_or_an_alias_of_its_twin():
    scripts = console_scripts()
    assert scripts.pop("conilium") is main
    assert set(scripts) == set(ALIASES)
    for alias, command in scripts.items():
        twin = resolve(ALIASES[alias].split())
        assert [p.to_info_dict() for p in command.params] == [p.to_info_dict() for p in twin.params], alias
        assert command.callback is twin.callback, alias
        if isinstance(command, click.Group):
            assert command.list_commands(click.Context(command)) == twin.list_commands(click.Context(twin))


def test_version_everywhere():
    for words, command in every_command():
        r = CliRunner().invoke(main, words + ["--version"])
        assert r.exit_code == 0 and r.output == f"conilium {conilium.__version__}\n", (words, r.output)
    for alias, command in console_scripts().items():
        r = CliRunner().invoke(command, ["--version"], prog_name=alias)
        assert r.exit_code == 0 and r.output.strip() == f"conilium {conilium.__version__}"


def test_quiet_everywhere():
    for words, command in every_command():
        opts = [p.opts for p in command.params if p.name == "quiet"]
        assert opts == [["-q", "--quiet"]], (words, opts)
        r = CliRunner().invoke(main, words + ["-q", "--help"])
        assert r.exit_code == 0, (words, r.output)


def test_quiet_given_to_a_group_holds_for_its_command(tmp_path):
    args = ["make-demo", "--out", str(tmp_path / "a"), "--clips", "10"]
    loud = CliRunner().invoke(main, ["corpus", *args])
    assert loud.exit_code == 0 and "Wrote a demo corpus" in loud.output
    for words in (["-q", "corpus"], ["corpus", "-q"]):
        args[2] = str(tmp_path / "-".join(words))
        quiet = CliRunner().invoke(main, [*words, *args])
        assert quiet.exit_code == 0 and quiet.output == "", quiet.output


_HELP_EVERYWHERE = """
import json, sys
from click.testing import CliRunner
sys.path.insert(0, {tests!r})
from test_cli import console_scripts, every_command
from conilium.cli import main

shown = []
for words, command in every_command():
    r = CliRunner().invoke(main, words + ["--help"])
    assert r.exit_code == 0, (words, r.output)
    shown.append(" ".join(["conilium", *words]))
for alias, command in console_scripts().items():
    r = CliRunner().invoke(command, ["--help"], prog_name=alias)
    assert r.exit_code == 0 and "Usage: " + alias in r.output, (alias, r.output)
    shown.append(alias)
print(json.dumps({{"shown": shown, "loaded": sorted(m for m in {heavy!r} if m in sys.modules)}}))
"""


def test_help_loads_no_heavy_library():
    """``--help`` of the root, of every group and command, and of every alias imports neither
    torch, transformers, h5py, scikit-learn nor matplotlib (in a fresh interpreter)."""
    code = _HELP_EVERYWHERE.format(tests=str(Path(__file__).parent), heavy=HEAVY)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(result["shown"]) >= 1 + 5 + 14 + len(ALIASES)
    assert result["loaded"] == [], f"--help imported {result['loaded']}"


def test_torchrun_entry_modules_run_their_command():
    """``python -m conilium.cli.extract`` / ``-m conilium.cli.finetune`` (what torchrun runs) are
    extract-features and finetune-best."""
    for module, first_line in (("conilium.cli.extract", "Run an upstream over a corpus once"),
                               ("conilium.cli.finetune", "Fine-tune an upstream and an attentive head")):
        r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr[-2000:]
        assert first_line in r.stdout


def test_every_numeric_option_is_bounded():
    """Every count, seed, rate, duration and share is checked while the command line is read (a
    usage error naming the option, exit status 2), never left to fail deep in the library."""
    unbounded = []
    for words, command in every_command():
        for p in command.params:
            number = isinstance(p.type, (click.types.IntParamType, click.types.FloatParamType))
            if number and not isinstance(p.type, click.types._NumberRangeBase):
                unbounded.append(f"conilium {' '.join(words)} {p.opts[0]}")
    assert unbounded == []


def test_upgrade_command_converts_a_format_1_cache_path_is_named(tmp_path):
    """`conilium extract upgrade` is wired to the library converter; a non-cache is a clear error."""
    from click.testing import CliRunner

    from conilium.cli import main

    result = CliRunner().invoke(main, ["extract", "upgrade", str(tmp_path)])
    assert result.exit_code == 1 and str(tmp_path) in result.output and "Traceback" not in result.output


def test_train_head_takes_the_agreement_reading(tmp_path):
    from conilium.cli.heads import train_head_cmd

    names = {p.name for p in train_head_cmd.params}
    assert "agreement_over" in names


def test_a_mistyped_command_gets_the_closest_names_suggested():
    from conilium.cli import main

    r = CliRunner().invoke(main, ["head"])
    assert r.exit_code == 2 and "No such command 'head'. Did you mean 'heads'?" in r.output
    r = CliRunner().invoke(main, ["heads", "trian"])
    assert r.exit_code == 2 and "Did you mean 'train'?" in r.output
    r = CliRunner().invoke(main, ["xyz"])
    assert r.exit_code == 2 and "Did you mean" not in r.output

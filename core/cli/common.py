"""What every command shares: the help options, ``--version``, ``-q/--quiet``, one-line
errors, and groups that list their commands in data-flow order and import them lazily."""

from __future__ import annotations

import importlib
from typing import Mapping, Optional

import click

import conilium

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def version_option(f):
    """``--version``: print conilium's version and exit."""
    return click.version_option(conilium.__version__, "--version", prog_name="conilium",
                                message="%(prog)s %(version)s", help="Print conilium's version and exit.")(f)


def _quiet_from_groups(ctx: click.Context, param, value: bool) -> bool:
    # `conilium -q eval ensemble ...`: -q given to a group holds for the command it runs
    parent = ctx.parent
    while not value and parent is not None:
        value = bool(parent.params.get("quiet"))
        parent = parent.parent
    return value


def quiet_option(help: str = "No progress bar or messages."):
    """``-q/--quiet``; also on when a group above the command was given ``-q``."""
    return click.option("-q", "--quiet", is_flag=True, callback=_quiet_from_groups, help=help)


#: ``-q`` of a group: it holds for the command that runs.
GROUP_QUIET = "Quiet for whichever command runs below (each command also takes -q)."


def fail(e: Exception):
    """A library error as click's one-line ``Error: ...`` (exit status 1), without a traceback."""
    raise click.ClickException(str(e)) from None


class Group(click.Group):
    """A group that lists its commands in the order they were added (the data flow), not
    alphabetically; ``lazy`` maps more command names to ``"module:attribute"``, imported
    only when that command is run or listed."""

    def __init__(self, *args, lazy: Optional[Mapping[str, str]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context):
        return list(self.lazy) + [name for name in self.commands if name not in self.lazy]

    def get_command(self, ctx: click.Context, name: str):
        if name in self.lazy and name not in self.commands:
            module, attribute = self.lazy[name].split(":")
            self.add_command(getattr(importlib.import_module(module), attribute), name)
        return super().get_command(ctx, name)

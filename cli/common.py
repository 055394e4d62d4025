"""What every command shares: the help options, ``--version``, ``-q/--quiet``, one-line
errors, a clean stop on SIGINT, SIGTERM and SIGHUP, and groups that list their commands in
data-flow order and import them lazily."""

from __future__ import annotations

import difflib
import importlib
import math
import signal
from pathlib import Path
from typing import Mapping, Optional, Union

import click

import conilium
from conilium.dirs import KINDS, describe_dir, dir_kind  # noqa: F401 (re-exported)
from conilium.locking import STOP_SIGNALS, exit_status, signal_name, stop_on_signals

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


# ----------------------------------------------------------------------------- option values

class Count(click.IntRange):
    """An integer option with bounds (``Count(1)``: at least 1); out of range is a usage error
    (exit status 2) naming the option."""

    name = "integer"

    def __init__(self, min: Optional[int] = 1, max: Optional[int] = None):
        super().__init__(min=min, max=max)


class Number(click.FloatRange):
    """A finite number option with bounds (``Number(0, open_min=True)``: positive); NaN, and
    infinity unless ``infinite``, are usage errors naming the option, as out of range is."""

    name = "number"

    def __init__(self, min: Optional[float] = None, max: Optional[float] = None, *, open_min: bool = False,
                 open_max: bool = False, infinite: bool = False):
        super().__init__(min=min, max=max, min_open=open_min, max_open=open_max)
        self.infinite = infinite

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if math.isnan(rv) or (math.isinf(rv) and not self.infinite):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


#: Counts of things that need one at least: threads, batch sizes, epochs, clips, widths.
POSITIVE_INT = Count(1)
#: Counts that may be zero: DataLoader worker processes.
NON_NEGATIVE_INT = Count(0)
#: Random seeds: what numpy and scikit-learn accept everywhere.
SEED = Count(0, 2 ** 32 - 1)
#: Learning rates, durations, sizes that must be above zero.
POSITIVE = Number(0, open_min=True)
#: Weight decay, memory budgets: zero or more.
NON_NEGATIVE = Number(0)
#: Shares and probabilities in [0, 1].
FRACTION = Number(0, 1)
#: Dropout-like probabilities in [0, 1).
DROPOUT = Number(0, 1, open_max=True)


def wait_for_lock_option(what: str):
    """``--wait-for-lock [SECONDS]``: wait for another process writing the output directory
    (as long as it takes, or at most SECONDS) instead of stopping at once."""
    return click.option("--wait-for-lock", "wait_for_lock", type=Number(0, infinite=True), is_flag=False,
                        flag_value=math.inf, default=None, metavar="[SECONDS]",
                        help=f"When another process is writing {what}, wait for it to finish (at most SECONDS "
                             f"when given) instead of stopping at once with a message naming it.")


def lock_wait(value: Optional[float]) -> Union[bool, float]:
    """The ``wait`` of :func:`conilium.locking.lock_directory` for a ``--wait-for-lock`` value."""
    if value is None:
        return False
    return True if math.isinf(value) else float(value)


# ----------------------------------------------------------------------------- what a directory is
# (the kinds are told apart by conilium.dirs, re-exported here for the commands)

def refuse_dir(path, expected: str, hint: str, *, accept: tuple = ()) -> None:
    """Click's one-line error (exit status 1) ``"PATH is <what it is>, not <expected>; <hint>"``
    when :func:`dir_kind` says ``path`` is another kind than those in ``accept`` (:data:`KINDS`
    keys); silence when it is one of them or nothing known (the library then says more)."""
    kind = dir_kind(path)
    if kind is not None and kind not in accept:
        raise click.ClickException(f"{path} is {describe_dir(path)}, not {expected}; {hint}")


def check_corpus_arg(path) -> None:
    """A ``--corpus`` that is another kind of directory (a cache, a run, an empty one, the
    corpus's own Audios/ folder): say so, and what to pass."""
    p = Path(path)
    if dir_kind(p) == "audio" and dir_kind(p.resolve().parent) == "corpus":
        raise click.ClickException(f"{path} is the corpus's audio folder, not the corpus; pass its parent "
                                   f"{p.resolve().parent} (the corpus root, with Audios/ and Labels/) to --corpus")
    refuse_dir(path, "a corpus", "pass the corpus root (Audios/, Labels/labels_consensus.csv, or a corpus.csv "
                                 "manifest) to --corpus",
               accept=("corpus",))


class Command(click.Command):
    """A command that a signal stops cleanly: SIGTERM, SIGHUP and SIGINT (Ctrl-C) raise
    :class:`~conilium.locking.Stopped` (:func:`conilium.locking.stop_on_signals`: locks released,
    temporary files removed), and end with one line naming the signal and the exit status
    128 + its number."""

    def invoke(self, ctx: click.Context):
        try:
            # SIGINT too: Python's own KeyboardInterrupt is lost where it lands in a garbage-collection
            # callback, stop_on_signals delivers it again
            with stop_on_signals(STOP_SIGNALS + (signal.SIGINT,)):
                return super().invoke(ctx)
        except KeyboardInterrupt as e:
            click.echo(f"Error: stopped by {signal_name(e)}; its locks are released and no half-written file "
                       f"is kept: run the same command again to carry on", err=True)
            ctx.exit(exit_status(e))


class Group(click.Group):
    """A group that lists its commands in the order they were added (the data flow), not
    alphabetically; ``lazy`` maps more command names to ``"module:attribute"``, imported
    only when that command is run or listed. Its commands are :class:`Command` s."""

    command_class = Command

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

    def resolve_command(self, ctx: click.Context, args):
        """As click's, and an unknown command name gets the closest known ones suggested."""
        name = click.utils.make_str(args[0]) if args else ""
        if args and not name.startswith("-") and self.get_command(ctx, name) is None:
            close = difflib.get_close_matches(name, self.list_commands(ctx), n=3, cutoff=0.6)
            if close:
                ctx.fail(f"No such command {name!r}. Did you mean {' or '.join(repr(c) for c in close)}?")
        return super().resolve_command(ctx, args)

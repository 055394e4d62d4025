"""Command-line options made from a config class's fields, declared once.

Each field of a training config that carries :func:`conilium.training.config.option`
metadata becomes one click option: ``batch_size`` → ``--batch-size``, its default and help
from the field, its values from the field's choices or bounds (a usage error naming the
option when out of range), a flag for a boolean. Every training command also takes

* ``--config FILE``: a config JSON (the ``config.json`` a run writes), the starting values;
* ``--set KEY=VALUE`` (repeatable): one field, the value read as JSON when it parses
  (``--set epochs=10``, ``--set sampler=null``), as a string otherwise.

Precedence: the dataclass defaults < ``--config FILE`` < the options given on the command
line < ``--set``. :func:`config_from_command` builds the config from them; the library then
checks it (:meth:`~conilium.training.config.RunConfig.check`).
"""

from __future__ import annotations

import json
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Mapping, Optional

import click
from click.core import ParameterSource

from conilium.errors import ConfigError
from conilium.training.config import flag_name, option_meta
from conilium.util import read_json_object

from .common import Count, Number

#: The keyword arguments the generated options add to a command.
CONFIG_FILE, SETS = "config_file", "sets"


def _is_bool(cls, f) -> bool:
    hint = typing.get_type_hints(cls).get(f.name)
    return hint is bool


def _click_type(meta: Mapping):
    if meta["choices"] is not None:
        return click.Choice([meta["none"] if c is None else str(c) for c in meta["choices"]])
    lo, hi = meta["minimum"], meta["maximum"]
    if meta["integer"]:
        lo = None if lo is None else int(lo) + (1 if meta["open_min"] else 0)
        hi = None if hi is None else int(hi) - (1 if meta["open_max"] else 0)
        return Count(lo, hi)
    if lo is not None or hi is not None:
        return Number(lo, hi, open_min=meta["open_min"], open_max=meta["open_max"])
    return None


def _option(cls, f, meta: Mapping, override: Optional[dict]) -> Callable:
    kw: Dict[str, Any] = dict(help=meta["help"])
    if _is_bool(cls, f):
        kw.update(is_flag=True, default=bool(f.default))
    else:
        kw["type"] = _click_type(meta)
        default = f.default
        if default is None and meta["none"] is not None:
            default = meta["none"]
        kw["default"] = default
        if meta["default_text"] is not None:
            kw["show_default"] = meta["default_text"]
        elif default is not None:
            kw["show_default"] = True
        if meta["metavar"]:
            kw["metavar"] = meta["metavar"]
    kw.update(override or {})
    return click.option(flag_name(f.name), f.name, **kw)


def config_options(cls, *, skip: Iterable[str] = (), overrides: Optional[Mapping[str, dict]] = None):
    """A decorator adding ``cls``'s options (fields with option metadata, ``cli`` on, not in
    ``skip``), ``--config FILE`` and ``--set KEY=VALUE`` to a click command; ``overrides``:
    field → click keyword arguments that differ for this command (a help text)."""
    skip, overrides = set(skip), dict(overrides or {})
    made = []
    for f in fields(cls):
        meta = option_meta(f)
        if meta is None or not meta["cli"] or f.name in skip:
            continue
        made.append(_option(cls, f, meta, overrides.get(f.name)))
    made.append(click.option("--set", SETS, multiple=True, metavar="KEY=VALUE",
                             help="Set any option of the config by its field name, e.g. --set epochs=10 "
                                  "--set sampler=null (repeatable; the value is read as JSON when it parses); "
                                  "wins over the options above."))
    made.append(click.option("--config", CONFIG_FILE, type=click.Path(dir_okay=False, exists=True, path_type=Path),
                             default=None, metavar="FILE",
                             help="Start from this config JSON (the config.json a run writes); options given "
                                  "on the command line and --set win over it."))

    def decorate(command):
        for make in reversed(made):  # the last one applied is listed first
            command = make(command)
        return command

    return decorate


def parse_sets(values: Iterable[str]) -> Dict[str, Any]:
    """``KEY=VALUE`` strings → {field: value}; the value as JSON when it parses, else the string."""
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--set")
        try:
            out[key.strip().replace("-", "_")] = json.loads(value)
        except ValueError:
            out[key.strip().replace("-", "_")] = value
    return out


def config_values(cls, params: Mapping[str, Any], *, given: Mapping[str, Any] = (),
                  ignore_file_keys: Iterable[str] = ()) -> Dict[str, Any]:
    """The field values a command line asks for, each source over the one before:
    ``--config FILE``'s (minus ``ignore_file_keys``, what a run records beside its config),
    every option given on the command line, ``given`` (the command's own options for fields
    without a generated one; None: not given), then ``--set``. Options left at their
    defaults are not included: the dataclass has them. An option's word for None
    (``--sampler none``) reads as None."""
    ctx = click.get_current_context()
    values: Dict[str, Any] = {}
    if params.get(CONFIG_FILE) is not None:
        loaded = read_json_object(params[CONFIG_FILE], "config file")
        values.update({k: v for k, v in loaded.items() if k not in set(ignore_file_keys)})
    names = {f.name for f in fields(cls)}
    for name, value in params.items():
        if name not in names or ctx.get_parameter_source(name) in (None, ParameterSource.DEFAULT):
            continue
        values[name] = value
    values.update({name: str(value) if isinstance(value, Path) else value
                   for name, value in dict(given).items() if value is not None})
    values.update(parse_sets(params.get(SETS) or ()))
    for f in fields(cls):
        meta = option_meta(f) or {}
        if meta.get("none") is not None and values.get(f.name) == meta["none"]:
            values[f.name] = None
    return values


def config_from_command(cls, params: Mapping[str, Any], *, given: Mapping[str, Any] = (),
                        required: Iterable[str] = (), ignore_file_keys: Iterable[str] = ()):
    """The config of class ``cls`` a command line describes (:func:`config_values`);
    ``required``: fields that must have a value in the end (click's usage error naming the
    option otherwise)."""
    values = config_values(cls, params, given=given, ignore_file_keys=ignore_file_keys)
    for name in required:
        if values.get(name) is None:
            raise click.UsageError(f"Missing option '{flag_name(name)}'.")
    try:
        return cls.from_dict(values)
    except TypeError as e:  # a value of the wrong kind from --set or a file
        raise ConfigError(str(e)) from None

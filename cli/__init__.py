"""The command line: one ``conilium`` root with a group per stage, in data-flow order.

Each stage's commands live in a module of this package (:mod:`.corpus`, :mod:`.extract`,
:mod:`.heads`, :mod:`.finetune`, :mod:`.evaluate`); the stage packages hold only library
code. The command modules import what ``--help`` shows from light modules (config
dataclasses, registries of names) and the library, with torch, transformers, h5py,
scikit-learn and matplotlib, inside the command bodies: ``--help`` loads none of them.
This package sits above every stage, so a command may chain stages (``finetune-best``
trains, then tunes the decision thresholds with :mod:`conilium.evaluate`).

The tools' own names are console scripts for the same command objects: identical options
and behaviour under both names.
"""

from __future__ import annotations

import click

from .common import CONTEXT, GROUP_QUIET, Group, quiet_option, version_option

#: Stage group → where it is defined, in data-flow order.
STAGES = {
    "corpus": "conilium.cli.corpus:corpus_group",
    "extract": "conilium.cli.extract:extract_group",
    "heads": "conilium.cli.heads:heads_group",
    "finetune": "conilium.cli.finetune:finetune_group",
    "eval": "conilium.cli.evaluate:eval_group",
}

#: Console script (the user's name) → its ``conilium`` command.
ALIASES = {
    "make-demo-corpus": "corpus make-demo",
    "describe-corpus": "corpus describe",
    "extract-features": "extract features",
    "verify-cache": "extract verify",
    "train-head": "heads train",
    "train-grid": "heads grid",
    "finetune-best": "finetune train",
    "predict": "finetune predict",
    "conilium-eval": "eval",
}


@click.group("conilium", cls=Group, lazy=STAGES, context_settings=CONTEXT)
@quiet_option(GROUP_QUIET)
@version_option
def main(quiet):
    """conilium: speech emotion recognition on multi-annotator corpora, stage by stage.

    \b
    The groups follow the data flow:
      corpus    make-demo | describe           a demo corpus; counts, agreement, figures
      extract   features | verify              corpus -> feature cache (one upstream pass)
      heads     train | grid                   feature cache -> head runs
      finetune  train | predict | export       corpus -> model directory -> predictions on audio, ONNX
      eval      metrics | compare | tune-thresholds | ensemble | stack | easy-difficult | report | submission
                                               run directories -> scores, comparisons, tables, submissions

    \b
    The tools' own names run the same commands, with the same options:
      make-demo-corpus, describe-corpus   conilium corpus make-demo, describe
      extract-features, verify-cache      conilium extract features, verify
      train-head, train-grid              conilium heads train, grid
      finetune-best, predict              conilium finetune train, predict
      conilium-eval                       conilium eval

    \b
    Example:
      conilium corpus make-demo --out demo
      conilium extract features --corpus demo --upstream demo-wavlm --random-init --out cache/demo
      conilium heads train --cache cache/demo --loss wbce --labels S --out runs/wbce-S
      conilium eval tune-thresholds runs/wbce-S runs/wbce-S-tuned

    `conilium GROUP --help` and `conilium GROUP COMMAND --help` say more.
    """

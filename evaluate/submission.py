"""Challenge-style submission files: ``FileName,EmoClass`` for every clip of a split."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Mapping, Optional

from conilium.corpus import Clip
from conilium.util import atomic_path

from conilium.runs import RunError, prediction_path, read_run


def write_submission(run_dir, path, *, split: str = "Test3",
                     clips: Optional[Mapping[str, Clip]] = None) -> int:
    """Write a run's predictions for ``split`` as ``FileName,EmoClass``; returns the row count.

    With ``clips`` (clip metadata of the corpus or cache), the predictions must cover
    exactly the clips of that split. Every prediction must be one of the run's classes.
    """
    run_dir = Path(run_dir)
    preds = read_run(run_dir, [split])[split]
    src = prediction_path(run_dir, split)
    if len(preds) == 0:
        raise RunError(f"{src}: no clip listed")
    seen = set()
    for i, (name, letter) in enumerate(zip(preds.names, preds.prediction)):
        if letter not in preds.classes:
            raise RunError(f"{src}:{i + 2}: clip {name}: prediction {letter!r} is not one of "
                           f"{','.join(preds.classes)}")
        if name in seen:
            raise RunError(f"{src}:{i + 2}: clip {name} listed twice")
        seen.add(name)
    if clips is not None:
        expected = {n for n, c in clips.items() if c.split == split}
        if not expected:
            raise RunError(f"the clip metadata has no clip in split {split}")
        missing, extra = sorted(expected - seen), sorted(seen - expected)
        if missing or extra:
            raise RunError(f"{src}: predictions do not cover split {split} exactly: {len(missing)} clip(s) "
                           f"missing (e.g. {missing[:3]}), {len(extra)} not in the split (e.g. {extra[:3]})")
    with atomic_path(path, suffix=".csv.tmp") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["FileName", "EmoClass"])
            for name, letter in zip(preds.names, preds.prediction):
                w.writerow([name, letter])
    return len(preds)

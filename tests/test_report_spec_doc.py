"""docs/REPORT_SPEC.md: the report spec's format, kept true by reading it here."""

import json
import re
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from conilium import CLASSES
from conilium.cli.evaluate import eval_group as main
from conilium.evaluate import paper
from conilium.evaluate.report_data import ATTRIBUTES_TABLE
from conilium.runs import prediction_path, write_predictions
from conilium.util import write_json

DOC = Path(__file__).resolve().parents[1] / "docs" / "REPORT_SPEC.md"


def _json_block(text: str, after: str) -> dict:
    block = re.search(re.escape(after) + r".*?```json\n(.*?)```", text, re.S)
    assert block, f"no JSON block after {after!r} in {DOC}"
    return json.loads(block.group(1))


def _run(path: Path, seed: int) -> None:
    """A run directory with Development predictions of the same clips (right on about half of them)."""
    refs = list(np.random.default_rng(0).choice(list(CLASSES), size=40))
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(len(CLASSES)), size=len(refs))
    probs[np.arange(20), [CLASSES.index(r) for r in refs[:20]]] += 2
    probs /= probs.sum(1, keepdims=True)
    write_json(path / "config.json", {"loss": "wce", "labels": "hard"})
    write_predictions(prediction_path(path, "Development"), [f"c{i}.wav" for i in range(len(refs))], probs,
                      [CLASSES[i] for i in probs.argmax(1)], refs)


def test_the_documented_minimal_example_is_accepted_by_conilium_eval_report(tmp_path):
    spec = _json_block(DOC.read_text(encoding="utf-8"), "<!-- minimal-example -->")
    runs = [v for rows in spec["tables"].values() for v in rows.values()]
    assert runs
    for i, run in enumerate(runs):
        _run(tmp_path / run, i)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    res = CliRunner().invoke(main, ["report", str(tmp_path / "spec.json"), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "rep" / "REPORT.md").read_text(encoding="utf-8")
    assert md.startswith(f"# {spec['title']}\n")
    for rows in spec["tables"].values():
        for label, run in rows.items():
            assert f"| {label} |" in md and f"`../{run}`" in md


def test_the_doc_names_every_table_and_every_paper_row():
    text = DOC.read_text(encoding="utf-8")
    for key in [*paper.TABLES, ATTRIBUTES_TABLE]:
        assert f"| `{key}` |" in text, key
    for key, table in paper.TABLES.items():
        line = next(ln for ln in text.splitlines() if ln.startswith(f"| `{key}` |"))
        for row in table.rows:
            assert f"`{row.label}`" in line or "as `table2`" in line, (key, row.label)
    fuller = _json_block(text, "## A fuller example")
    assert set(fuller["tables"]) <= {*paper.TABLES, ATTRIBUTES_TABLE}
    for key in ("title", "notes", "corpus_figures", "tables", "easy_difficult"):
        assert f"| `{key}` |" in text, key


def test_the_documented_bootstrap_keys_set_the_reports_draws_and_seed(tmp_path):
    text = DOC.read_text(encoding="utf-8")
    spec = _json_block(text, "<!-- bootstrap-example -->")
    for key in ("bootstrap_draws", "bootstrap_seed"):
        assert f"| `{key}` |" in text and key in spec, key
    for i, run in enumerate(v for rows in spec["tables"].values() for v in rows.values()):
        _run(tmp_path / run, i)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    res = CliRunner().invoke(main, ["report", str(tmp_path / "spec.json"), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    js = json.loads((tmp_path / "rep" / "report.json").read_text(encoding="utf-8"))
    assert (js["bootstrap"]["draws"], js["bootstrap"]["seed"]) == (spec["bootstrap_draws"], spec["bootstrap_seed"])
    paired = [f["interval"] for f in js["findings"] if f.get("interval")]
    assert paired and all((d["draws"], d["seed"]) == (spec["bootstrap_draws"], spec["bootstrap_seed"])
                          for d in paired)
    md = (tmp_path / "rep" / "REPORT.md").read_text(encoding="utf-8")
    assert f"{spec['bootstrap_draws']:,} times (seed {spec['bootstrap_seed']})" in md

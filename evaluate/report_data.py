"""What a report says, before it is rendered: how each run was trained (read from its
``config.json`` with the defaults training applies), each row's scores, the seed's findings
checked against ours, and the other numbers shown beside the paper's. The spec format and
what the report never lets the paper say for us: :mod:`conilium.evaluate.report`.
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

from conilium import CLASSES
from conilium.dirs import CacheDir, Manifest, ModelDir, RunDir, read_json_or_none
from conilium.errors import ConfigError
from conilium.metrics import score
from conilium.runs import Predictions, RunError, has_references, prediction_path, read_predictions
from conilium.util import read_json_object

from . import bootstrap, paper
from .options import DEFAULT_DRAWS, LEVEL, MIN_DRAWS
from .plots import figure_title, write_split_metrics

TEST_ROWS = ("test", "baseline (test)", "baseline_test", "baseline test")
DEV_SPLIT = "Development"
#: The report spec's table of attribute runs (not one of the paper's).
ATTRIBUTES_TABLE = "attributes"
#: Differences below this are ties: the report shows three decimals.
TIE = 0.0005
#: The report spec's bootstrap keys: draws of every interval (at least MIN_DRAWS) and their seed.
DRAWS_KEY, SEED_KEY = "bootstrap_draws", "bootstrap_seed"
#: A finding's verdict when the paired bootstrap interval of its difference contains 0.
NOT_RESOLVED = "not resolved"
#: Settings of a row (see :func:`run_setting`).
FROZEN, FINETUNED_FEATURES, END_TO_END = "frozen cache", "fine-tuned features", "end to end"


# --------------------------------------------------------------------------- a run's config

def _defaults(config_class) -> dict:
    return {f.name: f.default for f in dataclasses.fields(config_class) if f.default is not dataclasses.MISSING}


def as_trained(cfg: Mapping) -> dict:
    """A run's config as training read it: the fields a head run (train-head) or an end-to-end
    run (finetune-best) recorded, and for those it did not record (written before they
    existed) the defaults training gives them; a tuned run's ``source_config`` and an
    ensemble's ``member_configs`` likewise. Other configs are returned as they are."""
    from conilium.finetune.config import FinetuneConfig
    from conilium.heads.config import TrainConfig

    cfg = dict(cfg)
    kind = cfg.get("kind")
    if kind is None and "cache" in cfg:
        return {**_defaults(TrainConfig), **cfg}
    if kind == "finetune":
        return {**_defaults(FinetuneConfig), **cfg}
    if kind == "thresholds" and isinstance(cfg.get("source_config"), Mapping):
        cfg["source_config"] = as_trained(cfg["source_config"])
    if kind == "ensemble" and isinstance(cfg.get("member_configs"), list):
        cfg["member_configs"] = [as_trained(m) if isinstance(m, Mapping) else m for m in cfg["member_configs"]]
    return cfg


def run_config(run_dir) -> Optional[dict]:
    """The run's config as training read it (:func:`as_trained`); None when it has no readable one."""
    cfg = RunDir(run_dir).config_or_none()
    return None if cfg is None else as_trained(cfg)


def _metrics(run_dir) -> dict:
    return RunDir(run_dir).metrics_or_none() or {}


# --------------------------------------------------------------------------- one run, one split

def split_metrics(run_dir, split: str = DEV_SPLIT, out_dir=None, *, title: Optional[str] = None) -> Dict:
    """Score ``split`` of a run; with ``out_dir``, also write ``metrics.json``,
    ``per_class.csv``, ``confusion_percent.csv``, ``confusion_counts.csv`` and ``confusion.png``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: run directory not found")
    run = RunDir(run_dir)
    run.config()
    available = run.splits()
    if split not in available:
        raise RunError(f"{run_dir}: no predictions for split {split}; available: "
                       f"{', '.join(available) or 'none'}")
    preds = read_predictions(prediction_path(run_dir, split))
    if not has_references(preds):
        raise RunError(f"{prediction_path(run_dir, split)}: split {split} has no labelled clip to score "
                       f"(an unlabelled split can only be exported with `conilium-eval submission`)")
    result = score(preds.reference, preds.prediction, preds.classes)
    result["run"] = str(run_dir)
    result["split"] = split
    if out_dir is not None:
        out_dir = Path(out_dir)
        files = write_split_metrics(out_dir, result, title=title or figure_title(run_dir.name, split=split))
        RunDir(out_dir).write_metrics(result)
        result["files"] = {k: str(v) for k, v in files.items()}
    return result


# --------------------------------------------------------------------------- how a run was trained


# --------------------------------------------------------------------------- how a run was trained

def _lr(x) -> str:
    try:
        m, e = f"{float(x):e}".split("e")
    except (TypeError, ValueError):
        return str(x)
    return f"{float(m):g}e{int(e)}"


def _finetuned_model_of(identity: dict) -> Optional[Path]:
    """The finetune-best model directory a cache's upstream came from, or None."""
    if identity.get("source") != "local":
        return None
    for cand in (identity.get("name"), identity.get("path") and str(Path(identity["path"]).parent)):
        if cand and ModelDir(cand).is_model():
            return Path(cand)
    return None


def _setting_of(cfg: Optional[dict]) -> Dict:
    """See :func:`run_setting` (``cfg`` as training read it: :func:`as_trained`)."""
    if not isinstance(cfg, dict):
        return {"kind": "unknown", "text": "unknown (no config)", "random_init": None, "tuned": False}
    kind = cfg.get("kind")
    if kind == "thresholds":
        base = _setting_of(cfg.get("source_config") or {})
        return dict(base, text=f"{base['text']} + thresholds tuned on {cfg.get('tune_split', DEV_SPLIT)}",
                    tuned=True)
    if kind == "ensemble":
        return _ensemble_setting(cfg)
    if kind == "finetune":
        return _end_to_end_setting(cfg)
    if cfg.get("cache"):  # a head trained on a feature cache
        return _head_setting(cfg)
    return {"kind": "unknown", "text": "unknown", "random_init": None, "tuned": False}


def _ensemble_setting(cfg: dict) -> Dict:
    members = [_setting_of(m) for m in cfg.get("member_configs") or []]
    kinds = sorted({m["kind"] for m in members}) or ["unknown"]
    w = cfg.get("weights") or []
    weighted = len({round(float(x), 9) for x in w}) > 1
    random = sorted({m["random_init"] for m in members if m["random_init"]})
    what = kinds[0] if len(kinds) == 1 else "mixed"
    text = (f"{'weighted ' if weighted else ''}{cfg.get('method', 'mean')} of {len(members)} {what} runs"
            + (f" (weights {', '.join(f'{float(x):.3g}' for x in w)})" if weighted else ""))
    return {"kind": what, "text": text, "random_init": ", ".join(random) or None, "tuned": False,
            "weighted": weighted}


def _end_to_end_setting(cfg: dict) -> Dict:
    up = cfg.get("upstream_identity") or {}
    random = up.get("name") or cfg.get("upstream") if (up.get("source") == "random-init"
                                                         or cfg.get("random_init")) else None
    bits = [str(cfg.get("upstream")), f"lr {_lr(cfg.get('lr'))}", f"{cfg.get('epochs')} epochs"]
    if cfg.get("lora_rank"):
        bits.insert(1, f"LoRA rank {cfg['lora_rank']} adapters, upstream frozen")
    if cfg.get("max_train_clips"):
        bits.append(f"{cfg['max_train_clips']} training clips")
    return {"kind": END_TO_END, "text": f"{END_TO_END} ({', '.join(bits)})", "random_init": random,
            "tuned": False}


def _head_setting(cfg: dict) -> Dict:
    up = (CacheDir(cfg["cache"]).manifest_or_none() or Manifest()).upstream
    model = _finetuned_model_of(up)
    random = None
    if model is not None:
        what = FINETUNED_FEATURES
        mup = ModelDir(model).upstream
        if mup.get("source") == "random-init":
            random = f"{mup.get('name')}, then fine-tuned"
        origin = f"upstream fine-tuned by finetune-best, model {model.name}"
    else:
        what = FROZEN
        if up.get("source") == "random-init":
            random = str(up.get("name"))
        origin = str(up.get("name") or Path(cfg["cache"]).name)
    more = [str((CacheDir(c).manifest_or_none() or Manifest()).upstream.get("name") or Path(c).name)
            for c in cfg.get("more_caches") or []]
    if more:  # a fusion head over several caches
        origin = f"{origin} + {' + '.join(more)}, {cfg.get('fusion') or 'concat'} fusion"
    bits = [origin, f"head lr {_lr(cfg.get('lr'))}", f"{cfg.get('epochs')} epochs"]
    if cfg.get("sampler"):
        bits.append(f"{cfg['sampler']} sampler")
    if cfg.get("labels") in ("P*", "S*"):
        bits.append(f"{cfg['labels']} over {cfg['agreement_over']}")
    return {"kind": what, "text": f"{what} ({', '.join(bits)})", "random_init": random, "tuned": False}


def run_setting(run_dir) -> Dict:
    """How a run was trained, from its ``config.json`` (and its cache's manifest).

    ``kind``: ``"frozen cache"`` (a head on features of a frozen upstream),
    ``"fine-tuned features"`` (a head on features of an upstream written by
    finetune-best), ``"end to end"`` (finetune-best itself) or ``"mixed"`` (an ensemble of
    runs of different kinds); ``text``: that, with upstream, learning rate and epochs;
    ``random_init``: the upstream's name when it started from random weights, else None;
    ``tuned``: decision thresholds were adjusted.
    """
    return _setting_of(run_config(run_dir))


def threshold_scores(run_dir, split: str) -> Optional[Dict]:
    """For a threshold-tuned run: macro-F1 of ``split`` untuned and tuned, and (on the
    split the thresholds were tuned on) the K-fold estimate; None for other runs."""
    cfg = run_config(run_dir)
    if cfg is None or cfg.get("kind") != "thresholds":
        return None
    m = _metrics(run_dir)
    tune_split = m.get("tune_split") or cfg.get("tune_split") or DEV_SPLIT
    untuned = (m.get("untuned") or {}).get(split) or {}
    tuned = (m.get("splits") or {}).get(split) or {}
    cv = m.get("cross_validation") if split == tune_split else None
    return {"tune_split": tune_split, "in_sample": split == tune_split,
            "untuned": untuned.get("f1_macro"), "untuned_micro": untuned.get("f1_micro"),
            "tuned": tuned.get("f1_macro"),
            "kfold": cv.get("f1_macro_pooled") if cv else None, "kfold_k": cv.get("k") if cv else None,
            "kfold_folds_sd": cv.get("f1_macro_folds_sd") if cv else None}


# --------------------------------------------------------------------------- report spec


# --------------------------------------------------------------------------- report spec

def _resolve(path, base: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else base / p


def load_spec(spec) -> Tuple[Dict, Path]:
    """A report spec (dict or JSON file) and the folder its relative paths start from."""
    if isinstance(spec, dict):
        return spec, Path.cwd()
    path = Path(spec)
    return read_json_object(path, "report spec (a JSON object with 'tables')"), path.parent


class Bootstrap:
    """How the report's intervals are drawn (the spec's ``bootstrap_draws`` and
    ``bootstrap_seed``), with each run's predictions read once for them.

    A row's interval is :func:`conilium.evaluate.bootstrap.intervals` of its predictions, a
    finding's :func:`conilium.evaluate.bootstrap.paired` of its two rows' predictions: the
    numbers ``conilium-eval metrics --draws`` and ``conilium-eval compare`` give with the same
    draws and seed.
    """

    def __init__(self, draws: int = DEFAULT_DRAWS, seed: int = 0, level: float = LEVEL):
        self.draws, self.seed, self.level = draws, seed, level
        self._preds: Dict[Tuple[str, str], Predictions] = {}

    @classmethod
    def from_spec(cls, spec: Mapping) -> "Bootstrap":
        """The spec's bootstrap keys, checked (draws: an integer, at least MIN_DRAWS; seed: an
        integer from 0)."""
        draws, seed = spec.get(DRAWS_KEY, DEFAULT_DRAWS), spec.get(SEED_KEY, 0)
        if isinstance(draws, bool) or not isinstance(draws, int) or draws < MIN_DRAWS:
            raise ConfigError(f"report spec: {DRAWS_KEY} must be an integer of at least {MIN_DRAWS}, got {draws!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 32:
            raise ConfigError(f"report spec: {SEED_KEY} must be an integer from 0 to {2 ** 32 - 1}, got {seed!r}")
        return cls(draws, seed)

    def describe(self) -> Dict:
        """What report.json says of the intervals."""
        return {"draws": self.draws, "seed": self.seed, "level": self.level, "interval": bootstrap.INTERVAL_METHOD,
                "p_value": bootstrap.P_VALUE_METHOD}

    def predictions(self, run_dir, split: str) -> Predictions:
        key = (str(run_dir), split)
        if key not in self._preds:
            self._preds[key] = read_predictions(prediction_path(run_dir, split))
        return self._preds[key]

    def intervals(self, run_dir, split: str, *, classes: bool = True, attributes: bool = True) -> Dict[str, Dict]:
        """Each score of a run's split with its interval (:func:`bootstrap.intervals`): its F1
        scores with ``classes``, its CCCs with ``attributes``."""
        p = self.predictions(run_dir, split)
        if not attributes:
            p = Predictions(p.names, p.probs, p.prediction, p.reference, p.classes)
        if not classes:
            p = Predictions(p.names, np.zeros((len(p), 0)), [""] * len(p), [None] * len(p), (), p.attributes,
                            p.attribute_refs)
        return bootstrap.intervals(p, draws=self.draws, seed=self.seed, level=self.level)

    def kfold_predictions(self, row: Dict) -> Predictions:
        """A threshold-tuned row's K-fold predictions: each clip of its tuning split decided by
        the offsets fitted without its fold (``cross_validation.folds`` of its metrics.json,
        applied to its probabilities), checked against the K-fold estimate it recorded; a
        RunError when they cannot be rebuilt."""
        from .thresholds import apply_offsets

        p = self.predictions(row["run"], row["split"])
        cv = (_metrics(row["run"]).get("cross_validation") or {})
        folds = cv.get("folds") or []
        if not folds or tuple(cv.get("classes") or p.classes) != tuple(p.classes):
            raise RunError("no K-fold folds recorded in its metrics.json")
        pred = list(p.prediction)
        for fold in folds:
            held = [int(i) for i in fold["held_out"]]
            if held and not 0 <= min(held) <= max(held) < len(p):
                raise RunError("its K-fold folds do not index its predictions")
            for i, letter in zip(held, apply_offsets(p.probs[held], fold["offsets"], p.classes)):
                pred[i] = letter
        kfold = Predictions(p.names, p.probs, pred, p.reference, p.classes)
        # the probabilities are read back at the CSV's precision: the decisions must give the
        # estimate the run recorded, else a near tie was decided otherwise
        if abs(score(p.reference, pred)["f1_macro"] - float(cv.get("f1_macro_pooled", np.nan))) > 1e-9:
            raise RunError("its K-fold predictions could not be rebuilt to the recorded estimate")
        return kfold

    def paired(self, row_a: Dict, row_b: Dict, *, kfold_a: bool = False) -> Dict[str, Dict]:
        """The paired bootstrap of row A − row B on their class scores (both rows scored on the same
        split of the same clips; ``kfold_a``: row A's K-fold predictions, :meth:`kfold_predictions`);
        a RunError when they cannot be paired."""
        if row_a["split"] != row_b["split"]:
            raise RunError(f"scored on different splits ({row_a['split']}, {row_b['split']})")

        def classes_only(p: Predictions) -> Predictions:
            return Predictions(p.names, p.probs, p.prediction, p.reference, p.classes)

        a = classes_only(self.kfold_predictions(row_a) if kfold_a else self.predictions(row_a["run"], row_a["split"]))
        b = classes_only(self.predictions(row_b["run"], row_b["split"]))
        b, a = bootstrap._aligned_pair(row_b["run"], row_a["run"], b, a, row_a["split"])
        return bootstrap.paired(b, a, draws=self.draws, seed=self.seed, level=self.level)


def _row_entry(table: str, label: str, value, base: Path) -> Tuple[Path, Optional[str]]:
    if isinstance(value, str):
        return _resolve(value, base), None
    if isinstance(value, dict) and "run" in value:
        return _resolve(value["run"], base), value.get("split")
    raise ConfigError(f"report spec, table {table}, row {label!r}: expected a run directory or "
                      f"{{\"run\": DIR, \"split\": SPLIT}}, got {value!r}")


def _seed_entries(table: str, label: str, value, base: Path) -> List[Path]:
    """A row's ``seeds``: the runs of its configuration, one per seed (none when not given)."""
    seeds = value.get("seeds") if isinstance(value, dict) else None
    if seeds is None:
        return []
    if not isinstance(seeds, list) or not seeds or not all(isinstance(x, str) for x in seeds):
        raise ConfigError(f"report spec, table {table}, row {label!r}: 'seeds' must be a non-empty list of run "
                          f"directories (one per seed), got {seeds!r}")
    return [_resolve(x, base) for x in seeds]


def _over_seeds(table: str, label: str, runs: List[Path], split: str) -> Dict:
    """Each seed's run scored on ``split`` (as the row is): their macro- and micro-F1, with the
    mean and sample standard deviation (ddof 1, as train-grid's seeds.csv) over the seeds."""
    values: Dict[str, List[float]] = {"f1_macro": [], "f1_micro": []}
    for run in runs:
        try:
            s = split_metrics(run, split)
        except RunError as e:
            raise RunError(f"report spec, table {table}, row {label!r}, seeds: {e}") from None
        for k in values:
            values[k].append(float(s[k]))
    out: Dict = {"runs": [str(r) for r in runs],
                 "seeds": [(run_config(r) or {}).get("seed") for r in runs]}
    for k, v in values.items():
        out[k] = {"values": v, "mean": statistics.fmean(v), "sd": statistics.stdev(v) if len(v) > 1 else None}
    return out


def _test_split(run_dir: Path) -> Optional[str]:
    """The first labelled split of a run other than Train and Development."""
    for s in RunDir(run_dir).splits():
        if s in ("Train", DEV_SPLIT):
            continue
        if has_references(read_predictions(prediction_path(run_dir, s))):
            return s
    return None


def _fmt(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:.3f}"



# --------------------------------------------------------------------------- findings

def _row(scored: Dict[str, List[Dict]], ref: str) -> Optional[Dict]:
    table, label = paper.row_ref(ref)
    prow = paper.match_row(table, label)
    name = prow.label if prow else label
    for r in scored.get(table, []):
        if r["label"] == name and r.get("score"):
            return r
    return None


def our_value(scored: Dict[str, List[Dict]], ref: str, metric: str = "macro") -> Optional[float]:
    """Our number for a row reference: ``macro``/``micro`` as scored (a tuned row: tuned on
    the split it is scored on), ``macro_kfold`` a tuned row's K-fold estimate (an untuned
    row's macro-F1)."""
    r = _row(scored, ref)
    if r is None:
        return None
    if metric == "micro":
        return r["score"]["f1_micro"]
    if metric == "macro_kfold" and r.get("tuning"):
        return r["tuning"].get("kfold")
    return r["score"]["f1_macro"]


def all_findings() -> List[paper.Finding]:
    """The seed's findings, plus Table 2's again for the table on fine-tuned features."""
    out = list(paper.FINDINGS)
    for f in paper.FINDINGS:
        if f.table == "table2" and all(r.startswith("table2:") for r in f.rows):
            out.append(dataclasses.replace(f, table="table2_finetuned", text=f"{f.text} — on fine-tuned features",
                                           rows=tuple("table2_finetuned:" + r.split(":", 1)[1] for r in f.rows)))
    return out


def _signed(x: float) -> str:
    return f"{x:+.3f}".replace("-", "−")


def _difference(boot: Optional["Bootstrap"], f: paper.Finding, ra: Optional[Dict], rb: Optional[Dict]):
    """The paired bootstrap of row A − row B for a finding (``{"difference", "low", "high", "p_value",
    "n", ...}``), or ``(None, why)`` when the finding cannot be tested on paired clips."""
    if boot is None:
        return None, "no interval computed"
    if not (ra and rb and ra.get("run") and rb.get("run")):
        return None, "no predictions"
    key = "f1_micro" if f.metric == "micro" else "f1_macro"
    kfold = f.metric == "macro_kfold" and bool((ra.get("tuning") or {}).get("kfold") is not None)
    if f.metric == "macro_kfold" and (rb.get("tuning") or {}).get("kfold") is not None:
        return None, "not paired: both rows are K-fold estimates"
    try:
        got = boot.paired(ra, rb, kfold_a=kfold).get(key)
    except RunError as e:
        return None, f"not paired: {e}"
    if got is None:
        return None, "no paired score"
    # paired() scores B − A of its arguments (row B, row A): ``a`` and ``b`` named after the finding's rows
    return dict(got, a=got["b"], b=got["a"], metric=key, kfold=kfold, draws=boot.draws, seed=boot.seed,
                level=boot.level), ""


def _resolved(d: Dict) -> bool:
    """The paired interval of a difference leaves 0 out."""
    return d["low"] > 0 or d["high"] < 0


def check_finding(f: paper.Finding, scored: Dict[str, List[Dict]], boot: Optional["Bootstrap"] = None) -> Dict:
    """The seed's finding ``f`` against our numbers: a JSON-ready dict with ``verdict``
    ``"agrees"``, ``"disagrees"``, ``"tie"``, ``"not resolved"`` or ``"not run"``, and both
    sides' numbers.

    With ``boot``, a finding that compares two of our rows scored on the same clips is
    judged on the paired bootstrap of their difference (``interval``): *not resolved* when
    its interval contains 0, else *agrees* or *disagrees* by its sign; "X is the best" is
    *agrees* when X is above each other row with an interval above 0, *disagrees* when a row
    is above X with an interval leaving 0 out, else *not resolved* (``intervals``: X − each
    row). The K-fold finding pairs the tuned row's K-fold predictions
    (:meth:`Bootstrap.kfold_predictions`) with the untuned row. A finding that cannot be paired
    (rows on different splits) keeps the judgement on the numbers alone, with ``unpaired``
    saying why.
    """
    metric_name = {"macro": "macro-F1", "micro": "micro-F1", "macro_kfold": "macro-F1"}[f.metric]
    out = {"table": f.table, "where": f.where, "text": f.text, "metric": f.metric, "rows": list(f.rows)}

    def label(ref):
        return paper.row_ref(ref)[1]

    if f.kind == "best":
        pv = {label(r): paper.paper_value(r, f.metric) for r in f.rows}
        ov = {label(r): our_value(scored, r, f.metric) for r in f.rows}
        mine = {k: v for k, v in ov.items() if v is not None}
        paper_best = label(f.rows[0])
        out["paper"] = f"{paper_best} best ({_fmt(pv[paper_best])} {metric_name})"
        if label(f.rows[0]) not in mine or len(mine) < 2:
            out.update(verdict="not run", ours="—")
            return out
        top = max(mine.values())
        winners = [k for k, v in mine.items() if top - v < TIE]
        out["ours"] = (f"{' = '.join(winners)} best ({top:.3f}; {paper_best}: {mine[paper_best]:.3f})"
                       + (f", {len(mine)} of {len(ov)} rows run" if len(mine) < len(ov) else ""))
        out["verdict"] = ("agrees" if winners == [paper_best] else "tie" if paper_best in winners else "disagrees")
        others = [r for r in f.rows[1:] if ov[label(r)] is not None]
        diffs, why = [], ""
        for r in others:
            d, why = _difference(boot, f, _row(scored, f.rows[0]), _row(scored, r))
            if d is None:
                break
            diffs.append(dict(d, row=label(r)))
        if len(diffs) < len(others):
            if boot is not None:
                out["unpaired"] = why
            return out
        out["intervals"] = diffs
        out["ours"] += "; " + ", ".join(f"{paper_best} − {d['row']} {_signed(d['difference'])} "
                                        f"[{_signed(d['low'])}, {_signed(d['high'])}]" for d in diffs)
        out["verdict"] = ("agrees" if all(d["low"] > 0 for d in diffs)
                          else "disagrees" if any(d["high"] < 0 for d in diffs) else NOT_RESOLVED)
        return out

    a, b = f.rows
    pa, pb = paper.paper_value(a, f.metric), paper.paper_value(b, f.metric)
    if f.paper_delta is not None and (pa is None or pb is None):
        out["paper"] = f"{label(a)} − {label(b)} = +{f.paper_delta:.2f} {metric_name} (stated)"
    elif pa is not None and pb is not None:
        out["paper"] = f"{label(a)} {pa:.3f} vs {label(b)} {pb:.3f} ({pa - pb:+.3f})"
    else:
        out["paper"] = f"{label(a)} above {label(b)} (no numbers given for both)"
    oa, ob = our_value(scored, a, f.metric), our_value(scored, b, f.metric)
    if oa is None or ob is None:
        out.update(verdict="not run", ours="—")
        return out
    kfold = " (K-fold)" if f.metric == "macro_kfold" and _row(scored, a) and _row(scored, a).get("tuning") else ""
    out["ours"] = f"{label(a)}{kfold} {oa:.3f} vs {label(b)} {ob:.3f} ({oa - ob:+.3f})"
    out["verdict"] = "tie" if abs(oa - ob) < TIE else "agrees" if oa > ob else "disagrees"
    d, why = _difference(boot, f, _row(scored, a), _row(scored, b))
    if d is None:
        if boot is not None:
            out["unpaired"] = why
        return out
    out["interval"] = d
    out["ours"] = (f"{label(a)}{kfold} {oa:.3f} vs {label(b)} {ob:.3f} "
                   f"({_signed(d['difference'])} [{_signed(d['low'])}, {_signed(d['high'])}])")
    out["verdict"] = NOT_RESOLVED if not _resolved(d) else "agrees" if d["low"] > 0 else "disagrees"
    return out


# --------------------------------------------------------------------------- other numbers beside the seed's


def training_set_sizes(scored: Dict[str, List[Dict]]) -> List[Dict]:
    """Training clips of P, S, P*, S* (the seed's section 3.5) from our head runs, with
    the P*/S* reading that ran and the count the other reading would give."""
    found: Dict[str, Dict] = {}
    for key in ("table2", "table3", "sampler", "table1", "table2_finetuned"):
        for r in scored.get(key, []):
            if not r.get("run"):
                continue
            cfg = run_config(r["run"])
            if not cfg or cfg.get("kind") or cfg.get("labels") not in paper.TRAINING_SET_SIZES or not cfg.get("cache"):
                continue
            if cfg.get("train_on_xo") or cfg.get("task", "categories") != "categories":
                continue  # not the paper's training set
            lab = cfg["labels"]
            if lab in found:
                continue
            m = _metrics(r["run"])
            found[lab] = {"labels": lab, "run": r["run"], "clips": (m.get("training") or {}).get("clips"),
                          "reading": cfg.get("agreement_over") if lab.endswith("*") else None,
                          "cfg": cfg}
    out = []
    for lab, n_paper in paper.TRAINING_SET_SIZES.items():
        row = {"labels": lab, "paper": n_paper, "ours": None, "run": None, "reading": None,
               "other_reading": None, "other_count": None}
        got = found.get(lab)
        if got:
            row.update(ours=got["clips"], run=got["run"], reading=got["reading"])
            if lab.endswith("*"):
                ran = got["reading"]
                other = "targets" if ran == "all" else "all"
                row["other_reading"] = other
                row["other_count"] = _count_under(got["cfg"], lab, other)
        out.append(row)
    return out


def _count_under(cfg: dict, kind: str, reading: str) -> Optional[int]:
    """Training clips of ``kind`` in the run's cache under another P*/S* reading."""
    try:
        from conilium.cache.reader import FeatureCache
        from conilium.targets import training_set

        cache = FeatureCache(cfg["cache"])
        clips = [cache.clips[n] for n in cache.split(cfg.get("train_split", "Train"))]
        th = {"P*": cfg.get("p_threshold", 0.6), "S*": cfg.get("s_threshold", 0.5)}
        return len(training_set(clips, kind, thresholds=th, reading=reading)[0])
    except Exception:  # a missing or moved cache: the other count is simply not shown
        return None


def corpus_rows(corpus_dir: Optional[Path]) -> Optional[List[Dict]]:
    """Clips and durations per split from describe-corpus's summary.json, beside section 2."""
    if corpus_dir is None:
        return None
    summary = read_json_or_none(corpus_dir / "summary.json")
    if not summary:
        return None
    rows = []
    for split, n in (summary.get("clips_per_split") or {}).items():
        d = (summary.get("durations") or {}).get(split) or {}
        labelled = sum(v for k, v in (summary.get("consensus") or {}).get(split, {}).items() if k != "unlabelled")
        pkey = split if split in paper.CORPUS else ("Test" if not labelled else None)
        p = paper.CORPUS.get(pkey) if pkey else None
        rows.append({"split": split, "clips": n, "mean": d.get("mean"), "sd": d.get("sd"),
                     "longer_than_8s": d.get("longer_than_8s"), "paper_split": pkey,
                     "paper_clips": p and p["clips"], "paper_mean": p and p["mean"], "paper_sd": p and p["sd"]})
        if split == DEV_SPLIT:
            scoreable = sum((summary.get("consensus") or {}).get(split, {}).get(c, 0) for c in CLASSES)
            rows.append({"split": f"{split}, scoreable (consensus among the eight classes)", "clips": scoreable,
                         "mean": None, "sd": None, "longer_than_8s": None, "paper_split": "section 4",
                         "paper_clips": paper.DEV_SCOREABLE, "paper_mean": None, "paper_sd": None})
    return rows


def attribute_table(rows_spec: Dict, base: Path, boot: Optional[Bootstrap] = None) -> List[Dict]:
    """The attribute runs of a report spec: each row's Development (or given split) CCC per
    attribute and its parts, from the run's metrics.json, with each score's bootstrap interval
    from its predictions (``intervals``); an error naming the row when the run predicts no
    attributes."""
    boot = boot or Bootstrap()
    if not isinstance(rows_spec, dict):
        raise ConfigError(f"report spec, table {ATTRIBUTES_TABLE}: expected {{row label: run directory}}")
    rows = []
    for label, value in rows_spec.items():
        run_dir, split = _row_entry(ATTRIBUTES_TABLE, label, value, base)
        where = f"report spec, table {ATTRIBUTES_TABLE}, row {label!r}"
        if not run_dir.is_dir():
            raise RunError(f"{where}: run directory {run_dir} not found")
        m = RunDir(run_dir).metrics_or_none()
        if m is None:
            raise RunError(f"{where}: {run_dir} has no metrics.json (not a complete run)")
        if "attributes" not in m:
            raise RunError(f"{where}: {run_dir} predicts no attributes (train it with train-head --task "
                           f"attributes or joint)")
        split = split or DEV_SPLIT
        a = (m.get("attributes") or {}).get(split)
        if a is None:
            raise RunError(f"{where}: {run_dir} has no attribute scores on split {split} "
                           f"(scored: {', '.join(m['attributes']) or 'none'})")
        cfg = run_config(run_dir) or {}
        row = {"label": label, "run": str(run_dir), "split": split, "task": cfg.get("task"),
               "setting": run_setting(run_dir), "scores": a,
               "intervals": boot.intervals(run_dir, split, classes=False),
               "f1_macro": (m.get("splits") or {}).get(split, {}).get("f1_macro"),
               "train_clips": (m.get("training") or {}).get("attribute_clips")}
        seed_runs = _seed_entries(ATTRIBUTES_TABLE, label, value, base)
        if seed_runs:
            values = []
            for r in seed_runs:
                got = ((RunDir(r).metrics_or_none() or {}).get("attributes") or {}).get(split) or {}
                if got.get("ccc_mean") is None:
                    raise RunError(f"{where}, seeds: {r} has no attribute scores on split {split}")
                values.append(float(got["ccc_mean"]))
            row["seeds"] = {"runs": [str(r) for r in seed_runs],
                            "ccc_mean": {"values": values, "mean": statistics.fmean(values),
                                         "sd": statistics.stdev(values) if len(values) > 1 else None}}
        rows.append(row)
    return rows


def xo_rows(scored: Dict[str, List[Dict]]) -> List[Dict]:
    """Rows of the paper's tables trained with ``--train-on-xo``, with their X/O counts."""
    out = []
    for key, rows in scored.items():
        for r in rows:
            if not r.get("run"):
                continue
            m = _metrics(r["run"])
            xo = (m.get("training") or {}).get("xo")
            if xo:
                out.append({"table": key, "label": r["label"], "run": r["run"], **xo,
                            "clips": (m.get("training") or {}).get("clips")})
    return out


def _disagreement(scored: Dict[str, List[Dict]]) -> Optional[Dict]:
    """Prediction disagreement of the (first, unweighted) ensemble's members."""
    from .ensemble import prediction_disagreement

    for r in scored.get("ensemble", []):
        if not r.get("run") or not r.get("score"):
            continue
        cfg = run_config(r["run"]) or {}
        members = cfg.get("members") or []
        if len(members) >= 2 and all(Path(m).is_dir() for m in members):
            try:
                return prediction_disagreement(members, r["split"])
            except (RunError, ValueError):
                return None
    return None


# --------------------------------------------------------------------------- the spec's tables, scored

def check_tables(spec: Mapping) -> Dict:
    """The spec's ``tables``, checked: known table names mapping to ``{row label: run}``."""
    tables_spec = spec.get("tables", {})
    if not isinstance(tables_spec, dict):
        raise ConfigError("report spec: 'tables' must map table names to {row label: run directory}")
    unknown = sorted(set(tables_spec) - set(paper.TABLES) - {ATTRIBUTES_TABLE})
    if unknown:
        raise ConfigError(f"report spec: unknown table(s) {', '.join(unknown)}; known: "
                          f"{', '.join([*paper.TABLES, ATTRIBUTES_TABLE])}")
    return tables_spec


def _score_row(key: str, label: str, value, base: Path, boot: Bootstrap) -> Dict:
    run_dir, split = _row_entry(key, label, value, base)
    seed_runs = _seed_entries(key, label, value, base)
    prow = paper.match_row(key, label)
    is_test = key == "table4" and ((prow is not None and prow.label == "Test")
                                   or label.strip().lower() in TEST_ROWS)
    if not run_dir.is_dir():
        raise RunError(f"report spec, table {key}, row {label!r}: run directory {run_dir} not found")
    if split is None:
        split = _test_split(run_dir) if is_test else DEV_SPLIT
    setting = run_setting(run_dir)
    entry = {"label": prow.label if prow else label, "run": str(run_dir), "split": split,
             "paper_macro": prow.macro if prow else None, "paper_micro": prow.micro if prow else None,
             "paper_note": prow.note if prow else "", "in_paper": prow is not None, "setting": setting}
    if split is None:
        entry.update(score=None, note="no labelled test split in this run")
    else:
        try:
            s = split_metrics(run_dir, split)
        except RunError as e:
            raise RunError(f"report spec, table {key}, row {label!r}: {e}") from None
        entry["score"] = {k: s[k] for k in ("n", "f1_macro", "f1_micro", "per_class", "confusion",
                                            "confusion_percent", "confusion_labels")}
        entry["score"]["intervals"] = boot.intervals(run_dir, split, attributes=False)
        entry["tuning"] = threshold_scores(run_dir, split)
        if entry["tuning"] and entry["tuning"].get("kfold") is not None:
            try:  # the K-fold estimate's interval, from the rebuilt K-fold decisions
                kf = boot.kfold_predictions(entry)
                entry["tuning"]["kfold_interval"] = bootstrap.intervals(
                    kf, draws=boot.draws, seed=boot.seed, level=boot.level).get("f1_macro")
            except RunError:
                entry["tuning"]["kfold_interval"] = None
        if seed_runs:
            entry["seeds"] = _over_seeds(key, label, seed_runs, split)
    return entry


def _in_paper_order(table: paper.PaperTable, rows: List[Dict]) -> List[Dict]:
    """The paper's rows in its order (those the spec does not give with no run), then ours."""
    ordered: List[Dict] = []
    for prow in table.rows:
        mine = [r for r in rows if r["in_paper"] and r["label"] == prow.label]
        if mine:
            ordered.extend(mine)
        else:
            ordered.append({"label": prow.label, "run": None, "split": None, "score": None,
                            "paper_macro": prow.macro, "paper_micro": prow.micro, "paper_note": prow.note,
                            "in_paper": True, "setting": None})
    ordered.extend(r for r in rows if not r["in_paper"])
    return ordered


def score_tables(tables_spec: Mapping, base: Path,
                 boot: Optional[Bootstrap] = None) -> Tuple[Dict[str, List[Dict]], Dict[str, str]]:
    """Every row of the paper's tables scored (table → rows in the paper's order), each score
    with its bootstrap interval (``score.intervals``, drawn as ``boot`` says), and the runs
    whose upstream had random weights (run → upstream). A broken row is an error naming it."""
    boot = boot or Bootstrap()
    scored: Dict[str, List[Dict]] = {}
    random_init: Dict[str, str] = {}
    for key, table in paper.TABLES.items():
        rows_spec = tables_spec.get(key) or {}
        if not isinstance(rows_spec, dict):
            raise ConfigError(f"report spec, table {key}: expected {{row label: run directory}}")
        if key == "table2_finetuned" and not rows_spec:
            continue  # an optional table: only shown when run
        rows = [_score_row(key, label, value, base, boot) for label, value in rows_spec.items()]
        for r in rows:
            if r["setting"].get("random_init"):
                random_init[r["run"]] = r["setting"]["random_init"]
        scored[key] = _in_paper_order(table, rows)
    return scored, random_init


def easy_difficult_result(spec: Mapping, base: Path) -> Optional[Dict]:
    """The spec's Easy/Difficult analysis: computed from its runs, or read from a result folder."""
    if not spec.get("easy_difficult"):
        return None
    from .difficulty import easy_difficult, load_clips, read_result

    ed = spec["easy_difficult"]
    if isinstance(ed, dict) and "runs" in ed:
        runs = [_resolve(r, base) for r in ed["runs"]]
        clips = load_clips(cache=_resolve(ed["cache"], base) if ed.get("cache") else None,
                           corpus=_resolve(ed["corpus"], base) if ed.get("corpus") else None)
        return easy_difficult(runs, clips, split=ed.get("split", DEV_SPLIT), other=ed.get("other", "category"))
    return read_result(_resolve(ed, base))


def corpus_figures_dir(spec: Mapping, base: Path) -> Optional[Path]:
    """The spec's describe-corpus output folder (None when not given); an error when it is missing."""
    corpus_dir = _resolve(spec["corpus_figures"], base) if spec.get("corpus_figures") else None
    if corpus_dir is not None and not corpus_dir.is_dir():
        raise ConfigError(f"report spec: corpus_figures directory {corpus_dir} not found "
                          f"(write it with describe-corpus)")
    return corpus_dir


def _modality(run_dir) -> str:
    """What a head run hears: ``"audio"``, ``"text"`` (a text upstream's cache) or ``"audio + text"``
    (a fusion run over an audio and a text cache); ``""`` for other runs (ensembles, end to end)."""
    cfg = run_config(run_dir) or {}
    if cfg.get("kind") == "thresholds":
        cfg = cfg.get("source_config") or {}
    if not cfg.get("cache") or cfg.get("kind") in ("ensemble", "finetune"):
        return ""
    kinds = []
    for cache in [cfg["cache"], *(cfg.get("more_caches") or [])]:
        m = CacheDir(cache).manifest_or_none()
        kind = "unknown" if m is None else ("text" if m.text else "audio")
        if kind not in kinds:
            kinds.append(kind)
    return " + ".join(kinds)


def modality_rows(scored: Dict[str, List[Dict]], boot: Optional[Bootstrap] = None) -> List[Dict]:
    """Table 2's rows on the transcripts' text, alone or fused with the audio, each against the
    audio-only WBCE(S) row on the same clips: the paired bootstrap of the difference in macro-F1
    (``None`` with the reason when it cannot be paired). Empty when Table 2 has no such row."""
    rows = [r for r in scored.get("table2", []) if r.get("run") and r.get("score")]
    audio = next((r for r in rows if r["label"] == "WBCE(S)"), None)
    out = []
    for r in rows:
        kind = _modality(r["run"])
        if "text" not in kind:
            continue
        entry = {"label": r["label"], "run": r["run"], "modality": kind, "split": r["split"],
                 "f1_macro": r["score"]["f1_macro"], "against": None, "difference": None, "why": ""}
        if audio is None:
            entry["why"] = "no audio-only WBCE(S) row"
        elif boot is None:
            entry["why"] = "no interval computed"
        else:
            entry["against"], entry["level"] = audio["label"], boot.level
            try:
                entry["difference"] = boot.paired(r, audio).get("f1_macro")
            except RunError as e:
                entry["why"] = f"not paired: {e}"
        out.append(entry)
    return out


def extras(scored: Dict[str, List[Dict]], attribute_rows: List[Dict], corpus_dir: Optional[Path],
           boot: Optional[Bootstrap] = None) -> Dict:
    """The numbers shown beside the paper's tables: training-set sizes, corpus rows, ensemble
    disagreement, the attribute runs (:func:`attribute_table`), X/O runs, the text and audio +
    text rows against audio alone (:func:`modality_rows`)."""
    return {"training_sets": training_set_sizes(scored), "corpus": corpus_rows(corpus_dir),
            "disagreement": _disagreement(scored), "attributes": attribute_rows, "xo": xo_rows(scored),
            "modalities": modality_rows(scored, boot)}

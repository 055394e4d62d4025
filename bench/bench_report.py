"""What the report's intervals cost: the whole ``conilium-eval report`` of a spec, and its
bootstrap part (each row's 95 % interval, each finding's paired interval) beside the same
steps judged on the numbers alone.

    python bench/bench_report.py [results/report_spec.json] [--draws 2000] [--repeats 3] [--json FILE]

Run ``./run_all.sh`` first (its spec is results/report_spec.json). Prints the min and median
seconds over ``--repeats`` (``--json``: also into FILE, as bench/run_benchmarks.py gathers
them). Set OPENBLAS_NUM_THREADS=1 on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time


def _time(fn, repeats: int):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), statistics.median(times)


def main() -> None:
    from conilium.evaluate.report import build_report
    from conilium.evaluate.report_data import (DRAWS_KEY, Bootstrap, all_findings, check_finding, check_tables,
                                               load_spec, score_tables)

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", nargs="?", default="results/report_spec.json")
    ap.add_argument("--draws", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    spec, base = load_spec(args.spec)
    boot = Bootstrap(args.draws)
    tables = check_tables(spec)
    scored, _ = score_tables(tables, base, boot)
    rows = sum(1 for rs in scored.values() for r in rs if r.get("score"))
    clips = max(r["score"]["n"] for rs in scored.values() for r in rs if r.get("score"))
    findings = [f for f in all_findings() if f.table in scored]
    judged = [check_finding(f, scored, boot) for f in findings]
    paired = sum(1 for f in judged if f.get("interval") or f.get("intervals"))
    print(f"{args.spec}: {rows} scored rows (up to {clips} clips), {len(findings)} findings "
          f"({paired} with paired intervals), {args.draws} draws")

    def intervals():
        for rs in scored.values():
            for r in rs:
                if r.get("score"):
                    boot.intervals(r["run"], r["split"], attributes=False)

    figures = {"spec": args.spec, "scored_rows": rows, "clips_max": clips, "findings": len(findings),
               "findings_paired": paired, "draws": args.draws, "repeats": args.repeats, "seconds": {}}
    for key, what, fn in (("rows_intervals", "rows' intervals", intervals),
                          ("findings_paired_bootstrap", "findings, paired bootstrap",
                           lambda: [check_finding(f, scored, boot) for f in findings]),
                          ("findings_numbers_alone", "findings, numbers alone",
                           lambda: [check_finding(f, scored) for f in findings])):
        lo, med = _time(fn, args.repeats)
        print(f"  {what:<28} min {lo:.3f} s, median {med:.3f} s")
        figures["seconds"][key] = {"min": round(lo, 4), "median": round(med, 4)}
    with tempfile.TemporaryDirectory() as tmp:
        lo, med = _time(lambda: build_report(args.spec, tmp), args.repeats)
    report_draws = spec.get(DRAWS_KEY, boot.draws)
    print(f"  {'whole report (build_report)':<28} min {lo:.3f} s, median {med:.3f} s "
          f"(the spec's own {report_draws} draws)")
    figures["seconds"]["whole_report"] = {"min": round(lo, 4), "median": round(med, 4), "draws": report_draws}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()

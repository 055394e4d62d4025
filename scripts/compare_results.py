"""Compare two result folders of ./run_all.sh (e.g. before and after a change, same seed): every
metrics.json and predictions CSV (timings and the folders' own paths aside), every cache shard,
every checkpoint's and safetensors file's tensors. Usage: python scripts/compare_results.py OLD NEW"""
import hashlib, json, sys
from pathlib import Path

a, b = Path(sys.argv[1]), Path(sys.argv[2])
SKIP_KEYS = {"seconds", "train_seconds", "seconds_this_session", "clips_per_second", "device", "optimizer",
             "manifest_sha256", "settings_key", "wall_seconds", "elapsed"}

def norm(o, root):
    if isinstance(o, dict):
        return {norm(k, root): norm(v, root) for k, v in o.items() if k not in SKIP_KEYS and "second" not in k}
    if isinstance(o, (list, tuple)):
        return [norm(v, root) for v in o]
    if isinstance(o, str):
        return o.replace(str(root), "<root>")
    return o

def pt_equal(pa, pb):
    import torch
    x = torch.load(pa, map_location="cpu", weights_only=False)
    y = torch.load(pb, map_location="cpu", weights_only=False)
    def eq(p, q):
        if isinstance(p, torch.Tensor):
            return isinstance(q, torch.Tensor) and p.shape == q.shape and torch.equal(p, q)
        if isinstance(p, dict):
            p, q = norm_keys(p, a), norm_keys(q, b)
            return isinstance(q, dict) and set(p) == set(q) and all(eq(p[k], q[k]) for k in p)
        if isinstance(p, (list, tuple)):
            return isinstance(q, (list, tuple)) and len(p) == len(q) and all(eq(u, v) for u, v in zip(p, q))
        if isinstance(p, str):
            return p.replace(str(a), "<root>") == q.replace(str(b), "<root>")
        return p == q
    def norm_keys(d, root):
        return {k: v for k, v in d.items() if k not in SKIP_KEYS}
    return eq(x, y)

def st_equal(pa, pb):
    from safetensors.torch import load_file
    import torch
    x, y = load_file(str(pa)), load_file(str(pb))
    return set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)

same, diff, missing = 0, [], []
for pa in sorted(a.rglob("*")):
    if not pa.is_file() or "demo_corpus" in pa.parts or pa.suffix in (".png", ".md", ".log", ".lock"):
        continue
    rel = pa.relative_to(a)
    pb = b / rel
    if not pb.exists():
        missing.append(str(rel)); continue
    if pa.suffix == ".json":
        try:
            ok = norm(json.loads(pa.read_text()), a) == norm(json.loads(pb.read_text()), b)
        except ValueError:
            ok = pa.read_bytes() == pb.read_bytes()
    elif pa.suffix == ".csv":
        if pa.name == "results.csv":  # the grid table: seconds per row differ
            import csv
            ra = [{k: v for k, v in r.items() if "second" not in k} for r in csv.DictReader(open(pa))]
            rb = [{k: v for k, v in r.items() if "second" not in k} for r in csv.DictReader(open(pb))]
            ok = norm(ra, a) == norm(rb, b)
        else:
            ok = pa.read_text().replace(str(a), "<root>") == pb.read_text().replace(str(b), "<root>")
    elif pa.suffix == ".pt":
        ok = pt_equal(pa, pb)
    elif pa.suffix == ".safetensors":
        ok = st_equal(pa, pb)
    else:
        ok = hashlib.sha256(pa.read_bytes()).digest() == hashlib.sha256(pb.read_bytes()).digest()
    if ok:
        same += 1
    else:
        diff.append(str(rel))
print(f"equal: {same}, differ: {len(diff)}, missing in {b}: {len(missing)}")
for d in diff: print("DIFF", d)
for m in missing[:20]: print("MISSING", m)

"""The C build of an integer-mode run on a range of the full Fashion-MNIST test set, bit for bit against
the PyTorch integer model (issue 17: "agreement with PyTorch on all 10,000 test images for every
backend"). ``integer_full_check.py`` runs every backend; on MobileNetV2 the C build (about 0.3 s per
image here) is the slow part, so this script runs C alone on ``--start .. --stop``, and two processes
can share the images (``--threads 1`` each):

    PYTHONPATH=src python benchmarks/integer_c_check.py RUN --start 2000 --stop 6000 --json c_2000_6000.json
    PYTHONPATH=src python benchmarks/integer_c_check.py --table c_2000_6000.json c_6000_10000.json

The C code is generated from the packed file (saved and loaded back), as in ``integer_full_check.py``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from integer_full_check import full_test_split
from lowbit.export.api import compare, load_run, torch_reference
from lowbit.export.c_export import run_c
from lowbit.export.int_api import _bits_equal
from lowbit.export.int_c import compile_int_c, write_int_c
from lowbit.export.intgraph import IntReference, load_int_package, save_int_package
from lowbit.intmode import int_graph


def check(run: str, start: int, stop: int, out: Path) -> dict:
    t0 = time.perf_counter()
    cfg, run_data, model = load_run(Path(run))
    x, y = full_test_split(cfg, run_data)
    x, y = x[start:stop], y[start:stop]
    x, xn, y, ref = torch_reference(model, x, y, 500)
    save_int_package(int_graph(model, x[:1]), out / "packed")
    pkg = load_int_package(out / "packed" / "model.safetensors")
    write_int_c(pkg, out / "c", xn[:3], IntReference(pkg).run(xn[:3]))
    exe = compile_int_c(out / "c")
    t1 = time.perf_counter()
    lc = run_c(exe, xn, ref.shape[1])
    return {"run": run, "start": start, "stop": stop, **compare(ref, lc),
            "bit_exact_images": int(_bits_equal(ref, lc).sum()), "accuracy_c": float((lc.argmax(1) == y).mean()),
            "accuracy_torch": float((ref.argmax(1) == y).mean()),
            "seconds_per_image": (time.perf_counter() - t1) / max(len(xn), 1), "seconds": time.perf_counter() - t0}


def table(files: list[str]) -> str:
    recs = [json.loads(Path(f).read_text()) for f in files]
    n = sum(r["images"] for r in recs)
    lines = ["| run | images | C bit-exact with PyTorch | C accuracy |", "|---|---|---|---|"]
    for r in recs:
        lines.append(f"| {r['run']} | {r['start']}..{r['stop'] - 1} | {r['bit_exact_images']} / {r['images']} | "
                     f"{100 * r['accuracy_c']:.2f} % |")
    exact = sum(r["bit_exact_images"] for r in recs)
    acc = sum(r["accuracy_c"] * r["images"] for r in recs) / max(n, 1)
    lines.append(f"| all | {n} | {exact} / {n} | {100 * acc:.2f} % |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", nargs="?")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--stop", type=int, default=10000)
    ap.add_argument("--json", help="report file")
    ap.add_argument("--export-dir", default=None, help="export files (default: a folder per range under /tmp)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--table", nargs="+", metavar="JSON", help="merge reports of several ranges")
    args = ap.parse_args(argv)
    if args.table:
        print(table(args.table))
        return 0
    if not args.run or not args.json:
        ap.error("a run folder and --json are needed (or --table)")
    if not 0 <= args.start < args.stop:
        ap.error(f"--start {args.start} / --stop {args.stop}: need 0 <= start < stop")
    torch.set_num_threads(args.threads)
    out = Path(args.export_dir or f"/tmp/lowbit_c_check_{args.start}_{args.stop}")
    rep = check(args.run, args.start, args.stop, out)
    Path(args.json).write_text(json.dumps(rep, indent=1))
    print(json.dumps(rep))
    return 0 if rep["bit_exact_images"] == rep["images"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

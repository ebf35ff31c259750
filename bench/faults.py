"""SIGKILL every writer at many random points and count what the files hold (issue 14).

    /work/venv/bin/python bench/faults.py [--kills 50] [--writers experts-new,distill] [--seed 0] [--matrix]
                                          [--fuzz 100] [--hostile] [--exact]

For each writer (experts new / appending / --convexify, convexify in place and -o, distill with
a checkpoint every iteration, evaluate saving): a reference run without a kill, then runs killed
with SIGKILL after a drawn delay until `--kills` kills landed (runs that finished first are
counted as missed). After each kill the file must open and validate through the store and hold
the old content, the new one, or a consistent step between (expert rows done so far; a
distillation checkpoint), bit-identical to the reference; then the same command (distill:
with --resume) runs again and must finish with the reference result. tests/faultkit.py has
the details. `--matrix` also runs the whole corruption matrix (tests/test_corruption.py with
MCTOOL_FULL_MATRIX=1) and prints its counts; `--fuzz N` damages N random byte ranges of each
0.1.0 file and counts the inspect runs that read fine, were refused with one line, went wrong
or hung (tests/damage.py). `--hostile` runs every hostile `import` / `folder:` case of issue 24
(tests/hostile_import.py: NaN, the authors' variants, pickles that never end, storage and size
bombs, gaps, aliasing) as a child process each and counts tried / clean / problems.
`--exact` kills each exact writer (export mtt / ddranking / png
replacing an earlier export, import writing a new buffer) just before every one of its
file-system calls, one run per call, and counts tried / clean / problems (`--kills 0` runs only
these).

Prints a table and writes bench/results/faults.json. OMP_NUM_THREADS is forced to 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests import faultkit  # noqa: E402

EXACT_COLUMNS = ["writer", "calls", "tried", "killed", "old", "new", "corrupt", "clean", "problems", "seconds"]
COLUMNS = ["writer", "runs", "kills", "missed", "opened", "validated", "old", "partial", "new", "corrupt",
           "temporaries_left", "reruns_ok", "seconds"]


def _table(rows: list[dict], columns: list[str] = COLUMNS) -> str:
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    line = lambda vals: "  ".join(str(v).rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(columns), line("-" * w for w in widths), *(line([r[c] for c in columns]) for r in rows)])


def _result(args: argparse.Namespace, rows: list[dict], started: float) -> dict:
    return {"kills_per_writer": args.kills, "seed": args.seed, "rows": rows,
            "load_average": list(os.getloadavg()), "seconds": round(time.perf_counter() - started, 1),
            "note": "shared machine (2 cores, other jobs running); timings are not the point"}


def _write(path: Path, out: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")


def _matrix() -> dict:
    env = {**os.environ, "MCTOOL_FULL_MATRIX": "1"}
    started = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pytest", "tests/test_corruption.py", "-q", "-p", "no:cacheprovider"],
                       cwd=REPO, env=env, capture_output=True, text=True)
    tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-500:]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|error)", tail)}
    return {"counts": counts, "summary": tail, "seconds": round(time.perf_counter() - started, 1)}


def _hostile() -> dict:
    """Every case of tests/hostile_import.py, each in its own folder; the tally and the failures."""
    from tests.conftest import make_tiny_mnist
    from tests.hostile_import import CASES, run_case, tally

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mctool-hostile-") as tmp:
        data = make_tiny_mnist(Path(tmp) / "data")
        outcomes = [run_case(c, Path(tmp) / c.name, data) for c in CASES]
    result = {**tally(outcomes), "failures": [f"{o.name}: {o.why}" for o in outcomes if not o.clean],
              "cases": [{"name": o.name, "clean": o.clean, "seconds": round(o.seconds, 1),
                         "max_rss_mb": round(o.max_rss_mb)} for o in outcomes],
              "seconds": round(time.perf_counter() - started, 1)}
    return result


def main() -> None:
    """Run the kill loops (and the matrix), print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=50, help="kills per writer (default 50; 0: no kill loops)")
    parser.add_argument("--writers", default="", help="comma-separated subset (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--matrix", action="store_true", help="also run the full corruption matrix")
    parser.add_argument("--fuzz", type=int, default=0,
                        help="also damage N random byte ranges of each 0.1.0 file and inspect each copy")
    parser.add_argument("--fuzz-timeout", type=float, default=180.0, help="seconds before a read counts as hung")
    parser.add_argument("--hostile", action="store_true",
                        help="also run the hostile import / folder: cases (tests/hostile_import.py) and count them")
    parser.add_argument("--exact", action="store_true",
                        help="also kill each exact writer before every one of its file-system calls")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "faults.json")
    args = parser.parse_args()
    names = [n for n in args.writers.split(",") if n] or None
    started = time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="mctool-faults-") as tmp:
        if args.kills <= 0:  # --kills 0: only the other counts (--hostile, --fuzz, --matrix)
            names = []
        root = Path(tmp)
        templates = root
        if names != []:
            z = faultkit.Zygote()
            try:
                templates = faultkit.build_templates(z, root / "templates")
            finally:
                z.close()

        def report(line: str) -> None:
            print(line, file=sys.stderr, flush=True)

        for w in (faultkit.writers(templates, names) if names != [] else []):
            t = time.perf_counter()
            tally = faultkit.run_writers([w], args.kills, root / "runs", args.seed, report)[w.name]
            rows.append({"writer": w.name, **tally.row(), "seconds": round(time.perf_counter() - t, 1)})
            # Each writer's row as soon as it is done (a long run stopped part-way keeps them).
            report(_table(rows[-1:]))
            _write(args.out, _result(args, rows, started))
        exact_rows = []
        if args.exact:
            z = faultkit.Zygote()
            try:
                faultkit.build_exact_templates(z, templates)
                for w in faultkit.exact_writers(templates):
                    t = time.perf_counter()
                    tally = faultkit.run_exact(z, w, root / "exact")
                    exact_rows.append({"writer": w.name, **tally.row(), "seconds": round(time.perf_counter() - t, 1)})
                    report(_table(exact_rows[-1:], EXACT_COLUMNS))
            finally:
                z.close()
    out = _result(args, rows, started)
    if rows:
        print(_table(rows))
    if exact_rows:
        out["exact"] = exact_rows
        print(_table(exact_rows, EXACT_COLUMNS))
        total = {k: sum(r[k] for r in exact_rows) for k in ("tried", "clean", "problems")}
        print(f"exact-point kills: {total['tried']} tried, {total['clean']} clean, {total['problems']} problems")
        for r in exact_rows:
            for failure in r["failures"]:
                print(f"FAILURE {r['writer']}: {failure}")
    for r in rows:
        for failure in r["failures"]:
            print(f"FAILURE {r['writer']}: {failure}")
    if args.fuzz:
        from tests.damage import fuzz

        with tempfile.TemporaryDirectory(prefix="mctool-fuzz-") as tmp:
            t = time.perf_counter()
            release = REPO / "tests" / "data" / "release-0.1.0"
            f = fuzz([release / n for n in ("buffer.h5", "synset.h5", "streamed.h5", "compact.h5")], args.fuzz,
                     Path(tmp), seed=args.seed, timeout=args.fuzz_timeout)
            f["seconds"] = round(time.perf_counter() - t, 1)
        out["fuzz"] = f
        print(f"byte damage: {f['cases']} reads of damaged copies: {f['read']} read fine, {f['refused']} refused "
              f"with one line, {len(f['bad'])} bad, {len(f['hung'])} hung")
        for line in f["bad"] + f["hung"]:
            print(f"  {line}")
    if args.hostile:
        out["hostile_import"] = _hostile()
        h = out["hostile_import"]
        print(f"hostile import / folder: cases: {h['tried']} tried, {h['clean']} clean, {h['problems']} problems")
        for line in h["failures"]:
            print(f"  {line}")
    if args.matrix:
        out["corruption_matrix"] = _matrix()
        print(f"corruption matrix (every damage x base x command): {out['corruption_matrix']['summary']}")
    _write(args.out, out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

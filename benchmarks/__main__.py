"""Entry point: ``python -m benchmarks run [--quick] [--only GROUP ...]``."""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
from pathlib import Path

from .harness import Context, save

#: Benchmark groups, in the order they run: name -> module.
GROUPS = {
    "local": "benchmarks.local",
    "floor": "benchmarks.floor",
    "pouchdb": "benchmarks.pouchdb",
    "sync": "benchmarks.sync",
    "e2e": "benchmarks.e2e",
    "fanout": "benchmarks.fanout",
    "bootstrap": "benchmarks.bootstrap",
    "scale": "benchmarks.scale",
    "session": "benchmarks.session",
    "postgres": "benchmarks.postgres",
    "api": "benchmarks.api",
    "migration": "benchmarks.migration",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the benchmarks and write docs/benchmarks.md")
    run.add_argument("--quick", action="store_true", help="small sizes (N = 10,000)")
    run.add_argument("--only", nargs="*", choices=sorted(GROUPS), help="run only these groups")
    args = parser.parse_args(argv)
    names = args.only or list(GROUPS)
    with tempfile.TemporaryDirectory(prefix="tidesync-bench-") as tmp:
        ctx = Context(quick=args.quick, workdir=Path(tmp))
        ran = []
        try:
            for name in names:
                module = importlib.import_module(GROUPS[name])
                print(f"== {name}", file=sys.stderr, flush=True)
                module.run(ctx)
                ran.append(module.GROUP)
        finally:
            save(ctx, ran)  # what completed is kept even if a later group fails
    print("wrote docs/benchmarks.md and benchmarks/results.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

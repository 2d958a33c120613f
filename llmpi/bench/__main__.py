"""Dispatch `python -m llmpi.bench NAME ...` to llmpi.bench.NAME.main(argv)."""
import importlib
import pkgutil
import sys

import llmpi.bench as bench_pkg
from llmpi.cli import run_main
from llmpi.errors import UserError


def available():
    return sorted(m.name for m in pkgutil.iter_modules(bench_pkg.__path__) if not m.name.startswith("_"))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    names = available()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m llmpi.bench NAME [--json] [options]\nbenchmarks: " + ", ".join(names))
        return 0
    if argv[0] not in names:
        raise UserError(f"unknown benchmark {argv[0]!r}; choose one of: {', '.join(names)}")
    module = importlib.import_module(f"llmpi.bench.{argv[0]}")
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(run_main(main, prog="llmpi.bench") or 0)

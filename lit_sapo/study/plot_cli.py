"""`lit-sapo plot DIR_OR_RUN... --out PNG_DIR`: one PNG per metric, one line per configuration (see lit_sapo.plots)."""

from __future__ import annotations

import argparse

from lit_sapo.plots import plot_runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lit-sapo plot", description=__doc__)
    parser.add_argument("runs", nargs="+", help="run folders or sweep folders (every run below is drawn)")
    parser.add_argument("--out", required=True, help="folder of the PNG files")
    args = parser.parse_args(argv)
    written = plot_runs(args.runs, args.out)
    for path in written:
        print(path)
    return 0 if written else 1

"""Merges benchmark CSVs (JAX and PyTorch rows) into one table and one plot.

    python benchmarks/plot_results.py runs/bench/benchmark.csv torch.csv --out_dir runs/bench

Writes OUT_DIR/comparison.md and OUT_DIR/comparison.png and prints the table, so a
script that runs several benchmarks can end with the one comparison that matters.
Files that are missing or hold no rows are reported and skipped (one failed phase of a
long GPU run must not hide the others' figures).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


from msff_jax.analysis.benchmark import outputs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csvs", nargs="+", type=Path, help="benchmark CSV files")
    parser.add_argument("--out_dir", type=Path, required=True)
    args = parser.parse_args(argv)

    rows = []
    for path in args.csvs:
        if not path.exists() or path.stat().st_size == 0:
            print(f"plot_results: {path} is missing or empty; skipped", file=sys.stderr)
            continue
        rows += outputs.read_csv(path)
    if not rows:
        print("plot_results: no benchmark rows to show", file=sys.stderr)
        return 1
    args.out_dir.mkdir(parents=True, exist_ok=True)
    table = outputs.markdown_table(rows)
    (args.out_dir / "comparison.md").write_text(table)
    outputs.plot_throughput_vs_params(rows, args.out_dir / "comparison.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

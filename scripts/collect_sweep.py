"""Collect every run of a Hydra multirun sweep into one table (markdown + CSV) and a plot (PNG).

    python scripts/collect_sweep.py logs/sweep_retailrocket/multirun_<time>_pid<pid> [--out DIR]

Writes ``sweep_results.md``, ``sweep_results.csv`` and ``sweep_results.png`` into ``--out``
(default: the sweep directory), rows sorted by validation MRR@20. See ``seqrec.report.collect_sweep``.
"""

import argparse
import logging
from pathlib import Path

from seqrec.report import SWEEP_METRIC, collect_sweep, plot_sweep, sweep_markdown

log = logging.getLogger("collect_sweep")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="Hydra multirun directory")
    parser.add_argument(
        "--out", type=Path, default=None, help="output directory (default: sweep_dir)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    frame = collect_sweep(args.sweep_dir)
    out = args.out or args.sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    markdown = sweep_markdown(frame, f"Sweep {args.sweep_dir.name}")
    (out / "sweep_results.md").write_text(markdown)
    frame.to_csv(out / "sweep_results.csv", index=False)
    plot_sweep(frame, out / "sweep_results.png")
    log.info("%s", markdown)
    best = frame.iloc[0]
    log.info("best run %s: %s = %s", best["run"], SWEEP_METRIC, best[SWEEP_METRIC])
    log.info("wrote %s/sweep_results.{md,csv,png}", out)


if __name__ == "__main__":
    main()

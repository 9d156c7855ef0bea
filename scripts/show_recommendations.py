"""Print recommendations for a few real test prefixes of a prepared data set (used by `make demo`).

python scripts/show_recommendations.py artifacts/export/synthetic data/processed/synthetic --num 3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from seqrec.constants import NEXT_ITEM_ID, PREFIX_ITEM_IDS
from seqrec.predictor import SessionRecommender


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("export_dir", type=Path, help="directory written by scripts/export_onnx.py")
    parser.add_argument(
        "processed_dir", type=Path, help="directory written by scripts/prepare_data.py"
    )
    parser.add_argument("--num", type=int, default=3, help="test examples to show (int)")
    parser.add_argument("--k", type=int, default=10, help="recommendations per session (int)")
    args = parser.parse_args(argv)

    examples_path = args.processed_dir / "test_examples.parquet"
    if not examples_path.is_file():
        print(
            f"error: {examples_path} not found; run scripts/prepare_data.py first", file=sys.stderr
        )
        return 2
    recommender = SessionRecommender.from_dir(args.export_dir)
    examples = pd.read_parquet(examples_path)
    # longest prefixes first among the first rows: more interesting than one-click sessions
    shown = examples.head(200).assign(n=lambda f: f[PREFIX_ITEM_IDS].map(len))
    shown = shown.sort_values("n", ascending=False, kind="stable").head(args.num)
    for _, row in shown.iterrows():
        session = [str(i) for i in row[PREFIX_ITEM_IDS]]
        recs = recommender.recommend(session, k=args.k)
        ids = [r.item_id for r in recs]
        hit = ids.index(row[NEXT_ITEM_ID]) + 1 if row[NEXT_ITEM_ID] in ids else None
        print(f"session (last 8 of {len(session)}): {' '.join(session[-8:])}")
        print(f"  top-{args.k}: {' '.join(ids)}")
        print(
            f"  actual next item: {row[NEXT_ITEM_ID]} ({f'rank {hit}' if hit else f'not in top-{args.k}'})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

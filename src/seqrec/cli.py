"""Command line: recommend next items for one session from an ONNX export (torch-free).

Usage::

    python -m seqrec.cli artifacts/export/synthetic 1234 987 --k 10 [--exclude-seen] [--json]
        [--allow 11 12 ...] [--deny 13 ...] [--num-threads 1]

``--allow`` and ``--deny`` take every id that follows them: put them after the session's items,
or put the items last, after ``--`` (``--deny 13 -- 1234 987``; options go before ``--``: an
option name among the items is refused).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from seqrec.predictor import (
    NonFiniteScoresError,
    Recommendation,
    RecommendInfo,
    SessionRecommender,
)

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_USAGE = 2
"""Bad arguments or an unusable export directory (argparse uses 2 as well)."""
EXIT_MODEL = 1
"""The model scored the session NaN or +inf (damaged weights that passed the load check), or
the output could not be written."""


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (errors name the value, not this function)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, with the two mistakes that ``--allow``/``--deny`` (``nargs="+"``) invite:
    they took every id (a hint on the missing-ITEM error), and an option written after ``--``,
    which argparse reads as a session item (refused)."""

    _given: Sequence[str] = ()

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self._given = list(sys.argv[1:] if args is None else args)
        parsed, extras = super().parse_known_args(args, namespace)
        misplaced = [item for item in parsed.items if item in self._option_string_actions]
        if misplaced:  # --k, --allow, ... (-h too) after "--"
            self.error(
                f"{misplaced[0]!r} is among the session items: after -- every argument is an "
                "item, so put options before --"
            )
        return parsed, extras

    def error(self, message: str) -> NoReturn:
        if "required: ITEM" in message and {"--allow", "--deny"} & set(self._given):
            message += (
                " (--allow and --deny take every id after them: put them after the items, or "
                "put the items last, after --)"
            )
        super().error(message)


def build_parser() -> _Parser:
    """The argument parser of :func:`main`."""
    parser = _Parser(
        prog="seqrec-recommend",
        description="Recommend the next items for a session of raw item ids (oldest first).",
    )
    parser.add_argument(
        "export_dir", help="export directory (model.onnx, item_vocab.json, export_meta.json)"
    )
    parser.add_argument(
        "items", nargs="+", metavar="ITEM", help="raw item ids of the session, oldest first"
    )
    parser.add_argument(
        "--k", type=_positive_int, default=10, help="number of recommendations (default 10)"
    )
    parser.add_argument(
        "--exclude-seen", action="store_true", help="never recommend items of the session"
    )
    parser.add_argument(
        "--allow",
        nargs="+",
        action="extend",  # a repeated --allow adds to the list (it replaced it)
        metavar="ITEM",
        default=None,
        help="only these items may be recommended (allow-list; repeat to add more). It takes "
        "every id that follows: put it after the session's items, or put the items last, "
        "after -- (EXPORT_DIR --allow 11 12 -- 1234 987)",
    )
    parser.add_argument(
        "--deny",
        nargs="+",
        action="extend",
        metavar="ITEM",
        default=None,
        help="never recommend these items (repeat to add more); like --allow, it takes every id "
        "that follows",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--num-threads",
        type=_positive_int,
        default=1,
        help="onnxruntime intra-op threads (default 1)",
    )
    return parser


def _format_table(
    recs: Sequence[Recommendation], info: RecommendInfo, filters: Sequence[str] = ()
) -> str:
    """The recommendations as a ranked table; ``filters``: the filter options given (named when
    they left no item)."""
    lines = [
        f"session: {info.num_known} known, {info.num_unknown} unknown item(s)"
        + ("; no known item, popularity fallback" if info.used_fallback else "")
        + (
            f"; {info.num_unknown_filter_items} --allow/--deny item(s) not in the catalog "
            "(ignored; an --allow list of only such ids allows nothing)"
            if info.num_unknown_filter_items
            else ""
        ),
        f"{'rank':>4}  {'item_id':<20} {'score':>10}",
    ]
    for rank, rec in enumerate(recs, start=1):
        score = f"{rec.score:10.4f}" if rec.source == "model" else f"{'-':>10}"
        lines.append(f"{rank:>4}  {rec.item_id:<20} {score}")
    if not recs:  # only filters can leave nothing
        lines.append(f"(no item left after {' / '.join(filters) or 'the filters'})")
    return "\n".join(lines)


def _format_json(recs: Sequence[Recommendation], info: RecommendInfo, model_version: str) -> str:
    return json.dumps(
        {
            "num_known": info.num_known,
            "num_unknown": info.num_unknown,
            "used_fallback": info.used_fallback,
            "num_unknown_filter_items": info.num_unknown_filter_items,
            "model_version": model_version,
            "recommendations": [
                {"rank": rank, "item_id": rec.item_id, "score": rec.score, "source": rec.source}
                for rank, rec in enumerate(recs, start=1)
            ],
        },
        indent=2,
        allow_nan=False,  # never emit NaN, which is not JSON
    )


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), recommend, print the result.

    Returns:
        0 on success; 2 for bad arguments or a missing, unreadable or malformed export directory;
        1 when the model scores the session NaN or +inf or the output cannot be written
        (messages go to stderr, no traceback).
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        recommender = SessionRecommender.from_dir(args.export_dir, num_threads=args.num_threads)
    except (OSError, ValueError) as exc:  # OSError: missing or unreadable files
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        recs, info = recommender.recommend_with_info(
            args.items,
            k=args.k,
            exclude_seen=args.exclude_seen,
            allow_items=args.allow,
            deny_items=args.deny,
        )
    except NonFiniteScoresError as exc:  # a damaged model that passed the load check
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_MODEL
    text = (
        _format_json(recs, info, recommender.model_version)
        if args.json
        else _format_table(
            recs,
            info,
            [
                flag
                for flag, used in (
                    ("--exclude-seen", args.exclude_seen),
                    ("--allow", args.allow is not None),
                    ("--deny", args.deny is not None),
                )
                if used
            ],
        )
    )
    try:
        if sys.stdout is None:  # started with stdout closed (`>&-`)
            raise OSError("standard output is closed")
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. piped into `head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OSError as exc:  # e.g. a full disk (`> /dev/full`)
        print(f"error: cannot write the recommendations: {exc}", file=sys.stderr)
        return EXIT_MODEL
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())

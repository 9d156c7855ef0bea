"""Recommend next items for a session from an ONNX export (torch-free).

Example::

    python scripts/recommend.py artifacts/export/synthetic 1234 987 --k 10
"""

from seqrec.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

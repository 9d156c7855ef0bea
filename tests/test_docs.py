"""README examples run as written, and the generated blocks of README / PROPOSAL match docs/results."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _export_helpers import TinyExport, tiny_export
from _serving_helpers import running_server
from conftest import REPO_ROOT
from seqrec.predictor import SessionRecommender
from seqrec.serving.app import ServeSettings, create_app

README = REPO_ROOT / "README.md"
sys.path.insert(0, str(REPO_ROOT / "scripts"))
import render_docs  # noqa: E402


def readme_block(tag: str) -> tuple[str, str]:
    """(language, code) of the fenced block right after ``<!-- tested: tag -->`` in README.md."""
    match = re.search(
        rf"<!-- tested: {re.escape(tag)} -->\n```(\w+)\n(.*?)```", README.read_text(), re.S
    )
    assert match, f"README.md has no tested block {tag!r}"
    return match.group(1), match.group(2)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> TinyExport:
    return tiny_export(tmp_path_factory)  # ids "1001".."1030", like the demo's examples


def _run_python(code: str) -> tuple[dict, str]:
    namespace: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    return namespace, out.getvalue()


def test_readme_predictor_example(exported: TinyExport) -> None:
    lang, code = readme_block("readme-predictor")
    assert lang == "python" and '"artifacts/export/synthetic"' in code
    namespace, printed = _run_python(
        code.replace("artifacts/export/synthetic", str(exported.export_dir))
    )
    rec = namespace["rec"]
    *lines, strips_line = printed.strip().splitlines()
    assert len(lines) == 5
    shown = [line.split()[0] for line in lines]
    assert not set(rec.item_ids[:3]) & set(shown)  # exclude_seen and the deny-list
    assert all(line.split()[2] == "model" for line in lines)  # real ids: no fallback
    strips = namespace["strips"]
    assert [len(s) for s in strips] == [3, 3]
    assert strips_line == str([[r.item_id for r in strip] for strip in strips])


def test_readme_http_examples(exported: TinyExport) -> None:
    rec = SessionRecommender.from_dir(exported.export_dir)
    settings = ServeSettings(max_k=40, max_session_len=40, max_filter_items=50)
    session = list(dict.fromkeys(rec.fallback_items + rec.item_ids))[:2]  # what /catalog lists
    with running_server(create_app(rec, settings)) as url:
        lang, code = readme_block("readme-http")
        assert lang == "python" and "http://127.0.0.1:8000" in code
        _, printed = _run_python(code.replace("http://127.0.0.1:8000", url))
        version, items = printed.split(" ", 1)
        assert version == rec.model_version
        got = eval(items)  # noqa: S307 - a printed list of ids
        want = rec.recommend(session, k=5, exclude_seen=True, deny_items=["1003"])
        assert got == [r.item_id for r in want] and len(got) == 5

        lang, command = readme_block("readme-curl")
        assert lang == "bash" and shutil.which("curl")
        proc = subprocess.run(
            ["bash", "-c", command.replace("http://127.0.0.1:8000", url)],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        payload = json.loads(proc.stdout)
        want = rec.recommend(session, k=5, exclude_seen=True)
        assert [i["item_id"] for i in payload["items"]] == [r.item_id for r in want]
        assert payload["used_fallback"] is False


def test_generated_blocks_match_the_committed_reports() -> None:
    assert render_docs.main(["--check"]) == 0, "run: python scripts/render_docs.py"


def test_stale_block_is_detected_and_rewritten(tmp_path: Path) -> None:
    doc = tmp_path / "README.md"
    text = README.read_text()
    start = text.index("<!-- BEGIN generated: quality:retailrocket_benchmark -->")
    end = text.index("<!-- END generated: quality:retailrocket_benchmark -->")
    doc.write_text(text[:start] + text[start:end].replace("0.", "9.", 1) + text[end:])
    assert render_docs.main(["--check", str(doc)]) == 1
    assert render_docs.main([str(doc)]) == 0
    assert doc.read_text() == text


def test_unknown_block_name_is_refused(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- BEGIN generated: nope -->\n<!-- END generated: nope -->\n")
    with pytest.raises(KeyError, match="unknown generated block 'nope'"):
        render_docs.main(["--check", str(doc)])

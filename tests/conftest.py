"""Shared fixtures: tiny configs composed with Hydra, tiny demo-shop data built in code."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import seqrec.pipeline  # noqa: F401  (registers the seqrec_pid resolver)

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"

# Tiny models and the second core possibly busy: one intra-op thread keeps tests predictable.
torch.set_num_threads(1)

TINY_GENERATOR = [
    "data.generator.num_visitors=1500",
    "data.generator.num_items=150",
    "data.generator.num_categories=6",
    "data.generator.days=30",
]
TINY_MODEL = ["model.d_model=16", "model.n_heads=2", "model.n_layers=1", "model.warmup_steps=0"]


@pytest.fixture
def compose_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose a primary config with every path inside ``tmp_path``."""

    def _compose(config_name: str, overrides: list[str] | None = None) -> DictConfig:
        base = [
            f"paths.root_dir={tmp_path}",
            f"paths.output_dir={tmp_path}/run",
        ]
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name=config_name, overrides=base + (overrides or []))

    return _compose


def compose_at(root: Path, config_name: str, overrides: list[str] | None = None) -> DictConfig:
    """Like the ``compose_cfg`` fixture, for any root directory (e.g. in module-scoped fixtures)."""
    base = [f"paths.root_dir={root}", f"paths.output_dir={root}/run"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=base + (overrides or []))


def real_data_dir() -> Path:
    """``$SEQREC_DATA_DIR``; real-data tests fail (not skip) in CI when it is missing."""
    value = os.environ.get("SEQREC_DATA_DIR")
    if not value or not Path(value).is_dir():
        if os.environ.get("CI"):
            pytest.fail(
                f"SEQREC_DATA_DIR={value!r} is not a directory; CI must provide the real data"
            )
        pytest.skip("SEQREC_DATA_DIR not set; real-data test skipped outside CI")
    return Path(value)

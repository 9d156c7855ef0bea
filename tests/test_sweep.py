"""Optuna sweep config (needs the `sweep` extra) and the sweep collector on a fake sweep dir."""

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from conftest import CONF_DIR, REPO_ROOT, TINY_GENERATOR, TINY_MODEL
from seqrec import report

SWEEP_CONFIG = "hparams_search=retailrocket_optuna"


def test_optuna_sweep_config_composes_with_the_plugin(
    compose_cfg: Callable[..., DictConfig],
) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="needs the sweep extra")
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.plugins import Plugins
    from hydra.plugins.sweeper import Sweeper
    from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override
    from optuna.distributions import CategoricalDistribution, LogUniformDistribution

    sweepers = [f"{c.__module__}.{c.__name__}" for c in Plugins.instance().discover(Sweeper)]
    assert "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper" in sweepers

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[SWEEP_CONFIG, "paths.root_dir=/tmp/x", "paths.output_dir=/tmp/x/run"],
            return_hydra_config=True,
        )
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert sweeper.direction == "maximize" and sweeper.n_trials >= 10
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert cfg.data.name == "retailrocket_benchmark"
    assert cfg.callbacks.model_checkpoint.monitor == "val/mrr@20"  # what train.py returns

    parser = OverridesParser.create()
    space = {
        key: create_optuna_distribution_from_override(parser.parse_override(f"{key}={value}"))
        for key, value in sweeper.params.items()
    }
    assert set(space) >= {"model.d_model", "model.n_layers", "model.dropout", "model.lr", "loss"}
    assert isinstance(space["model.lr"], LogUniformDistribution)
    assert isinstance(space["loss"], CategoricalDistribution)
    loss_options = {p.stem for p in (CONF_DIR / "loss").glob("*.yaml")}
    assert set(space["loss"].choices) == loss_options == {"ce", "sampled_softmax", "bce", "gbce"}
    # every swept value composes (d_model divisible by n_heads, loss group options exist)
    for d_model in space["model.d_model"].choices:
        trial = compose_cfg("train", [SWEEP_CONFIG, f"model.d_model={d_model}"])
        assert trial.model.d_model % trial.model.n_heads == 0
    for loss in space["loss"].choices:
        assert compose_cfg("train", [SWEEP_CONFIG, f"loss={loss}"]).model.loss == loss


def write_run(root: Path, name: str, overrides: list[str], result: dict | None) -> None:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if result is not None:
        (run / "train_result.json").write_text(json.dumps(result))


def fake_sweep(root: Path) -> Path:
    sweep = root / "multirun_x"
    common = ["hparams_search=retailrocket_optuna", "trainer.max_epochs=2"]

    def result(mrr: float | None) -> dict:
        return {
            "best_val_mrr@20": mrr,
            "last_val": {"val/mrr@20": mrr or 0.0, "val/recall@20": 0.5},
            "train_time_s": 12.5,
            "epochs": 2,
            "global_step": 10,
            "best_ckpt": "x.ckpt" if mrr else "",
        }

    write_run(sweep, "0", ["model.lr=0.001", "loss=ce", "model.d_model=64", *common], result(0.10))
    write_run(sweep, "1", ["model.lr=0.003", "loss=bce", "model.d_model=64", *common], result(0.30))
    write_run(sweep, "2", ["model.lr=0.01", "loss=gbce", "model.d_model=32", *common], None)
    write_run(
        sweep, "10", ["model.lr=0.0005", "loss=ce", "model.d_model=32", *common], result(0.20)
    )
    write_run(sweep, "3", ["model.lr=0.02", "loss=ce", "model.d_model=32", *common], result(None))
    (sweep / "optimization_results.yaml").write_text("name: optuna\n")
    return sweep


def test_collect_sweep_table_sorted_by_val_mrr(tmp_path: Path) -> None:
    frame = report.collect_sweep(fake_sweep(tmp_path))
    assert frame["run"].tolist() == ["1", "10", "0", "2", "3"]
    assert frame["status"].tolist() == ["ok", "ok", "ok", "no result", "no checkpoint"]
    assert frame["best_val_mrr@20"].tolist()[:3] == [0.30, 0.20, 0.10]
    assert frame.loc[frame["run"] == "1", "model.lr"].item() == pytest.approx(0.003)
    assert frame.loc[frame["run"] == "1", "loss"].item() == "bce"
    assert frame.loc[frame["run"] == "1", "val/recall@20"].item() == 0.5
    assert report.sweep_param_columns(frame) == ["model.lr", "loss", "model.d_model"]
    md = report.sweep_markdown(frame, "toy sweep")
    assert "| 1 | 1 | 0.003 | bce | 64 | 0.3000 |" in md
    assert "5 runs, 3 with a result" in md
    with pytest.raises(FileNotFoundError):
        report.collect_sweep(tmp_path / "empty")


def test_collect_sweep_script(tmp_path: Path) -> None:
    sweep = fake_sweep(tmp_path)
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "scripts" / "collect_sweep.py"),
            str(sweep),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    csv = pd.read_csv(out / "sweep_results.csv")
    assert csv["run"].astype(str).tolist()[0] == "1" and len(csv) == 5
    assert (out / "sweep_results.md").read_text().startswith("# Sweep multirun_x")
    assert (out / "sweep_results.png").stat().st_size > 1000


@pytest.mark.slow
def test_tiny_optuna_sweep_end_to_end(tmp_path: Path) -> None:
    """Two Optuna trials of scripts/train.py -m on the demo shop, then the collector."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="needs the sweep extra")
    command = [
        sys.executable,
        str(REPO_ROOT / "scripts" / "train.py"),
        "-m",
        SWEEP_CONFIG,
        "data=synthetic",
        *TINY_GENERATOR,
        *[o for o in TINY_MODEL if not o.startswith("model.d_model")],
        f"paths.root_dir={tmp_path}",
        "num_threads=1",
        "trainer=cpu",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=2",
        "~logger",
        "hydra.sweeper.n_trials=2",
        "model.d_model=choice(8,16)",
        "model.n_layers=1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert "Best value:" in output
    (sweep,) = (tmp_path / "logs" / "sweep_retailrocket").glob("multirun_*")
    frame = report.collect_sweep(sweep)
    assert len(frame) == 2 and (frame["status"] == "ok").all()
    assert frame["best_val_mrr@20"].notna().all()
    assert set(frame["model.d_model"]) <= {8, 16} and set(frame["loss"]) <= {
        "ce",
        "sampled_softmax",
        "bce",
        "gbce",
    }
    best = frame["best_val_mrr@20"].max()
    assert f"Best value: {best}" in output  # what train.py returned is what the table holds

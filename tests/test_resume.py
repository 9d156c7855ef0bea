"""Fault classes 9 (resume after SIGKILL) and 10 (run directories).

Class 9 runs ``scripts/train.py`` in subprocesses on a tiny demo shop (16 training batches and 4
validation batches per epoch, 2 epochs, a step checkpoint every 6 steps, dropout on): one run is
never interrupted; another is SIGKILLed from outside right after its step-6 checkpoint is written
and then resumed from ``last.ckpt``. The resumed run continues at step 6, trains on exactly the
batches the first run would have, with the same random numbers, and ends with the same metrics and
weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import DictConfig

from conftest import REPO_ROOT, TINY_GENERATOR, compose_at
from seqrec import pipeline
from seqrec.resume import RunDirectoryError, check_output_dir

TESTS_DIR = Path(__file__).resolve().parent
RUN_TIMEOUT_S = 300


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), *filter(None, [env.get("PYTHONPATH")])])
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HYDRA_FULL_ERROR="1")
    return env


def _train_args(root: Path, name: str) -> list[str]:
    return [
        sys.executable,
        str(REPO_ROOT / "scripts" / "train.py"),
        "data=synthetic",
        *TINY_GENERATOR,
        f"paths.root_dir={root}",
        f"hydra.run.dir={root}/{name}",
        "trainer=cpu",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=16",
        "trainer.limit_val_batches=4",
        "trainer.enable_progress_bar=false",
        "data.datamodule.batch_size=16",
        "data.datamodule.eval_batch_size=32",
        "model.d_model=16",
        "model.n_heads=2",
        "model.n_layers=1",
        "model.warmup_steps=3",
        "model.dropout=0.2",  # random numbers matter: dropout masks must continue identically
        "num_threads=1",
        "callbacks.periodic_checkpoint.every_n_train_steps=6",
        "callbacks.periodic_checkpoint.save_top_k=-1",
        "callbacks.early_stopping.patience=10",
        "~logger",
        "+callbacks.recorder._target_=_resume_helpers.StepRecorder",
        f"+callbacks.recorder.path={root}/{name}_steps.jsonl",
    ]


def _run(args: list[str]) -> None:
    result = subprocess.run(
        args, env=_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )
    assert result.returncode == 0, result.stderr[-3000:]


def _steps(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_class9_sigkill_after_step_6_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    stats = pipeline.prepare(compose_at(tmp_path, "prepare", ["data=synthetic", *TINY_GENERATOR]))
    assert stats["num_valid_examples"] >= 4 * 32  # 4 full validation batches per epoch

    _run(_train_args(tmp_path, "uninterrupted"))

    marker = tmp_path / "killed_at_step"
    killed = subprocess.Popen(
        [
            *_train_args(tmp_path, "killed"),
            "+callbacks.pause._target_=_resume_helpers.PauseAtStep",
            "+callbacks.pause.step=6",
            f"+callbacks.pause.marker={marker}",
        ],
        env=_env(),
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not marker.exists():
        if killed.poll() is not None:
            pytest.fail(f"run exited before step 6: {killed.stderr.read().decode()[-3000:]}")
        assert time.monotonic() < deadline, "no step-6 checkpoint in time"
        time.sleep(0.05)
    killed.kill()  # SIGKILL: no cleanup, no final checkpoint
    assert killed.wait(timeout=30) == -9
    killed.stderr.close()
    checkpoints = tmp_path / "killed" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step0000006.ckpt"]
    last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 6
    assert not (tmp_path / "killed" / "train_result.json").exists()

    _run([*_train_args(tmp_path, "resumed"), f"ckpt_path={checkpoints / 'last.ckpt'}"])

    # The global step continues from 6, on the batches the interrupted run would have seen.
    uninterrupted = _steps(tmp_path / "uninterrupted_steps.jsonl")
    before, after = (
        _steps(tmp_path / "killed_steps.jsonl"),
        _steps(tmp_path / "resumed_steps.jsonl"),
    )
    assert [s["global_step"] for s in uninterrupted] == list(range(1, 33))
    assert [s["batch_idx"] for s in uninterrupted] == list(range(16)) * 2  # 16 batches per epoch
    assert [s["global_step"] for s in before] == list(range(1, 7))
    assert after[0]["global_step"] == 7 and after[0]["batch_idx"] == 6 and after[0]["epoch"] == 0
    assert before + after == uninterrupted  # same batches, same losses, bit for bit

    # Final metrics and weights equal the uninterrupted run with the same seed.
    results = {
        name: json.loads((tmp_path / name / "train_result.json").read_text())
        for name in ("uninterrupted", "resumed")
    }
    assert results["resumed"]["global_step"] == results["uninterrupted"]["global_step"] == 32
    assert results["resumed"]["last_val"] == results["uninterrupted"]["last_val"]
    assert results["resumed"]["best_val_mrr@20"] == results["uninterrupted"]["best_val_mrr@20"]
    weights = {
        name: torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=False)[
            "state_dict"
        ]
        for name in ("uninterrupted", "resumed")
    }
    assert weights["resumed"].keys() == weights["uninterrupted"].keys()
    for key, value in weights["uninterrupted"].items():
        assert torch.equal(weights["resumed"][key], value), key

    # A fresh run pointed at the killed run's directory refuses to overwrite its checkpoints.
    cfg = compose_at(
        tmp_path, "train", ["data=synthetic", f"paths.output_dir={tmp_path / 'killed'}"]
    )
    with pytest.raises(RunDirectoryError, match="refusing to overwrite"):
        pipeline.train(cfg)


# -------------------------------------------------------------------------- 10. run directories


def test_class10_fresh_run_refuses_a_directory_with_a_checkpoint(
    compose_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"precious")
    cfg = compose_cfg("train", ["data=synthetic"])
    with pytest.raises(RunDirectoryError) as err:
        pipeline.train(cfg)
    message = str(err.value)
    assert str(checkpoint.parent) in message and "last.ckpt" in message
    assert f"ckpt_path={checkpoint}" in message  # says how to resume instead
    assert checkpoint.read_bytes() == b"precious"
    assert not (tmp_path / "data" / "processed").exists()  # refused before any work


def test_class10_resuming_into_the_directory_is_allowed(tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "last.ckpt").write_bytes(b"x")
    check_output_dir([checkpoints], ckpt_path=checkpoints / "last.ckpt")  # no error
    check_output_dir([tmp_path / "empty"], ckpt_path=None)  # fresh run, fresh directory
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        check_output_dir([checkpoints], ckpt_path=checkpoints / "missing.ckpt")
    with pytest.raises(RunDirectoryError):
        check_output_dir([checkpoints], ckpt_path=None)


def _start_app(root: Path, overrides: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            str(TESTS_DIR / "_hydra_rundir_app.py"),
            f"paths.root_dir={root}",
            *overrides,
        ],
        env=_env(),
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
@pytest.mark.parametrize("same_second", [False, True])
def test_class10_two_runs_started_together_get_distinct_directories(
    tmp_path: Path, same_second: bool
) -> None:
    overrides = []
    if same_second:
        # The configured template with its time stamp frozen: only the process id tells them apart.
        template = yaml.safe_load((REPO_ROOT / "conf" / "hydra" / "default.yaml").read_text())
        run_dir = template["run"]["dir"]
        assert "${now:%Y-%m-%d_%H-%M-%S}" in run_dir and "${seqrec_pid:}" in run_dir
        overrides = [
            f"hydra.run.dir={run_dir.replace('${now:%Y-%m-%d_%H-%M-%S}', '2015-06-02_05-02-12')}"
        ]
    procs = [_start_app(tmp_path, overrides) for _ in range(2)]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        outputs.append(Path(out.strip().splitlines()[-1]))
    assert outputs[0] != outputs[1]
    for proc, run_dir in zip(procs, outputs, strict=True):
        assert run_dir.is_dir() and (run_dir / ".hydra" / "config.yaml").is_file()
        assert run_dir.name.endswith(f"_pid{proc.pid}")
        assert run_dir.parent == tmp_path / "logs" / "prepare"

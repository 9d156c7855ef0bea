"""`trainer=ddp`: a real 2-process DDP training on CPU (gloo) through scripts/train.py.

The script is run in a subprocess because ``strategy: ddp`` starts the second process by running
the same command again (Lightning's subprocess launcher, Hydra-aware); ``ddp_spawn`` would need
picklable state and is slower to start. Validation metrics must be reduced over both processes:
the logged val/mrr@20 equals a single-process evaluation of the same weights on the whole
validation set, and differs from what one process sees on its own shard.
"""

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from conftest import REPO_ROOT, TINY_GENERATOR, TINY_MODEL
from seqrec import pipeline
from seqrec.data.datamodule import SessionDataModule
from seqrec.metrics import evaluate_scorer
from seqrec.sequence import encode_prefixes

NUM_VALID_EXAMPLES = 300  # even, so the DistributedSampler pads no duplicate example
MAX_LEN = 50


def test_ddp_config_composes(compose_cfg: Callable[..., DictConfig]) -> None:
    cfg = compose_cfg("train", ["trainer=ddp"])
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == 2
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.num_nodes == 1
    gpu = compose_cfg("train", ["trainer=ddp", "trainer.accelerator=gpu", "trainer.devices=8"])
    assert gpu.trainer.devices == 8 and gpu.trainer.strategy == "ddp"


@pytest.mark.slow
def test_ddp_two_processes_cpu_gloo_reduces_validation_metrics(
    compose_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    data = ["data=synthetic", *TINY_GENERATOR]
    pipeline.prepare(compose_cfg("prepare", data))
    processed = tmp_path / "data" / "processed" / "synthetic"
    valid = pd.read_parquet(processed / "valid_examples.parquet")
    assert len(valid) >= NUM_VALID_EXAMPLES
    valid.iloc[:NUM_VALID_EXAMPLES].to_parquet(processed / "valid_examples.parquet", index=False)

    command = [
        sys.executable,
        str(REPO_ROOT / "scripts" / "train.py"),
        "trainer=ddp",
        *data,
        *TINY_MODEL,
        f"paths.root_dir={tmp_path}",
        "num_threads=1",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=4",
        "trainer.enable_progress_bar=false",
        "data.datamodule.batch_size=32",
        "data.datamodule.eval_batch_size=64",
        "~logger",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("MASTER_PORT", None)  # Lightning picks a free port
    proc = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert "distributed_backend=gloo" in output
    assert "Starting with 2 processes" in output
    assert "MEMBER: 2/2" in output  # the second process joined the group

    (result_path,) = (tmp_path / "logs" / "train").glob("*/train_result.json")
    result = json.loads(result_path.read_text())
    assert result["global_step"] == 4  # both processes step together on their own shards
    logged = result["last_val"]

    # Single process, whole validation set, same weights (one epoch: best = end-of-epoch weights).
    module = pipeline.load_module(result["best_ckpt"])
    examples = SessionDataModule(str(processed), max_len=MAX_LEN).examples("valid")
    assert len(examples) == NUM_VALID_EXAMPLES
    full = evaluate_scorer(
        pipeline.model_scorer(module, MAX_LEN), examples.prefixes, examples.next_items
    )
    for key in ("recall@10", "recall@20", "mrr@20", "ndcg@20"):
        assert logged[f"val/{key}"] == pytest.approx(full[key], abs=1e-5), key
    with torch.inference_mode():
        scores = module(torch.from_numpy(encode_prefixes(examples.prefixes, MAX_LEN)))
        loss = F.cross_entropy(scores, torch.from_numpy(examples.next_items)).item()
    assert logged["val/loss"] == pytest.approx(loss, abs=1e-4)

    # Rank 0 alone (DistributedSampler without shuffling: every other example) sees another value,
    # so the equality above proves the metric states were summed over both processes.
    rank0 = np.arange(0, NUM_VALID_EXAMPLES, 2)
    shard = evaluate_scorer(
        pipeline.model_scorer(module, MAX_LEN),
        [examples.prefixes[i] for i in rank0],
        examples.next_items[rank0],
    )
    assert abs(shard["mrr@20"] - full["mrr@20"]) > 1e-4

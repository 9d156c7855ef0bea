"""Length-bucketed sampling and the training-throughput benchmark (seqrec.throughput)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig

from conftest import TINY_GENERATOR, TINY_MODEL
from seqrec import throughput
from seqrec.data.dataset import TrainSessions
from seqrec.lit_module import SASRecModule
from seqrec.resume import EpochShuffleSampler


def _lengths(num: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(2, 51, size=num)


def test_bucketed_order_is_a_permutation_fixed_by_seed_and_epoch() -> None:
    lengths = _lengths(1000)
    sampler = EpochShuffleSampler(1000, 7, lengths, batch_size=32, bucket_batches=4)
    first = sampler.order()
    assert sorted(first.tolist()) == list(range(1000))
    assert np.array_equal(first, EpochShuffleSampler(1000, 7, lengths, 32, 4).order())
    sampler.set_epoch(1)
    assert not np.array_equal(first, sampler.order())


def test_bucketed_batches_are_narrow_and_the_short_batch_stays_last() -> None:
    lengths = _lengths(1000)
    bucketed = EpochShuffleSampler(1000, 7, lengths, batch_size=32, bucket_batches=4).order()
    plain = EpochShuffleSampler(1000, 7).order()

    def mean_width(order: np.ndarray) -> float:
        return float(np.mean([lengths[order[i : i + 32]].max() for i in range(0, 992, 32)]))

    # 1000 = 31 full batches of 32 + 8: random batches of lengths 2..50 are ~50 wide
    assert mean_width(plain) > 45
    assert mean_width(bucketed) < 0.75 * mean_width(plain)
    # the 8 leftover windows stay last (so the loader's batches are the sampler's batches): they
    # are the 8 longest of the final chunk of the same permutation (chunks of 4 x 32 = 128)
    last_chunk = plain[896:]
    expected = last_chunk[np.argsort(lengths[last_chunk], kind="stable")][-8:]
    assert bucketed[992:].tolist() == expected.tolist()


def test_bucketed_sampler_rejects_wrong_lengths() -> None:
    with pytest.raises(ValueError, match=r"lengths has shape \(3,\), expected \(4,\)"):
        EpochShuffleSampler(4, 0, [2, 3, 4], batch_size=2)
    with pytest.raises(ValueError, match="batch_size and bucket_batches must be >= 1"):
        EpochShuffleSampler(4, 0, [2, 3, 4, 5], batch_size=0)


def test_all_positions_loss_equals_the_target_positions_loss() -> None:
    """The "before" loss and the module's loss are the same number (only the cost differs)."""
    torch.manual_seed(0)
    module = SASRecModule(num_items=40, max_len=12, d_model=16, n_layers=1).eval()
    windows = [np.array([3, 5, 7, 9]), np.array([4, 2]), np.array([1, 8, 8, 6, 39, 40, 2])]
    dynamic = TrainSessions.collate(windows)
    padded = TrainSessions.collate(windows, 11)
    assert padded["item_ids"].shape == (3, 11)
    with pytest.raises(ValueError, match="width 5 < longest window's 6 input positions"):
        TrainSessions.collate(windows, 5)
    expected = module.loss(dynamic["item_ids"], dynamic["targets"])
    for batch in (dynamic, padded):
        got = throughput.all_positions_ce(module, batch["item_ids"], batch["targets"])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_throughput_bench_on_tiny_data(compose_cfg: Callable[..., DictConfig]) -> None:
    cfg = compose_cfg(
        "bench_train",
        [
            "data=synthetic",
            *TINY_GENERATOR,
            *TINY_MODEL,
            "data.datamodule.batch_size=16",
            "steps=3",
            "warmup_steps=1",
            "num_threads=1",
        ],
    )
    report = throughput.run_throughput_bench(cfg)
    results = report["results"]
    assert list(results) == list(throughput.VARIANTS)
    # every variant trains on the same windows: same sequences and real target positions
    assert len({r["sequences"] for r in results.values()}) == 1
    assert len({r["positions"] for r in results.values()}) == 1
    # windows hold up to max_len + 1 items: inputs and targets are max_len = 50 wide
    assert results["padded_all_positions"]["padded_positions"] == 3 * 16 * 50
    # bucketing pads less than random batches padded to their longest window
    assert (
        results["length_bucketing"]["padded_positions"]
        <= results["dynamic_padding"]["padded_positions"]
        < results["padded_all_positions"]["padded_positions"]
    )
    assert all(np.isfinite(r["final_loss"]) and r["sequences_per_s"] > 0 for r in results.values())
    saved = json.loads(Path(cfg.report_dir, "throughput.json").read_text())
    assert saved["speedup_after_vs_before"] == pytest.approx(
        results["length_bucketing"]["sequences_per_s"]
        / results["padded_all_positions"]["sequences_per_s"]
    )
    markdown = Path(cfg.report_dir, "throughput.md").read_text()
    assert "| length_bucketing |" in markdown and "x before" in markdown


@pytest.mark.parametrize("override", ["steps=0", "warmup_steps=-1"])
def test_throughput_bench_rejects_bad_step_counts(
    compose_cfg: Callable[..., DictConfig], override: str
) -> None:
    cfg = compose_cfg("bench_train", ["data=synthetic", override])
    with pytest.raises(ValueError, match="need steps >= 1 and warmup_steps >= 0"):
        throughput.run_throughput_bench(cfg)


def test_throughput_bench_rejects_unknown_variant(compose_cfg: Callable[..., DictConfig]) -> None:
    cfg = compose_cfg("bench_train", ["data=synthetic", "variants=[fast_mode]"])
    with pytest.raises(ValueError, match="unknown variant"):
        throughput.run_throughput_bench(cfg)

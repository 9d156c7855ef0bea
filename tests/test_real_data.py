"""The pipeline on the real files under $SEQREC_DATA_DIR (CI sets it; fails there if missing)."""

from collections.abc import Callable

import pytest
from omegaconf import DictConfig

from conftest import TINY_MODEL, real_data_dir
from seqrec import pipeline

pytestmark = [pytest.mark.real_data, pytest.mark.slow]


def test_benchmark_prepare_train_slice_and_full_test_eval(
    compose_cfg: Callable[..., DictConfig],
) -> None:
    data_dir = real_data_dir()
    assert (data_dir / "retailrocket" / "gcegnn_benchmark" / "train_sessions.tsv").is_file()
    common = ["data=retailrocket_benchmark", f"paths.external_data_dir={data_dir}"]
    stats = pipeline.prepare(compose_cfg("prepare", common))
    assert stats["train_file"]["num_sessions"] == 126_168
    assert stats["train_file"]["num_events"] == 685_984
    assert stats["num_items"] == 36_968
    assert stats["num_test_examples"] == 15_132
    # whole test sessions (test_sessions.tsv) are kept for the widget replay only
    assert stats["test_sessions"]["num_sessions"] == 4_775
    assert stats["test_sessions"]["num_events"] == 24_682
    # the last 10% of train sessions (file order) are validation
    assert stats["valid_sessions"]["num_sessions"] == round(126_168 * 0.1)

    result = pipeline.train(
        compose_cfg(
            "train",
            [
                *common,
                *TINY_MODEL,
                "trainer=cpu",
                "trainer.max_epochs=1",
                "trainer.limit_train_batches=8",
                "trainer.limit_val_batches=2",
                "trainer.enable_progress_bar=false",
                "num_threads=1",
            ],
        )
    )
    assert result["global_step"] == 8
    report = pipeline.evaluate(compose_cfg("eval", common))
    assert report["num_examples"] == 15_132 and report["num_items"] == 36_968
    rpop = report["results"]["RepeatPop"]
    # repeat-aware popularity on this split is a published reference figure (Recall@20 0.3908,
    # MRR@20 0.2596, trained on the whole train file); ours fits on the 90% training part.
    assert 0.36 < rpop["recall@20"] < 0.42 and 0.24 < rpop["mrr@20"] < 0.28
    assert report["results"]["Pop"]["recall@20"] < 0.05


def test_raw_events_sample(compose_cfg: Callable[..., DictConfig]) -> None:
    data_dir = real_data_dir()
    stats = pipeline.prepare(
        compose_cfg("prepare", ["data=retailrocket_sample", f"paths.external_data_dir={data_dir}"])
    )
    read = stats["read"]
    assert read["num_rows_read"] == 9_385
    assert read["num_rows_other_event_type"] == 263 + 46
    assert (
        read["num_rows_kept"] + read["num_rows_other_event_type"] + read["num_duplicate_rows"]
        == 9_385
    )
    assert stats["num_items"] > 0
    for part in ("train_sessions", "valid_sessions", "test_sessions"):
        assert stats[part]["session_len_median"] >= 2


def test_yoochoose_sessionrec_prepare(compose_cfg: Callable[..., DictConfig]) -> None:
    data_dir = real_data_dir()
    assert (data_dir / "yoochoose" / "rsc15_100k").is_dir()
    stats = pipeline.prepare(
        compose_cfg("prepare", ["data=yoochoose_rsc15_100k", f"paths.external_data_dir={data_dir}"])
    )
    # figures of the shipped files (PROVENANCE.md): train_full 70,278 clicks / 17,794 sessions /
    # 2,933 items; test 13,568 clicks in 3,416 sessions -> 13,568 - 3,416 next-item examples
    assert stats["num_items"] == 2_933
    assert stats["train_sessions"]["num_sessions"] == 13_629
    assert stats["train_sessions"]["num_events"] == 53_254
    assert stats["valid_sessions"]["num_sessions"] == 17_794 - 13_629
    assert stats["num_test_examples"] == 13_568 - 3_416
    assert stats["num_valid_examples"] == 16_539 - 4_084

from collections.abc import Callable
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import DictConfig

from seqrec.lit_module import SASRecModule

PRIMARY = ["train", "prepare", "eval", "export"]
DATA = ["synthetic", "retailrocket", "retailrocket_sample", "retailrocket_benchmark"]


@pytest.mark.parametrize("config_name", PRIMARY)
@pytest.mark.parametrize("data", DATA)
def test_every_primary_config_composes(
    compose_cfg: Callable[..., DictConfig], config_name: str, data: str
) -> None:
    cfg = compose_cfg(config_name, [f"data={data}"])
    assert cfg.data.name == data
    assert cfg.data.max_len == 50
    assert cfg.data.source in ("events", "benchmark")


def test_experiment_and_trainers_compose(compose_cfg: Callable[..., DictConfig]) -> None:
    cfg = compose_cfg("train", ["experiment=retailrocket_sasrec"])
    assert cfg.data.name == "retailrocket_benchmark"
    assert cfg.model.max_len == cfg.data.max_len
    assert compose_cfg("train", ["trainer=gpu"]).trainer.precision == "bf16-mixed"
    assert compose_cfg("train", ["trainer=cpu"]).trainer.accelerator == "cpu"
    assert compose_cfg("train", ["debug=fast"]).trainer.fast_dev_run == 2


def test_model_and_trainer_instantiate(compose_cfg: Callable[..., DictConfig]) -> None:
    cfg = compose_cfg("train", ["trainer=cpu", "model.d_model=16"])
    module = instantiate(cfg.model, num_items=42)
    assert isinstance(module, SASRecModule)
    assert module.hparams.num_items == 42 and module.hparams.max_len == 50
    trainer = instantiate(
        cfg.trainer, logger=False, callbacks=[instantiate(c) for c in cfg.callbacks.values()]
    )
    assert trainer.max_epochs == cfg.trainer.max_epochs


def test_a_missing_checkpoint_is_named(
    tmp_path: Path, compose_cfg: Callable[..., DictConfig]
) -> None:
    """evaluate / export with a wrong ckpt_path: our message, not fsspec's from inside Lightning."""
    from seqrec.pipeline import resolve_ckpt

    missing = tmp_path / "nope.ckpt"
    cfg = compose_cfg("eval", [f"ckpt_path={missing}"])
    with pytest.raises(FileNotFoundError, match=rf"ckpt_path={missing}: not found \(expected a"):
        resolve_ckpt(cfg)
    cfg = compose_cfg("eval", [f"ckpt_path={tmp_path}"])
    with pytest.raises(FileNotFoundError, match=r": a directory \(expected a .ckpt file\)"):
        resolve_ckpt(cfg)
    # evaluate checks the path before it loads (here: generates) the data set
    from seqrec.pipeline import evaluate

    with pytest.raises(FileNotFoundError, match=rf"ckpt_path={missing}: not found"):
        evaluate(compose_cfg("eval", ["data=synthetic", f"ckpt_path={missing}"]))
    assert not any(tmp_path.rglob("*.parquet")) and not any(tmp_path.rglob("*.txt"))
    (tmp_path / "ok.ckpt").write_bytes(b"")
    assert resolve_ckpt(compose_cfg("eval", [f"ckpt_path={tmp_path / 'ok.ckpt'}"])) == (
        tmp_path / "ok.ckpt"
    )

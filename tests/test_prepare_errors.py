"""Preparation refuses to write an empty split and says which rule emptied it."""

from collections.abc import Callable

import pytest
from omegaconf import DictConfig

from conftest import TINY_GENERATOR
from seqrec.pipeline import EmptyDataError, prepare


def test_too_short_period_for_two_holdouts(compose_cfg: Callable[..., DictConfig]) -> None:
    tiny = [o for o in TINY_GENERATOR if ".days=" not in o]
    overrides = ["data=synthetic", *tiny, "data.generator.days=10"]
    with pytest.raises(
        EmptyDataError,
        match=r"span 10.0 days; two holdouts of 7 days leave no training sessions. Lower data.holdout_days",
    ):
        prepare(compose_cfg("prepare", overrides))


def test_filters_removing_everything(compose_cfg: Callable[..., DictConfig]) -> None:
    overrides = ["data=synthetic", *TINY_GENERATOR, "data.min_session_len=1000"]
    with pytest.raises(EmptyDataError, match="no sessions left after sessionizing and filtering"):
        prepare(compose_cfg("prepare", overrides))

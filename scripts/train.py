"""Hydra entry point: `python scripts/train.py [overrides]` -> `seqrec.pipeline.train`.

Returns the best validation MRR@20 from the Hydra main function, so a multirun sweeper (Optuna,
see conf/hparams_search/) can optimise it: `python scripts/train.py -m hparams_search=...`.
"""

import hydra
from omegaconf import DictConfig

from seqrec import pipeline


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    result = pipeline.train(cfg)
    print(pipeline.summarize("train", result))
    # None when no checkpoint was kept: the sweeper then counts the trial as failed
    return result["best_val_mrr@20"]


if __name__ == "__main__":
    main()

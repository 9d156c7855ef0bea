"""Hydra entry point: `python scripts/train.py [overrides]` -> `seqrec.pipeline.train`."""

import hydra
from omegaconf import DictConfig

from seqrec import pipeline


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    result = pipeline.train(cfg)
    print(pipeline.summarize("train", result))


if __name__ == "__main__":
    main()

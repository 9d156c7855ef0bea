"""Hydra entry point: `python scripts/prepare_data.py [overrides]` -> `seqrec.pipeline.prepare`."""

import hydra
from omegaconf import DictConfig

from seqrec import pipeline


@hydra.main(version_base="1.3", config_path="../conf", config_name="prepare")
def main(cfg: DictConfig) -> None:
    result = pipeline.prepare(cfg)
    print(pipeline.summarize("prepare", result))


if __name__ == "__main__":
    main()

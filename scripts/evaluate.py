"""Hydra entry point: `python scripts/evaluate.py [overrides]` -> `seqrec.pipeline.evaluate`."""

import hydra
from omegaconf import DictConfig

from seqrec import pipeline


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    result = pipeline.evaluate(cfg)
    print(pipeline.summarize("evaluate", result))


if __name__ == "__main__":
    main()

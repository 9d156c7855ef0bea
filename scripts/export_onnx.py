"""Hydra entry point: `python scripts/export_onnx.py [overrides]` -> `seqrec.pipeline.export`."""

import hydra
from omegaconf import DictConfig

from seqrec import pipeline


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    result = pipeline.export(cfg)
    print(pipeline.summarize("export", result))


if __name__ == "__main__":
    main()

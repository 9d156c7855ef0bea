"""Hydra entry point: `python scripts/export_onnx.py [overrides]` -> `seqrec.pipeline.export`."""

import logging

import hydra
from omegaconf import DictConfig

from seqrec import pipeline


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    # the dynamo exporter's libraries log every pass at INFO; keep the demo output readable
    for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch._dynamo", "torch.export"):
        logging.getLogger(name).setLevel(logging.WARNING)
    result = pipeline.export(cfg)
    print(pipeline.summarize("export", result))


if __name__ == "__main__":
    main()

"""Quality report: SASRec and every baseline on one split -> artifacts/reports/<dataset>/quality.*

    python scripts/bench_quality.py data=retailrocket_benchmark num_threads=1
    python scripts/bench_quality.py data=synthetic train=true 'train_overrides=["trainer=cpu"]'

See ``seqrec.report`` for the protocol and ``conf/bench_quality.yaml`` for the options.
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from seqrec import pipeline, report

# Overrides of the bench run that the train run must share (same data, paths and seed).
SHARED_KEYS = ("data", "paths", "seed", "num_threads")


def train_overrides(cfg: DictConfig) -> list[str]:
    """Overrides for the train config: this run's data choice and shared overrides, then extras."""
    hydra_cfg = HydraConfig.get()
    shared = [
        o
        for o in hydra_cfg.overrides.task
        if o.lstrip("+~").split("=")[0].split(".")[0] in SHARED_KEYS
    ]
    choice = (
        []
        if any(o.startswith("data=") for o in shared)
        else [f"data={hydra_cfg.runtime.choices.data}"]
    )
    return [*choice, *shared, *cfg.train_overrides]


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench_quality")
def main(cfg: DictConfig) -> None:
    train_cfg = None
    if cfg.train:
        train_cfg = hydra.compose(config_name="train", overrides=train_overrides(cfg))
        print(f"training first: scripts/train.py {' '.join(train_overrides(cfg))}")
    result = report.run_quality_bench(cfg, train_cfg)
    if result.get("train_result"):
        print(pipeline.summarize("train", result["train_result"]))
    print(f"\n{report.quality_markdown(result)}")


if __name__ == "__main__":
    main()

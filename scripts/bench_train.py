"""Training throughput before and after the speed work -> artifacts/reports/<dataset>/throughput.*

    python scripts/bench_train.py                                  # RetailRocket benchmark
    python scripts/bench_train.py data=synthetic steps=5           # seconds

See ``seqrec.throughput`` for the variants and ``conf/bench_train.yaml`` for the options.
"""

import hydra
from omegaconf import DictConfig

from seqrec import pipeline, throughput  # noqa: F401 - pipeline registers the run-dir resolver


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench_train")
def main(cfg: DictConfig) -> None:
    report = throughput.run_throughput_bench(cfg)
    print(throughput.throughput_markdown(report))
    print("wrote " + ", ".join(report["paths"]))


if __name__ == "__main__":
    main()

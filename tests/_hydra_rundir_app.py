"""A do-nothing Hydra app over the project's configs: prints the run directory Hydra created.

Used by test_resume.py to start two runs at the same moment (the real scripts would also work but
take seconds to import torch)."""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import seqrec.pipeline  # noqa: F401  (registers the seqrec_pid resolver used by conf/hydra)


@hydra.main(version_base="1.3", config_path="../conf", config_name="prepare")
def main(cfg: DictConfig) -> None:
    print(HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()

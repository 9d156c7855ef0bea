"""Replay real test sessions click by click through the exported model, as the widget would.

    python scripts/replay_widget.py data=retailrocket_benchmark      # after export_onnx.py
    python scripts/replay_widget.py                                  # demo shop (make demo)

Reports the share of clicks whose next click was in the strip, how often the strip changes and
the latency of each call -> artifacts/reports/<dataset>/replay.{json,md}. See ``seqrec.replay``.
"""

import hydra
from omegaconf import DictConfig

from seqrec import pipeline, replay  # noqa: F401 - pipeline registers the run-dir resolver


@hydra.main(version_base="1.3", config_path="../conf", config_name="replay")
def main(cfg: DictConfig) -> None:
    report = replay.run_replay(cfg)
    print(replay.replay_markdown(report))
    print("wrote " + ", ".join(report["paths"]))


if __name__ == "__main__":
    main()

"""seqrec: session-based next-item recommendation.

Importing any part of seqrec turns off onnxruntime's usage telemetry unless the process already
chose: onnxruntime 1.29 and later, on Linux and macOS, write a device id and an event cache
under ``~/.cache/Microsoft/DeveloperTools/.onnxruntime`` and upload process, model and error
events, unless ``ORT_DISABLE_TELEMETRY=1`` is set before onnxruntime starts. A recommender
serving shoppers should not send anything out by default; set ``ORT_DISABLE_TELEMETRY=0``
before importing seqrec to leave onnxruntime's default on. (A process that created an
onnxruntime session before importing seqrec has already decided.)
"""

import os

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"

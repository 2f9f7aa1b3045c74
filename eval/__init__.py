"""Measure any artifact: task metrics, size, latency (PyTorch and ONNX Runtime).

Importing this package registers the ``evaluate`` stage.
"""

from slimtune.eval.stage import EvaluateConfig, evaluate_artifact

__all__ = ["EvaluateConfig", "evaluate_artifact"]

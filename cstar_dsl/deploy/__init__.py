"""Deployment: the saved model and `cstar_dsl.load` (``artifacts``), ONNX / TorchScript / pt2 export,
inference-time graph rewrites, and CPU latency measurement."""

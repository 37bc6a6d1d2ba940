"""headserve's machine-learning core: backbones, preprocessing, trunks, heads, ONNX export and runtime.

Importable and testable without gRPC; never imports `service`.
"""

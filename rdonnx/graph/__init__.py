"""ONNX models: load and write (external data, IR fit given by the caller), prunable weights,
layer discovery. Knows nothing of `.rdonnx` files or ONNX Runtime."""

"""ONNX Runtime sessions and devices, calibration data, distortion and task metrics, replay."""

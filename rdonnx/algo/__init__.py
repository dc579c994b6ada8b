"""Pure algorithms on arrays: in-layer criteria, quantizers, k-means, OBS / GPTQ, PQI and CKA
math, the layer-input layout. No ONNX model, no ONNX Runtime."""

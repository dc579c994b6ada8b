"""The CUDA path: runs only where onnxruntime has a working CUDA execution provider."""

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import rdonnx
from rdonnx.flow.config import CompressConfig

ROOT = Path(__file__).resolve().parent.parent
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a GPU (CPU machines: the CPU "
                    "fallback and the --device cuda error are tested in "
                    "test_runtime_session.py)")
def test_rd_compress_runs_on_cuda_and_matches_cpu(tmp_path):
    config = CompressConfig.of(grid=(1.0, 0.5, 0.2, 0.1, 0.05), layer_distortion=False)
    results = {}
    for device in ("cuda", "cpu"):
        result = rdonnx.compress(ROOT / "models/digits_cnn.onnx", rate=0.3,
                                 calib=ROOT / "models/digits_calib.npz",
                                 config=config.updated(device=device))
        results[device] = result
    assert results["cuda"].report.device == "CUDAExecutionProvider"
    assert results["cpu"].report.device == "CPUExecutionProvider"
    gpu, cpu = results["cuda"].report.calibration, results["cpu"].report.calibration
    assert gpu.nmse == pytest.approx(cpu.nmse, rel=1e-3, abs=1e-6)
    for name in results["cpu"].weights:  # same curves up to float noise: same allocation
        kept_gpu = np.count_nonzero(results["cuda"].weights[name])
        kept_cpu = np.count_nonzero(results["cpu"].weights[name])
        assert abs(kept_gpu - kept_cpu) <= 0.02 * results["cpu"].weights[name].size

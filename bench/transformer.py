"""The benchmarks' transformer: a small encoder trained on the digits, exported to ONNX.

Each 8x8 image is read as 8 tokens of 8 pixels: token embedding, learned positions, two
`nn.TransformerEncoderLayer`s (attention + feed-forward), mean pooling, a linear classifier.
It takes the bundled data files as they are (`input` [batch, 1, 8, 8]).
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent


def _training_script():
    spec = importlib.util.spec_from_file_location("train_digits",
                                                  ROOT / "models" / "train_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class DigitsTransformer(nn.Module):
    def __init__(self, width: int = 64, heads: int = 4, layers: int = 2):
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.position = nn.Parameter(torch.zeros(1, 8, width))
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=2 * width,
                                           dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.reshape(x.shape[0], 8, 8)) + self.position
        return self.head(self.encoder(tokens).mean(dim=1))


def build(path: Path, epochs: int = 40) -> float:
    """Train (deterministically), export to `path`; returns the torch test accuracy."""
    script = _training_script()
    script.set_determinism(0)
    x_train, y_train, x_test, y_test = script.load_data()
    model = script.train(DigitsTransformer(), x_train, y_train, epochs=epochs, lr=2e-3)
    with torch.no_grad():
        accuracy = float((model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.from_numpy(x_test[:2]),), str(path),
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)
    proto = onnx.load(str(path))
    proto.ir_version = 8
    onnx.save(proto, str(path))
    return accuracy


if __name__ == "__main__":
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    path = out / "digits_transformer.onnx"
    print(f"test accuracy {build(path):.2%}")
    print(np.unique([n.op_type for n in onnx.load(str(path)).graph.node]))

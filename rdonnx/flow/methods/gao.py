"""`--method gao` (Gao et al.): settings imposed on the uniform allocator."""

from __future__ import annotations

from dataclasses import replace

from rdonnx.flow.config import CompressConfig


def settings(config: CompressConfig) -> CompressConfig:
    """Gao et al.'s setting for `--method gao`: one density in every layer (the uniform
    allocator), entries scored by w^2 * E[x^2] (the activation criterion) and, when values
    are quantized, the activation-weighted k-means quantizer."""
    coding = config.coding
    return replace(config, prune=replace(config.prune, criterion="activation"),
                   coding=replace(coding, quantizer="kmeans" if coding.quantized
                                  else coding.quantizer))

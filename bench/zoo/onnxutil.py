"""Exporting and saving ONNX files the installed onnxruntime loads."""

from __future__ import annotations

from pathlib import Path

import onnx

IR_VERSION = 10  # onnx 1.23 writes IR 14 by default, which onnxruntime 1.32 refuses


def save(model: onnx.ModelProto, path: Path, external: bool = False) -> Path:
    """Save with IR version 10 (opset imports unchanged); external data beside it if asked or
    if the model is over 1.8 GB."""
    model.ir_version = min(model.ir_version, IR_VERSION) if model.ir_version else IR_VERSION
    external = external or model.ByteSize() > 1_800_000_000
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    return path


def export_torch(module, args: tuple, path: Path, input_names: list[str],
                 output_names: list[str], dynamic_axes: dict, opset: int = 17,
                 external: bool = False) -> Path:
    """torch.onnx.export (TorchScript exporter), then re-save with IR version 10."""
    import torch

    tmp = path.with_suffix(".export.onnx")
    with torch.no_grad():
        torch.onnx.export(module, args, str(tmp), input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes,
                          opset_version=opset, dynamo=False, do_constant_folding=True)
    model = onnx.load(str(tmp))
    save(model, path, external=external)
    for p in tmp.parent.glob(tmp.name + "*"):
        p.unlink()
    for p in tmp.parent.glob("*.export.onnx.data"):
        p.unlink()
    return path


def keep_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """Keep only the named graph outputs (in that order)."""
    by_name = {o.name: o for o in model.graph.output}
    kept = [by_name[n] for n in names]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    return model

"""ONNX Runtime sessions: device choice with proof, overridable weights, extra outputs."""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import onnx

from rdonnx.causes import caused
from rdonnx.choices import DEFAULT_DEVICE, DEVICES
from rdonnx.errors import UsageError
from rdonnx.graph.model import Model, fit_ir_version, slot_array, tensor_slots, uses_external_data
from rdonnx.graph.weights import Weight

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
INSTALL_HINT = ("onnxruntime is not installed: run pip install 'rdonnx[cpu]' "
                "(or 'rdonnx[gpu]' for CUDA; never both)")


def import_onnxruntime() -> ModuleType:
    """Import onnxruntime, or explain in one line how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise UsageError(INSTALL_HINT) from None
    return onnxruntime


def _probe_model() -> onnx.ModelProto:
    """A one-node model for asking onnxruntime what it accepts."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])], "probe",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])


@functools.lru_cache(maxsize=1)
def max_runtime_ir_version() -> int:
    """The newest IR version the installed onnxruntime loads (probed once)."""
    ort = import_onnxruntime()
    probe = _probe_model()
    options = ort.SessionOptions()
    options.log_severity_level = 4
    for ir in range(onnx.IR_VERSION, 6, -1):
        probe.ir_version = ir
        try:
            ort.InferenceSession(probe.SerializeToString(), options, providers=[CPU])
            return ir
        except Exception:  # noqa: BLE001 - any refusal means "too new"
            continue
    return 7


def cuda_status() -> str:
    """Whether the CUDA execution provider really runs a model here ("yes" or "no (why)")."""
    probe = _probe_model()
    probe.ir_version = 8
    try:
        _, device = create_session(probe.SerializeToString(), Model(probe), "auto")
    except UsageError as exc:
        return f"no ({exc})"
    return "yes" if device.provider == CUDA else f"no ({device.notice})"


@dataclass(frozen=True)
class Device:
    """The execution provider that really runs the sessions, and any notice about the choice."""

    provider: str
    notice: str | None = None

    @property
    def ort_device(self) -> str:
        return "cuda" if self.provider == CUDA else "cpu"


def _options(ort: ModuleType) -> object:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: overridable-initializer warnings are expected
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.use_deterministic_compute = True
    return options


def create_session(payload: bytes, model: Model, device: str | Device,
                   optimize: bool = False, threads: int = 0,
                   initializers: Mapping[str, object] | None = None) -> tuple[object, Device]:
    """A session on `device` ("auto", "cpu", "cuda" or a resolved `Device`); `optimize`:
    all of ORT's graph optimisations (outputs equal up to float rounding); `threads`: intra-op
    threads (0: ORT's default, every core); `initializers`: OrtValues (kept alive by the
    caller) for the model's data-less external initializers."""
    ort = import_onnxruntime()
    options = _options(ort)
    if initializers:
        options.add_external_initializers(list(initializers), list(initializers.values()))
    if optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = max(int(threads), 0)
    if model.base_dir is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         str(model.base_dir))
    wanted = device.provider if isinstance(device, Device) else device
    if wanted not in (*DEVICES, CUDA, CPU):
        raise UsageError(f"unknown device {wanted!r}; choose one of {', '.join(DEVICES)}")
    notice = None
    if wanted in ("auto", "cuda", CUDA):
        if CUDA in ort.get_available_providers():
            try:
                session = ort.InferenceSession(payload, options, providers=[CUDA, CPU])
                if session.get_providers()[0] == CUDA:
                    return session, Device(CUDA)
                reason = "the CUDA execution provider did not initialise"
            except Exception as exc:  # noqa: BLE001 - report why CUDA is unusable
                reason = f"the CUDA execution provider failed ({str(exc)[:160]})"
        else:
            reason = "onnxruntime has no CUDA execution provider (install 'rdonnx[gpu]')"
        if wanted != "auto":
            raise UsageError(f"--device cuda: {reason}; use --device cpu or auto")
        notice = f"{reason}; running on the CPU"
    try:
        session = ort.InferenceSession(payload, options, providers=[CPU])
    except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated types
        raise caused("onnxruntime cannot load the model", exc) from None
    return session, Device(CPU, notice if not isinstance(device, Device) else None)


def measurement_model(model: Model, weights: Sequence[Weight],
                      extra_outputs: Sequence[str] = ()) -> onnx.ModelProto:
    """A copy of the model whose weights are main-graph inputs, so each run can feed new ones.

    Weights in subgraphs or Constant nodes move to the main graph too (subgraphs see outer
    names). `extra_outputs` names intermediate tensors to return as well.
    """
    proto = copy.deepcopy(model.proto)
    slots = tensor_slots(proto)
    graph = proto.graph
    for weight in weights:
        slot = slots[weight.name]
        slot.detach()
        for value in list(graph.input):
            if value.name == weight.name:
                graph.input.remove(value)
        graph.input.append(onnx.helper.make_tensor_value_info(
            weight.name, slot.tensor.data_type, list(weight.shape)))
    for name in extra_outputs:
        graph.output.append(onnx.ValueInfoProto(name=name))
    fit_ir_version(proto, max_runtime_ir_version())
    return proto


def ortvalue(array: np.ndarray, data_type: int, device: str = "cpu") -> object:
    """`array` as an OrtValue of ONNX element type `data_type` (bfloat16 through its bits;
    those stay on the CPU and ONNX Runtime copies them where they are needed)."""
    ort = import_onnxruntime()
    array = np.ascontiguousarray(array.astype(onnx.helper.tensor_dtype_to_np_dtype(data_type),
                                              copy=False))
    if data_type == onnx.TensorProto.BFLOAT16:
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array.view(np.uint16), data_type)
    return ort.OrtValue.ortvalue_from_numpy(array, device, 0)


class Runner:
    """One ONNX Runtime session that runs the model with any variant of its prunable weights."""

    def __init__(self, model: Model, weights: Sequence[Weight],
                 device: str | Device = DEFAULT_DEVICE, extra_outputs: Sequence[str] = (),
                 proto: onnx.ModelProto | None = None):
        """`proto`: the model's `measurement_model` for these weights, when the caller built
        it already (it keeps it: downstream probes slice it); extra outputs are added to the
        session only."""
        self.proto = proto if proto is not None else measurement_model(model, weights)
        if any(uses_external_data(t) for t in self.proto.graph.initializer) and \
                model.base_dir is None:
            raise UsageError("the model keeps tensors in external data: load it from its path")
        self.model = model
        graph_outputs = self.proto.graph.output
        count = len(graph_outputs)
        for name in extra_outputs:
            graph_outputs.append(onnx.ValueInfoProto(name=name))
        try:
            payload = self.proto.SerializeToString()
        finally:
            del graph_outputs[count:]
        self.session, self.device = create_session(payload, model, device)
        self.output_names = [o.name for o in model.proto.graph.output]
        self.extra_outputs = list(extra_outputs)
        slots = tensor_slots(model.proto)
        self._types = {w.name: slots[w.name].tensor.data_type for w in weights}
        self._weights = {w.name: self.weight_value(w.name, slot_array(model, slots[w.name]))
                         for w in weights}

    def weight_value(self, name: str, array: np.ndarray) -> object:
        """`array` as an OrtValue on the session's device, to feed in place of weight `name`."""
        return ortvalue(array, self._types[name], self.device.ort_device)

    def run(self, feed: Mapping[str, np.ndarray],
            weights: Mapping[str, object] | None = None,
            outputs: Sequence[str] | None = None) -> list[np.ndarray]:
        """Run one batch; `weights` (arrays, or values from `weight_value`) replace some
        prunable weights for this run only."""
        full = dict(feed)
        full.update(self._weights)
        for name, value in (weights or {}).items():
            full[name] = self.weight_value(name, value) if isinstance(value, np.ndarray) \
                else value
        names = list(outputs) if outputs is not None else self.output_names
        return run_session(self.session, names, full, self.device)

    @property
    def weights(self) -> Mapping[str, object]:
        """The original value of every overridable weight, ready to feed."""
        return self._weights

    def weight_bytes(self, name: str) -> int:
        """Bytes of weight `name`'s value."""
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(self._types[name])).itemsize
        return int(np.prod(self._weights[name].shape())) * itemsize



def run_session(session: object, names: Sequence[str], feed: Mapping[str, object],
                device: Device) -> list[np.ndarray]:
    """Run `session`: on CUDA through I/O binding (`bound_run`), elsewhere a plain run."""
    try:
        if device.provider == CUDA:
            return bound_run(session, names, feed, device.ort_device)
        return session.run(list(names), dict(feed))
    except Exception as exc:  # noqa: BLE001 - ORT's errors carry no common base type
        raise caused("onnxruntime failed to run the model", exc) from None


def bound_run(session: object, names: Sequence[str], feed: Mapping[str, object],
              device: str) -> list[np.ndarray]:
    """One run through I/O binding: OrtValues already on `device` (weights, cached
    activations) are bound where they are, arrays are copied there once, outputs come back
    to the host."""
    binding = session.io_binding()
    for name, value in feed.items():
        if isinstance(value, np.ndarray):
            value = ortvalue(value, onnx.helper.np_dtype_to_tensor_dtype(value.dtype), device)
        binding.bind_ortvalue_input(name, value)
    for name in names:
        binding.bind_output(name, "cpu")
    session.run_with_iobinding(binding)
    return binding.copy_outputs_to_cpu()

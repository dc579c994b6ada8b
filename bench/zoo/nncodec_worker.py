"""Run inside NNCodec's own virtual environment: code an .npz of float tensors with NNCodec
(MPEG NNR reference codec) at one qp and write the decoded tensors and the bitstream size.

    <nncodec-venv>/bin/python nncodec_worker.py IN.npz OUT.npz QP
"""

import importlib.abc
import importlib.machinery
import json
import sys
import types

import numpy as np


class _Stub(types.ModuleType):
    """Any attribute is another stub: stands in for torchvision, whose PyPI wheel needs CUDA
    torch libraries; NNCodec imports it only for its dataset loaders, unused here."""

    __path__: list = []

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Stub(f"{self.__name__}.{name}")

    def __call__(self, *args, **kwargs):
        return _Stub(self.__name__ + "()")

    def __mro_entries__(self, bases):
        return (object,)


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return _Stub(spec.name)

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Finder())
from nncodec import nnc  # noqa: E402

src, dst, qp = sys.argv[1], sys.argv[2], int(sys.argv[3])
with np.load(src) as z:
    params = {k: z[k].astype(np.float32) for k in z.files}
bs = nnc.compress(params, bitstream_path=dst + ".nnc", qp=qp, return_bitstream=True,
                  verbose=False)
decoded = nnc.decompress(bs)
np.savez(dst, **{k: np.asarray(decoded[k], np.float32).reshape(params[k].shape) for k in params})
print(json.dumps({"bitstream_bytes": len(bs)}))

"""Tensors across the Triton python-backend boundary, shared by the repository's python
models (model.py of the cpu flavour's graphs, and the caption loop). `make export` copies
this file next to every python model.py (<model>/1/pb_tensors.py).

Tensors cross the boundary through DLPack when numpy >= 2: the backend stubs of Triton
2.51 (the nvidia-pytriton wheel) are built with a pybind11 that predates numpy 2's ABI,
and their numpy path reads a numpy 2 array's item size wrongly, so inputs read back as the
first element repeated and outputs arrive with 0 bytes (found by running the real server).
DLPack carries shape and dtype without that code.

Dependencies: numpy and the standard library (ctypes).
"""

from __future__ import annotations

import ctypes

import numpy as np
import triton_python_backend_utils as pb_utils

NUMPY_TYPES = {
    "TYPE_BOOL": np.bool_,
    "TYPE_UINT8": np.uint8,
    "TYPE_INT8": np.int8,
    "TYPE_INT16": np.int16,
    "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64,
    "TYPE_FP16": np.float16,
    "TYPE_FP32": np.float32,
    "TYPE_FP64": np.float64,
}


USE_DLPACK = int(np.__version__.split(".")[0]) >= 2


class _Capsule:
    """Hands a DLPack capsule to np.from_dlpack, which wants an object with __dlpack__."""

    def __init__(self, capsule) -> None:
        self.capsule = capsule

    def __dlpack__(self, *args, **kwargs):
        return self.capsule

    def __dlpack_device__(self):
        return (1, 0)  # kDLCPU, device 0


def as_numpy(tensor) -> np.ndarray:
    """A request tensor as a numpy array we own (the tensor's memory is Triton's)."""
    if USE_DLPACK and hasattr(tensor, "to_dlpack"):
        return np.array(np.from_dlpack(_Capsule(tensor.to_dlpack())), copy=True)
    return tensor.as_numpy()


# The 2.51 stub renames a consumed capsule "used_dlpack" instead of the protocol's
# "used_dltensor", so numpy's capsule destructor does not recognise it as consumed and
# reports "PyCapsule_GetPointer called with incorrect name" into the server log for every
# output (harmless: the stub frees the tensor itself). Renaming it properly keeps the log clean.
_STUB_USED = b"used_dlpack"
_USED = ctypes.create_string_buffer(b"used_dltensor")  # must outlive every capsule renamed to it
try:
    _capsule_is_valid = ctypes.pythonapi.PyCapsule_IsValid
    _capsule_is_valid.argtypes, _capsule_is_valid.restype = [ctypes.py_object, ctypes.c_char_p], ctypes.c_int
    _capsule_set_name = ctypes.pythonapi.PyCapsule_SetName
    _capsule_set_name.argtypes, _capsule_set_name.restype = [ctypes.py_object, ctypes.c_char_p], ctypes.c_int
except AttributeError:  # not CPython
    _capsule_is_valid = _capsule_set_name = None


def _mark_consumed(capsule) -> None:
    if _capsule_is_valid is not None and _capsule_is_valid(capsule, _STUB_USED):
        _capsule_set_name(capsule, _USED)


def to_tensor(name: str, array: np.ndarray):
    array = np.ascontiguousarray(array)
    if not array.flags.writeable:  # DLPack (before 1.0) cannot export read-only arrays
        array = array.copy()
    if USE_DLPACK and hasattr(pb_utils.Tensor, "from_dlpack"):
        capsule = array.__dlpack__()
        tensor = pb_utils.Tensor.from_dlpack(name, capsule)
        _mark_consumed(capsule)
        return tensor
    return pb_utils.Tensor(name, array)


def error_response(message: str):
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)

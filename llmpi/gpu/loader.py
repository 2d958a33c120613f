"""The one loader of our CUDA kernels: kernels/*.cu -> cupy.RawModule, compiled once per file,
and cuBLAS's GemmEx on CuPy's handle (for llmpi.gpu.bf16).

NVRTC compiles a file the first time one of its kernels is launched on a device;
CuPy keeps the binary in ~/.cupy/kernel_cache, so later processes skip compilation.
"""
import functools
import glob
import os
import re

from ..errors import UserError

OPTIONS = ("-std=c++17",)


@functools.lru_cache(maxsize=None)
def kernel_dir() -> str:
    """llmpi/_kernels in an installed package (setup.py copies them there, headers too), else <repo>/kernels."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the llmpi package
    for d in (os.path.join(here, "_kernels"), os.path.join(os.path.dirname(here), "kernels")):
        if glob.glob(os.path.join(d, "*.cu")):
            return d
    raise UserError(f"CUDA kernel sources not found in {here}/_kernels or the checkout's kernels/; "
                    "reinstall llmpi")


_LOCAL_INCLUDE = re.compile(r'^#include "(\w+\.cuh)"[ \t]*$', re.MULTILINE)


def source(file: str) -> str:
    """kernels/<file> with each `#include "x.cuh"` of a header beside it replaced by that
    header's text: NVRTC then compiles one self-contained string, and CuPy's kernel cache, which
    keys on the source string, sees a header change as a new source."""
    with open(os.path.join(kernel_dir(), file), encoding="utf-8") as f:
        text = f.read()
    return _LOCAL_INCLUDE.sub(lambda m: source(m.group(1)), text)


@functools.lru_cache(maxsize=None)
def module(file: str):
    """The RawModule of kernels/<file> (e.g. 'layernorm.cu')."""
    import cupy
    return cupy.RawModule(code=source(file), options=OPTIONS)


@functools.lru_cache(maxsize=None)
def kernel(file: str, name: str):
    """The RawKernel `name` (an extern "C" entry point) of kernels/<file>."""
    return module(file).get_function(name)


def cublas_gemm_ex(*args):
    """cublasGemmEx(transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype,
    ldc, computeType, algo) on CuPy's cuBLAS handle and current stream; pointers are raw addresses
    (alpha and beta on the host: captured by value in a CUDA graph)."""
    import cupy
    from cupy.cuda import cublas
    handle, stream = cupy.cuda.device.get_cublas_handle(), cupy.cuda.get_current_stream()
    if stream.is_capturing():
        # CuPy refuses every cuBLAS call while a stream captures (its setStream raises), though
        # cuBLAS supports capture (CUDA 12.2+ takes its workspace with cudaMallocAsync): call the
        # library CuPy loaded directly, on CuPy's handle
        library = _captured_cublas()
        _check_cublas(library.cublasSetStream_v2(handle, stream.ptr), "cublasSetStream")
        _check_cublas(library.cublasGemmEx(handle, *args), "cublasGemmEx")
    else:
        cublas.gemmEx(handle, *args)


@functools.lru_cache(maxsize=None)
def _captured_cublas():
    """libcublas through ctypes: the copy CuPy loaded when cublas_gemm_ex imported its binding
    (dlopen finds a loaded library by its soname, so CuPy's handle is valid here)."""
    import ctypes

    import cupy
    major = cupy.cuda.runtime.runtimeGetVersion() // 1000
    library = ctypes.CDLL(f"libcublas.so.{major}")
    pointer, integer = ctypes.c_void_p, ctypes.c_int
    library.cublasSetStream_v2.argtypes = [pointer, pointer]
    library.cublasGemmEx.argtypes = [pointer, integer, integer, integer, integer, integer,
                                     pointer, pointer, integer, integer, pointer, integer, integer,
                                     pointer, pointer, integer, integer, integer, integer]
    for function in (library.cublasSetStream_v2, library.cublasGemmEx):
        function.restype = integer
    return library


def _check_cublas(status, call):
    if status != 0:
        raise RuntimeError(f"{call} failed with cublasStatus_t {status} during CUDA graph capture")

"""kernels/*.cu on the CPU, for tests without a GPU.

Each kernel file is compiled by the host C++ compiler (C++20) against kernel_emulator.h, which
runs every CUDA thread of a block as a host thread with __syncthreads and the warp operations
as barriers; the inline-PTX instructions the kernels use (TF32 rounding, the m16n8k8 TF32
mma, the bf16x2 conversion and the m16n8k16 bf16 mma) become calls into that header.
`install(monkeypatch)` makes llmpi.gpu.loader.kernel hand out these instead of CuPy RawKernels, so
the wrappers in llmpi/gpu/ run their kernels on NumPy arrays (and llmpi.gpu.bf16's GEMMs go to a
NumPy version of cublasGemmEx).
One host thread per CUDA thread is slow: small shapes only.
"""
import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile

import numpy as np

from llmpi.gpu import loader

HEADER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernel_emulator.h")
PTX = [  # (inline PTX statement, the emulator's equivalent)
    (re.compile(r'asm\("cvt\.rna\.tf32\.f32 %0, %1;" : "=r"\((\w+)\) : "f"\((\w+)\)\);'),
     r"\1 = emu_tf32(\2);"),
    (re.compile(r'asm volatile\("mma\.sync\.aligned\.m16n8k8\.row\.col\.f32\.tf32\.tf32\.f32 "\s*"[^"]*"\s*'
                r':\s*"\+f"\((\w+)\[0\]\)[^:]*:\s*"r"\((\w+)\[0\]\),\s*"r"\(\w+\[1\]\),\s*"r"\(\w+\[2\]\),'
                r'\s*"r"\(\w+\[3\]\),\s*"r"\(([^()]*)\),\s*"r"\(([^()]*)\)\);'),
     r"emu_mma(\1, \2, \3, \4);"),
    (re.compile(r'asm\("cvt\.rn\.bf16x2\.f32 %0, %1, %2;" : "=r"\((\w+)\) : "f"\((\w+)\), "f"\((\w+)\)\);'),
     r"\1 = emu_bf16x2(\2, \3);"),
    (re.compile(r'asm volatile\("mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.bf16\.bf16\.f32 "\s*"[^"]*"\s*'
                r':\s*"\+f"\((\w+)\[0\]\)[^:]*:\s*"r"\((\w+)\[0\]\),\s*"r"\(\w+\[1\]\),\s*"r"\(\w+\[2\]\),'
                r'\s*"r"\(\w+\[3\]\),\s*"r"\(([^()]*)\),\s*"r"\(([^()]*)\)\);'),
     r"emu_mma_bf16(\1, \2, \3, \4);"),
]
ENTRY_POINT = re.compile(r'extern "C"\s+void\s+(\w+)\s*\(([^)]*)\)\s*\{')


@functools.lru_cache(maxsize=None)
def compiler():
    """The host C++ compiler if it builds C++20 <barrier>, else None."""
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        return None
    probe = subprocess.run([cxx, "-std=c++20", "-x", "c++", "-fsyntax-only", "-"], input="#include <barrier>\n",
                           capture_output=True, text=True)
    return cxx if probe.returncode == 0 else None


def host_source(file, cxx):
    """kernels/<file> with its inline PTX replaced by the emulator's functions, plus one
    emu_launch_<name>(gx, gy, threads, <the kernel's parameters>) per entry point."""
    src = loader.source(file)
    for pattern, replacement in PTX:
        src = pattern.sub(replacement, src)
    if re.search(r"\basm\b", src):
        raise NotImplementedError(f"{file} has inline PTX that kernel_emulator.py does not know")
    # entry points made by macros exist only after preprocessing
    expanded = subprocess.run([cxx, "-std=c++20", "-E", "-P", "-x", "c++", "-include", HEADER, "-"], input=src,
                              capture_output=True, text=True, check=True).stdout
    launchers = []
    for name, params in ENTRY_POINT.findall(expanded):
        if name.startswith("emu_"):
            continue
        args = ", ".join(re.findall(r"(\w+)\s*(?:,|$)", params))
        launchers.append(f'extern "C" void emu_launch_{name}(unsigned gx, unsigned gy, unsigned threads, {params}) '
                         f"{{ emu_run_grid(gx, gy, threads, [=] {{ {name}({args}); }}); }}")
    return src + "\n" + "\n".join(launchers) + "\n"


@functools.lru_cache(maxsize=None)
def library(file):
    """The compiled shared library of kernels/<file>, cached by content in the temp directory."""
    cxx = compiler()
    src = host_source(file, cxx)
    with open(HEADER) as f:
        key = hashlib.sha256((f.read() + src).encode()).hexdigest()[:16]
    out_dir = os.path.join(tempfile.gettempdir(), "llmpi_kernel_emulator")
    os.makedirs(out_dir, exist_ok=True)
    lib = os.path.join(out_dir, f"{file[:-3]}-{key}.so")
    if not os.path.exists(lib):
        cpp = lib[:-3] + ".cpp"
        with open(cpp, "w") as f:
            f.write(src)
        tmp = f"{lib}.{os.getpid()}"
        subprocess.run([cxx, "-std=c++20", "-O1", "-w", "-shared", "-fPIC", "-pthread", "-include", HEADER,
                        cpp, "-o", tmp], check=True, capture_output=True, text=True)
        os.replace(tmp, lib)  # atomic: a concurrent build of the same key never sees half a file
    return ctypes.CDLL(lib)


def _c_argument(a):
    """The C value of a kernel argument, typed as CuPy would pass it (and as strictly)."""
    if isinstance(a, np.ndarray):  # like a RawKernel, the address of the first element, views ignored
        return ctypes.c_void_p(a.ctypes.data)
    for kind, ctype in ((np.int32, ctypes.c_int32), (np.int64, ctypes.c_int64), (np.float32, ctypes.c_float)):
        if isinstance(a, kind):
            return ctype(a.item())
    raise TypeError(f"kernel argument of type {type(a).__name__}: pass NumPy scalars of the C type")


class EmulatedKernel:
    """Called like a cupy.RawKernel: kernel(grid, block, args)."""

    def __init__(self, file, name):
        self.launch = getattr(library(file), f"emu_launch_{name}")
        self.launch.restype = None

    def __call__(self, grid, block, args):
        gx, gy = (tuple(grid) + (1, 1))[:2]
        threads = block[0]
        if threads % 32 or not 0 < threads <= 1024:
            raise ValueError(f"the emulator runs blocks of a multiple of 32 threads up to 1024, got {threads}")
        self.launch(ctypes.c_uint(gx), ctypes.c_uint(gy), ctypes.c_uint(threads), *[_c_argument(a) for a in args])


CUDA_R_32F, CUDA_R_16BF, CUBLAS_COMPUTE_32F = 0, 14, 68


def _column_major(address, dtype, rows, cols, ld):
    """The (rows, cols) column-major matrix with leading dimension ld at a raw address, as a
    float32 array (bf16 bit patterns widened); a writable view for float32."""
    count = ld * cols
    if dtype == CUDA_R_16BF:
        bits = np.ctypeslib.as_array((ctypes.c_uint16 * count).from_address(address))
        flat = (bits.astype(np.uint32) << 16).view(np.float32)
    elif dtype == CUDA_R_32F:
        flat = np.ctypeslib.as_array((ctypes.c_float * count).from_address(address))
    else:
        raise NotImplementedError(f"cudaDataType {dtype}")
    return flat.reshape(cols, ld).T[:rows, :]


def bf16_bits(x):
    """float values -> their bf16 bit patterns (uint16), round to nearest even as kernels/bf16.cuh."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def gemm_ex(transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype, ldc, compute, algo):
    """cublasGemmEx's documented semantics in NumPy (float64 products): C = alpha op(A) op(B) +
    beta C, all column-major; C is not read when beta is 0; a bf16 C gets the float32 result
    rounded once (finite values only: no NaN handling)."""
    if compute != CUBLAS_COMPUTE_32F or Ctype not in (CUDA_R_32F, CUDA_R_16BF):
        raise NotImplementedError("only fp32 accumulation into fp32 or bf16")
    a = _column_major(A, Atype, *((k, m) if transa else (m, k)), lda)
    b = _column_major(B, Btype, *((n, k) if transb else (k, n)), ldb)
    c = _column_major(C, Ctype, m, n, ldc)
    al, be = ctypes.c_float.from_address(alpha).value, ctypes.c_float.from_address(beta).value
    product = al * ((a.T if transa else a).astype(np.float64) @ (b.T if transb else b))
    result = (product + be * c if be else product).astype(np.float32)
    if Ctype == CUDA_R_32F:
        c[...] = result
        return
    bits = np.ctypeslib.as_array((ctypes.c_uint16 * (ldc * n)).from_address(C)).reshape(n, ldc).T
    bits[:m, :] = bf16_bits(result)


def install(monkeypatch):
    """Route the kernel launches of llmpi/gpu/ to the emulator, and llmpi.gpu.bf16's cuBLAS calls to
    gemm_ex, for one test."""
    monkeypatch.setattr(loader, "kernel", EmulatedKernel)
    monkeypatch.setattr(loader, "cublas_gemm_ex", gemm_ex)

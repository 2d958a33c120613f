"""llmpi: a GPT trained data-parallel under MPI, every pass written by hand."""
import glob
import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


HERE = os.path.dirname(os.path.abspath(__file__))


class build_py_with_kernels(build_py):
    """Copy the top-level kernels/*.cu (and the *.cuh they include) and jobs/*.toml into the built package (as
    llmpi/_kernels and llmpi/_jobs), so an installed, non-editable llmpi finds its CUDA
    sources and job files next to itself."""

    def run(self):
        super().run()
        for folder, pattern, dest in (("kernels", "*.cu", "_kernels"), ("kernels", "*.cuh", "_kernels"),
                                     ("jobs", "*.toml", "_jobs")):
            target = os.path.join(self.build_lib, "llmpi", dest)
            os.makedirs(target, exist_ok=True)
            for src in glob.glob(os.path.join(HERE, folder, pattern)):
                shutil.copy(src, target)

setup(
    name="llmpi",
    version="0.1.0",
    description="Teaching-and-research code for distributed training of language models on MPI",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["llmpi", "llmpi.*"]),
    cmdclass={"build_py": build_py_with_kernels},
    install_requires=[
        "numpy>=1.23",
        "h5py>=3.7",
        "mpi4py>=3.1",
        "tomli-w>=1.0",  # config.toml and checkpoints' job text, written so any string reads back
        "tokenizers>=0.21",  # byte-level BPE (llmpi.data.bpe): trains and encodes offline
        "scipy>=1.9",
        "matplotlib>=3.5",  # llmpi.compare's figures (slurm/compare.sh ends with them)
        "tomli>=2.0; python_version<'3.11'",
        "numba>=0.59",  # the fused CPU kernels (llmpi.cpu); optional at run time: without it the NumPy layers run
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-mpi>=0.6", "pytest-timeout>=2"],
        "mpich": ["mpich"],
        "gpu": ["cupy-cuda12x"],
        "plot": ["matplotlib"],
        "bench": ["torch"],
        "zstd": ["zstandard"],  # .zst inputs to `llmpi.data prepare`
    },
    entry_points={"console_scripts": ["llmpi-train=llmpi.train:main"]},
)

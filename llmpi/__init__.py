"""llmpi: a GPT-style language model written by hand on NumPy/CuPy, trained under MPI."""

__version__ = "0.1.0"

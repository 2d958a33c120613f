"""Data: token files (corpus: prepare them; tokenfile: read them), tokenizers, and which windows
each rank trains on (sampler). The names below are the data API the trainer and tools use."""
from .corpus import default_data_path, ensure_prepared, prepare
from .sampler import STRATEGIES, Sampler, get_batch
from .tokenfile import TokenFile

__all__ = ["STRATEGIES", "Sampler", "TokenFile", "default_data_path", "ensure_prepared", "get_batch", "prepare"]

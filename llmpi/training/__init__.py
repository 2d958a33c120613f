"""Training: the run (run.py: set-up, resume, signals, faults, evaluation, checkpoints), its
loops by `parallel.mode` (sync.py: all-reduce; async_rma.py: one-sided RMA windows; local_sgd.py:
H local steps, then an average), and
checkpoint, metrics and optimizer (with the LR schedule)."""
from .async_rma import train_async
from .local_sgd import train_local
from .sync import train_sync

LOOPS = {"sync": train_sync, "async": train_async, "local": train_local}  # parallel.mode

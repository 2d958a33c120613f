"""`python -m llmpi.sample runs/NAME`: generate text from the newest checkpoint of a run."""
import dataclasses
import sys

import numpy as np

from .cli import ArgumentParser, run_main
from .comm.world import rank
from .data import TokenFile, default_data_path
from .errors import UserError
from .model.gpt import GPT
from .training import checkpoint


def main(argv=None):
    ap = ArgumentParser(prog="python -m llmpi.sample", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", help="run directory holding ckpt_*.h5, e.g. runs/default")
    ap.add_argument("--prompt", default="", help="text to continue (default: a newline)")
    ap.add_argument("--tokens", type=int, default=200, help="tokens to generate")
    ap.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 = greedy")
    ap.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0 = all")
    ap.add_argument("--seed", type=int, default=1337, help="sampling seed")
    args = ap.parse_args(argv)
    if args.tokens < 0 or args.temperature < 0 or args.top_k < 0:
        raise UserError("--tokens, --temperature and --top-k must be >= 0")

    ckpt = checkpoint.load_latest(args.run_dir)
    job = ckpt.config
    tokens = TokenFile(job.data.path or default_data_path())
    tok = tokens.tokenizer
    cfg = job.model
    if cfg.vocab_size == 0:  # the run took it from the data file
        cfg = dataclasses.replace(cfg, vocab_size=tokens.vocab_size)
    model = GPT(cfg, np, seed=0)
    for name, value in ckpt.params(model.params.names).items():  # from the stage files of any layout
        if value.shape != model.params.views[name].shape:
            raise UserError(f"checkpoint in {args.run_dir} holds {name} of shape {value.shape} but its model "
                            f"config needs {model.params.views[name].shape}; the checkpoint does not match its config")
        model.params.views[name][...] = value

    try:
        ids = np.asarray(tok.encode(args.prompt or "\n"), dtype=np.int64)
    except (KeyError, ValueError) as err:
        raise UserError(f"the prompt has characters outside the tokenizer's vocabulary ({err})") from None
    if ids.size == 0:
        ids = np.zeros(1, dtype=np.int64)
    out = model.generate(ids[None, :], args.tokens, temperature=args.temperature,
                         top_k=args.top_k or None, rng=np.random.default_rng(args.seed))
    if rank() == 0:  # under mpiexec every rank draws the same sample; one prints it
        print(f"# {args.run_dir} step {ckpt.step}", file=sys.stderr)
        print(tok.decode(out[0]))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, prog="llmpi.sample") or 0)

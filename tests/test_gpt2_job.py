"""jobs/gpt2_124m.toml: GPT-2 small's shape and parameter count, and one training step at
block 64 on a BPE corpus (the full block of 1024 takes minutes on a CPU)."""
import math
import os

from cli import run, single_process_only
from llmpi.config import load_job
from llmpi.data import prepare
from llmpi.model.gpt import gpt2_layout

SHAKESPEARE = "/work/shared/data/tinyshakespeare.txt"
GPT2_SMALL_PARAMETERS = 124_439_808  # with GPT-2's vocabulary of 50257 and the LM head tied to wte


def test_gpt2_124m_is_gpt2_small():
    job = load_job("gpt2_124m")
    m, o = job.model, job.optim
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size) == (12, 12, 768, 1024, 0)
    assert (o.name, o.lr, o.beta1, o.beta2, o.weight_decay, o.grad_clip) == ("adamw", 6e-4, 0.9, 0.95, 0.1, 1.0)
    assert job.train.batch_size * m.block_size == 524_288  # llm.c's tokens per step
    m.vocab_size = 50257
    assert sum(math.prod(shape) for _, shape in gpt2_layout(m)) == GPT2_SMALL_PARAMETERS


@single_process_only
def test_gpt2_124m_one_step_at_block_64(tmp_path):
    if os.path.exists(SHAKESPEARE):
        text = open(SHAKESPEARE, encoding="utf-8").read()[:200_000]
    else:
        text = "To be, or not to be, that is the question:\n" * 5000
    src = tmp_path / "corpus.txt"
    src.write_text(text, encoding="utf-8")
    data = prepare([str(src)], "bpe", 0.1, str(tmp_path / "bpe.h5"), progress=False, vocab_size=512)
    proc = run(["-m", "llmpi.train", "gpt2_124m", "--set", "model.block_size=64", "--set", "train.batch_size=1",
                "--set", "train.max_iters=1", "--set", "train.eval_iters=1", "--set", f"data.path={data}",
                "--set", f"train.out_dir={tmp_path / 'runs'}", "--set", "train.device=cpu"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "12 layers x 768 ch" in proc.stdout and "bpe, vocab 512" in proc.stdout
    val = float(proc.stdout.split("val loss")[1].split()[0])
    assert 0 < val < 2 * math.log(512)

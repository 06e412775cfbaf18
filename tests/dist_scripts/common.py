"""Helpers shared by the multi-process tests: tiny models of all three families and a torchrun launcher."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = Path(__file__).resolve().parent
FAMILIES = ("qwen2", "llama", "qwen3")


def make_models(root: Path) -> dict[str, Path]:
    """4-layer tiny HF checkpoints ``{family: dir}`` with vocab 300 (padding differs at TP=1/TP=2:
    384 vs 512 rows). Qwen2 ties embeddings (as Qwen2.5-0.5B); Llama uses Llama 3 RoPE scaling with
    the original context 8192 that megatron-core fixes."""
    sys.path.insert(0, str(REPO))
    from megatron_dapo.data.tiny_checkpoint import make_tiny_checkpoint

    out = {}
    tok = None
    for fam in FAMILIES:
        d = root / fam
        make_tiny_checkpoint(d, family=fam, num_layers=4, vocab_size=300, tie_word_embeddings=fam == "qwen2",
                             max_position_embeddings=65536 if fam == "llama" else 512, tokenizer_dir=tok,
                             seed=FAMILIES.index(fam))
        tok = tok or d
        out[fam] = d
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, nproc: int, env: dict[str, str], timeout: int = 240,
             check: bool = True) -> subprocess.CompletedProcess:
    """Run ``tests/dist_scripts/<script>`` (or an absolute script path plus arguments, space separated)
    under torchrun with ``nproc`` processes (gloo, CPU); raises AssertionError with the output on failure."""
    full_env = dict(os.environ)
    full_env.update({k: str(v) for k, v in env.items()})
    full_env.setdefault("OMP_NUM_THREADS", "1")
    cmd = ["timeout", str(timeout), sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master-port={free_port()}"]
    cmd += script.split() if script.startswith("/") else [str(SCRIPTS / script)]
    proc = subprocess.run(cmd, env=full_env, cwd=str(REPO), capture_output=True, text=True, timeout=timeout + 30)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} (nproc={nproc}, env={env}) failed with rc={proc.returncode}:\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc

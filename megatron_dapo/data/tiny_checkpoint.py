"""Tiny random-initialised Hugging Face checkpoints (Qwen2 / Llama-3 / Qwen3 architectures).

No real weights are available to the project's tests, so the tests, the CPU demo and CI use a tiny model
of the real architecture with random weights, written exactly like a Hub checkpoint: ``config.json``,
``generation_config.json``, ``model.safetensors`` and the tokenizer files.

Families (transformers model classes):

* ``qwen2``: ``Qwen2ForCausalLM`` — biases on q/k/v projections, rope θ = 1e6 (as Qwen2.5).
* ``llama``: ``LlamaForCausalLM`` — no biases, rope θ = 5e5 with ``llama3`` rope scaling
  (factor 8, low/high frequency factors 1/4, original context 8192 — the values megatron-core's
  Llama 3 scaling hard-codes, so the tiny model converts exactly).
* ``qwen3``: ``Qwen3ForCausalLM`` — RMSNorm on per-head queries and keys (QK-norm), no biases, θ = 1e6.

``config.json`` also carries the legacy top-level ``rope_theta`` (and ``rope_scaling`` for llama) keys
that transformers 4.x checkpoints have, next to transformers 5.x's ``rope_parameters``, so converters
written against either layout read the same values.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

from .tasks import generate_tasks
from .tokenizer import load_tokenizer, stop_token_ids, train_demo_tokenizer

FAMILIES = ("qwen2", "llama", "qwen3")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                    "tokenizer.model", "LICENSE")


def _rope_parameters(family: str, max_position_embeddings: int) -> dict:
    if family == "llama":
        return {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
    return {"rope_type": "default", "rope_theta": 1000000.0}


def _copy_tokenizer(tokenizer_dir: Path, out_dir: Path) -> None:
    if not tokenizer_dir.is_dir():
        raise FileNotFoundError(f"tokenizer_dir not found: {tokenizer_dir}")
    copied = 0
    for name in _TOKENIZER_FILES:
        src = tokenizer_dir / name
        if src.is_file():
            shutil.copy2(src, out_dir / name)
            copied += 1
    if copied == 0:
        raise FileNotFoundError(f"tokenizer_dir {tokenizer_dir} has none of {', '.join(_TOKENIZER_FILES)}")


def make_tiny_checkpoint(
    out_dir: str | Path,
    *,
    family: str = "qwen2",
    tokenizer_dir: str | Path | None = None,
    demo_rows: Sequence[dict] | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = True,
    seed: int = 0,
    max_position_embeddings: int = 512,
    initializer_range: float = 0.02,
    vocab_size: int | None = None,
    demo_vocab_size: int = 150,
) -> Path:
    """Write a random-initialised HF causal-LM checkpoint with its tokenizer to ``out_dir``.

    Args:
        out_dir: output directory (created; existing model/tokenizer files are overwritten).
        family: ``"qwen2"`` | ``"llama"`` | ``"qwen3"`` (see the module docstring).
        tokenizer_dir: copy this tokenizer (e.g. ``../shared/data/qwen2.5-tokenizer``).  When ``None``
            a demo tokenizer is trained (:func:`megatron_dapo.data.tokenizer.train_demo_tokenizer`) on
            ``demo_rows`` or, if those are ``None`` too, on 2,000 fresh demo rows generated with ``seed``.
        hidden_size, num_layers, num_attention_heads, num_key_value_heads, intermediate_size,
        tie_word_embeddings, max_position_embeddings, initializer_range: the HF config fields
            (``num_hidden_layers`` = ``num_layers``; head_dim = hidden_size / num_attention_heads).
        seed: ``torch.manual_seed`` for the weights (same seed and shapes → identical weights).
        vocab_size: embedding rows; default ``len(tokenizer)``; must be >= ``len(tokenizer)``.
        demo_vocab_size: vocabulary size of a freshly trained demo tokenizer.

    Returns:
        ``Path(out_dir)``.

    Raises:
        ValueError: unknown family, heads not dividing ``hidden_size``, ``num_attention_heads`` not a
            multiple of ``num_key_value_heads``, or ``vocab_size < len(tokenizer)``.
        FileNotFoundError: ``tokenizer_dir`` missing or without tokenizer files.
    """
    import torch  # heavy: torch; this module is used without it
    import transformers  # heavy: transformers, only loaded where a model or tokenizer is

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    if hidden_size % num_attention_heads:
        raise ValueError(f"hidden_size={hidden_size} is not divisible by num_attention_heads="
                         f"{num_attention_heads}")
    if num_attention_heads % num_key_value_heads:
        raise ValueError(f"num_attention_heads={num_attention_heads} is not a multiple of "
                         f"num_key_value_heads={num_key_value_heads}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    if tokenizer_dir is not None:
        _copy_tokenizer(Path(tokenizer_dir), out)
        tokenizer = load_tokenizer(out)
    else:
        rows = list(demo_rows) if demo_rows is not None else generate_tasks(2000, seed)
        tokenizer = train_demo_tokenizer(rows, out, vocab_size=demo_vocab_size)
    n_tok = len(tokenizer)
    if vocab_size is None:
        vocab_size = n_tok
    if vocab_size < n_tok:
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer ({n_tok} tokens)")

    stops = stop_token_ids(tokenizer)
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    # Qwen2.5 convention: bos_token_id = <|endoftext|> when the tokenizer itself has no bos token.
    bos_id = tokenizer.bos_token_id
    if bos_id is None:
        bos_id = tokenizer.get_vocab().get("<|endoftext|>", eos_id)
    rope = _rope_parameters(family, max_position_embeddings)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        hidden_act="silu",
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie_word_embeddings,
        rope_parameters=rope,
        attention_dropout=0.0,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    if family == "qwen2":
        config = transformers.Qwen2Config(**common, use_sliding_window=False,
                                          max_window_layers=num_layers)
        model_cls = transformers.Qwen2ForCausalLM
    elif family == "qwen3":
        config = transformers.Qwen3Config(**common, head_dim=hidden_size // num_attention_heads,
                                          attention_bias=False, use_sliding_window=False,
                                          max_window_layers=num_layers)
        model_cls = transformers.Qwen3ForCausalLM
    else:
        config = transformers.LlamaConfig(**common, head_dim=hidden_size // num_attention_heads,
                                          attention_bias=False, mlp_bias=False)
        model_cls = transformers.LlamaForCausalLM
    config.architectures = [model_cls.__name__]

    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=bos_id,
        eos_token_id=stops if len(stops) > 1 else eos_id,
        pad_token_id=pad_id,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
    )
    model.save_pretrained(str(out))

    # Legacy (transformers 4.x) rope keys alongside ``rope_parameters``.
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["rope_theta"] = rope["rope_theta"]
    if family == "llama":
        cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out

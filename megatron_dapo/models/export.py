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
    from safetensors.torch import save_file

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
    import torch.distributed as dist

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

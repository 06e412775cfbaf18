"""What this machine can run: GPU, Transformer Engine, SGLang, vLLM. Pure detection, no side effects.

GPU-only packages are never imported at module import time anywhere in megatron_dapo; code that needs
one calls :func:`require` which raises a clear :class:`MissingBackendError`.
"""
from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from .errors import MegatronDapoError

if TYPE_CHECKING:
    import torch


class MissingBackendError(MegatronDapoError, RuntimeError):
    """A GPU-only package (transformer-engine, sglang, vllm) or a CUDA device is needed but absent."""


def has_cuda() -> bool:
    """True when torch sees a CUDA device: the one CUDA check of the package (``torch.cuda.is_available()``)."""
    import torch  # heavy: this module is imported by the configuration, which the command line loads

    return torch.cuda.is_available()


def default_device() -> torch.device:
    """The device this process computes on: ``torch.device("cuda", torch.cuda.current_device())`` when
    :func:`has_cuda`, else ``torch.device("cpu")`` (a ``torch.device``)."""
    import torch  # heavy: see has_cuda

    return torch.device("cuda", torch.cuda.current_device()) if has_cuda() else torch.device("cpu")


def has_package(name: str) -> bool:
    """True when ``name`` is importable (checked without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def has_transformer_engine() -> bool:
    return has_package("transformer_engine")


_HINTS = {
    "transformer_engine": "pip install 'megatron_dapo[gpu]' on a CUDA machine (or use an NGC PyTorch container)",
    "sglang": "pip install 'megatron_dapo[gpu]' (sglang) on a CUDA machine, or set rollout.backend=cpu",
    "vllm": "pip install vllm on a CUDA machine, or set rollout.backend=cpu",
}


def require(package: str, feature: str) -> None:
    """Raise :class:`MissingBackendError` naming ``feature`` when ``package`` is not installed."""
    if not has_package(package):
        hint = _HINTS.get(package, f"pip install {package}")
        raise MissingBackendError(f"{feature} needs the '{package}' package, which is not installed here: {hint}")

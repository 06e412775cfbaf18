"""megatron_dapo: DAPO (arXiv 2503.14476) on Megatron-core with SGLang-compatible rollout engines."""

__version__ = "0.1.0"

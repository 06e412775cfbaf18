"""The project's CPU rollout engine: SGLang's native HTTP API over an HF-transformers model (fp32).

* :mod:`~megatron_dapo.engines.cpu.requests` - ``/generate`` bodies to per-sequence requests, sampling (pure).
* :mod:`~megatron_dapo.engines.cpu.model` - the model and the worker thread that batches requests.
* :mod:`~megatron_dapo.engines.cpu.server` - the HTTP application and ``python -m megatron_dapo.engines.cpu.server``.
"""

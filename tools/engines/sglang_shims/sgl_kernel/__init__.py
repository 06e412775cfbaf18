"""Import-time stand-in for ``sgl_kernel`` when real SGLang runs on a CPU without AMX.

SGLang's CPU mode (``SGLANG_USE_CPU_ENGINE=1``) imports a handful of ``sgl_kernel`` names while its modules
load; on CPUs without AMX/AVX-512 its layers then take their pure-torch ``forward_native`` paths and never
call them. The CPU build of sgl-kernel is not published on PyPI, so this package supplies the names. Any
name that is actually *called* raises ``NotImplementedError`` naming itself, so a code path that would need
a real kernel fails loudly instead of computing something wrong.

Only ``tools/engines/build_engine_venv.sh`` puts this folder on the engine's ``PYTHONPATH``; the trainer's
own environment never sees it.
"""

__version__ = "0.0.0+megatron-dapo-cpu-stand-in"


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    def _not_available(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} was called, but this engine runs with megatron_dapo's import-time stand-in "
            "for sgl_kernel (CPU without AMX); a real sgl-kernel CPU build is needed for this path")

    _not_available.__name__ = name
    return _not_available

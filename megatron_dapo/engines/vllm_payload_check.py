"""Validate HTTP requests our vLLM client builds against vLLM's own routes and request classes.

Runs INSIDE the vLLM interpreter (``.venv-vllm/bin/python path/to/vllm_payload_check.py < batch.json``),
imports only vLLM and the standard library, and checks a whole batch in one process (vLLM's imports
take seconds). Input: a JSON list of ``{"path": "/route?query", "body": {...} | null, "backend":
"nccl" | "ipc" (weight-transfer routes only)}``. Output (stdout): a JSON list, per item ``{"ok": bool,
"error": str | null, "call": what vLLM's engine would have been called with}``.

How each request is checked:

* ``/inference/v1/generate``: ``GenerateRequest.model_validate`` (pydantic; it builds vLLM's
  ``SamplingParams``, whose ``__post_init__`` verifies the sampling fields).
* every route of vLLM's RL router (``vllm/entrypoints/rl/online/api_router.py``: pause, resume,
  abort_requests, init_weight_transfer_engine, start/finish_weight_update, update_weights,
  update_weight_version, weight_info) and of the dev routers (``/collective_rpc``,
  ``/reset_prefix_cache``, ``/sleep``, ``/wake_up``): sent through FastAPI's ``TestClient`` to the real
  route functions, with a recording stand-in for vLLM's ``AsyncLLM`` engine client; a non-2xx answer is
  a failure. Then the recorded arguments are checked further: ``init_info`` builds the backend's
  ``NCCLWeightTransferInitInfo`` / ``IPCWeightTransferInitInfo``, ``update_info`` the backend's
  ``NCCLWeightTransferUpdateInfo`` / ``IPCWeightTransferUpdateInfo`` (IPC handles unpickled with
  ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``, as the server needs), ``/collective_rpc reload_weights``
  kwargs bind to ``GPUModelRunner.reload_weights``.
"""
from __future__ import annotations

import inspect
import json
import os
import sys


def _recorder_class():
    from vllm.v1.engine.async_llm import AsyncLLM  # optional: vllm and its server (the vllm extra)

    class _Outputs:
        request_states: dict = {}
        parent_requests: dict = {}

    class Recorder(AsyncLLM):  # only the attribute the abort-all route reads and the methods routes call
        def __init__(self):  # noqa: D401 - no engine behind it
            self.calls: list = []
            self.output_processor = _Outputs()

        def __del__(self):
            pass

        def _rec(self, name, **kw):
            self.calls.append((name, kw))

        async def pause_generation(self, *, mode="abort", clear_cache=True, **kw):
            self._rec("pause_generation", mode=mode, clear_cache=clear_cache)

        async def resume_generation(self):
            self._rec("resume_generation")

        async def is_paused(self):
            return False

        async def abort(self, request_id, internal=False):
            self._rec("abort", request_ids=list(request_id) if not isinstance(request_id, str) else [request_id],
                      internal=internal)

        async def init_weight_transfer_engine(self, request):
            self._rec("init_weight_transfer_engine", init_info=request.init_info)

        async def shutdown_weight_transfer_engine(self):
            self._rec("shutdown_weight_transfer_engine")

        async def start_weight_update(self, *a, **kw):
            self._rec("start_weight_update")

        async def update_weights(self, request):
            self._rec("update_weights", update_info=request.update_info)

        async def finish_weight_update(self, weight_version=None):
            self._rec("finish_weight_update", weight_version=weight_version)

        async def update_weight_version(self, new_version):
            self._rec("update_weight_version", new_version=new_version)

        async def get_weight_version(self):
            return "default"

        async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
            self._rec("collective_rpc", method=method, args=list(args), kwargs=dict(kwargs or {}))
            return [None]

        async def reset_prefix_cache(self, reset_running_requests=False, reset_external=False):
            self._rec("reset_prefix_cache", reset_running_requests=reset_running_requests)
            return True

        async def sleep(self, level=1, mode="abort"):
            self._rec("sleep", level=level, mode=mode)

        async def wake_up(self, tags=None):
            self._rec("wake_up", tags=tags)
            return True

    return Recorder


def _app(engine):
    from fastapi import FastAPI  # optional: vllm and its server (the vllm extra)

    # optional: vllm and its server (the vllm extra)
    from vllm.entrypoints.rl.online.api_router import router as rl_router
    from vllm.entrypoints.serve.dev.cache.api_router import router as cache_router
    from vllm.entrypoints.serve.dev.rpc.api_router import router as rpc_router
    from vllm.entrypoints.serve.dev.sleep.api_router import router as sleep_router

    app = FastAPI()
    for r in (rl_router, rpc_router, cache_router, sleep_router):
        app.include_router(r)
    app.state.engine_client = engine
    return app


def _deep_check(name: str, kw: dict, backend: str | None) -> None:
    """Build the backend request classes from what the route passed to the engine."""
    if name == "init_weight_transfer_engine":
        if backend == "nccl":
            # optional: vllm and its server (the vllm extra)
            from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferInitInfo as cls
        elif backend == "ipc":
            # optional: vllm and its server (the vllm extra)
            from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferInitInfo as cls
        else:
            raise ValueError(f"weight-transfer payload needs backend nccl or ipc, got {backend!r}")
        cls(**kw["init_info"])
    elif name == "update_weights":
        if backend == "nccl":
            # optional: vllm and its server (the vllm extra)
            from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferUpdateInfo as cls
        elif backend == "ipc":
            # optional: vllm and its server (the vllm extra)
            from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferUpdateInfo as cls
        else:
            raise ValueError(f"weight-transfer payload needs backend nccl or ipc, got {backend!r}")
        infos = kw["update_info"] if isinstance(kw["update_info"], list) else [kw["update_info"]]
        for info in infos:
            cls(**info)
    elif name == "collective_rpc" and kw["method"] == "reload_weights":
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner  # optional: vllm and its server (the vllm extra)

        inspect.signature(GPUModelRunner.reload_weights).bind(None, *kw["args"], **kw["kwargs"])
        if not kw["kwargs"].get("weights_path"):
            raise ValueError("reload_weights without weights_path reloads the served model, not new weights")


def _jsonable(x):
    try:
        json.dumps(x)
        return x
    except TypeError:
        return repr(x)


def check(items: list[dict]) -> list[dict]:
    """Validate ``items`` (see the module docstring); one result dict per item."""
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    from fastapi.testclient import TestClient  # optional: vllm and its server (the vllm extra)

    # optional: vllm and its server (the vllm extra)
    from vllm.entrypoints.scale_out.token_in_token_out.protocol import GenerateRequest

    engine = _recorder_class()()
    client = TestClient(_app(engine), raise_server_exceptions=True)
    results = []
    for item in items:
        path, body = item["path"], item.get("body")
        try:
            if path.split("?")[0] == "/inference/v1/generate":
                req = GenerateRequest.model_validate(body)
                call = {"request_id": req.request_id, "sampling_params": repr(req.sampling_params)}
            else:
                engine.calls.clear()
                resp = client.post(path, json=body) if body is not None else client.post(path)
                if resp.status_code >= 300:
                    raise ValueError(f"HTTP {resp.status_code}: {resp.text[:400]}")
                call = [(n, {k: _jsonable(v) for k, v in kw.items()}) for n, kw in engine.calls]
                for n, kw in engine.calls:
                    _deep_check(n, kw, item.get("backend"))
            results.append({"ok": True, "error": None, "call": call})
        except Exception as exc:  # every failure is reported per item
            results.append({"ok": False, "error": f"{type(exc).__name__}: {exc}"[:600], "call": None})
    return results


def main() -> int:
    items = json.load(sys.stdin)
    print(json.dumps(check(items)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

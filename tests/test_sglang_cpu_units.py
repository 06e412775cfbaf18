"""Fast checks (no engine server) of the real-SGLang pieces: CPU launch command and environment, the
weight-update bracket rule, the update-group store layout against torch's own helper (what SGLang's
``init_custom_process_group`` calls), the flattened-bucket format, tied-embedding filtering, the
``rollout.mode=deterministic`` warning and the one-line exit 2 for a missing engine interpreter."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from megatron_dapo.engines import launch_common, launch_sglang
from megatron_dapo.engines.client import needs_weight_update_bracket, parse_server_version
from megatron_dapo.engines.tensor_ipc import (FLATTENED_BUCKET, TensorPayloadError, deserialize_payload,
                                              serialize_flattened_bucket, unflatten_bucket)

REPO = Path(__file__).resolve().parents[1]


def test_cpu_command_flags_and_env():
    cmd = launch_sglang.build_sglang_command("/m", port=1234, device="cpu", dtype="float32", python="/py",
                                             max_total_tokens=2048, colocated=True, mem_fraction_static=0.5)
    assert cmd[:3] == ["/py", "-m", "sglang.launch_server"]
    joined = " ".join(cmd)
    for flag in ("--device cpu", "--attention-backend torch_native", "--sampling-backend pytorch",
                 "--cuda-graph-backend-decode disabled", "--cuda-graph-backend-prefill disabled",
                 "--max-total-tokens 2048", "--skip-server-warmup", "--dtype float32", "--sleep-on-idle"):
        assert flag in joined, flag
    # GPU-only flags stay off on CPU (the memory saver needs libcuda)
    assert "--enable-memory-saver" not in cmd and "--mem-fraction-static" not in cmd and "--base-gpu-id" not in cmd
    gpu = launch_sglang.build_sglang_command("/m", port=1234, colocated=True, python="/py")
    assert "--enable-memory-saver" in gpu and "--device" not in gpu
    env = launch_sglang.sglang_cpu_env({"PYTHONPATH": "/x"})
    assert env["SGLANG_USE_CPU_ENGINE"] == "1" and env["OMP_NUM_THREADS"] == "1"
    assert env["PYTHONPATH"] == f"{launch_sglang.SGLANG_CPU_SHIMS}{os.pathsep}/x"
    assert (launch_sglang.SGLANG_CPU_SHIMS / "sgl_kernel" / "__init__.py").is_file()
    with pytest.raises(ValueError, match="dtype"):
        launch_sglang.sglang_cpu_args("fp32")


def test_auto_dtype_is_the_checkpoints(tmp_path):
    """SGLang's --dtype auto serves fp32 checkpoints in fp16; the launchers pass the checkpoint's dtype."""
    (tmp_path / "config.json").write_text('{"dtype": "float32"}')
    assert launch_sglang.checkpoint_dtype(str(tmp_path)) == "float32"
    (tmp_path / "config.json").write_text('{"torch_dtype": "bfloat16"}')
    assert launch_sglang.checkpoint_dtype(str(tmp_path)) == "bfloat16"
    assert launch_sglang.checkpoint_dtype(str(tmp_path), "float16") == "float16"
    assert launch_sglang.checkpoint_dtype(str(tmp_path / "nope")) == "auto"


def test_missing_engine_venv_names_make_engines(tmp_path, monkeypatch):
    from megatron_dapo.backend import MissingBackendError

    monkeypatch.setattr(launch_common, "REPO_ROOT", tmp_path)  # read by default_engine_python
    monkeypatch.setenv("MEGATRON_DAPO_ENGINE_VENV_ROOT", str(tmp_path))
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(MissingBackendError, match="make engines"):
        launch_sglang.launch_sglang_servers(str(tmp_path), device="cpu")


def test_trainer_with_unusable_engine_python_exits_2_with_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "megatron_dapo.cli", "train", str(REPO / "examples/tiny-cpu/dapo.yaml"),
                           "rollout.backend=sglang", f"rollout.engine_python={tmp_path / 'no-python'}",
                           f"output_dir={tmp_path}", f"model.hf_path={tmp_path / 'model'}", "resume=none"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("megatron-dapo:")]
    assert len(errors) == 1 and "engine_python" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_bracket_rule_by_server_version():
    assert parse_server_version("0.5.23") == (0, 5, 23)
    assert parse_server_version("0.5.10rc0") == (0, 5, 10)
    assert parse_server_version(None) is None and parse_server_version("dev") is None
    assert needs_weight_update_bracket({"version": "0.5.23"})
    assert needs_weight_update_bracket({"version": "0.6.0"})
    assert not needs_weight_update_bracket({"version": "0.4.9.post2"})
    assert not needs_weight_update_bracket({"backend": "megatron_dapo.cpu_engine"})  # no version: no routes


GROUP_SCRIPT = textwrap.dedent('''
    import sys, threading, datetime, torch, torch.distributed as dist
    from torch.distributed.distributed_c10d import PrefixStore, _new_process_group_helper, _world, rendezvous
    from megatron_dapo.engines.update_group import create_weight_update_group
    port = int(sys.argv[1])
    out = {}
    def sglang_side():  # what sglang.srt.utils.init_custom_process_group does for rank 1
        timeout = datetime.timedelta(seconds=60)
        store, rank, world = next(rendezvous(f"tcp://127.0.0.1:{port}", 1, 2, timeout=timeout))
        store.set_timeout(timeout)
        pg, _ = _new_process_group_helper(2, 1, [], dist.Backend("gloo"), PrefixStore("wug", store),
                                          group_name="wug", backend_options=None, timeout=timeout)
        _world.pg_group_ranks[pg] = {0: 0, 1: 1}
        t = torch.zeros(4)
        dist.broadcast(t, src=0, group=pg)
        out["got"] = t.tolist()
    th = threading.Thread(target=sglang_side); th.start()
    g = create_weight_update_group("127.0.0.1", port, 0, 2, backend="gloo", timeout_s=60, group_name="wug")
    g.broadcast(torch.arange(4.0), src=0)
    th.join(60)
    print("GOT", out.get("got"))
''')


def test_update_group_meets_torchs_helper_as_sglang_calls_it():
    """Bug 2: the trainer's group and SGLang's (PrefixStore(group_name) + torch's helper) meet."""
    port = launch_common.find_free_ports(1)[0]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", GROUP_SCRIPT, str(port)], capture_output=True, text=True,
                          timeout=180, env=env)
    assert "GOT [0.0, 1.0, 2.0, 3.0]" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_flattened_bucket_round_trip_and_layout():
    named = [("a", torch.arange(6, dtype=torch.float32).reshape(2, 3)), ("b", torch.ones(5, dtype=torch.bfloat16)),
             ("c", torch.tensor([7], dtype=torch.int64))]
    back = deserialize_payload(serialize_flattened_bucket(named), FLATTENED_BUCKET)
    assert [n for n, _ in back] == ["a", "b", "c"]
    for (_, x), (_, y) in zip(named, back):
        assert x.dtype == y.dtype and torch.equal(x, y)
    with pytest.raises(TensorPayloadError, match="fit"):
        import types
        unflatten_bucket({"flattened_tensor": torch.zeros(4, dtype=torch.uint8),
                          "metadata": [types.SimpleNamespace(name="x", shape=torch.Size([2]), dtype=torch.float32,
                                                             start_idx=0, end_idx=8, numel=8)]})
    with pytest.raises(ValueError):
        serialize_flattened_bucket([])


def test_weight_sync_drops_tied_lm_head(tmp_path):
    from megatron_dapo.sync.weight_sync import WeightSync

    class Actor:
        rank = dp_rank = 0
        spec = None  # tie_word_embeddings comes from hf_path's config.json
        hf_path = tmp_path

        def iter_hf_tensors(self, dtype=None):
            yield "model.embed_tokens.weight", torch.ones(4, 2)
            yield "lm_head.weight", torch.ones(4, 2)

    class Client:
        control_urls = ["http://127.0.0.1:1"]

    (tmp_path / "config.json").write_text('{"tie_word_embeddings": true}')
    ws = WeightSync(Actor(), Client(), transport="disk", work_dir=tmp_path / "w", dtype="fp32")
    assert [n for n, _ in ws._engine_tensors()] == ["model.embed_tokens.weight"]
    (tmp_path / "config.json").write_text('{"tie_word_embeddings": false}')
    ws = WeightSync(Actor(), Client(), transport="disk", work_dir=tmp_path / "w", dtype="fp32")
    assert [n for n, _ in ws._engine_tensors()] == ["model.embed_tokens.weight", "lm_head.weight"]


def test_deterministic_with_sglang_warns_and_names_the_key():
    from megatron_dapo.config import DeterminismWarning, load_config

    with pytest.warns(DeterminismWarning, match="rollout.mode=deterministic"):
        load_config(str(REPO / "examples/tiny-cpu/dapo.yaml"), ["rollout.backend=sglang"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeterminismWarning)
        load_config(str(REPO / "examples/tiny-cpu/dapo.yaml"), ["rollout.backend=cpu"])
        load_config(str(REPO / "examples/tiny-cpu/dapo.yaml"), ["rollout.backend=sglang", "rollout.mode=streaming"])

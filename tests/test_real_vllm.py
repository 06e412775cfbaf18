"""vLLM-specific tests of the real vLLM 0.32 server (``.venv-vllm``, ``make engines``) behind :class:`VLLMClient`.

What every engine must do (generation and scoring equal to transformers fp32, seeds, abort / abort-all,
disk weight updates, release / resume, the weight sync) is in the protocol suite
(``tests/test_engine_protocol.py``, kind ``vllm``); here only what is vLLM's own: scoring at a temperature,
the tied-embedding reload workaround (tied and untied checkpoints) with versions, payload validation
against vLLM's own classes, the capability table against :attr:`VLLMClient.capabilities`, and the trainer
running on it (``rollout.backend=vllm``, disk reload after every step).

The server is the protocol suite's session server of kind ``vllm`` (``engine_pool`` of
``tests/engine_fixtures.py``: started once per pytest session for both files, serving the protocol model).
Under ``CI=true`` a missing ``.venv-vllm`` fails (run ``make engines``); elsewhere those tests are skipped.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT, unavailable
from helpers import fail_message, hf_logprobs, read_scalars, repo_env

PY = sys.executable
CONFIG = str(REPO_ROOT / "examples" / "tiny-cpu" / "dapo.yaml")
TOL = 1e-4


def _vllm_python() -> str:
    from megatron_dapo.backend import MissingBackendError
    from megatron_dapo.engines.launch_common import default_engine_python

    try:
        return default_engine_python("vllm")
    except MissingBackendError as exc:
        unavailable(f"real vLLM tests need the vLLM venv: run `make engines` ({exc})")


def _perturbed(src: Path, dst: Path, seed: int, *, untie: bool = False) -> Path:
    """A copy of ``src`` with every matrix moved by N(0, 0.2) noise (so logprobs change a lot);
    ``untie``: also an explicit, different ``lm_head.weight`` and ``tie_word_embeddings: false``."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    sd = load_file(str(src / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    out = {k: (v + 0.2 * torch.randn(v.shape, generator=g) if v.dim() == 2 else v.clone()) for k, v in sd.items()}
    if untie:
        out["lm_head.weight"] = 0.2 * torch.randn(sd["model.embed_tokens.weight"].shape, generator=g)
        cfg = json.loads((dst / "config.json").read_text())
        cfg["tie_word_embeddings"] = False
        (dst / "config.json").write_text(json.dumps(cfg))
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _max_diff(a, b) -> float:
    assert len(a) == len(b), (len(a), len(b))
    return max(abs(x - y) for x, y in zip(a, b))


@pytest.fixture(scope="session")
def vllm_server(engine_pool, tmp_path_factory):
    """The session's vLLM server of the protocol suite (``engine_pool("vllm")``, serving the tied protocol
    model) and copies of its model: ``(url, {"base", "tied2", "untied3"} dirs, server log path)``."""
    engine = engine_pool("vllm")
    tmp = tmp_path_factory.mktemp("real_vllm")
    base = shutil.copytree(engine.model_dir, tmp / "base")
    assert json.loads((base / "config.json").read_text())["tie_word_embeddings"] is True
    assert not (base / "lm_head.safetensors").exists(), "the shared protocol model was modified"
    models = {"base": base, "tied2": _perturbed(base, tmp / "tied2", 2),
              "untied3": _perturbed(base, tmp / "untied3", 3, untie=True)}
    return engine.url, models, engine.procs.engines[0].log_path


@pytest.fixture
def restore_base(vllm_server, tmp_path):
    """After the test: the protocol model's weights back on the shared server (version ``default``)."""
    yield
    url, models, _ = vllm_server

    async def go():
        async with _client(url) as c:
            await c.update_weights_from_disk(str(shutil.copytree(models["base"], tmp_path / "restore")), "default")
    asyncio.run(go())


def _client(url):
    from megatron_dapo.engines.vllm_client import VLLMClient

    return VLLMClient([url], request_timeout_s=300, max_retries=1)


def _prompts(model_dir: Path, k: int = 2) -> list[list[int]]:
    from megatron_dapo.data.dataset import render_prompt
    from megatron_dapo.data.tasks import generate_tasks
    from megatron_dapo.data.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    return [render_prompt(tok, row["prompt"], 256) for row in generate_tasks(k, seed=11)]


def _wait_idle(url: str, timeout_s: float = 30.0) -> None:
    """Until ``/metrics`` reports no running request (the gauge is refreshed by the engine loop)."""
    deadline = time.monotonic() + timeout_s
    while _running(url) > 0:
        assert time.monotonic() < deadline, f"{_running(url)} requests still running after {timeout_s} s"
        time.sleep(0.1)


def _server_log(log: Path, n: int = 60) -> str:
    if not log.is_file():
        return "(no server log)"
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if "ERROR" in ln or "Error" in ln]
    return "\n--- vLLM server log (errors) ---\n" + "\n".join(lines[-n:])


def _running(url: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("vllm:num_requests_running"))


# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_score_at_a_temperature_matches_hf(vllm_server):
    """``score(..., temperature=0.6)``: vLLM's ``prompt_logprobs`` rescaled by the client (temperature 1 is
    the protocol suite's ``test_score_matches_hf_from_any_start``)."""
    url, models, _ = vllm_server
    seq = _prompts(models["base"], 1)[0] + [5, 9, 17, 3, 4]

    async def go():
        async with _client(url) as c:
            return await c.score([seq], 4, temperature=0.6)

    s06 = asyncio.run(go())
    assert _max_diff(s06[0], hf_logprobs(models["base"], seq, 4, 0.6)) <= TOL


@pytest.mark.slow
def test_weight_reload_tied_and_untied_versions_and_logprobs(vllm_server, tmp_path, restore_base):
    """Disk reload (``/collective_rpc reload_weights`` + ``/reset_prefix_cache``): version reported, served
    logprobs equal the NEW weights' transformers logprobs - for a tied checkpoint (the client adds the
    ``lm_head.weight`` vLLM would otherwise keep stale) and an untied one. Without the added output layer,
    vLLM 0.32 keeps the old one (measured here, the reason for the fix)."""
    from megatron_dapo.engines.transport import EngineError

    url, models, _ = vllm_server
    prompt = _prompts(models["base"], 1)[0]
    seq = prompt + [7, 8, 9, 10]
    sp = {"max_new_tokens": 12, "temperature": 1.0, "n": 2, "sampling_seed": 3}

    async def go():
        results = {}
        async with _client(url) as c:
            for tag in ("tied2", "untied3"):
                d = shutil.copytree(models[tag], tmp_path / tag)  # the client may add lm_head.safetensors
                t = time.perf_counter()
                await c.update_weights_from_disk(str(d), weight_version=f"v-{tag}")
                took = time.perf_counter() - t
                versions = await c.get_weight_version()
                outs = await c.generate([prompt], sp, rid=f"after-{tag}")
                score = (await c.score([seq], 1))[0]
                results[tag] = (took, versions, outs, score)
            # the bug the fix works around: a tied checkpoint WITHOUT an explicit lm_head.weight
            raw = shutil.copytree(models["tied2"], tmp_path / "raw-tied2")
            await c.collective_rpc("reload_weights", {"weights_path": str(raw)})
            await c.flush_cache()
            results["raw"] = (await c.score([seq], 1))[0]
            with pytest.raises((EngineError, FileNotFoundError)):
                await c.update_weights_from_disk(str(tmp_path / "does-not-exist"), weight_version="bad")
            # back to the base weights, checked here (restore_base puts them back again even when this test fails)
            await c.update_weights_from_disk(str(shutil.copytree(models["base"], tmp_path / "base")), "default")
            results["base"] = (await c.score([seq], 1))[0]
        return results

    res = asyncio.run(go())
    for tag in ("tied2", "untied3"):
        took, versions, outs, score = res[tag]
        assert versions == {url: f"v-{tag}"}
        assert all(o.weight_version == f"v-{tag}" for o in outs)
        d_score = _max_diff(score, hf_logprobs(models[tag], seq, 1))
        d_sampled = max(_max_diff(o.output_logprobs, hf_logprobs(models[tag], prompt + o.output_ids, len(prompt)))
                        for o in outs)
        print(f"{tag}: reload {took:.2f} s, score diff {d_score:.2e}, sampled diff {d_sampled:.2e}")
        assert d_score <= TOL and d_sampled <= TOL
    stale = _max_diff(res["raw"], hf_logprobs(models["tied2"], seq, 1))
    print(f"tied reload without lm_head.weight: served logprobs off by {stale:.3f}")
    assert stale > 1e-2, "vLLM refreshed a tied output layer: the untie workaround may no longer be needed"
    assert _max_diff(res["base"], hf_logprobs(models["base"], seq, 1)) <= TOL


class _Recording:
    """A :class:`VLLMClient` whose HTTP layer records the requests and answers like a vLLM server."""

    @staticmethod
    def make():
        from megatron_dapo.engines.vllm_client import VLLMClient

        class Rec(VLLMClient):
            def __init__(self):
                super().__init__(["http://vllm-a:8000", "http://vllm-b:8000"], cpu=False)
                self.sent = []

            async def _http(self, method, url, path, payload=None, timeout_s=None):
                self.sent.append({"path": path, "body": payload, "method": method})
                if path == "/inference/v1/generate":
                    n = payload["sampling_params"].get("n", 1)
                    ids = [1, 2]
                    choice = lambda i: {"index": i, "finish_reason": "length", "token_ids": ids,  # noqa: E731
                                        "logprobs": {"content": [{"token_id": t, "logprob": -1.0} for t in ids]},
                                        "weight_versions": [{"version": "default", "start": 0, "end": 2}]}
                    plp = [None] + [{str(t): {"logprob": -1.0}} for t in payload["token_ids"][1:]]
                    return 200, {"request_id": payload.get("request_id"), "choices": [choice(i) for i in range(n)],
                                 "prompt_logprobs": plp}
                if path == "/weight_info":
                    return 200, {"weight_version": "default"}
                if path.startswith("/reset_prefix_cache"):
                    return 200, {"success": True}
                return 200, {}

        return Rec()


@pytest.mark.slow
def test_client_payloads_validate_against_vllm_classes(tmp_path):
    """Every request the client builds, sent through vLLM's own route functions and request classes in
    ONE subprocess of ``.venv-vllm``; deliberately wrong payloads are rejected by the same checker."""
    import torch as _t

    from megatron_dapo.engines.vllm_client import (
        build_ipc_update_info, build_nccl_update_info, build_vllm_generate_payload, check_payloads_in_vllm,
    )

    py = _vllm_python()
    ckpt = _perturbed_dir(tmp_path)
    c = _Recording.make()
    names, dtypes, shapes = ["model.norm.weight", "lm_head.weight"], [_t.float32, _t.bfloat16], [[64], [150, 64]]

    async def drive():
        sp = {"max_new_tokens": 8, "temperature": 0.7, "top_p": 0.9, "top_k": -1, "n": 2, "sampling_seed": 5,
              "stop_token_ids": [2], "ignore_eos": False, "min_new_tokens": 1, "repetition_penalty": 1.0}
        await c.generate([[3, 4, 5]], sp, rid="r")
        await c.generate([[3, 4, 5]], {"max_new_tokens": 4}, return_logprob=False)
        await c.score([[3, 4, 5, 6]], 1)
        await c.score([[3, 4, 5, 6]], 1, temperature=0.5)
        c._rid_locations["r-0"] = [("http://vllm-a:8000", ["r-0"])]
        await c.abort(rid="r")
        await c.abort_all()
        for mode in ("abort", "wait", "keep"):
            await c.pause(mode)
        await c.resume()
        await c.update_weights_from_disk(str(ckpt), "7")
        await c.update_weight_version("8")
        await c.get_weight_version()
        await c.flush_cache()
        await c.release_memory_occupation()
        await c.resume_memory_occupation(["weights"])
        await c.resume_memory_occupation()
        await c.init_weight_transfer("10.0.0.1", 29555, tp_size=2, backend="nccl")
        await c.start_weight_update()
        await c.update_weights(build_nccl_update_info(names, dtypes, shapes))
        await c.finish_weight_update("9")
        await c.init_weight_transfer("", 0, backend="ipc")
        handles = [{"GPU-0000": (0, "h", 1)}, {"GPU-0000": (0, "h", 2)}]
        await c.update_weights(build_ipc_update_info(names, dtypes, shapes, handles))
        await c.finish_weight_update(None)
        await c.shutdown_weight_transfer()

    asyncio.run(drive())
    sent = [r for r in c.sent if r["method"] == "POST"]
    backend = None
    items = []
    for r in sent:
        if r["path"] == "/init_weight_transfer_engine":
            backend = "ipc" if "master_address" not in r["body"]["init_info"] else "nccl"
        items.append({"path": r["path"], "body": r["body"], "backend": backend})
    paths = {i["path"].split("?")[0] for i in items}
    assert {"/inference/v1/generate", "/abort_requests", "/pause", "/resume", "/collective_rpc",
            "/reset_prefix_cache", "/update_weight_version", "/sleep", "/wake_up", "/init_weight_transfer_engine",
            "/start_weight_update", "/update_weights", "/finish_weight_update",
            "/shutdown_weight_transfer_engine"} <= paths, paths
    bad = [
        {"path": "/inference/v1/generate", "body": {"token_ids": [-1], "sampling_params": {}}},
        {"path": "/inference/v1/generate",
         "body": build_vllm_generate_payload([1], {"max_new_tokens": 4, "top_p": 1.5}, request_id="x")},
        {"path": "/collective_rpc", "body": {"method": "reload_weights"}},
        {"path": "/collective_rpc", "body": {"method": "reload_weights", "kwargs": {"weight_path": "/x"}}},
        {"path": "/pause?mode=later", "body": None},
        {"path": "/update_weights", "backend": "nccl",
         "body": {"update_info": {"names": ["a", "b"], "dtype_names": ["float32"], "shapes": [[1], [2]]}}},
        {"path": "/init_weight_transfer_engine", "backend": "nccl", "body": {"init_info": {"master_port": 1}}},
        {"path": "/update_weight_version", "body": {"version": "1"}},
    ]
    t = time.perf_counter()
    res = check_payloads_in_vllm(items + bad, python=py)
    print(f"{len(items)} client requests + {len(bad)} wrong ones checked in {time.perf_counter() - t:.1f} s")
    good, rejected = res[:len(items)], res[len(items):]
    failures = [(i["path"], r["error"]) for i, r in zip(items, good) if not r["ok"]]
    assert not failures, failures
    assert [r["ok"] for r in rejected] == [False] * len(bad), list(zip([b["path"] for b in bad], rejected))


def _perturbed_dir(tmp: Path) -> Path:
    """A minimal tied safetensors checkpoint (what update_weights_from_disk needs on disk)."""
    from safetensors.torch import save_file

    d = tmp / "ckpt"
    d.mkdir()
    save_file({"model.embed_tokens.weight": torch.zeros(150, 64), "model.norm.weight": torch.ones(64)},
              str(d / "model.safetensors"))
    return d


def _train(tmp: Path, name: str, model: Path, url: str, extra: list[str], timeout: int = 600):
    args = [PY, "-m", "megatron_dapo.train", CONFIG, f"output_dir={tmp}", f"run_name={name}",
            f"model.hf_path={model}", "rollout.backend=vllm", f"rollout.engine_urls=[{url}]",
            "weight_sync.transport=disk", "weight_sync.check_logprobs=true", "trainer.save_interval=100",
            "trainer.eval_interval=0"] + extra
    return subprocess.run(args, cwd=REPO_ROOT, env=repo_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_trainer_on_vllm_syncs_by_disk_reload(vllm_server, tmp_path, restore_base):
    """3 steps of the demo recipe on real vLLM (deterministic rollouts): the engine's logprobs equal the
    actor's after every sync (fp32, <= 1e-4) and the reported weight version follows the steps."""
    url, models, server_log = vllm_server
    proc = _train(tmp_path, "det", models["base"], url, ["trainer.total_steps=3"])
    assert proc.returncode == 0, fail_message(proc) + _server_log(server_log)
    sc = read_scalars(tmp_path / "det" / "tb") if (tmp_path / "det" / "tb").is_dir() else read_scalars(
        next(tmp_path.glob("**/tb")))
    diffs = [v for _, v in sc["weight_sync/engine_actor_logprob_max_abs_diff"]]
    print("engine-actor logprob diffs after each sync:", diffs)
    assert len(diffs) >= 3 and max(diffs) <= TOL, diffs
    assert [s for s, _ in sc["rollout/reward_mean"]] == [1, 2, 3]
    with urllib.request.urlopen(url + "/weight_info", timeout=5) as r:
        # the sync closing step k sends weight_version str(k): the engines' version counts the steps done
        assert json.loads(r.read())["weight_version"] == "3"


@pytest.mark.slow
def test_trainer_on_vllm_concurrent_rollout_counts_aborts(vllm_server, tmp_path, restore_base):
    """The default non-deterministic rollout on real vLLM: one request per prompt, concurrently, the rest
    aborted once the dynamic sampler is full - the aborted requests come back and are counted."""
    url, models, server_log = vllm_server
    proc = _train(tmp_path, "nondet", models["base"], url, [
        # 8 prompts x 32 samples = 256 sequences, twice what vLLM's CPU server runs at once (max_num_seqs 128):
        # the second half waits while the first is generated and scored, so when one mixed group fills the
        # sampler there are requests in flight to abort (groups that finished generating are kept as surplus
        # by the streaming scorer, and the sequences of one batch finish together on the protocol model)
        "trainer.total_steps=3", "rollout.mode=streaming", "rollout.rollout_batch_size=1",
        "rollout.n_samples_per_prompt=32", "algorithm.oversample_factor=8.0", "rollout.max_response_length=200",
        "algorithm.overlong_buffer_length=16", "actor.ppo_mini_batch_size=32"])
    assert proc.returncode == 0, fail_message(proc) + _server_log(server_log)
    sc = read_scalars(next(tmp_path.glob("**/tb")))
    aborted = sum(v for _, v in sc["dynamic_sampling/aborted_requests"])
    print("aborted requests per step:", sc["dynamic_sampling/aborted_requests"])
    assert aborted > 0  # (partial outputs of aborted requests: the protocol suite's abort tests)
    assert max(v for _, v in sc["weight_sync/engine_actor_logprob_max_abs_diff"]) <= TOL
    _wait_idle(url)


def test_missing_vllm_interpreter_is_one_line_exit_2(tmp_path):
    """``rollout.backend=vllm`` without a vLLM interpreter: exit 2 and one line naming ``make engines``."""
    proc = subprocess.run([PY, "-m", "megatron_dapo.train", CONFIG, f"output_dir={tmp_path}", "rollout.backend=vllm",
                           f"rollout.engine_python={tmp_path / 'no-venv' / 'bin' / 'python'}",
                           f"model.hf_path={tmp_path / 'm'}", "trainer.total_steps=1"],
                          cwd=REPO_ROOT, env=repo_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, fail_message(proc)
    assert "Traceback" not in proc.stderr, fail_message(proc)
    lines = [ln for ln in proc.stderr.splitlines() if "make engines" in ln]
    assert len(lines) == 1 and "rollout.engine_python" in lines[0], fail_message(proc)


# ---- pure: no server ----------------------------------------------------------------------------
def test_capability_table_matches_the_client():
    """The protocol suite's ``vllm`` capabilities (CPU) are what :attr:`VLLMClient.capabilities` declares for
    CPU servers, restricted to the suite's names; a GPU server adds ``memory_release`` (``/sleep``)."""
    from megatron_dapo.engines.vllm_client import VLLMClient
    from tests.engine_fixtures import CAPABILITIES, ENGINE_KINDS

    cpu = VLLMClient(["http://127.0.0.1:1"], cpu=True).capabilities & set(CAPABILITIES)
    gpu = VLLMClient(["http://127.0.0.1:1"], cpu=False).capabilities & set(CAPABILITIES)
    assert cpu == ENGINE_KINDS["vllm"].capabilities
    assert gpu - cpu == {"memory_release"}


def test_vllm_command_generate_payload_and_parse():
    from megatron_dapo.engines.launch_vllm import build_vllm_command, vllm_env
    from megatron_dapo.engines.vllm_client import (
        build_nccl_init_info, build_reload_payload, build_vllm_generate_payload, parse_vllm_generate_response,
    )

    gpu = build_vllm_command("/m", port=8000, tp_size=2, enable_sleep_mode=True, python="py")
    assert gpu[:3] == ["py", "-m", "vllm.entrypoints.openai.api_server"] and "processed_logprobs" in gpu
    assert "--enable-sleep-mode" in gpu and "--tensor-parallel-size" in gpu
    cpu = build_vllm_command("/m", port=8000, enable_sleep_mode=True, python="py", cpu=True)
    assert not {"--enable-sleep-mode", "--tensor-parallel-size", "--gpu-memory-utilization"} & set(cpu)
    env = vllm_env({}, cpu=True)
    assert env["VLLM_SERVER_DEV_MODE"] == "1" and env["OMP_NUM_THREADS"] == "1"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind" and env["HF_HUB_OFFLINE"] == "1"

    body = build_vllm_generate_payload([1, 2, 3], {"max_new_tokens": 5, "sampling_seed": 3, "n": 2, "top_k": -1,
                                                   "min_new_tokens": 1, "stop_token_ids": [7]}, request_id="r-0")
    assert body == {"request_id": "r-0", "token_ids": [1, 2, 3], "sampling_params": {
        "max_tokens": 5, "seed": 3, "n": 2, "top_k": 0, "min_tokens": 1, "stop_token_ids": [7], "logprobs": 0}}
    with pytest.raises(ValueError, match="regex"):
        build_vllm_generate_payload([1], {"regex": "a+"}, request_id="x")
    with pytest.raises(ValueError, match="max_new_tokens"):
        build_vllm_generate_payload([1], {"max_tokens": 3}, request_id="x")  # SGLang names only
    ans = {"request_id": "generate-tokens-r-0", "choices": [
        {"index": 1, "finish_reason": "abort", "token_ids": [9],
         "logprobs": {"content": [{"token_id": 9, "logprob": -0.3}]}},
        {"index": 0, "finish_reason": "stop", "token_ids": [4, 7], "stop_reason": 7,
         "logprobs": {"content": [{"token_id": 4, "logprob": -0.1}, {"token_id": 7, "logprob": -0.2}]},
         "weight_versions": [{"version": "1", "start": 0, "end": 1}, {"version": "2", "start": 1, "end": 2}]}]}
    outs = parse_vllm_generate_response(ans, prompt_len=3)
    assert [o.output_ids for o in outs] == [[4, 7], [9]] and [o.finish_reason for o in outs] == ["stop", "abort"]
    assert outs[0].output_logprobs == [-0.1, -0.2] and outs[0].weight_version == "2" and outs[1].weight_version is None
    bad = json.loads(json.dumps(ans))
    bad["choices"][1]["logprobs"]["content"][0]["token_id"] = 8
    with pytest.raises(ValueError, match="token ids"):
        parse_vllm_generate_response(bad, prompt_len=3)
    assert build_reload_payload("/ckpt/step3") == {"method": "reload_weights", "kwargs": {"weights_path": "/ckpt/step3"}}
    assert build_nccl_init_info("h", 29500, 3, 5)["rank_offset"] == 3
    with pytest.raises(ValueError, match="rank_offset"):
        build_nccl_init_info("h", 29500, 5, 5)


def test_untie_and_output_layer_copy(tmp_path):
    """The served untied copy computes the same function as the tied source; a reload directory gets an
    explicit ``lm_head.weight`` equal to the embedding, listed in the index."""
    import transformers
    from safetensors import safe_open

    from megatron_dapo.data.tiny_checkpoint import make_tiny_checkpoint
    from megatron_dapo.models.export import add_output_layer_copy, untie_hf_checkpoint

    src = make_tiny_checkpoint(tmp_path / "tied", hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
                               num_layers=1, demo_vocab_size=120)
    before = sorted(p.name for p in src.iterdir())
    out = untie_hf_checkpoint(src, tmp_path / "untied")
    assert sorted(p.name for p in src.iterdir()) == before  # source untouched
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    a = transformers.AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    b = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert b.lm_head.weight.data_ptr() != b.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        untie_hf_checkpoint(out, tmp_path / "again")
    reload_dir = shutil.copytree(src, tmp_path / "reload")
    assert add_output_layer_copy(reload_dir) is True and add_output_layer_copy(reload_dir) is False
    index = json.loads((reload_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert index["lm_head.weight"] == "lm_head.safetensors"
    with safe_open(str(reload_dir / "lm_head.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_tensor("lm_head.weight"), a.model.embed_tokens.weight)
    with pytest.raises(FileNotFoundError):
        add_output_layer_copy(tmp_path / "nothing-here")


def test_config_rejects_tiny_head_size_vllm_cannot_run():
    from megatron_dapo.config import ConfigError, load_config

    cfg = load_config(CONFIG, ["rollout.backend=vllm"])  # the demo shape (head size 32) runs everywhere
    assert cfg.model.tiny_hidden_size // cfg.model.tiny_num_attention_heads == 32
    with pytest.raises(ConfigError, match="model.tiny_num_attention_heads.*head size 16"):
        load_config(CONFIG, ["rollout.backend=vllm", "model.tiny_num_attention_heads=4"])

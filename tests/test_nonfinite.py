"""Issue 16: non-finite numbers and malformed engine output never reach the weights.

* actor (torchrun workers, gloo): NaN loss in one micro-batch at DP=2 and TP=2, an inf gradient in one
  parameter shard of one rank, a NaN ratio, a NaN entropy: every rank skips, the state (parameters, fp32
  master weights, Adam moments and step, LR scheduler) stays bit-equal, and the next good update equals a
  run that never saw the bad batches; the regular and the distributed optimizer; the save guard; and the
  premise (megatron-core's own ``step()`` turns the weights into NaN);
* trainer: K consecutive skipped updates stop the run with one line and exit 2, the latest checkpoint is
  good and loadable;
* rollout: a proxy in front of a real engine returns an out-of-vocabulary id, a NaN logprob and a logprob
  list of the wrong length: each counted and dropped, the step trains on the rest; an engine that keeps
  misbehaving stops the step naming its URL.

The test hooks (``MEGATRON_DAPO_TEST_NONFINITE`` / ``actor.test_injection``, the proxy) are never enabled by
production code.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT
from dist_scripts.common import free_port
from helpers import CONFIG, fail_message, read_scalars, repo_env

SCRIPTS = REPO_ROOT / "tests" / "nonfinite_scripts"
sys.path.insert(0, str(SCRIPTS))

from misbehaving_proxy import MisbehavingProxy  # noqa: E402

from megatron_dapo.rollout.validate import (  # noqa: E402
    MALFORMED_REASONS, MalformedEngineOutput, ResponseValidator, check_response,
)


# ---------------------------------------------------------------------------------------------- pure checks
@pytest.mark.parametrize("ids, lps, finish, reason", [
    ([1, 2, 3], [-0.1, -2.0, 0.0], "stop", None),
    ([1, 2], [-0.1, -0.2], "length", None),
    ([1, 300], [-0.1, -0.2], "stop", "token_id"),
    ([-1, 2], [-0.1, -0.2], "stop", "token_id"),
    ([1, 2], [-0.1], "stop", "logprob_count"),
    ([1, 2], None, "stop", "logprob_count"),
    ([1, 2], [-0.1, float("nan")], "stop", "logprob_nonfinite"),
    ([1, 2], [float("-inf"), -0.1], "stop", "logprob_nonfinite"),
    ([1, 2], [-0.1, 0.5], "stop", "logprob_positive"),
    (list(range(9)), [-0.1] * 9, "length", "length"),
    ([1, 2], [-0.1, -0.2], "abort", "finish_reason"),
    ([1, 2], [-0.1, -0.2], "eos", "finish_reason"),
])
def test_check_response(ids, lps, finish, reason):
    got = check_response(ids, lps, finish, vocab_size=300, max_response_length=8)
    assert (got and got[0]) == reason, got
    if reason:
        assert reason in MALFORMED_REASONS and got[1]


class _Out:
    def __init__(self, ids, lps, finish="stop", url="http://e0"):
        self.output_ids, self.output_logprobs, self.finish_reason, self.engine_url = ids, lps, finish, url


def test_validator_counts_drops_and_stops_on_a_streak():
    v = ResponseValidator(vocab_size=300, max_response_length=8, max_consecutive_malformed=4)
    good = _Out([1, 2], [-0.1, -0.2])
    assert v.screen_group([good, good])
    assert not v.screen_group([good, _Out([999], [-0.1])])
    assert not v.screen_group([_Out([1], [float("nan")]), _Out([1, 2], [-0.1]), good])  # streak reset by good
    m = v.metrics()
    assert m["malformed_responses"] == 3 and m["malformed_groups_dropped"] == 2
    assert m["malformed/token_id"] == 1 and m["malformed/logprob_nonfinite"] == 1
    assert m["malformed/logprob_count"] == 1
    other = _Out([1], [-0.1], url="http://e1")
    v.start_step()
    assert v.metrics()["malformed_responses"] == 0
    bad = _Out([1], [0.7])
    with pytest.raises(MalformedEngineOutput, match=r"engine http://e0 returned 4 malformed responses in a row"):
        v.screen_group([bad, other, bad, bad, bad])  # e1's good answer does not reset e0's streak


def test_advantages_finite_by_construction():
    from megatron_dapo.algorithm import NonFiniteAdvantageError, compute_group_advantages

    with pytest.raises(NonFiniteAdvantageError, match=r"bug: rewards of group 1 \(row 1"):
        compute_group_advantages(torch.tensor([[1.0, -1.0], [float("nan"), 1.0]]))
    with pytest.raises(NonFiniteAdvantageError, match="bug: advantages of group 0"):
        compute_group_advantages(torch.tensor([[3e38, 3e38, -3e38]]), norm_by_std=False)  # sum overflows fp32
    assert torch.isfinite(compute_group_advantages(torch.tensor([[1.0, -1.0, 1.0]]))).all()


def test_config_keys_validated():
    from megatron_dapo.config import ConfigError, DAPOConfig

    cfg = DAPOConfig()
    assert cfg.trainer.max_consecutive_nonfinite == 3 and cfg.rollout.max_consecutive_malformed_per_engine == 8
    cfg.model.make_tiny, cfg.model.hf_path = True, "unused"
    cfg.trainer.max_consecutive_nonfinite = 0
    with pytest.raises(ConfigError, match="trainer.max_consecutive_nonfinite"):
        cfg.validate(target="cluster")
    cfg.trainer.max_consecutive_nonfinite = 2
    cfg.rollout.max_consecutive_malformed_per_engine = 0
    with pytest.raises(ConfigError, match="rollout.max_consecutive_malformed_per_engine"):
        cfg.validate(target="cluster")


def test_parser_passes_wrong_logprob_count_to_the_validator():
    from megatron_dapo.engines.payloads import parse_generate_response

    (o,) = parse_generate_response({"output_ids": [3, 4], "meta_info": {
        "finish_reason": "stop", "output_token_logprobs": [[-1.0, 3, None]]}})
    assert o.output_logprobs == [-1.0]
    assert check_response(o.output_ids, o.output_logprobs, o.finish_reason, vocab_size=10,
                          max_response_length=4)[0] == "logprob_count"


def test_vllm_parser_passes_wrong_logprob_count_to_the_validator():
    from megatron_dapo.engines.vllm_client import parse_vllm_generate_response

    choice = {"index": 0, "finish_reason": "stop", "token_ids": [3, 4],
              "logprobs": {"content": [{"token_id": 3, "logprob": -1.0}]}}
    (o,) = parse_vllm_generate_response({"choices": [choice]}, prompt_len=2)
    assert o.output_logprobs == [-1.0]
    assert check_response(o.output_ids, o.output_logprobs, o.finish_reason, vocab_size=10,
                          max_response_length=4)[0] == "logprob_count"
    choice["logprobs"]["content"].append({"token_id": 5, "logprob": -2.0})  # same length, another token: refused
    with pytest.raises(ValueError, match="logprob token ids do not match token_ids"):
        parse_vllm_generate_response({"choices": [choice]}, prompt_len=2)


def test_guard_hook_parsing_term_bits_and_update_selection(monkeypatch):
    from megatron_dapo.actor.batching import build_actor_batch
    from megatron_dapo.actor.nonfinite import (
        NONFINITE_TERMS, TEST_NONFINITE_ENV, NonFiniteGuard, NonFiniteUpdate, injected_term, nonfinite_bits,
        parse_test_injection,
    )

    assert parse_test_injection(None) is None and parse_test_injection("") is None
    with pytest.raises(ValueError, match=f"{TEST_NONFINITE_ENV}: kind must be 'loss' or 'grad'"):
        parse_test_injection('{"kind": "weights"}')
    with pytest.raises(ValueError, match=f"{TEST_NONFINITE_ENV}: term must be one of"):
        parse_test_injection('{"kind": "loss", "term": "reward"}')

    good = {"pg_loss": 0.5, "entropy": 1.0, "kl_loss": 0.0, "ratio_mean": 1.0, "approx_kl": 0.0}
    assert nonfinite_bits(good, 0.5) == 0
    assert nonfinite_bits(good, math.nan) == 1  # a bad total with finite terms counts as policy_loss
    for i, key in [(1, "entropy"), (2, "kl_loss"), (3, "ratio_mean"), (3, "approx_kl")]:
        assert nonfinite_bits(dict(good, **{key: math.inf}), 0.5) == 1 << i, key
    assert len(NONFINITE_TERMS) == 4

    monkeypatch.setenv(TEST_NONFINITE_ENV, '{"kind": "loss", "term": "entropy", "from_update": 2, '
                                           '"micro_batch": 1, "dp_rank": 0, "value": "inf"}')
    guard = NonFiniteGuard([], None, rank=0, dp_rank=0, dp_size=1, last_stage=True)
    assert guard.last is None
    assert [guard.injection(i, True) is not None for i in range(4)] == [False, False, True, True]
    assert guard.injection(3, apply_update=False) is None
    guard.test_injection = {"kind": "grad", "updates": [1]}
    assert [guard.injection(i, True) is not None for i in range(3)] == [False, True, False]

    spec = {"kind": "loss", "term": "entropy", "micro_batch": 1, "dp_rank": 0, "value": "inf"}
    mb = build_actor_batch([[1, 2]], [[3, 4]])
    mb.extras["mb_index"] = 1
    assert injected_term(spec, mb, dp_rank=0) == ("entropy", math.inf)
    assert injected_term(spec, mb, dp_rank=1) is None
    assert injected_term(dict(spec, micro_batch=0), mb, dp_rank=0) is None
    assert injected_term({"kind": "grad"}, mb, dp_rank=0) is None

    check = NonFiniteUpdate(True, ("entropy",), True, [(0, 1)])
    assert check.describe() == "non-finite entropy and non-finite gradient norm (first in micro-batch 1 of DP rank 0)"


# ---------------------------------------------------------------------------------------------- actor
@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    from megatron_dapo.data import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("nf") / "m", family="qwen2", num_layers=2, vocab_size=300)


def _torchrun_worker(tmp_path, hf, tp: int, variants: str, ckpt: bool) -> dict:
    out = tmp_path / "report.json"
    env = repo_env()
    env.update({"HF": str(hf), "OUT": str(out), "TP": str(tp), "VARIANTS": variants})
    if ckpt:
        env["CKPT"] = str(tmp_path / "ckpt")
    cmd = ["timeout", "300", sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           f"--master-port={free_port()}", str(SCRIPTS / "actor_worker.py")]
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=330)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


def _check_variant(per_rank: list[dict], dp: int):
    expect = {"nan_policy_loss": ("policy_loss",), "nan_ratio": ("ratio",), "nan_entropy": ("entropy",),
              "inf_grad_shard": ()}
    for rank, rep in enumerate(per_rank):
        ups = rep["updates"]
        assert [u["name"] for u in ups][0] == "good" and ups[-1]["name"] == "good"
        for u in ups:
            bad = u["name"] != "good"
            assert u["skipped"] is bad, (rank, u)
            assert u["metrics"]["update_skipped"] == (1.0 if bad else 0.0)
            if bad:
                assert u["changed"] == 0, f"rank {rank}: {u['name']} changed {u['changed_keys']}"
                for term in expect[u["name"]]:
                    assert term in u["terms"] and u["metrics"][f"nonfinite_{term}"] == 1.0, (rank, u)
            else:
                assert u["changed"] > 0 and math.isfinite(u["grad_norm"]), (rank, u)
        # which micro-batch: micro-batch 1 of the last DP rank, found on every rank
        assert ups[1]["micro_batches"] == [[dp - 1, 1]], ups[1]
        # the inf in one rank's gradient shard is seen by every rank (the norm flag)
        assert ups[2]["grad_norm_flag"] and not math.isfinite(ups[2]["grad_norm"]), ups[2]
        assert rep["final_vs_clean"] == [], f"rank {rank}: differs from the clean run in {rep['final_vs_clean']}"
        assert rep["final_finite"]


@pytest.mark.slow
def test_dp2_nonfinite_updates_skip_bit_exact(tmp_path, tiny_hf):
    rep = _torchrun_worker(tmp_path, tiny_hf, tp=1, variants="distopt-bf16,regular-fp32", ckpt=True)
    for variant in ("distopt-bf16", "regular-fp32"):
        _check_variant(rep[variant], dp=2)
    # regular optimizer, DP=2: the inf shard is on rank 1 only; rank 0's own norm was finite, yet it skipped
    # too because the flag is all-reduced over every rank
    for r in rep["save_guard"]:
        assert r["error"] and "rank 1 holds NaN/inf in parameter" in r["error"], r
        assert r["latest"].endswith("iter_0000001") and r["entries"] == ["iter_0000001", "latest"], r
    # premise of the issue: megatron-core's own step() reports success and writes NaN into the weights
    assert all(u["reported_ok"] and u["params_nan"] for u in rep["unguarded_step"]), rep["unguarded_step"]


@pytest.mark.slow
def test_tp2_nonfinite_updates_skip_bit_exact(tmp_path, tiny_hf):
    rep = _torchrun_worker(tmp_path, tiny_hf, tp=2, variants="regular-bf16", ckpt=False)
    _check_variant(rep["regular-bf16"], dp=1)


# ---------------------------------------------------------------------------------------------- trainer
@pytest.fixture(scope="module")
def cpu_engine(tiny_model, tmp_path_factory):
    """One CPU engine on ``tiny_model`` for the module (the trainer runs use it through rollout.engine_urls)."""
    from megatron_dapo.engines.launch_cpu import launch_cpu_engines

    procs = launch_cpu_engines(str(tiny_model), 1, seed=0, log_dir=tmp_path_factory.mktemp("engine_logs"),
                               health_timeout_s=180)
    with procs:
        yield procs.urls[0]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """The demo model of examples/tiny-cpu (random Qwen2 + demo tokenizer), made in-process."""
    from megatron_dapo.config import load_config
    from megatron_dapo.trainer import prepare_model

    d = tmp_path_factory.mktemp("model") / "tiny-qwen2"
    return prepare_model(load_config(CONFIG, [f"model.hf_path={d}"]))


def _train(overrides: list[str], env_extra: dict[str, str] | None = None, timeout: int = 400):
    env = repo_env()
    env.update(env_extra or {})
    cmd = [sys.executable, "-m", "megatron_dapo.train", CONFIG] + overrides
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _small(tmp: Path, model: Path, name: str, steps: int) -> list[str]:
    return [f"output_dir={tmp}", f"run_name={name}", f"model.hf_path={model}", f"trainer.total_steps={steps}",
            "rollout.rollout_batch_size=4", "rollout.n_samples_per_prompt=4", "actor.ppo_mini_batch_size=8",
            "trainer.eval_interval=0", "trainer.export_hf=false", "weight_sync.transport=disk",
            "rollout.colocated=false"]  # a shared engine must stay awake for the next test


@pytest.mark.slow
def test_consecutive_nonfinite_updates_stop_with_good_checkpoint(tmp_path, tiny_model, cpu_engine):
    # 2 updates per step; from update 2 on every policy loss is NaN: step 1 trains and is saved, step 2 skips
    # both updates (streak 2 = max) -> one line, exit 2, no checkpoint of step 2
    inject = {"MEGATRON_DAPO_TEST_NONFINITE": json.dumps({"kind": "loss", "term": "policy_loss", "from_update": 2})}
    proc = _train(_small(tmp_path, tiny_model, "nf", 5) + ["trainer.save_interval=1",
                                                           "trainer.max_consecutive_nonfinite=2",
                                                           f'rollout.engine_urls=["{cpu_engine}"]'], inject)
    assert proc.returncode == 2, fail_message(proc)
    assert "Traceback" not in proc.stderr, fail_message(proc)
    stops = [x for x in proc.stderr.splitlines() if x.startswith("megatron-dapo:")]
    assert len(stops) == 1 and "2 consecutive optimizer updates were skipped as non-finite at step 2" in stops[0], \
        fail_message(proc)
    assert "non-finite policy_loss" in stops[0] and "iter_0000001" in stops[0], stops[0]
    run = tmp_path / "nf"
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "iter_0000001"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("iter_")) == ["iter_0000001"]
    sc = read_scalars(run / "tb")
    assert [v for _, v in sc["actor/update_skipped"]] == [0.0]
    assert math.isfinite(sc["actor/pg_loss"][0][1])
    # the last checkpoint loads and holds finite weights, different from the initial ones (step 1 trained)
    code = (
        "import sys, json, torch; sys.path.insert(0, sys.argv[1])\n"
        "from megatron_dapo.actor.megatron_actor import MegatronActor\n"
        "from megatron_dapo.actor.checkpoint import load_checkpoint\n"
        "from megatron_dapo.config import ActorConfig\n"
        "a = MegatronActor(sys.argv[2], ActorConfig(params_dtype='fp32'))\n"
        "p0 = {n: t.clone() for n, t in a.iter_hf_tensors()}\n"
        "st = load_checkpoint(a, sys.argv[3])\n"
        "p1 = {n: t.clone() for n, t in a.iter_hf_tensors()}\n"
        "fin = all(bool(torch.isfinite(t).all()) for t in p1.values())\n"
        "moved = any(not torch.equal(p0[n], p1[n]) for n in p0)\n"
        "print(json.dumps({'step': st['step'], 'finite': fin, 'moved': moved}))\n")
    out = subprocess.run([sys.executable, "-c", code, str(REPO_ROOT), str(tiny_model), str(ckpts)],
                         cwd=REPO_ROOT, env=repo_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res == {"step": 1, "finite": True, "moved": True}, res


# ---------------------------------------------------------------------------------------------- engines
@pytest.fixture(scope="module", params=["cpu"])
def upstream_engine(request, tiny_model):
    """``(engine URL, vocab size)`` of our CPU engine serving ``tiny_model``, behind the misbehaving proxy in the
    trainer runs (the proxy's rollout test runs in front of every engine kind: the ``engine`` fixture)."""
    from megatron_dapo.models.hf_config import spec_from_hf_config

    vocab = spec_from_hf_config(tiny_model).vocab_size
    if request.param == "cpu":
        return request.getfixturevalue("cpu_engine"), vocab
    raise AssertionError(f"unknown upstream {request.param!r}")  # pragma: no cover - added after the merge


def _collect(url: str, vocab: int, tokenizer_dir: Path, threshold: int = 8, backend: str = "cpu"):
    """One step's rollout through ``collect_batch`` against ``url`` with a validator (no trainer), through the
    client the trainer builds for ``backend`` (``rollout.backend``)."""
    from megatron_dapo.algorithm import DynamicSampler
    from megatron_dapo.data import PromptDataset, generate_tasks, load_tokenizer, render_batch
    from megatron_dapo.engines.engine_set import BACKENDS
    from megatron_dapo.rollout.generation import RolloutSettings, collect_batch

    tok = load_tokenizer(tokenizer_dir)
    ds = PromptDataset(generate_tasks(64, seed=1), seed=1, shuffle=False)
    sampler = DynamicSampler(3, 4, enabled=False, max_num_gen_batches=4)
    validator = ResponseValidator(vocab, 16, threshold)
    s = RolloutSettings(n_samples_per_prompt=4, max_response_length=16, seed=3, deterministic=True,
                        soft_overlong_punishment=False, response_validator=validator)
    client = BACKENDS[backend].client([url], router_url=None, api_key=None, request_timeout_s=600.0, max_retries=0)
    try:
        groups, _ = collect_batch(client, sampler, lambda n: render_batch(tok, ds.next_batch(n), 256)[0], tok, s, 0)
    finally:
        client.close()
    return groups, validator


@pytest.mark.slow
def test_proxy_corrupt_responses_dropped_and_counted(engine):
    """The proxy in front of each session engine (our CPU engine, real SGLang, real vLLM): the three corrupted
    responses of the engine's own answers are dropped with their groups and counted by reason."""
    from megatron_dapo.models.hf_config import spec_from_hf_config

    url, model, kind = engine.url, engine.model_dir, engine.kind.name
    vocab = spec_from_hf_config(model).vocab_size
    # SGLang-API engines answer one sample-major batch (items 0, 1, 2 are sample 0 of prompts 0, 1, 2); vLLM one
    # request per prompt with its n = 4 choices (items 0, 4, 8 are in the first three answers to arrive)
    at = (0, 4, 8) if kind == "vllm" else (0, 1, 2)
    plan = dict(zip(at, ("oov", "nan_logprob", "wrong_length")))
    with MisbehavingProxy(url, vocab_size=vocab, plan=plan) as p:
        groups, v = _collect(p.url, vocab, model, backend=kind)
    assert p.corrupted == sorted(plan.items()), p.corrupted
    m = v.metrics()
    assert m["malformed_responses"] == 3 and m["malformed_groups_dropped"] == 3, m
    for reason in ("token_id", "logprob_nonfinite", "logprob_count"):
        assert m[f"malformed/{reason}"] == 1, m
    assert len(groups) == 3  # the batch filled from the next round's prompts
    for g in groups:
        assert all(0 <= t < vocab for r in g.responses for t in r)
        assert all(math.isfinite(x) and x <= 1e-4 for lp in g.rollout_logprobs for x in lp)
    # an engine that keeps returning malformed output stops the step, naming it
    with MisbehavingProxy(url, vocab_size=vocab, corrupt_all="nan_logprob") as bad:
        with pytest.raises(MalformedEngineOutput, match=rf"engine {bad.url} returned 5 malformed responses in a row"):
            _collect(bad.url, vocab, model, threshold=5, backend=kind)


@pytest.mark.slow
def test_trainer_step_trains_on_the_rest_through_proxy(tmp_path, upstream_engine, tiny_model):
    url, vocab = upstream_engine
    with MisbehavingProxy(url, vocab_size=vocab, plan={0: "oov", 1: "nan_logprob", 2: "wrong_length"}) as p:
        proc = _train(_small(tmp_path, tiny_model, "px", 1) + [f'rollout.engine_urls=["{p.url}"]', "resume=none"])
    assert proc.returncode == 0, fail_message(proc)
    assert [k for _, k in p.corrupted] == ["oov", "nan_logprob", "wrong_length"], p.corrupted
    sc = read_scalars(tmp_path / "px" / "tb")
    one = {k: v[0][1] for k, v in sc.items()}
    assert one["rollout/malformed_responses"] == 3 and one["rollout/malformed_groups_dropped"] == 3, one
    assert one["rollout/malformed/token_id"] == one["rollout/malformed/logprob_nonfinite"] == 1
    assert one["rollout/malformed/logprob_count"] == 1
    assert one["actor/num_updates"] == 2 and one["actor/update_skipped"] == 0 and math.isfinite(one["actor/pg_loss"])


@pytest.mark.slow
def test_trainer_stops_on_an_engine_that_keeps_misbehaving(tmp_path, upstream_engine, tiny_model):
    url, vocab = upstream_engine
    with MisbehavingProxy(url, vocab_size=vocab, corrupt_all="oov") as p:
        proc = _train(_small(tmp_path, tiny_model, "bad", 1) + [f'rollout.engine_urls=["{p.url}"]', "resume=none",
                                                                "rollout.max_consecutive_malformed_per_engine=4"])
    assert proc.returncode == 2, fail_message(proc)
    assert "Traceback" not in proc.stderr, fail_message(proc)
    stops = [x for x in proc.stderr.splitlines() if x.startswith("megatron-dapo:")]
    assert len(stops) == 1 and f"engine {p.url} returned 4 malformed responses in a row" in stops[0], fail_message(proc)
    assert not (tmp_path / "bad" / "checkpoints").exists()

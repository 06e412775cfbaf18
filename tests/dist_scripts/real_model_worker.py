"""torchrun worker for tests/test_real_model.py: SmolLM2-135M-Instruct (a real pretrained model) at one layout.

Env: ``HF_DIR`` (the prepared HF checkpoint), ``CKPT`` (the Megatron checkpoint tools/convert_hf_to_megatron.py
wrote from it; unset or empty: no fp64 Megatron logits, the fp32 actor log-probs only), ``TP``, ``PP``, ``OUT``
(torch.save of a dict, written by global rank 0), ``HF_REF=1`` to add transformers' reference values
(single-process launch only).

Two checks per layout, on real token ids (chat-template prompts + answers, see :func:`real_batch`):

* fp32, the production path: :class:`MegatronActor` (HF loading, TP/PP schedule, chunked log-prob kernel)
  ``compute_logprobs`` → ``actor_logprobs`` ``[N, L]`` (zero outside the response mask);
* fp64, the weight mapping alone: ``megatron_dapo.models.convert.megatron_model`` loads ``CKPT`` at the layout,
  is cast to float64, and gives full-vocabulary logits ``meg64_logits`` ``[n, s, V]`` (TP gathered; PP: the
  first stage's hidden states are sent to the second stage over gloo).

With ``HF_REF=1``: ``hf32_logprobs`` / ``hf64_logprobs`` (actor alignment) and ``hf64_logits`` (transformers in
float64 with :func:`convert.exact_rmsnorm`), the references the test compares against.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

TEXTS = [
    ("What is 3 + 4?", "3 + 4 = 7.\nAnswer: 7"),
    ("Janet has 16 eggs and eats 3. How many are left?", "16 - 3 = 13 eggs are left.\nAnswer: 13"),
    ("Name a color of the sky.", "The sky is blue."),
]


def real_batch(hf_dir):
    """``(prompts, responses, tokens)``: chat-template prompt ids, response ids (ending in ``<|im_end|>``) and an
    int64 ``[3, 24]`` block of the first 24 ids of each full sequence."""
    import torch

    from megatron_dapo.data.dataset import render_prompt
    from megatron_dapo.data.tokenizer import load_tokenizer

    tok = load_tokenizer(hf_dir)
    prompts = [render_prompt(tok, [{"role": "user", "content": q}], None) for q, _ in TEXTS]
    resps = [tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for _, a in TEXTS]
    tokens = torch.tensor([(p + r)[-24:] for p, r in zip(prompts, resps)])
    return prompts, resps, tokens


def hf_reference(hf_dir, batch, tokens):
    """transformers' log-probs (fp32 and fp64) in the actor's alignment and fp64 logits of ``tokens``."""
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_dapo.models.convert import exact_rmsnorm

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    out = {}
    for tag in ("hf32", "hf64"):
        if tag == "hf64":
            model.double()
            exact_rmsnorm(model)
        lp = torch.zeros(batch.input_ids.shape, dtype=torch.float64)
        with torch.no_grad():
            for i in range(len(batch)):
                n = int(batch.seq_lengths[i])
                ids = batch.input_ids[i: i + 1, :n]
                logp = torch.log_softmax(model(ids).logits[0].double(), -1)
                lp[i, 1:n] = logp[:-1].gather(1, ids[0, 1:, None]).squeeze(1)
            out[f"{tag}_logprobs"] = lp * batch.response_mask
            if tag == "hf64":
                out["hf64_logits"] = model(tokens).logits.double()
    return out


def meg64_logits(hf_dir, ckpt, tokens, tp, pp):
    """fp64 logits ``[n, s, V]`` of the converted checkpoint at TP×PP (returned on the last stage, else None)."""
    import torch
    import torch.distributed as dist

    from megatron_dapo.cpu_shims import device_remap
    from megatron_dapo.models.convert import load_megatron_model, megatron_logits, megatron_model
    from megatron_dapo.models.hf_config import spec_from_hf_config

    spec = spec_from_hf_config(hf_dir)
    with megatron_model(spec, tp=tp, pp=pp) as mm:
        model, ps = mm["model"], mm["ps"]
        load_megatron_model(model, Path(ckpt))
        model.double()
        if pp == 1:
            return megatron_logits(model, tokens, tp, spec.vocab_size)
        b, s = tokens.shape
        pos = torch.arange(s).unsqueeze(0).expand(b, s)
        causal = torch.ones(s, s, dtype=torch.bool).triu(1).view(1, 1, s, s)
        group = ps.get_pipeline_model_parallel_group()
        ranks = dist.get_process_group_ranks(group)
        with torch.no_grad(), device_remap():
            if ps.is_pipeline_first_stage():
                hidden = model(tokens, pos, causal)   # [s, b, h] fp64
                dist.send(hidden.contiguous(), dst=ranks[1], group=group)
                return None
            hidden = torch.empty(s, b, spec.hidden_size, dtype=torch.float64)
            dist.recv(hidden, src=ranks[0], group=group)
            model.set_input_tensor(hidden)
            out = model(tokens, pos, causal)
            if tp > 1:
                from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

                out = gather_from_tensor_model_parallel_region(out)
            return out[..., :spec.vocab_size].double()


def main():
    import torch
    import torch.distributed as dist

    from megatron_dapo.actor.batching import build_actor_batch
    from megatron_dapo.actor.megatron_actor import MegatronActor
    from megatron_dapo.config import ActorConfig

    hf_dir, tp, pp = os.environ["HF_DIR"], int(os.environ["TP"]), int(os.environ["PP"])
    prompts, resps, tokens = real_batch(hf_dir)
    batch = build_actor_batch(prompts, resps)
    res = {"tp": tp, "pp": pp, "mask": batch.response_mask}
    actor = MegatronActor(hf_dir, ActorConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                              lr=1e-6, lr_warmup_steps=0, max_tokens_per_gpu=256,
                                              logprob_chunk_size=64), total_train_steps=1)
    lp, _ = actor.compute_logprobs(batch)
    res["actor_logprobs"] = lp.double()
    actor.close()
    if os.environ.get("CKPT"):
        logits = meg64_logits(hf_dir, os.environ["CKPT"], tokens, tp, pp)
        # the last pipeline stage's TP rank 0 holds the logits: collect them on global rank 0
        box = [logits if logits is not None and (dist.get_rank() % tp == 0) else None]
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, box[0])
        res["meg64_logits"] = next(g for g in gathered if g is not None)
    if os.environ.get("HF_REF") == "1":
        res.update(hf_reference(hf_dir, batch, tokens))
    res["tokens"] = tokens
    if dist.get_rank() == 0:
        torch.save(res, os.environ["OUT"])
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

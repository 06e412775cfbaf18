"""Padding-free sequence packing (THD, ``PackedSeqParams``): pack/unpack units and actor equivalence.

* units: ``cu_seqlens`` (int32), the padding multiple, per-sequence positions, the pack/unpack round trip,
  fixed-length rows, token-budget micro-batching, bad input errors, the config rule;
* megatron-core's unfused THD RoPE restarts positions at every ``cu_seqlens_q_padded`` boundary;
* the Megatron actor (this file doubles as the torchrun worker): log-probs/entropies with
  ``pack_sequences=True`` equal the padded ones (<= 1e-5) and the gradients of one DAPO loss step equal the
  padded gradients (relative <= 1e-6) at TP=1, TP=2, PP=2 and PP=2 x VPP=2 (fixed-length packed rows);
  a packing with one merged segment (cross-sequence attention) changes the log-probs (not vacuous).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE.parent))

# ----------------------------------------------------------------------------------------------- worker


def _worker_batch():
    """6 rows with very different lengths (4..26 tokens) over token ids < 300."""
    from megatron_dapo.actor.batching import build_actor_batch

    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (5, 2, 9, 3, 7, 4)]
    resps = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (17, 2, 8, 1, 12, 5)]
    return build_actor_batch(prompts, resps)


def _worker_main(out_path: str, model_dirs: str, layouts: str) -> None:
    import torch.distributed as dist

    import megatron_dapo.actor.megatron_actor as ma
    from megatron_dapo.actor.packing import PackedMicroBatch
    from megatron_dapo.config import ActorConfig
    from megatron_dapo.models.hf_config import spec_from_hf_config

    seen: list[tuple[int, int]] = []  # (packed row length, rows packed) of every packed micro-batch
    real_pack = ma.pack_sequences

    def counting_pack(ids, lens, **kw):
        p = real_pack(ids, lens, **kw)
        seen.append((p.total_len, p.num_seqs))
        return p

    ma.pack_sequences = counting_pack
    results = {}
    for spec in layouts.split(";"):
        lay = dict(kv.split("=") for kv in spec.split(",") if kv)
        results[spec] = {}
        for path in model_dirs.split(","):
            fam = spec_from_hf_config(path).family
            cfg = ActorConfig(tensor_model_parallel_size=int(lay.get("tp", 1)),
                              pipeline_model_parallel_size=int(lay.get("pp", 1)),
                              virtual_pipeline_model_parallel_size=int(lay["vpp"]) if lay.get("vpp") else None,
                              lr=1e-3, lr_warmup_steps=0, weight_decay=0.0, clip_grad=0.0, max_tokens_per_gpu=32,
                              logprob_chunk_size=5, optimizer="sgd")
            actor = ma.MegatronActor(path, cfg, total_train_steps=2)
            b = _worker_batch()
            r: dict = {}
            for pack in (False, True):
                actor.cfg.pack_sequences = pack
                seen.clear()
                lp, ent = actor.compute_logprobs(b)
                r[f"packed_rows_{pack}"] = list(seen)
                r[f"lp_{pack}"], r[f"ent_{pack}"] = lp, ent
            if lay.get("control") == "1":
                # negative control: one merged segment per packed row (cross-sequence attention)
                real_psp = PackedMicroBatch.packed_seq_params

                def merged(self, device=None):
                    p = real_psp(self, device)
                    t = torch.tensor([0, self.total_len], dtype=torch.int32)
                    p.cu_seqlens_q = p.cu_seqlens_kv = p.cu_seqlens_q_padded = p.cu_seqlens_kv_padded = t
                    p.max_seqlen_q = p.max_seqlen_kv = self.total_len
                    return p

                PackedMicroBatch.packed_seq_params = merged
                r["lp_merged"], _ = actor.compute_logprobs(b)
                PackedMicroBatch.packed_seq_params = real_psp
            g = torch.Generator().manual_seed(1)
            lp = r["lp_False"]
            b.old_logprobs = lp + 0.05 * torch.randn(lp.shape, generator=g) * b.response_mask
            b.advantages = torch.randn(len(b), 1, generator=g).expand_as(lp).contiguous() * b.response_mask
            for pack in (False, True):
                actor.cfg.pack_sequences = pack
                m = actor.train_step(b, ma.LossSettings(entropy_coeff=0.01), apply_update=False)
                grads = {}
                for name, t in actor.iter_full_grads():
                    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
                        t = t[: actor.spec.vocab_size]
                    grads[name] = t.clone()
                r[f"grads_{pack}"], r[f"pg_loss_{pack}"] = grads, m["pg_loss"]
            r["mask"], r["lengths"] = b.response_mask, b.seq_lengths
            results[spec][fam] = r
            actor.close()
    if dist.get_rank() == 0:
        torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker_main(*sys.argv[1:4])
    sys.exit(0)

# ------------------------------------------------------------------------------------------------ tests
import pytest  # noqa: E402

from megatron_dapo.actor.packing import (  # noqa: E402
    PackingError,
    make_packed_micro_batches,
    pack_sequences,
    packing_pad_multiple,
    padded_length,
)


def _ragged(lengths, width=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    ids = torch.full((len(lengths), width), -7, dtype=torch.long)  # -7: padding that must never be read
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, 300, (n,), generator=g)
    return ids, torch.tensor(lengths)


def test_cu_seqlens_positions_and_padding_multiple():
    ids, lens = _ragged([3, 5, 1], width=6)
    p = pack_sequences(ids, lens, pad_multiple=4)
    assert p.cu_seqlens.dtype == torch.int32 and p.cu_seqlens_padded.dtype == torch.int32
    assert p.cu_seqlens.tolist() == [0, 3, 8, 9]
    assert p.cu_seqlens_padded.tolist() == [0, 4, 12, 16]
    assert p.total_len == 16 and p.max_seqlen == 8 and p.num_valid_tokens == 9
    assert p.input_ids.shape == (1, 16) and p.position_ids.shape == (1, 16)
    assert p.position_ids[0].tolist() == [0, 1, 2, 3] + list(range(8)) + [0, 1, 2, 3]
    assert p.input_ids[0, :3].tolist() == ids[0, :3].tolist()
    assert p.input_ids[0, 4:9].tolist() == ids[1, :5].tolist()
    assert p.input_ids[0, 12].item() == ids[2, 0].item()
    assert (p.input_ids != -7).all()  # padding of the source rows is never copied
    assert p.input_ids[0, [3, 9, 10, 11, 13, 14, 15]].eq(0).all()  # filler = pad_token_id
    psp = p.packed_seq_params()
    assert psp.qkv_format == "thd"
    assert psp.cu_seqlens_q.tolist() == psp.cu_seqlens_kv.tolist() == [0, 3, 8, 9]
    assert psp.cu_seqlens_q_padded.tolist() == psp.cu_seqlens_kv_padded.tolist() == [0, 4, 12, 16]
    assert psp.cu_seqlens_q.dtype == torch.int32
    assert psp.max_seqlen_q == psp.max_seqlen_kv == 8
    # multiple 1: no padding at all
    q = pack_sequences(ids, lens)
    assert q.cu_seqlens.tolist() == q.cu_seqlens_padded.tolist() and q.total_len == 9


def test_unpack_pack_round_trip():
    ids, lens = _ragged([7, 2, 5, 1], width=9, seed=1)
    p = pack_sequences(ids, lens, pad_multiple=3)
    valid = torch.arange(9)[None, :] < lens[:, None]
    back = p.unpack(p.input_ids)
    assert back.shape == ids.shape and back.dtype == ids.dtype
    assert torch.equal(back[valid], ids[valid]) and back[~valid].eq(0).all()
    vals = torch.randn(4, 9, 3)
    packed = p.pack(vals, fill=float("nan"))
    assert packed.shape == (p.total_len, 3)
    assert torch.isnan(packed).any(dim=1).sum() == p.total_len - int(lens.sum())
    assert torch.equal(p.unpack(packed)[valid], vals[valid])
    assert torch.equal(p.unpack(packed.unsqueeze(0))[valid], vals[valid])  # [1, T, ...] accepted too
    rows, cols, pos = p.token_index()
    assert torch.equal(p.input_ids[0, pos], ids[rows, cols])
    assert torch.equal(p.packed_offsets()[rows] + cols, pos)


def test_fixed_length_row_extends_last_segment():
    ids, lens = _ragged([4, 3])
    p = pack_sequences(ids, lens, pad_multiple=2, pad_to=12)
    assert p.total_len == 12 and p.cu_seqlens_padded.tolist() == [0, 4, 12] and p.max_seqlen == 8
    assert p.position_ids[0].tolist() == [0, 1, 2, 3] + list(range(8))
    with pytest.raises(PackingError, match="shorter than the packed length 8"):
        pack_sequences(ids, lens, pad_multiple=2, pad_to=6)
    with pytest.raises(PackingError, match="multiple of pad_multiple=2"):
        pack_sequences(ids, lens, pad_multiple=2, pad_to=11)


def test_packing_removes_padding_on_unequal_lengths():
    # the batch of tests/test_loss_exactness.py: prompt + response lengths 4..64
    lens = [p + r for p, r in zip([3, 9, 5, 2, 7, 4, 6, 3], [1, 40, 3, 25, 2, 60, 8, 15])]
    ids, t = _ragged(lens)
    for m in (1, 2, 8):
        p = pack_sequences(ids, t, pad_multiple=m)
        assert p.total_len == sum(padded_length(n, m) for n in lens)
        assert p.total_len < ids.numel()
    assert pack_sequences(ids, t).total_len == 193 and ids.numel() == 512


def test_pad_multiple_rule():
    assert packing_pad_multiple() == 1
    assert packing_pad_multiple(8, 1, sequence_parallel=False) == 1
    assert packing_pad_multiple(8, 1, sequence_parallel=True) == 8
    assert packing_pad_multiple(2, 2, sequence_parallel=True) == 8
    assert packing_pad_multiple(1, 4) == 8
    assert packing_pad_multiple(2, 1, sequence_parallel=True, fp8=True) == 32
    with pytest.raises(PackingError, match="tensor_parallel_size"):
        packing_pad_multiple(0)


def test_packed_micro_batches_respect_budget():
    lens = [13, 2, 9, 30, 7, 7, 1, 16]
    groups = make_packed_micro_batches(lens, 32, pad_multiple=2)
    assert sorted(i for g in groups for i in g) == list(range(len(lens)))
    for g in groups:
        cost = sum(padded_length(lens[i], 2) for i in g)
        assert cost <= 32 or len(g) == 1
    assert len(groups) == 3  # 30+2 | 16+14... first fit decreasing: [30,2] [16,13(14)] [9(10),8,8,1(2)]
    assert groups == make_packed_micro_batches(lens, 32, pad_multiple=2)  # deterministic
    assert make_packed_micro_batches([40, 3], 32) == [[0], [1]]  # an oversized row gets its own micro-batch
    assert make_packed_micro_batches(lens, 32, micro_batch_size=3) == [[0, 1, 2], [3, 4, 5], [6, 7]]


@pytest.mark.parametrize("bad, match", [
    (lambda ids, lens: pack_sequences(ids, torch.tensor([3, 0, 2])), "row 1: seq_length 0"),
    (lambda ids, lens: pack_sequences(ids, torch.tensor([3, 9, 2])), r"row 1: seq_length 9 is outside \[1, 5\]"),
    (lambda ids, lens: pack_sequences(ids.float(), lens), "integer token ids"),
    (lambda ids, lens: pack_sequences(ids[0], lens), "2-D tensor"),
    (lambda ids, lens: pack_sequences(ids, lens[:2]), "2 entries for 3 rows"),
    (lambda ids, lens: pack_sequences(ids[:0], lens[:0]), "empty batch"),
    (lambda ids, lens: pack_sequences(ids, lens, pad_multiple=0), "pad_multiple must be >= 1"),
    (lambda ids, lens: pack_sequences(ids, lens).unpack(torch.zeros(3)), "expected 10 packed positions"),
    (lambda ids, lens: pack_sequences(ids, lens).pack(torch.zeros(2, 5)), r"expected \[3, >= 5"),
    (lambda ids, lens: make_packed_micro_batches([3, 0], 8), "row 1: length 0"),
    (lambda ids, lens: make_packed_micro_batches([3], 0), "max_tokens"),
])
def test_bad_input_errors(bad, match):
    ids, lens = _ragged([3, 5, 2])
    with pytest.raises(PackingError, match=match):
        bad(ids, lens)


def test_thd_rope_restarts_positions_per_sequence():
    """megatron-core 0.16.1's unfused THD RoPE == per-sequence BSHD RoPE from position 0 (verified, not assumed)."""
    from types import SimpleNamespace

    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    def rope(n):  # RotaryEmbedding's table [n, 1, 1, d] (base 10000, d = 8), built without CUDA calls
        f = torch.outer(torch.arange(n, dtype=torch.float32), 1.0 / 10000 ** (torch.arange(0, 8, 2) / 8))
        return torch.cat([f, f], dim=-1)[:, None, None, :]

    ids, lens = _ragged([5, 3, 6])
    p = pack_sequences(ids, lens, pad_multiple=2)
    freqs = rope(p.max_seqlen)  # GPTModel sizes the table with max_seqlen (RotaryEmbedding.get_rotary_seq_len)
    cfg = SimpleNamespace(apply_rope_fusion=False, rotary_interleaved=False, multi_latent_attention=False)
    one_rank = SimpleNamespace(size=lambda: 1, rank=lambda: 0)
    t = torch.randn(p.total_len, 2, 8)
    got = apply_rotary_pos_emb(t, freqs, cfg, cu_seqlens=p.cu_seqlens_padded, cp_group=one_rank)
    for i in range(3):
        s, e = int(p.cu_seqlens_padded[i]), int(p.cu_seqlens_padded[i + 1])
        alone = apply_rotary_pos_emb(t[s:e].unsqueeze(1), rope(e - s), cfg, cp_group=one_rank).squeeze(1)
        assert torch.allclose(got[s:e], alone, atol=1e-6), i
    # and the rotation is position dependent: without restarts the second sequence would differ
    s, e = int(p.cu_seqlens_padded[1]), int(p.cu_seqlens_padded[2])
    shifted = apply_rotary_pos_emb(t[:e].unsqueeze(1), rope(e), cfg, cp_group=one_rank).squeeze(1)[s:e]
    assert (shifted - got[s:e]).abs().max() > 1e-3


def test_config_rejects_context_parallel_and_examples_enable_packing():
    from conftest import REPO_ROOT

    from megatron_dapo.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="actor.pack_sequences"):
        load_config(None, ["model.hf_path=/x", "actor.pack_sequences=true", "actor.context_parallel_size=2"],
                    validate=False).validate(target="cluster")
    cfg = load_config(None, ["model.hf_path=/x", "actor.pack_sequences=true"], validate=False)
    assert cfg.actor.pack_sequences is True
    cfg.validate(target="cluster")
    for name in ("qwen2.5-0.5b", "qwen2.5-7b", "qwen2.5-32b"):
        assert load_config(REPO_ROOT / "examples" / name / "dapo.yaml", validate=False).actor.pack_sequences
    assert not load_config(REPO_ROOT / "examples" / "tiny-cpu" / "dapo.yaml", validate=False).actor.pack_sequences


# ------------------------------------------------------------------------------- actor (torchrun) tests
LAYOUTS = {1: "tp=1,control=1", 2: "tp=2;pp=2;pp=2,vpp=2"}
ALL_LAYOUTS = ["tp=1,control=1", "tp=2", "pp=2", "pp=2,vpp=2"]


@pytest.fixture(scope="module")
def actor_results(tmp_path_factory):
    from dist_scripts.common import torchrun

    from megatron_dapo.data.tiny_checkpoint import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("packing")
    dirs = []
    for fam, seed in (("qwen2", 0), ("qwen3", 2)):
        d = root / fam
        make_tiny_checkpoint(d, family=fam, num_layers=4, vocab_size=300, tie_word_embeddings=fam == "qwen2",
                             max_position_embeddings=512, tokenizer_dir=dirs[0] if dirs else None, seed=seed)
        dirs.append(d)
    out = {}
    for nproc, layouts in LAYOUTS.items():
        f = root / f"res{nproc}.pt"
        torchrun(f"{HERE} {f} {','.join(map(str, dirs))} {layouts}", nproc, {}, timeout=300)
        out.update(torch.load(f, weights_only=False))
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.slow
@pytest.mark.parametrize("layout", ALL_LAYOUTS)
def test_actor_packed_logprobs_and_grads_equal_padded(actor_results, layout):
    for fam, r in actor_results[layout].items():
        mask = r["mask"]
        assert mask.sum() > 30
        # the packed path really ran: one packed row per micro-batch, each shorter than the padded block
        rows = r["packed_rows_True"]
        assert sum(n for _, n in rows) == len(mask), rows
        padded_tokens = mask.numel()  # N x L (the padded path pads each micro-batch to its longest row)
        if "vpp" in layout:  # fixed p2p shapes: every packed row has the length of the longest one
            assert len({t for t, _ in rows}) == 1, rows
        else:
            assert sum(t for t, _ in rows) == int(r["lengths"].sum()), rows
            assert sum(t for t, _ in rows) < padded_tokens
        assert r["packed_rows_False"] == []
        assert (r["lp_True"] - r["lp_False"]).abs().max() <= 1e-5, (layout, fam)
        assert ((r["ent_True"] - r["ent_False"]) * mask).abs().max() <= 1e-5, (layout, fam)
        assert r["pg_loss_True"] == pytest.approx(r["pg_loss_False"], rel=1e-6, abs=1e-8)
        ref, got = r["grads_False"], r["grads_True"]
        assert set(ref) == set(got)
        names = sorted(ref)
        nonzero = 0
        for n in names:
            if ref[n].abs().max() > 0:
                nonzero += 1
                assert _rel(got[n], ref[n]) <= 1e-6, (layout, fam, n, _rel(got[n], ref[n]))
        assert nonzero >= len(names) - 1
        if "lp_merged" in r:
            # cross-sequence attention (one merged segment) gives different log-probs: the check is not vacuous
            assert (r["lp_merged"] - r["lp_False"]).abs().max() > 1e-2

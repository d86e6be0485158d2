"""Teacher scoring against a plain forward pass; model loading errors; FSDP2 on 2 CPU processes.

The FSDP2 test runs this file under `torchrun --nproc_per_node 2` (see `fsdp_main` at the bottom)."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from common.models import ALIASES, ModelError, check_vocab, load_model, resolve
from common.teacher import Teachers, score_teacher, token_logprobs

V = 300
ROOT = Path(__file__).resolve().parents[1]


def tiny_model(seed=0, tied=False, vocab=V):
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, intermediate_size=64, tie_word_embeddings=tied)
    return Qwen3ForCausalLM(cfg).float()


def make_batch(seed=0, B=4, T=12, pad=0):
    """Right-padded random batch (as `episode.collate` makes) with a random mask of trained tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, T), generator=g)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    lengths[0] = T
    attn = (torch.arange(T)[None] < lengths[:, None]).long()
    ids = ids.masked_fill(attn == 0, pad)
    mask = (torch.rand(B, T, generator=g) < 0.6) & attn.bool()
    mask[:, 0] = False
    return ids, attn, mask


def plain(model, ids, attn, mask):
    """Reference: full logits, log-softmax, gather. Returns logp [B, T], log-softmax rows [N, V]."""
    lsm = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits.float()[:, :-1], -1)
    logp = torch.zeros(ids.shape, dtype=lsm.dtype)
    logp[:, 1:] = lsm.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return logp * mask, lsm[mask[:, 1:]]


@pytest.mark.parametrize("chunk_size", [3, 1024])
@pytest.mark.parametrize("tied", [False, True])
def test_scores_match_plain_forward(chunk_size, tied):
    model = tiny_model(tied=tied).eval()
    ids, attn, mask = make_batch()
    with torch.no_grad():
        s = token_logprobs(model, ids, attn, mask, topk=5, full=True, chunk_size=chunk_size)
        ref, ref_full = plain(model, ids, attn, mask)
    assert s.logp.shape == ids.shape and (s.logp[~mask] == 0).all()
    torch.testing.assert_close(s.logp, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s.full, ref_full, atol=1e-5, rtol=1e-5)
    vals, idx = ref_full.topk(5, dim=-1)
    torch.testing.assert_close(s.topk_logp[mask], vals, atol=1e-5, rtol=1e-5)
    assert (s.topk_ids[mask] == idx).all()
    assert (s.topk_logp[~mask] == 0).all()
    # padding changes nothing: each row scored alone, unpadded, gives the same numbers
    for b in range(ids.shape[0]):
        n = int(attn[b].sum())
        with torch.no_grad():
            alone = token_logprobs(model, ids[b:b + 1, :n], attn[b:b + 1, :n], mask[b:b + 1, :n])
        torch.testing.assert_close(alone.logp[0], s.logp[b, :n], atol=1e-5, rtol=1e-5)


def test_head_sees_only_chunks_of_masked_positions():
    model = tiny_model().eval()
    ids, attn, mask = make_batch()
    head = model.get_output_embeddings()
    shapes = []
    original = head.forward
    head.forward = lambda h: (shapes.append(tuple(h.shape)), original(h))[1]
    with torch.no_grad():
        token_logprobs(model, ids, attn, mask, chunk_size=4)
    assert head.forward is not original and "forward" in head.__dict__  # an instance forward is restored
    assert sum(s[0] for s in shapes) == mask.sum() and all(len(s) == 2 and s[0] <= 4 for s in shapes)


def test_gradients_match_plain_and_logits_are_not_kept():
    ids, attn, mask = make_batch(1)
    w = torch.randn(ids.shape, generator=torch.Generator().manual_seed(3))
    grads, saved = [], []

    def record(t):
        saved.append(tuple(t.shape))
        return t

    for mine in (True, False):
        model = tiny_model(tied=True).train()
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(record, lambda t: t):
            if mine:
                s = token_logprobs(model, ids, attn, mask, full=True, chunk_size=3)
                logp, full = s.logp, s.full
            else:
                logp, full = plain(model, ids, attn, mask)
        loss = (logp * w).sum() + (full.exp() * full).sum()  # a sampled-token term and an entropy term
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        # tensors kept for backward with the vocabulary as last dim (logits, log-softmax): only the plain path
        vocab_sized = [sh for sh in saved if sh[-1] == V]
        assert (not vocab_sized) if mine else ((ids.shape[0], ids.shape[1] - 1, V) in vocab_sized), vocab_sized
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4, msg=n)


def test_no_logits_kept_without_full():
    """With full=False, checkpointed chunks keep nothing vocabulary-sized for backward."""
    model = tiny_model().train()
    ids, attn, mask = make_batch(2)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(tuple(t.shape)), t)[1], lambda t: t):
        s = token_logprobs(model, ids, attn, mask, chunk_size=3)
    assert not [sh for sh in saved if sh[-1] == V], saved
    s.logp.sum().backward()
    assert model.lm_head.weight.grad is not None and model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0


def test_micro_batched_teacher_equals_one_batch():
    model = tiny_model().eval().requires_grad_(False)
    ids, attn, mask = make_batch(4, B=7, T=16)
    batch = {"input_ids": ids, "attention_mask": attn}
    big = score_teacher(model, batch, mask, micro_batch_tokens=10**9, topk=3, full=True)
    small = score_teacher(model, batch, mask, micro_batch_tokens=20, topk=3, full=True)  # one row each
    mid = score_teacher(model, batch, mask, micro_batch_tokens=40, topk=3, full=True)
    for s in (small, mid):
        torch.testing.assert_close(s.logp, big.logp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s.topk_logp, big.topk_logp, atol=1e-5, rtol=1e-5)
        assert (s.topk_ids == big.topk_ids).all()
        torch.testing.assert_close(s.full, big.full, atol=1e-5, rtol=1e-5)
    assert not big.logp.requires_grad
    torch.testing.assert_close(big.logp, plain(model, ids, attn, mask)[0].detach(), atol=1e-5, rtol=1e-5)


def test_teachers_route_rows():
    a, b = tiny_model(1).eval(), tiny_model(2).eval()
    ids, attn, mask = make_batch(5, B=5)
    names = ["a", "b", "b", "a", "b"]
    s = Teachers({"a": a, "b": b}, micro_batch_tokens=30).score({"input_ids": ids, "attention_mask": attn}, mask,
                                                                names, topk=2)
    for i, n in enumerate(names):
        with torch.no_grad():
            ref = plain({"a": a, "b": b}[n], ids[i:i + 1], attn[i:i + 1], mask[i:i + 1])[0]
        torch.testing.assert_close(s.logp[i:i + 1], ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ModelError, match="no teacher"):
        Teachers({"a": a}).score({"input_ids": ids, "attention_mask": attn}, mask, ["c"] * 5)


def test_teachers_route_full_rows_in_batch_mask_order():
    """The full rows of interleaved teachers come back in the whole batch's mask order, each from its row's
    teacher: the same rows as one teacher's score_teacher where that teacher owns the row."""
    a, b = tiny_model(1).eval(), tiny_model(2).eval()
    ids, attn, mask = make_batch(6, B=5)
    names = ["b", "a", "b", "a", "a"]
    s = Teachers({"a": a, "b": b}, micro_batch_tokens=20).score({"input_ids": ids, "attention_mask": attn}, mask,
                                                                names, full=True)
    per_teacher = {n: score_teacher(m, {"input_ids": ids, "attention_mask": attn}, mask, full=True).full
                   for n, m in (("a", a), ("b", b))}
    owner = torch.tensor([n == "a" for n in names])[:, None].expand_as(mask)[mask]  # per full row: row's teacher is a
    assert s.full.shape == per_teacher["a"].shape
    torch.testing.assert_close(s.full[owner], per_teacher["a"][owner], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s.full[~owner], per_teacher["b"][~owner], atol=1e-5, rtol=1e-5)


def test_logprobs_at_given_tokens_match_full_rows():
    """`at`: the log-probs of named tokens per position (a student at its teacher's top-k), with gradient."""
    model = tiny_model(3)
    ids, attn, mask = make_batch(7)
    at = torch.randint(0, V, ids.shape + (4,), generator=torch.Generator().manual_seed(0))
    s = token_logprobs(model, ids, attn, mask, full=True, at=at, chunk_size=3)
    torch.testing.assert_close(s.at_logp[mask], s.full.gather(-1, at[mask]))
    assert (s.at_logp[~mask] == 0).all()
    s.at_logp.sum().backward()
    assert model.lm_head.weight.grad.abs().sum() > 0


def word_tokenizer(n):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(n)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="w0")))


def test_vocab_mismatch_names_both_sizes():
    check_vocab((tiny_model(), word_tokenizer(280)), (tiny_model(1), word_tokenizer(280)))  # same: fine
    with pytest.raises(ModelError) as e:
        check_vocab((tiny_model(), word_tokenizer(280)), (tiny_model(vocab=512), word_tokenizer(500)),
                    names=("tiny", "qwen3-8b"))
    msg = str(e.value)
    assert "\n" not in msg and "280" in msg and "500" in msg and "300" in msg and "512" in msg
    assert "qwen3-8b" in msg and "tiny" in msg
    with pytest.raises(ModelError, match="300 outputs"):  # same tokenizer, different output layer
        check_vocab(tiny_model(), tiny_model(vocab=512))
    other = word_tokenizer(280)
    other.add_tokens(["extra"])
    with pytest.raises(ModelError, match="281 tokens"):
        check_vocab(word_tokenizer(280), other)


def test_unknown_alias_is_one_line_listing_aliases():
    with pytest.raises(ModelError) as e:
        resolve("qwen3-99b")
    msg = str(e.value)
    assert "\n" not in msg and all(a in msg for a in ALIASES) and "tiny" in msg
    assert resolve("qwen3-30b-a3b") == "Qwen/Qwen3-30B-A3B" and resolve("qwen3-0.6b") == "Qwen/Qwen3-0.6B"
    assert resolve("someorg/some-model") == "someorg/some-model"


def test_unreachable_hub_id_is_one_line():
    code = ("from common.models import load_model\n"
            "try:\n    load_model('nobody-xyz/not-a-model')\nexcept Exception as e:\n    print(type(e).__name__, '|', e)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    line = out.stdout.strip()
    assert line.startswith("ModelError |") and "could not be found locally or downloaded" in line, out


def test_load_local_directory(tmp_path):
    model = tiny_model(vocab=280)
    model.save_pretrained(tmp_path)
    word_tokenizer(280).save_pretrained(tmp_path)
    frozen, tok = load_model(str(tmp_path))
    assert len(tok) == 280 and not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    trainable, _ = load_model(str(tmp_path), trainable=True)
    assert trainable.training and all(p.requires_grad for p in trainable.parameters())
    assert next(trainable.parameters()).dtype == torch.float32
    torch.testing.assert_close(frozen.lm_head.weight, model.lm_head.weight)


def test_fsdp2_two_processes():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.count("FSDP2 OK") == 2, out.stdout[-3000:] + out.stderr[-5000:]


# ----------------------------------------------------------------------------------------------------
# FSDP2 worker (2 CPU processes, gloo): run by test_fsdp2_two_processes


def fsdp_main():
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor

    from common.runs import gathered

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    def shard(model, root_reshard=None):
        for layer in model.model.layers:
            fully_shard(layer)
        # None: FSDP2 keeps the root's parameters gathered after forward; True: they are resharded, and the
        # backward of the checkpointed chunks only works because FSDP re-gathers them on seeing gradients
        # arrive at the root module's outputs (our statistics are returned as `out.logits` for that)
        return fully_shard(model, reshard_after_forward=root_reshard)

    batches = [make_batch(10 + r, B=3, T=14) for r in range(world)]  # each rank trains on its own rows
    ids, attn, mask = batches[rank]
    for tied, root_reshard in ((False, None), (True, None), (False, True), (True, True)):
        model = tiny_model(tied=tied).train()
        ref = copy.deepcopy(model)
        shard(model, root_reshard)
        with torch.no_grad():
            s = token_logprobs(model, ids, attn, mask, topk=3, full=True, chunk_size=3)
            r_logp, r_full = plain(ref, ids, attn, mask)
        torch.testing.assert_close(s.logp, r_logp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s.full, r_full, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s.topk_logp[mask], r_full.topk(3, -1).values, atol=1e-5, rtol=1e-5)

        # gathered (the rollouts' context, common/runs.py): the weights gathered once, FSDP's forward hooks off
        # (other hooks kept), the same numbers; afterwards the hooks back in their order, the weights sharded,
        # and the training steps below still get the right gradients
        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        hooks_before = [(list(m._forward_pre_hooks.items()), list(m._forward_hooks.items())) for m in units]
        model.model.norm.register_forward_hook(lambda *_: None)  # not FSDP's: stays
        with gathered(model):
            assert not torch.is_grad_enabled()
            assert not any(isinstance(p, DTensor) for p in model.parameters())
            for m in units:
                state = fully_shard.state(m)
                assert not [h for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values())
                            if getattr(h, "__self__", None) is state]
            assert len(model.model.norm._forward_hooks) == 1
            s = token_logprobs(model, ids, attn, mask, full=True, chunk_size=3)
            torch.testing.assert_close(s.full, r_full, atol=1e-5, rtol=1e-5)
        model.model.norm._forward_hooks.clear()
        assert hooks_before == [(list(m._forward_pre_hooks.items()), list(m._forward_hooks.items())) for m in units]
        assert all(isinstance(p, DTensor) for p in model.parameters())

        def loss_fn(logp, full, w):
            return (logp * w).sum() + (full.exp() * full).sum()

        ws = [torch.randn(b[0].shape, generator=torch.Generator().manual_seed(20 + i)) for i, b in enumerate(batches)]
        for step in range(2):  # twice: the second step reuses FSDP's state from the first backward
            model.zero_grad()
            ref.zero_grad()
            s = token_logprobs(model, ids, attn, mask, full=True, chunk_size=3)
            loss_fn(s.logp, s.full, ws[rank]).backward()
            # FSDP averages gradients over ranks: the reference averages the losses of all ranks' rows
            ref_loss = sum(loss_fn(*plain(ref, *b), w) for b, w in zip(batches, ws)) / world
            ref_loss.backward()
            ref_params = dict(ref.named_parameters())
            for n, p in model.named_parameters():
                torch.testing.assert_close(p.grad.full_tensor(), ref_params[n].grad, atol=1e-5, rtol=1e-4,
                                           msg=f"tied={tied} root_reshard={root_reshard} {n}")

    # teachers: frozen, sharded; ranks with different numbers of micro-batches and rows per teacher
    teachers, refs = {}, {}
    for i, name in enumerate(("a", "b")):
        teachers[name] = tiny_model(30 + i).eval().requires_grad_(False)
        refs[name] = copy.deepcopy(teachers[name])
        shard(teachers[name], root_reshard=True)
    B = 5 if rank == 0 else 1
    ids, attn, mask = make_batch(40 + rank, B=B, T=12)
    names = ["a", "b", "a", "a", "b"][:B]  # rank 1 has no row for teacher b
    s = Teachers(teachers, micro_batch_tokens=12).score({"input_ids": ids, "attention_mask": attn}, mask, names, topk=2)
    for i, n in enumerate(names):
        with torch.no_grad():
            r = plain(refs[n], ids[i:i + 1], attn[i:i + 1], mask[i:i + 1])[0]
        torch.testing.assert_close(s.logp[i:i + 1], r, atol=1e-5, rtol=1e-5)
    assert all(isinstance(p, DTensor) for t in teachers.values() for p in t.parameters())  # resharded after use
    print(f"FSDP2 OK rank {rank}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    fsdp_main()

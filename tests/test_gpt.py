import io

import pytest
import torch
import torch.nn.functional as F

from dpar.models import GPT_models
from dpar.models.layers import KVCache
from helpers import tiny_gpt

# LlamaGen autoregressive/models/gpt.py, GPT-B c2i (dim 768, 12 layers, ffn hidden find_multiple(int(2*4*768/3), 256)
# = 2048, vocab 16384, 1000 classes + 1 null class for CFG), read from its source.
LLAMAGEN_GPT_B_TOP = {
    "cls_embedding.embedding_table.weight": (1001, 768),
    "tok_embeddings.weight": (16384, 768),
    "norm.weight": (768,),
    "output.weight": (16384, 768),
}
LLAMAGEN_GPT_B_LAYER = {
    "attention.wqkv.weight": (2304, 768),
    "attention.wo.weight": (768, 768),
    "feed_forward.w1.weight": (2048, 768),
    "feed_forward.w3.weight": (2048, 768),
    "feed_forward.w2.weight": (768, 2048),
    "attention_norm.weight": (768,),
    "ffn_norm.weight": (768,),
}


def test_state_dict_matches_llamagen_gpt_b():
    with torch.device("meta"):
        model = GPT_models["GPT-B"](vocab_size=16384, block_size=256, num_classes=1000, cls_token_num=1,
                                    model_type="c2i")
    expected = dict(LLAMAGEN_GPT_B_TOP)
    for i in range(12):
        expected.update({f"layers.{i}.{k}": v for k, v in LLAMAGEN_GPT_B_LAYER.items()})
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected


def test_checkpoint_round_trip_strict():
    model = tiny_gpt()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict()}, buffer)
    buffer.seek(0)
    fresh = tiny_gpt()
    torch.nn.init.zeros_(fresh.output.weight)
    fresh.load_state_dict(torch.load(buffer, weights_only=True)["model"], strict=True)
    idx, cond = torch.randint(0, 48, (2, 15)), torch.tensor([1, 4])
    assert torch.equal(fresh(idx, cond)[0], model(idx, cond)[0])


def llamagen_reference_logits(sd, idx, cond, n_layer, n_head, grid, eps=1e-5, base=10000.0):
    """LlamaGen's c2i forward written out functionally from its source (one class token)."""
    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    dim = sd["tok_embeddings.weight"].shape[1]
    head = dim // n_head
    half = head // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    angles = torch.outer(torch.arange(grid).float(), freqs)
    grid_angles = torch.cat([angles[:, None].expand(-1, grid, -1), angles[None].expand(grid, -1, -1)], -1).flatten(0, 1)
    cos = torch.cat([torch.zeros(1, half), torch.cos(grid_angles)])  # class position: all-zero table
    sin = torch.cat([torch.zeros(1, half), torch.sin(grid_angles)])

    def rotary(x):  # x [B, L, H, D], pairs (2k, 2k+1)
        x0, x1 = x[..., 0::2], x[..., 1::2]
        c, s = cos[: x.shape[1], None], sin[: x.shape[1], None]
        return torch.stack([x0 * c - x1 * s, x1 * c + x0 * s], -1).flatten(-2)

    h = torch.cat([sd["cls_embedding.embedding_table.weight"][cond][:, None], sd["tok_embeddings.weight"][idx]], 1)
    B, L, _ = h.shape
    for i in range(n_layer):
        p = f"layers.{i}."
        x = rms(h, sd[p + "attention_norm.weight"])
        q, k, v = (x @ sd[p + "attention.wqkv.weight"].T).split(dim, -1)
        q, k, v = (t.view(B, L, n_head, head) for t in (q, k, v))
        q, k = rotary(q), rotary(k)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / head ** 0.5
        scores = scores.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
        attn = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(B, L, dim)
        h = h + attn @ sd[p + "attention.wo.weight"].T
        x = rms(h, sd[p + "ffn_norm.weight"])
        ffn = (F.silu(x @ sd[p + "feed_forward.w1.weight"].T) * (x @ sd[p + "feed_forward.w3.weight"].T))
        h = h + ffn @ sd[p + "feed_forward.w2.weight"].T
    return rms(h, sd["norm.weight"]) @ sd["output.weight"].T


def test_logits_equal_llamagen_math():
    model = tiny_gpt(n_layer=3)
    idx, cond = torch.randint(0, 48, (2, 15)), torch.tensor([0, 3])
    expected = llamagen_reference_logits(model.state_dict(), idx, cond, n_layer=3, n_head=2, grid=4)
    assert torch.allclose(model(idx, cond)[0], expected, atol=1e-4)


def test_causality():
    model = tiny_gpt()
    idx, cond = torch.randint(0, 48, (2, 15)), torch.tensor([1, 2])
    base = model(idx, cond)[0]
    for j in (0, 6, 14):  # logits[:, t] predicts x_{t+1} from the class and idx[:, :t]
        changed = idx.clone()
        changed[:, j:] = (changed[:, j:] + 7) % 48
        out = model(changed, cond)[0]
        assert torch.equal(out[:, : j + 1], base[:, : j + 1])
        assert not torch.allclose(out[:, j + 1], base[:, j + 1])


@pytest.mark.parametrize("static", [False, True], ids=["filled-prefix", "static"])
@pytest.mark.parametrize("overrides", [{}, {"model_type": "uncond"}, {"n_kv_head": 1}])
def test_kv_cached_steps_equal_full_forward(overrides, static):
    model = tiny_gpt(**overrides)
    idx = torch.randint(0, 48, (3, 15))
    cond = model.cls_embedding.null_labels(3) if overrides.get("model_type") == "uncond" else torch.tensor([0, 4, 5])
    full = model(idx, cond)[0]
    model.setup_caches(max_batch_size=3, max_seq_length=16, dtype=torch.float32, static=static)
    steps = [model(None, cond, input_pos=torch.tensor([0]))[0]]
    for t in range(15):
        steps.append(model(idx[:, t:t + 1], None, input_pos=torch.tensor([t + 1]))[0])
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    model.clear_caches()
    assert all(layer.attention.kv_cache is None for layer in model.layers)
    assert torch.equal(model(idx, cond)[0], full)


@pytest.mark.parametrize("static", [False, True], ids=["filled-prefix", "static"])
@pytest.mark.parametrize("overrides", [{}, {"n_kv_head": 1}])
def test_kv_cache_accepts_per_row_positions_and_multi_token_chunks(overrides, static):
    model = tiny_gpt(**overrides)
    idx, cond = torch.randint(0, 48, (2, 15)), torch.tensor([1, 3])
    full = model(idx, cond)[0]
    model.setup_caches(max_batch_size=2, max_seq_length=16, dtype=torch.float32, static=static)
    first = model(None, cond, input_pos=torch.tensor([[0], [0]]))[0]
    chunk = model(idx[:, :6], None, input_pos=torch.arange(1, 7).expand(2, 6))[0]
    step = model(idx[:, 6:7], None, input_pos=torch.tensor([7]))[0]
    assert torch.allclose(torch.cat([first, chunk, step], dim=1), full[:, :8], atol=1e-5)


@pytest.mark.parametrize("static", [False, True], ids=["filled-prefix", "static"])
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_kv_cache_attends_each_query_over_its_own_rows_past(static, kv_heads):
    """Some rows (``rows``) at their own positions, one query or several each: every query sees its row's
    entries up to its own position, and nothing of other rows or later slots (written out as softmax)."""
    torch.manual_seed(0)
    cache = KVCache(4, 16, kv_heads, 8, torch.float32, static)
    history = torch.randn(4, kv_heads, 16, 8), torch.randn(4, kv_heads, 16, 8)
    cache.attend(torch.randn(4, 2, 16, 8), *history, torch.arange(16))  # every slot of every row written
    for rows, positions in ((torch.tensor([2, 0]), torch.tensor([[5], [9]])),
                            (torch.tensor([3, 1, 0]), torch.tensor([[0, 1], [14, 15], [6, 7]]))):
        q = torch.randn(len(rows), 2, positions.shape[1], 8)
        k, v = torch.randn(len(rows), kv_heads, positions.shape[1], 8), torch.randn(len(rows), kv_heads, positions.shape[1], 8)
        out = cache.attend(q, k, v, positions, rows)
        for j, row in enumerate(rows.tolist()):
            keys, values = history[0][row].clone(), history[1][row].clone()
            keys[:, positions[j]], values[:, positions[j]] = k[j], v[j]
            for s, position in enumerate(positions[j].tolist()):
                for head in range(2):
                    kv_head = head * kv_heads // 2
                    weights = (keys[kv_head, :position + 1] @ q[j, head, s] / 8 ** 0.5).softmax(0)
                    expected = weights @ values[kv_head, :position + 1]
                    torch.testing.assert_close(out[j, head, s], expected, atol=1e-5, rtol=1e-5)
        history[0][rows[:, None], :, positions] = k.transpose(1, 2)
        history[1][rows[:, None], :, positions] = v.transpose(1, 2)


def test_eval_mode_returns_all_positions_without_dropout():
    model = tiny_gpt(resid_dropout_p=0.5, token_dropout_p=0.5, class_dropout_prob=0.5)
    idx, cond = torch.randint(0, 48, (2, 15)), torch.tensor([1, 3])
    logits, loss = model(idx, cond, targets=torch.randint(0, 48, (2, 16)))
    assert logits.shape == (2, 16, 48) and loss.ndim == 0
    assert torch.equal(logits, model(idx, cond)[0])
    model.train()
    assert not torch.allclose(model(idx, cond)[0], logits)


def test_loss_is_token_cross_entropy_and_valid_masks_samples():
    model = tiny_gpt()
    idx, cond = torch.randint(0, 48, (2, 15)), torch.tensor([1, 3])
    targets = torch.randint(0, 48, (2, 16))
    logits, loss = model(idx, cond, targets=targets)
    assert torch.allclose(loss, F.cross_entropy(logits.reshape(-1, 48), targets.reshape(-1)))
    _, first_only = model(idx, cond, targets=targets, valid=torch.tensor([1, 0]))
    assert torch.allclose(first_only, F.cross_entropy(logits[0], targets[0]))


def test_unconditional_model_needs_no_class():
    model = tiny_gpt(model_type="uncond")
    assert model.cls_embedding.embedding_table.weight.shape[0] == 1
    idx = torch.randint(0, 48, (2, 15))
    assert torch.equal(model(idx, None)[0], model(idx, model.cls_embedding.null_labels(2))[0])
    with pytest.raises(ValueError, match="needs cond_idx"):
        tiny_gpt()(idx, None)


@pytest.mark.slow  # about 24 s on 2 CPU cores, nearly all of it inductor compiling
def test_compiled_training_forward_and_backward_equal_eager():
    """``train.compile``: inductor's CPU code for the position table once failed to build (a clamp before // and %)."""
    model = tiny_gpt(class_dropout_prob=0.0).train()  # no random ops: inductor draws its own random numbers
    idx, cond = torch.randint(0, 48, (3, 16)), torch.tensor([0, 1, 2])
    results = []
    for forward in (model, torch.compile(model)):
        model.zero_grad()
        logits, loss = forward(idx[:, :-1], cond, targets=idx)
        loss.backward()
        results.append((logits.detach(), model.tok_embeddings.weight.grad.clone()))
    torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=1e-5)

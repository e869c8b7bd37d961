"""model.py against a deliberately naive reference written with plain loops."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from model import HeadCrossEntropy, KVCache, ModelConfig, Transformer

TINY = dict(block_size=32, vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, n_embd=16, n_hidden=24)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**TINY, **overrides})).eval()
    # non-trivial norm weights so that a wrong norm cannot hide behind all-ones
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.randn_like(p))
    return model


# ------------------------------------------------------------------ naive reference

def naive_rmsnorm(x, w, eps):
    out = []
    for row in x:
        ms = sum(float(v) ** 2 for v in row) / len(row)
        out.append([float(v) / math.sqrt(ms + eps) * float(g) for v, g in zip(row, w)])
    return torch.tensor(out)


def naive_rope(vec, pos, head_dim):
    out = list(map(float, vec))
    for i in range(head_dim // 2):
        angle = pos * 10000 ** (-2 * i / head_dim)
        a, b = out[2 * i], out[2 * i + 1]
        out[2 * i] = a * math.cos(angle) - b * math.sin(angle)
        out[2 * i + 1] = a * math.sin(angle) + b * math.cos(angle)
    return out


def naive_forward(model, ids):
    """Logits of every position, one scalar loop at a time where it matters."""
    c = model.config
    hd, group = c.head_dim, c.n_head // c.n_kv_head
    sd = {k: v.double() for k, v in model.state_dict().items()}
    x = sd["tok_embeddings.weight"][ids]
    T = len(ids)
    for layer in range(c.n_layer):
        p = f"layers.{layer}."
        h = naive_rmsnorm(x, sd[p + "attn_norm.weight"], c.norm_eps).double()
        q, k, v = (h @ sd[p + f"attn.{w}.weight"].T for w in ("wq", "wk", "wv"))
        heads = []
        for t in range(T):
            row = []
            for head in range(c.n_head):
                kv_head = head // group  # query head h reads KV head h // (n_head / n_kv_head)
                qv = naive_rope(q[t, head * hd:(head + 1) * hd], t, hd)
                scores = []
                for s in range(T):
                    if c.is_causal and s > t:
                        continue
                    kvec = naive_rope(k[s, kv_head * hd:(kv_head + 1) * hd], s, hd)
                    scores.append(sum(a * b for a, b in zip(qv, kvec)) / math.sqrt(hd))
                peak = max(scores)
                weights = [math.exp(sc - peak) for sc in scores]
                total = sum(weights)
                out = [0.0] * hd
                for s, w in enumerate(weights):
                    for d in range(hd):
                        out[d] += w / total * float(v[s, kv_head * hd + d])
                row += out
            heads.append(row)
        x = x + torch.tensor(heads, dtype=torch.float64) @ sd[p + "attn.wo.weight"].T
        h = naive_rmsnorm(x, sd[p + "ffn_norm.weight"], c.norm_eps).double()
        gate, up = h @ sd[p + "ffn.w1.weight"].T, h @ sd[p + "ffn.w3.weight"].T
        silu = gate / (1 + torch.exp(-gate))
        x = x + (silu * up) @ sd[p + "ffn.w2.weight"].T
    x = naive_rmsnorm(x, sd["norm.weight"], c.norm_eps).double()
    return x @ sd["tok_embeddings.weight"].T  # tied head


@pytest.mark.parametrize("is_causal", [True, False])
def test_forward_matches_naive_reference(is_causal):
    model = tiny_model(is_causal=is_causal)
    ids = torch.randint(0, 50, (7,), generator=torch.Generator().manual_seed(1))
    logits, _ = model(ids[None])
    expected = naive_forward(model, ids)
    torch.testing.assert_close(logits[0].double(), expected, atol=1e-5, rtol=1e-4)


def test_head_is_tied_to_embedding():
    model = tiny_model()
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()


def test_rmsnorm_is_float32_under_bf16_input():
    model = tiny_model()
    x = torch.randn(3, 16).bfloat16()
    out = model.norm(x)
    assert out.dtype == torch.bfloat16
    expected = naive_rmsnorm(x.float(), model.norm.weight.detach(), 1e-5)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


def test_learned_positions_change_with_order():
    model = tiny_model(use_rope=False)
    assert model.pos_embeddings is not None
    a, _ = model(torch.tensor([[1, 2, 3]]))
    b, _ = model(torch.tensor([[2, 1, 3]]))
    assert not torch.allclose(a[0, -1], b[0, -1])


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(block_size=32, vocab_size=64, n_layer=8, n_head=4, n_kv_head=4,
                                    n_embd=128, n_hidden=256))
    std_wo = model.layers[0].attn.wo.weight.std().item()
    std_wq = model.layers[0].attn.wq.weight.std().item()
    assert abs(std_wq - 0.02) < 0.002
    assert abs(std_wo - 0.02 / math.sqrt(16)) < 0.001


def test_loss_mask_restricts_loss_to_marked_positions():
    model = tiny_model()
    ids = torch.randint(0, 50, (2, 9))
    x, y = ids[:, :-1], ids[:, 1:]
    mask = torch.zeros_like(y)
    mask[0, 5:] = 1
    mask[1, 2] = 1
    logits, _ = model(x)
    no_logits, loss = model(x, y, loss_mask=mask)
    assert no_logits is None
    torch.testing.assert_close(loss, F.cross_entropy(logits[mask == 1], y[mask == 1]))


@pytest.mark.parametrize("rows", [4, 1000])  # several chunks with a ragged last one, and a single chunk
def test_chunked_head_cross_entropy_matches_full_logits(rows, monkeypatch):
    monkeypatch.setattr(HeadCrossEntropy, "ROWS", rows)
    torch.manual_seed(0)
    h = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(30, 6, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 30, (11,))
    targets[[2, 7]] = -1  # ignored

    def chunked(h, weight):
        return HeadCrossEntropy.apply(h, weight, targets, True)

    expected = F.cross_entropy(h @ weight.t(), targets, ignore_index=-1)
    torch.testing.assert_close(chunked(h, weight), expected)
    assert torch.autograd.gradcheck(chunked, (h, weight))
    with torch.no_grad():  # validation: the loss alone
        torch.testing.assert_close(HeadCrossEntropy.apply(h, weight, targets, False), expected)
    frozen = weight.detach()  # a frozen head (LoRA): the gradient of h alone
    (grad_h,) = torch.autograd.grad(HeadCrossEntropy.apply(h, frozen, targets, True), h)
    (expected_grad_h,) = torch.autograd.grad(F.cross_entropy(h @ frozen.t(), targets, ignore_index=-1), h)
    torch.testing.assert_close(grad_h, expected_grad_h)


def test_training_loss_and_gradients_match_full_logits_under_bf16_autocast():
    model = tiny_model()
    ids = torch.randint(0, 50, (2, 17))
    x, y = ids[:, :-1], ids[:, 1:]

    def loss_and_grads(full_logits):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if full_logits:
                logits, _ = model(x)
                loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            else:
                _, loss = model(x, y)
        loss.backward()
        return loss, [p.grad for p in model.parameters()]

    full_loss, full_grads = loss_and_grads(True)
    loss, grads = loss_and_grads(False)
    torch.testing.assert_close(loss, full_loss, rtol=1e-3, atol=1e-3)
    for a, b in zip(grads, full_grads):
        torch.testing.assert_close(a, b, rtol=0.05, atol=2e-3)


# ------------------------------------------------------------------ KV cache

def test_kv_cache_prefill_and_steps_equal_full_forward():
    model = tiny_model()
    ids = torch.randint(0, 50, (1, 30))
    full, _ = model(ids)
    cache = KVCache(model.config, 1, "cpu")
    prefill, _ = model(ids[:, :12], kv_cache=cache)
    chunk, _ = model(ids[:, 12:20], kv_cache=cache)  # a multi-token chunk after cached positions
    steps = [model(ids[:, t:t + 1], kv_cache=cache)[0] for t in range(20, 30)]
    cached = torch.cat([prefill, chunk] + steps, dim=1)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_rope", [True, False])
def test_kv_cache_with_a_length_per_row_equals_each_row_alone(use_rope):
    # rows at different positions (a server's requests) take a token each per pass
    model = tiny_model(use_rope=use_rope)
    prompts = [torch.randint(0, 50, (1, n)) for n in (3, 9, 1)]
    steps = torch.randint(0, 50, (3, 4))
    batch = KVCache(model.config, 3, "cpu")
    for row, prompt in enumerate(prompts):
        alone = KVCache(model.config, 1, "cpu")
        model(prompt, kv_cache=alone)
        for keys, values, own_keys, own_values in zip(batch.keys, batch.values, alone.keys, alone.values):
            keys[row], values[row] = own_keys[0], own_values[0]
    batch.length = torch.tensor([p.shape[1] for p in prompts])
    batched = torch.cat([model(steps[:, t:t + 1], kv_cache=batch)[0] for t in range(4)], dim=1)
    for row, prompt in enumerate(prompts):
        full, _ = model(torch.cat([prompt, steps[row:row + 1]], dim=1))
        torch.testing.assert_close(batched[row], full[0, -4:], atol=1e-5, rtol=1e-5)
    assert batch.length.tolist() == [7, 13, 5]
    with pytest.raises(ValueError, match="one token per row"):
        model(steps[:, :2], kv_cache=batch)


def test_generation_with_cache_equals_recomputing_without_cache():
    model = tiny_model()
    prompt = [3, 7, 11]
    max_new = model.config.block_size - len(prompt)  # a long generation up to the full context
    cached = list(model.generate(prompt, max_new, stop_ids=()))
    ids = list(prompt)
    for _ in range(max_new):
        logits, _ = model(torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
    assert cached == ids[len(prompt):]


def test_generation_past_block_size_reprefills_a_window():
    model = tiny_model()
    block = model.config.block_size
    generated = list(model.generate([5], 2 * block, stop_ids=()))
    assert len(generated) == 2 * block
    # replay the policy by hand: once the context is full, keep the last block // 2 tokens and
    # prefill them again from position 0
    history = [5]
    expected = []
    window = list(history)
    for _ in range(2 * block):
        logits, _ = model(torch.tensor([window]))
        next_id = int(logits[0, -1].argmax())
        expected.append(next_id)
        history.append(next_id)
        window = window + [next_id] if len(window) < block else history[-(block // 2):]
    assert generated == expected


def test_forward_refuses_more_than_block_size():
    model = tiny_model()
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))
    cache = KVCache(model.config, 1, "cpu")
    model(torch.zeros(1, 30, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache)


def test_non_causal_model_sees_the_future():
    model = tiny_model(is_causal=False)
    a, _ = model(torch.tensor([[1, 2, 3, 4]]))
    b, _ = model(torch.tensor([[1, 2, 3, 9]]))
    assert not torch.allclose(a[0, 0], b[0, 0])  # position 0 depends on position 3
    causal = tiny_model(is_causal=True)
    a, _ = causal(torch.tensor([[1, 2, 3, 4]]))
    b, _ = causal(torch.tensor([[1, 2, 3, 9]]))
    torch.testing.assert_close(a[0, :3], b[0, :3])


# ------------------------------------------------------------------ LoRA

def randomize_lora_b(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.1)


def test_lora_starts_at_zero_and_trains_only_adapters():
    model = tiny_model()
    ids = torch.randint(0, 50, (1, 10))
    before, _ = model(ids)
    model.attach_lora(rank=4, alpha=8)
    after, _ = model(ids)
    torch.testing.assert_close(before, after)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-2] for n in trainable} == {"wq", "wk", "wv", "wo"}


def test_lora_side_branch_formula():
    model = tiny_model()
    model.attach_lora(rank=2, alpha=6, targets=("wq", "w1"))
    randomize_lora_b(model)
    layer = model.layers[0].ffn.w1
    x = torch.randn(3, 16)
    expected = x @ layer.weight.T + 3.0 * (x @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected)


def test_lora_merge_unmerge_and_detach():
    model = tiny_model()
    ids = torch.randint(0, 50, (1, 10))
    base, _ = model(ids)
    model.attach_lora(rank=4, alpha=4, targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3"))
    randomize_lora_b(model)
    side, _ = model(ids)
    assert not torch.allclose(side, base)
    model.merge_lora()
    merged, _ = model(ids)
    torch.testing.assert_close(merged, side, atol=1e-5, rtol=1e-5)
    model.unmerge_lora()
    unmerged, _ = model(ids)
    torch.testing.assert_close(unmerged, side, atol=1e-6, rtol=1e-6)
    model.detach_lora()
    detached, _ = model(ids)
    torch.testing.assert_close(detached, base, atol=1e-6, rtol=1e-6)
    assert all(p.requires_grad for p in model.parameters())


def test_lora_adapter_only_save_and_load(tmp_path):
    model = tiny_model()
    model.attach_lora(rank=3, alpha=6, targets=("wq", "wv"))
    randomize_lora_b(model)
    ids = torch.randint(0, 50, (1, 10))
    expected, _ = model(ids)
    path = tmp_path / "lora.pt"
    torch.save({"lora": model.lora_state_dict(), "lora_config": model.lora_config}, path)
    saved = torch.load(path, weights_only=True)
    assert all("lora_" in k for k in saved["lora"])
    assert len(saved["lora"]) == 2 * 2 * model.config.n_layer

    fresh = tiny_model()  # same seed: same base weights
    fresh.load_lora_state_dict(saved["lora"], saved["lora_config"])
    got, _ = fresh(ids)
    torch.testing.assert_close(got, expected)

    other = tiny_model(n_embd=32)
    with pytest.raises(ValueError, match="does not fit"):
        other.load_lora_state_dict(saved["lora"], saved["lora_config"])


# ------------------------------------------------------------------ config and size

def test_reference_parameter_counts():
    assert Transformer(ModelConfig.from_json("config/nano-56m.json")).num_params() == 55_591_424
    assert Transformer(ModelConfig.from_json("config/nano-168m.json")).num_params() == 168_334_080


def test_flops_per_token():
    model = tiny_model()
    c = model.config
    assert model.flops_per_token(10) == 6 * model.num_params() + 12 * c.n_layer * c.n_head * c.head_dim * 10
    # without the head: less the tied vocab_size x n_embd matrix's 6 FLOPs per weight
    assert model.flops_per_token(10) - model.flops_per_token(10, head=False) == 6 * c.vocab_size * c.n_embd


@pytest.mark.parametrize("change, message", [
    ({"colour": 1}, "unknown key"),
    ({"n_embd": 30}, "not divisible by n_head"),
    ({"n_kv_head": 3}, "not divisible by n_kv_head"),
    ({"n_embd": 12, "n_head": 4}, "must be even for RoPE"),
    ({"n_layer": 0}, "positive integer"),
])
def test_bad_config_names_the_problem(tmp_path, change, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**TINY, **change}))
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_json(path)


def test_odd_head_dim_is_fine_without_rope():
    ModelConfig(**{**TINY, "n_embd": 12, "n_head": 4, "use_rope": False})

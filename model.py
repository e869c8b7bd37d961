"""
The Nano model: a Llama-style decoder-only Transformer, in one file.

Pre-norm RMSNorm blocks, rotary position embedding on interleaved pairs (or learned absolute
positions), grouped-query attention through scaled_dot_product_attention, a SwiGLU feed-forward,
an output head tied to the token embedding, a KV cache for generation, and LoRA adapters that can
be attached, merged, unmerged, detached and saved on their own.

The same Transformer runs Qwen2 / Qwen2.5 and Qwen3 checkpoints through a few options: an explicit
head_dim, biases on the q, k, v projections (qkv_bias, Qwen2), an RMSNorm of every query and key head
(qk_norm, Qwen3), RoPE on the pairs (i, i + head_dim/2) (rope_style "half"), its base (rope_theta) and
an output head of its own (tie_embeddings false).
"""

import json
import math
from dataclasses import dataclass, asdict, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer import EOS_ID, PAD_ID


ROPE_STYLES = ("interleaved", "half")


@dataclass
class ModelConfig:
    block_size: int = 256
    vocab_size: int = 4096
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4
    n_embd: int = 256
    n_hidden: int = 688
    dropout: float = 0.0
    bias: bool = False
    use_rope: bool = True
    norm_eps: float = 1e-5
    is_causal: bool = True
    head_dim: int = 0                  # 0 (or None): n_embd // n_head
    qkv_bias: bool = False             # biases on wq, wk, wv only (Qwen2)
    qk_norm: bool = False              # RMSNorm of each query and key head before RoPE (Qwen3)
    rope_style: str = "interleaved"    # pairs (2i, 2i+1), or "half": pairs (i, i + head_dim/2)
    rope_theta: float = 10000.0
    tie_embeddings: bool = True        # the output head shares the token embedding's weight

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "n_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"model config: {name} must be a positive integer, got {value!r}")
        if not self.head_dim:   # older configs have no head_dim: it follows from the width
            if self.n_embd % self.n_head != 0:
                raise ValueError(f"model config: n_embd ({self.n_embd}) is not divisible by n_head ({self.n_head})")
            self.head_dim = self.n_embd // self.n_head
        if not isinstance(self.head_dim, int) or isinstance(self.head_dim, bool) or self.head_dim < 0:
            raise ValueError(f"model config: head_dim must be a positive integer (or 0), got {self.head_dim!r}")
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"model config: n_head ({self.n_head}) is not divisible by n_kv_head ({self.n_kv_head})")
        if self.use_rope and self.head_dim % 2 != 0:
            raise ValueError(f"model config: head_dim {self.head_dim} must be even for RoPE")
        if self.rope_style not in ROPE_STYLES:
            raise ValueError(f"model config: rope_style must be one of {', '.join(ROPE_STYLES)}, got {self.rope_style!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"model config: rope_theta must be positive, got {self.rope_theta}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model config: dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d, source="model config"):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {', '.join(unknown)}; known keys are {', '.join(sorted(known))}")
        return cls(**d)

    @classmethod
    def from_json(cls, path):
        with open(path, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=str(path))


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in float32 whatever the autocast dtype, as every engine does
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).type_as(x)


def rope_tables(head_dim, length, base=10000.0):
    """cos and sin of p * theta_i for positions p < length and pairs i < head_dim / 2."""
    theta = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float64), theta)
    return torch.cos(angles).float(), torch.sin(angles).float()


def apply_rope(x, cos, sin, style="interleaved"):
    """Rotate pairs of x [B, H, T, D] by the angles of cos/sin [T, D/2] (or [B, 1, T, D/2]: each row at
    its own positions): interleaved pairs (x[2i], x[2i+1]), or with style "half" the pairs (x[i], x[i+D/2])
    (Hugging Face's rotate_half, which Qwen checkpoints are trained with)."""
    if style == "half":
        first, second = x.float().chunk(2, dim=-1)
        return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1).type_as(x)
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class LoRALinear(nn.Linear):
    """A linear layer that can carry a low-rank side branch: y = W x + (alpha / rank) B A x."""

    def __init__(self, in_features, out_features, bias=False):
        super().__init__(in_features, out_features, bias=bias)
        self.lora_A = None
        self.lora_B = None
        self.lora_scaling = 0.0
        self.lora_dropout = nn.Identity()
        self.lora_merged = False

    def attach_lora(self, rank, alpha, dropout=0.0):
        device, dtype = self.weight.device, self.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        # B starts at zero so that attaching an adapter leaves the model's output unchanged
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=dtype))
        self.lora_scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_merged = False

    def detach_lora(self):
        if self.lora_merged:
            self.unmerge_lora()
        self.lora_A = None
        self.lora_B = None
        self.lora_dropout = nn.Identity()

    def lora_delta(self):
        return self.lora_scaling * (self.lora_B @ self.lora_A)

    @torch.no_grad()
    def merge_lora(self):
        if self.lora_A is not None and not self.lora_merged:
            self.weight += self.lora_delta()
            self.lora_merged = True

    @torch.no_grad()
    def unmerge_lora(self):
        if self.lora_merged:
            self.weight -= self.lora_delta()
            self.lora_merged = False

    def forward(self, x):
        y = super().forward(x)
        if self.lora_A is not None and not self.lora_merged:
            y = y + self.lora_scaling * F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return y


class KVCache:
    """Keys and values of every layer for the positions generated so far, preallocated to capacity positions
    (block_size unless told fewer: a Qwen context of 40960 positions would take gigabytes).
    `length` is an int for the whole batch, or a LongTensor [B] of each row's own: rows holding sequences of
    different lengths (a server's concurrent requests) then take one new token each per forward."""

    def __init__(self, config, batch_size, device, dtype=torch.float32, capacity=None):
        self.capacity = min(capacity or config.block_size, config.block_size)
        shape = (batch_size, config.n_kv_head, self.capacity, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.length = 0  # positions filled; the next forward writes at this position

    def reset(self):
        self.length = 0


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        hd = config.head_dim
        qkv_bias = config.bias or config.qkv_bias
        self.wq = LoRALinear(config.n_embd, config.n_head * hd, bias=qkv_bias)
        self.wk = LoRALinear(config.n_embd, config.n_kv_head * hd, bias=qkv_bias)
        self.wv = LoRALinear(config.n_embd, config.n_kv_head * hd, bias=qkv_bias)
        self.wo = LoRALinear(config.n_head * hd, config.n_embd, bias=config.bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(hd, config.norm_eps)
            self.k_norm = RMSNorm(hd, config.norm_eps)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope, kv_cache=None, layer_index=0):
        B, T, _ = x.shape
        c = self.config
        q = self.wq(x).view(B, T, c.n_head, c.head_dim)
        k = self.wk(x).view(B, T, c.n_kv_head, c.head_dim)
        v = self.wv(x).view(B, T, c.n_kv_head, c.head_dim).transpose(1, 2)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope, c.rope_style), apply_rope(k, *rope, c.rope_style)

        start = 0
        mask, is_causal = None, False
        if kv_cache is not None and torch.is_tensor(kv_cache.length):
            # a token per row at the row's own position; each row sees its own positions only
            start = kv_cache.length
            rows = torch.arange(B, device=x.device)
            kv_cache.keys[layer_index][rows, :, start] = k[:, :, 0]
            kv_cache.values[layer_index][rows, :, start] = v[:, :, 0]
            end = int(start.max()) + 1
            k = kv_cache.keys[layer_index][:B, :, :end]
            v = kv_cache.values[layer_index][:B, :, :end]
            mask = (torch.arange(end, device=x.device) <= start[:, None])[:, None, None, :]
        elif kv_cache is not None:
            start = kv_cache.length
            kv_cache.keys[layer_index][:B, :, start:start + T] = k
            kv_cache.values[layer_index][:B, :, start:start + T] = v
            k = kv_cache.keys[layer_index][:B, :, :start + T]
            v = kv_cache.values[layer_index][:B, :, :start + T]

        if c.is_causal and mask is None:
            if start == 0:
                is_causal = True
            elif T > 1:
                # a chunk after cached positions sees all of them plus its own causal triangle
                mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=c.dropout if self.training else 0.0,
            enable_gqa=c.n_kv_head != c.n_head)
        y = y.transpose(1, 2).reshape(B, T, c.n_head * c.head_dim)
        return self.resid_dropout(self.wo(y))


class FeedForward(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.w1 = LoRALinear(config.n_embd, config.n_hidden, bias=config.bias)  # gate
        self.w2 = LoRALinear(config.n_hidden, config.n_embd, bias=config.bias)  # down
        self.w3 = LoRALinear(config.n_embd, config.n_hidden, bias=config.bias)  # up
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.ffn = FeedForward(config)

    def forward(self, x, rope, kv_cache=None, layer_index=0):
        h = x + self.attn(self.attn_norm(x), rope, kv_cache, layer_index)
        return h + self.ffn(self.ffn_norm(h))


class HeadCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits h @ weight.T against targets (-1: ignored), chunk by chunk.

    The [tokens, vocab_size] logits never exist whole, and the gradient is taken while each chunk is
    at hand (softmax minus the one-hot target), so backward only scales it. On a CPU the softmax and its
    backward over the full logits cost more than the head's matmuls; chunked, they run in cache."""

    ROWS = 256  # rows per chunk: 256 x 8192 float32 logits are 8 MB

    @staticmethod
    def forward(ctx, h, weight, targets, grad_enabled):
        # needs_input_grad ignores no_grad (validation): grad_enabled tells whether a backward can follow
        want_grad_h, want_grad_weight = (grad_enabled and wanted for wanted in ctx.needs_input_grad[:2])
        grad_h = torch.empty_like(h) if want_grad_h else None
        high = torch.promote_types(weight.dtype, torch.float32)  # bf16 -> fp32, fp64 stays
        if torch.is_autocast_enabled(h.device.type):  # cast the weight once, not for every chunk's matmuls
            weight = weight.to(torch.get_autocast_dtype(h.device.type))
        grad_weight = torch.zeros(weight.shape, dtype=high, device=weight.device) if want_grad_weight else None
        valid = (targets >= 0).to(high)
        total = torch.zeros((), dtype=high, device=h.device)
        for i in range(0, h.shape[0], HeadCrossEntropy.ROWS):
            rows = slice(i, i + HeadCrossEntropy.ROWS)
            h_chunk, target_chunk, valid_chunk = h[rows], targets[rows].clamp(min=0), valid[rows]
            logits = F.linear(h_chunk, weight).to(high)
            target_logits = logits.gather(1, target_chunk[:, None]).squeeze(1)
            max_logits = logits.amax(dim=-1, keepdim=True)
            exps = logits.sub_(max_logits).exp_()  # in place: one pass of exp serves the loss and the softmax
            sums = exps.sum(dim=-1, keepdim=True)
            log_z = (sums.log() + max_logits).squeeze(1)
            total += ((log_z - target_logits) * valid_chunk).sum()
            if want_grad_h or want_grad_weight:
                grad_logits = exps.div_(sums)  # the softmax
                grad_logits.scatter_add_(1, target_chunk[:, None], -torch.ones_like(sums))
                grad_logits = grad_logits.mul_(valid_chunk[:, None]).to(weight.dtype)
                if want_grad_h:
                    grad_h[rows] = grad_logits @ weight
                if want_grad_weight:  # not for a frozen base (LoRA)
                    grad_weight += grad_logits.t() @ h_chunk
        count = valid.sum()
        ctx.save_for_backward(grad_h, grad_weight, count)
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_weight, count = ctx.saved_tensors
        scale = grad_loss / count
        # autograd casts each gradient to its input's dtype
        return (None if grad_h is None else grad_h * scale,
                None if grad_weight is None else grad_weight * scale, None, None)


class OutputHead(nn.Linear):
    """The output layer. Given targets it returns their mean cross-entropy instead of the logits
    (HeadCrossEntropy); being a module call, ZeRO-3 gathers its weight for it as for any layer."""

    def forward(self, h, targets=None):
        if targets is None:
            return super().forward(h).float()
        return HeadCrossEntropy.apply(h, self.weight, targets, torch.is_grad_enabled())


class Transformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_embeddings = None if config.use_rope else nn.Embedding(config.block_size, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.output = OutputHead(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        if config.use_rope:
            cos, sin = rope_tables(config.head_dim, config.block_size, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.lora_config = None
        self.apply(self._init_weights)
        # residual projections scaled down so the residual stream does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        """Trainable-model parameters, a tied head counted once, LoRA adapters excluded."""
        return sum(p.numel() for n, p in self.named_parameters() if "lora_" not in n)

    def flops_per_token(self, seq_len=None, head=True):
        """Training FLOPs per token: 6N for the matmuls plus 12·L·n_head·head_dim·T for attention.
        head=False leaves out the output layer, for training that computes it at a few masked positions."""
        c = self.config
        T = seq_len or c.block_size
        matmul_params = self.num_params() - (0 if head else c.vocab_size * c.n_embd)
        return 6 * matmul_params + 12 * c.n_layer * c.n_head * c.head_dim * T

    def forward(self, idx, targets=None, loss_mask=None, kv_cache=None):
        """(logits [B, T, V], None) for tokens idx [B, T]; with targets, (None, the mean cross-entropy over
        the positions where loss_mask is nonzero): all positions when it is None, targets of -1 ignored.
        With a kv_cache the tokens continue the cached positions and the cache advances by T."""
        B, T = idx.shape
        start = kv_cache.length if kv_cache is not None else 0
        per_row = torch.is_tensor(start)
        if per_row and T != 1:
            raise ValueError(f"a cache with a length per row takes one token per row, got {T}")
        end = (int(start.max()) if per_row else start) + T
        if end > self.config.block_size:
            raise ValueError(f"sequence of {end} positions exceeds block_size {self.config.block_size}")
        if kv_cache is not None and end > kv_cache.capacity:
            raise ValueError(f"sequence of {end} positions exceeds the KV cache's {kv_cache.capacity}")
        # positions [T], or [B, T] with a length per row
        positions = start[:, None] + torch.arange(T, device=idx.device) if per_row else \
            torch.arange(start, start + T, device=idx.device)
        x = self.tok_embeddings(idx)
        rope = None
        if self.pos_embeddings is not None:
            x = x + self.pos_embeddings(positions)
        elif per_row:
            rope = (self.rope_cos[positions][:, None], self.rope_sin[positions][:, None])
        else:
            rope = (self.rope_cos[start:start + T], self.rope_sin[start:start + T])
        x = self.dropout(x)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, kv_cache, i)
        if kv_cache is not None:
            kv_cache.length += T
        h = self.norm(x)
        if targets is None:
            return self.output(h), None
        if loss_mask is not None:
            # SFT marks a few answer tokens per record: the head, the largest matmul of a small model,
            # and its softmax run on those positions alone
            keep = loss_mask != 0
            h, targets = h[keep], targets[keep]
        return None, self.output(h.reshape(-1, h.size(-1)), targets.reshape(-1))

    # ---------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(self, prompt_ids, max_new_tokens, sample=None, stop_ids=(PAD_ID, EOS_ID)):
        """Yield new token ids one at a time for one prompt (a list of ids).

        The prompt is prefilled in one forward pass and each new token costs one cached step. When the
        sequence would outgrow block_size, the oldest tokens are dropped and the kept window (the last
        block_size // 2 tokens) is prefilled again from position 0, so RoPE positions always match
        what the model saw in training. `sample(logits, history) -> id` picks the next token
        (greedy when None). Non-causal models have no cache: they re-run the whole window each step.
        """
        if not prompt_ids:
            raise ValueError("generate needs a non-empty prompt")
        sample = sample or (lambda logits, history: int(torch.argmax(logits)))
        block = self.config.block_size
        device = self.tok_embeddings.weight.device
        history = list(prompt_ids)
        window = history[-block:]
        cache = None
        if self.config.is_causal:   # room for what this call can generate, at most the context
            cache = KVCache(self.config, 1, device, self.tok_embeddings.weight.dtype, len(window) + max_new_tokens)
        logits, _ = self.forward(torch.tensor([window], device=device), kv_cache=cache)
        for _ in range(max_new_tokens):
            next_id = sample(logits[0, -1], history)
            yield next_id
            if next_id in stop_ids:
                return
            history.append(next_id)
            if cache is not None and cache.length < cache.capacity:
                logits, _ = self.forward(torch.tensor([[next_id]], device=device), kv_cache=cache)
                continue
            window = history[-(block // 2 if cache is not None else block):]
            if cache is not None:
                cache.reset()
            logits, _ = self.forward(torch.tensor([window], device=device), kv_cache=cache)

    # ---------------------------------------------------------------- LoRA

    def lora_layers(self, targets):
        for name, module in self.named_modules():
            if isinstance(module, LoRALinear) and name.rsplit(".", 1)[-1] in targets:
                yield name, module

    def attach_lora(self, rank, alpha, dropout=0.0, targets=("wq", "wk", "wv", "wo")):
        """Add adapters to the named projections and freeze everything else."""
        allowed = {"wq", "wk", "wv", "wo", "w1", "w2", "w3"}
        if not set(targets) <= allowed or not targets:
            raise ValueError(f"lora targets must be a non-empty subset of {sorted(allowed)}, got {list(targets)}")
        if rank <= 0:
            raise ValueError(f"lora rank must be positive, got {rank}")
        self.detach_lora()
        for p in self.parameters():
            p.requires_grad_(False)
        for _, module in self.lora_layers(targets):
            module.attach_lora(rank, alpha, dropout)
        self.lora_config = {"rank": rank, "alpha": alpha, "dropout": dropout, "targets": list(targets)}

    def detach_lora(self):
        for _, module in self.lora_layers({"wq", "wk", "wv", "wo", "w1", "w2", "w3"}):
            module.detach_lora()
        for p in self.parameters():
            p.requires_grad_(True)
        self.lora_config = None

    def merge_lora(self):
        for module in self.modules():
            if isinstance(module, LoRALinear):
                module.merge_lora()

    def unmerge_lora(self):
        for module in self.modules():
            if isinstance(module, LoRALinear):
                module.unmerge_lora()

    def lora_state_dict(self):
        return {name: p.detach().clone() for name, p in self.named_parameters() if "lora_" in name}

    def load_lora_state_dict(self, state, lora_config):
        """Attach adapters described by lora_config and fill them from state (adapter weights only)."""
        self.attach_lora(lora_config["rank"], lora_config["alpha"], lora_config.get("dropout", 0.0),
                         lora_config["targets"])
        own = dict(self.named_parameters())
        expected = {n for n in own if "lora_" in n}
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(f"LoRA weights do not fit this model: missing {missing[:4]}, unexpected {extra[:4]}")
        with torch.no_grad():
            for name, tensor in state.items():
                if own[name].shape != tensor.shape:
                    raise ValueError(f"LoRA weight {name}: shape {tuple(tensor.shape)} does not fit "
                                     f"the model's {tuple(own[name].shape)}")
                own[name].copy_(tensor)

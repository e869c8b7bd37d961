"""
Export Nano models and LoRA adapters to .bin files, and read them back (the layout is in FORMAT.md).

    python export.py model.bin --checkpoint ckpt.pt                  # float32
    python export.py model.bin --quant ckpt.pt [--group-size 128]    # Q80: int8 groups + float32 scales
    python export.py model.bin --q4k ckpt.pt (or model_f32.bin)      # Q4K: 4-bit blocks of 256, 6-bit group scales
    python export.py lora.bin --lora lora.pt                         # LoRA adapter for wq, wk, wv, wo
    python export.py model.gguf --gguf ckpt.pt|model.bin [--q8_0]    # GGUF for llama.cpp

Readers: load_bin(path) -> (model.Transformer, tokenizer.Tokenizer), Q80 and Q4K weights dequantized;
load_lora_bin(path, model_config=None) -> (adapter state dict, lora config).
"""

import argparse
import math
import mmap
import os
import struct
from typing import NamedTuple

import numpy as np
import torch

import checkpoint
from hf import QWEN_NORM_EPS, QWEN_ROPE_THETA, HFCheckpoint
from model import ModelConfig, Transformer, rope_tables
from tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, BPETokenizer, Tokenizer

MAGIC = (0x42443453, 0x55524C4D)
HEADER_BYTES = 256
OLD_VERSIONS = {(2024, 10), (2025, 8), (2025, 12)}
MODEL_TYPE, LORA_TYPE = 0, 10
QWEN2_TYPE, QWEN3_TYPE = 2, 3
QWEN_TYPES = {QWEN2_TYPE: "Qwen2", QWEN3_TYPE: "Qwen3"}
QUANT_F32, QUANT_Q80, QUANT_Q4K = 0x00, 0x80, 0x42
FLAG_NON_CAUSAL = 1 << 0   # the flags word: full attention (seq2seq)
DEFAULT_NORM_EPS, DEFAULT_ROPE_THETA = 1e-5, 10000.0   # what a 0 in the norm_eps and rope_theta words means
LORA_TARGETS = ("wq", "wk", "wv", "wo")
LINEAR_KINDS = ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "ffn.w1", "ffn.w2", "ffn.w3")

# Headers as (field, struct code) in word order: word i holds the i-th field, every later word up to 64 is 0.
# "I" is a u32, "i" an int32, "f" a float32.
PREAMBLE = (("magic0", "I"), ("magic1", "I"), ("major_version", "I"), ("minor_version", "I"),
            ("model_type", "I"), ("config_length", "I"))
MODEL_HEADER = PREAMBLE + (
    ("block_size", "I"), ("vocab_size", "I"), ("n_layer", "I"), ("n_embd", "I"), ("n_head", "I"),
    ("n_kv_head", "I"), ("n_hidden", "I"), ("is_shared_classifier", "I"), ("head_dim", "I"),
    ("quant_type", "I"), ("group_size", "I"),
    ("flags", "I"), ("norm_eps", "f"), ("rope_theta", "f"))   # extension words: 0 = the original's behaviour
LORA_HEADER = PREAMBLE + (
    ("lora_rank", "I"), ("lora_alpha", "i"), ("n_layer", "I"), ("n_embd", "I"), ("n_head", "I"),
    ("n_kv_head", "I"), ("n_hidden", "I"))   # the eighth config word is 0
DIM_FIELDS = ("block_size", "vocab_size", "n_layer", "n_embd", "n_head", "n_kv_head", "n_hidden")
LORA_DIM_FIELDS = ("n_layer", "n_embd", "n_head", "n_kv_head", "n_hidden")   # must equal the base model's


class FileKind(NamedTuple):
    description: str
    model_types: tuple   # the model_type words a reader of this kind accepts; the first is the default
    version: tuple
    config_length: int   # bytes of the config words after the config_length word
    header: tuple        # (field, struct code) in word order

    @property
    def header_struct(self):
        return struct.Struct("<" + "".join(code for _, code in self.header))


MODEL_FILE = FileKind("a model", (MODEL_TYPE, QWEN2_TYPE, QWEN3_TYPE), (2026, 1), 36, MODEL_HEADER)
LORA_FILE = FileKind("a LoRA adapter", (LORA_TYPE,), (2024, 10), 32, LORA_HEADER)


# ----------------------------------------------------------------------------- layout

def model_type_of(cfg):
    """The file's model_type for a config: Qwen3 has q/k norms, Qwen2 q/k/v biases, Nano neither."""
    return QWEN3_TYPE if cfg.qk_norm else QWEN2_TYPE if cfg.qkv_bias else MODEL_TYPE


def tensor_layout(cfg, is_shared_classifier=True, rope_width=None):
    """The model file's parameters in order: (state_dict name, shape, quantized in Q80) per tensor. A Qwen file's
    biases or q/k norms follow w3; rope_width (default head_dim / 2) is the RoPE tables' width."""
    L, E, V, F, hd = cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.n_hidden, cfg.head_dim
    q_dim, kv_dim = cfg.n_head * hd, cfg.n_kv_head * hd
    shapes = {"attn.wq": (q_dim, E), "attn.wk": (kv_dim, E), "attn.wv": (kv_dim, E), "attn.wo": (E, q_dim),
              "ffn.w1": (F, E), "ffn.w2": (E, F), "ffn.w3": (F, E)}
    layout = [(f"layers.{i}.attn_norm.weight", (E,), False) for i in range(L)]
    layout += [(f"layers.{i}.ffn_norm.weight", (E,), False) for i in range(L)]
    layout += [("norm.weight", (E,), False), ("tok_embeddings.weight", (V, E), True)]
    for kind in LINEAR_KINDS:
        layout += [(f"layers.{i}.{kind}.weight", shapes[kind], True) for i in range(L)]
    layout += qwen_extras(cfg)
    rope_shape = (cfg.block_size, rope_width or hd // 2)
    layout += [("rope_cos", rope_shape, False), ("rope_sin", rope_shape, False)]
    if not is_shared_classifier:
        layout.append(("output.weight", (V, E), True))
    return layout


def qwen_extras(cfg):
    """Qwen2's q, k, v biases or Qwen3's q and k norm weights, each kind over all layers (float32 in every file)."""
    L, hd = cfg.n_layer, cfg.head_dim
    sizes = {"attn.wq.bias": cfg.n_head * hd, "attn.wk.bias": cfg.n_kv_head * hd, "attn.wv.bias": cfg.n_kv_head * hd}
    kinds = list(sizes) if cfg.qkv_bias else []
    if cfg.qk_norm:
        kinds, sizes = ["attn.q_norm.weight", "attn.k_norm.weight"], {"attn.q_norm.weight": hd, "attn.k_norm.weight": hd}
    return [(f"layers.{i}.{kind}", (sizes[kind],), False) for kind in kinds for i in range(L)]


def choose_group_size(cfg, requested=128):
    """The largest of requested, requested/2, requested/4, ... that divides every matmul input width."""
    widths = (cfg.n_embd, cfg.n_head * cfg.head_dim, cfg.n_hidden)
    size = requested
    while size > 1 and any(w % size for w in widths):
        size //= 2
    return max(size, 1)


def quantize_q80(tensor, group_size):
    """int8 values and float32 scales of a tensor's row-major data in groups: scale = max|w| / 127."""
    groups = tensor.detach().float().reshape(-1, group_size)
    scales = groups.abs().amax(dim=1) / 127.0
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))   # all-zero group: q = 0, scale = 0
    q = torch.round(groups / safe[:, None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(-1).numpy(), scales.numpy().astype("<f4")


# ----------------------------------------------------------------------------- Q4K

Q4K_BLOCK, Q4K_GROUP = 256, 32           # elements per block, per 6-bit scale and min
Q4K_FRAME_HEADER_BYTES = 44              # u64 frame_bytes, u32 0x42, u32 ndim, 6 x u32 shape, u32 nblocks
Q4K_MAX_NDIM = 6
Q4K_BLOCK_DTYPE = np.dtype([("marker", "<u4"), ("n", "<u4"), ("zero", "<u4"), ("d", "<f4"), ("dmin", "<f4"),
                            ("scales", "u1", 12), ("codes", "u1", 128)])   # 160 bytes, no padding
Q4K_QUANTIZERS = ("search", "minmax")


def q4k_layout(cfg, rope_width=None):
    """A Q4K file's parameters in order: (name, shape), where a name of a per-layer kind such as "attn.wq" is
    one frame [L, rows, cols] over all layers, "tok_embeddings.weight" the frame [V, E], the rest float32.
    Qwen files: the biases or q/k norms after the frames; a Qwen3 file has no RoPE tables."""
    layout = [(name, shape) for name, shape, _ in tensor_layout(cfg, True, rope_width)]
    norms, embedding = layout[:2 * cfg.n_layer + 1], layout[2 * cfg.n_layer + 1]
    matrix_shapes = dict(layout)
    frames = [(kind, (cfg.n_layer, *matrix_shapes[f"layers.0.{kind}.weight"])) for kind in LINEAR_KINDS]
    extras = [(name, shape) for name, shape, _ in qwen_extras(cfg)]
    rope = [] if cfg.qk_norm else layout[-2:]
    return norms + [embedding] + frames + extras + rope


def is_q4k_frame(name, shape):
    """Whether an entry of q4k_layout is a Q4K frame (else float32)."""
    return len(shape) > 1 and not name.startswith("rope_")


def _blocks_of(rows):
    """rows [R, cols] as zero-padded blocks [R * ceil(cols/256), 256] and each block's count of valid elements."""
    count, cols = rows.shape
    per_row = -(-cols // Q4K_BLOCK)
    padded = np.zeros((count, per_row * Q4K_BLOCK), np.float32)
    padded[:, :cols] = rows
    n = np.minimum(Q4K_BLOCK, cols - Q4K_BLOCK * np.arange(per_row, dtype=np.int64))
    return padded.reshape(-1, Q4K_BLOCK), np.tile(n, count)


def _group_ranges(blocks, valid):
    """Per group of 32: (min, max) over its valid elements; a group with none gets (0, 0)."""
    groups, mask = blocks.reshape(-1, 8, Q4K_GROUP), valid.reshape(-1, 8, Q4K_GROUP)
    low = np.where(mask, groups, np.float32(np.inf)).min(axis=2)
    high = np.where(mask, groups, np.float32(-np.inf)).max(axis=2)
    empty = ~mask.any(axis=2)
    return np.where(empty, np.float32(0), low), np.where(empty, np.float32(0), high)


def _superblock_scales(s, b):
    """d, dmin per block and the 6-bit sc, m per group, from each group's scale s and offset b (both >= 0)."""
    d = (s.max(axis=1) / np.float32(63)).astype(np.float32)
    dmin = (b.max(axis=1) / np.float32(63)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d[:, None] > 0, np.round(s / d[:, None]), 0).astype(np.int64) & 63
        m = np.where(dmin[:, None] > 0, np.round(b / dmin[:, None]), 0).astype(np.int64) & 63
    return d, dmin, sc, m


def _codes(blocks, s, b):
    """round((x + b) / s) masked to 4 bits, per group's s and b (0 where s is 0)."""
    groups = blocks.reshape(-1, 8, Q4K_GROUP)
    s, b = s[:, :, None], b[:, :, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s > 0, np.round((groups + b) / s), 0)
    return (np.nan_to_num(q).astype(np.int64) & 15).reshape(-1, Q4K_BLOCK)


def q4k_minmax(blocks, valid):
    """The original's quantizer (FORMAT.md), in float32: each group's range over 15 steps, from its minimum."""
    low, high = _group_ranges(blocks, valid)
    high = np.maximum(high, np.float32(np.finfo(np.float32).smallest_subnormal))
    below = low <= 0
    s = np.where(below, (high - low) / np.float32(15), high / np.float32(15)).astype(np.float32)
    b = np.where(below, -low, np.float32(0)).astype(np.float32)
    d, dmin, sc, m = _superblock_scales(s, b)
    return d, dmin, sc, m, _codes(blocks, s, b)


# Candidate step counts for a group's range in the search: 15 is min/max; fewer steps clip the extremes.
SEARCH_STEPS = np.linspace(11.0, 16.0, 21, dtype=np.float32)


def q4k_search(blocks, valid):
    """A quantizer that lowers the squared error: per group, try ranges of several step counts, refit scale and
    offset to the codes by least squares, keep the best; then code against the 6-bit quantized scale and min."""
    groups, mask = blocks.reshape(-1, 8, Q4K_GROUP).astype(np.float64), valid.reshape(-1, 8, Q4K_GROUP)
    low, high = (r.astype(np.float64) for r in _group_ranges(blocks, valid))
    low = np.minimum(low, 0.0)   # the offset b = -low must be >= 0: a positive group starts from 0
    count = mask.sum(axis=2)
    best_s, best_b = (high - low) / 15, -low
    best_err = _group_error(groups, mask, best_s, best_b)
    for steps in SEARCH_STEPS:
        s = (high - low) / steps
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.clip(np.round((groups - low[..., None]) / s[..., None]), 0, 15) * mask
        # least squares x ~ s q - b over the valid elements, b kept >= 0
        sq, sx, sqq, sqx = q.sum(2), (groups * mask).sum(2), (q * q).sum(2), (q * groups).sum(2)
        det = count * sqq - sq * sq
        with np.errstate(divide="ignore", invalid="ignore"):
            fit_s = np.where(det > 0, (count * sqx - sq * sx) / det, s)
            fit_b = np.where(det > 0, (sq * sqx - sqq * sx) / det, -low)
        fit_b = np.maximum(fit_b, 0.0)
        fit_s = np.where(fit_b > 0, fit_s, np.where(sqq > 0, sqx / np.maximum(sqq, 1), s))   # refit s alone
        fit_s = np.maximum(np.nan_to_num(fit_s), 0.0)
        err = _group_error(groups, mask, fit_s, fit_b)
        better = err < best_err
        best_s, best_b, best_err = (np.where(better, new, old) for new, old in
                                    ((fit_s, best_s), (fit_b, best_b), (err, best_err)))
    d, dmin, sc, m = _superblock_scales(best_s.astype(np.float32), best_b.astype(np.float32))
    step = (sc * d[:, None]).astype(np.float32)
    offset = (m * dmin[:, None]).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(step[..., None] > 0, np.round((groups + offset[..., None]) / step[..., None]), 0)
    codes = np.clip(np.nan_to_num(q), 0, 15).astype(np.int64) * mask
    return d, dmin, sc, m, codes.reshape(-1, Q4K_BLOCK)


def _group_error(groups, mask, s, b):
    """Squared error of the best codes in [0, 15] for each group's scale s and offset b."""
    s3, b3 = s[..., None], b[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s3 > 0, np.clip(np.round((groups + b3) / s3), 0, 15), 0)
    return (((q * s3 - b3 - groups) * mask) ** 2).sum(axis=2)


def pack_q4k_scales(sc, m):
    """The 12 bytes of a block's 8 six-bit scales and mins (ggml's K-quant arrangement, FORMAT.md)."""
    packed = np.zeros((len(sc), 12), np.uint8)
    for j in range(4):
        packed[:, j] = sc[:, j] | (sc[:, j + 4] >> 4) << 6
        packed[:, j + 4] = m[:, j] | (m[:, j + 4] >> 4) << 6
        packed[:, j + 8] = (sc[:, j + 4] & 15) | (m[:, j + 4] & 15) << 4
    return packed


def unpack_q4k_scales(packed):
    packed = packed.astype(np.int64)
    sc, m = np.zeros((len(packed), 8), np.int64), np.zeros((len(packed), 8), np.int64)
    for j in range(4):
        sc[:, j], m[:, j] = packed[:, j] & 63, packed[:, j + 4] & 63
        sc[:, j + 4] = (packed[:, j + 8] & 15) | (packed[:, j] >> 6) << 4
        m[:, j + 4] = (packed[:, j + 8] >> 4) | (packed[:, j + 4] >> 6) << 4
    return sc, m


Q4K_CHUNK_BLOCKS = 4096   # blocks quantized at a time, to bound the search's temporary arrays


def quantize_q4k(tensor, quantizer="search"):
    """A tensor's blocks (a structured array of Q4K_BLOCK_DTYPE), row after row along its last dimension."""
    rows = tensor.detach().float().cpu().numpy().reshape(-1, tensor.shape[-1])
    blocks, n = _blocks_of(rows)
    out = np.zeros(len(blocks), Q4K_BLOCK_DTYPE)
    out["marker"], out["n"] = QUANT_Q4K, n
    quantize = q4k_search if quantizer == "search" else q4k_minmax
    for start in range(0, len(blocks), Q4K_CHUNK_BLOCKS):
        part = slice(start, start + Q4K_CHUNK_BLOCKS)
        valid = np.arange(Q4K_BLOCK) < n[part, None]
        d, dmin, sc, m, codes = quantize(blocks[part], valid)
        codes = codes * valid   # codes past n are 0
        out["d"][part], out["dmin"][part] = d, dmin
        out["scales"][part] = pack_q4k_scales(sc, m)
        out["codes"][part] = (codes[:, 0::2] | codes[:, 1::2] << 4).astype(np.uint8)
    return out


def dequantize_q4k(blocks, cols):
    """Blocks of rows of width cols as float32 [rows, cols]: w = q (sc d) - m dmin."""
    sc, m = unpack_q4k_scales(blocks["scales"])
    codes = np.empty((len(blocks), Q4K_BLOCK), np.float32)
    codes[:, 0::2], codes[:, 1::2] = blocks["codes"] & 15, blocks["codes"] >> 4
    step = (sc * blocks["d"][:, None].astype(np.float32)).astype(np.float32)
    offset = (m * blocks["dmin"][:, None].astype(np.float32)).astype(np.float32)
    values = codes.reshape(-1, 8, Q4K_GROUP) * step[..., None] - offset[..., None]
    return values.reshape(-1, -(-cols // Q4K_BLOCK) * Q4K_BLOCK)[:, :cols]


def q4k_frame_header(shape):
    """A Q4K frame's 44 header bytes for a tensor of shape (ndim, shape, block count, frame length)."""
    if len(shape) > Q4K_MAX_NDIM:
        raise ValueError(f"Q4K frames hold at most {Q4K_MAX_NDIM} dimensions, got {len(shape)}")
    nblocks = math.prod(shape[:-1]) * -(-shape[-1] // Q4K_BLOCK)
    dims = list(shape) + [0] * (Q4K_MAX_NDIM - len(shape))
    frame_bytes = Q4K_FRAME_HEADER_BYTES + Q4K_BLOCK_DTYPE.itemsize * nblocks
    return struct.pack("<QII6II", frame_bytes, QUANT_Q4K, len(shape), *dims, nblocks)


def q4k_frame(tensor, quantizer="search"):
    """A tensor as one Q4K frame: its header (ndim, shape, block count), then its blocks."""
    return q4k_frame_header(tuple(tensor.shape)) + quantize_q4k(tensor, quantizer).tobytes()


# ----------------------------------------------------------------------------- writing

def header_bytes(kind, fields):
    """The 256-byte header of a file kind from {field: value}: its preamble, then fields in word order."""
    values = {"magic0": MAGIC[0], "magic1": MAGIC[1], "major_version": kind.version[0],
              "minor_version": kind.version[1], "model_type": kind.model_types[0],
              "config_length": kind.config_length, **fields}
    words = kind.header_struct.pack(*(values[name] for name, _ in kind.header))
    return words + bytes(HEADER_BYTES - len(words))


def extension_words(cfg):
    """flags, norm_eps and rope_theta of a model config. A Nano file writes a default as 0, as the original does;
    a Qwen file states both (the original's engine assumes eps 1e-5, wrongly)."""
    if model_type_of(cfg) != MODEL_TYPE:
        return {"flags": 0, "norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta}
    norm_eps = 0.0 if np.float32(cfg.norm_eps) == np.float32(DEFAULT_NORM_EPS) else cfg.norm_eps
    return {"flags": 0 if cfg.is_causal else FLAG_NON_CAUSAL, "norm_eps": norm_eps, "rope_theta": 0.0}


def tokenizer_bytes(tokenizer):
    special_ids = set(tokenizer.special_tokens.values())
    records = []
    for token_id, token in enumerate(tokenizer.itos):
        if len(token) > 255:
            raise ValueError(f"tokenizer: token {token_id} has {len(token)} code points, the format allows 255")
        records.append(struct.pack("<BBBBI", len(token), int(token_id in special_ids), 0xFF, 0xFF, token_id))
        records.append(struct.pack(f"<{len(token)}I", *map(ord, token)))
    body = b"".join(records)
    return struct.pack("<II", 8 + len(body), len(tokenizer.itos)) + body


def tokenizer_section(tokenizer, cfg):
    """The tokenizer section: Nano's code-point records, or for a Qwen file the BPE's byte records, padded with
    empty records to the model's vocab_size (Qwen's embedding has rows no token uses)."""
    is_nano = model_type_of(cfg) == MODEL_TYPE
    if not isinstance(tokenizer, Tokenizer if is_nano else BPETokenizer):
        raise ValueError("a Nano model file holds Nano's own tokenizer" if is_nano else
                         f"a {QWEN_TYPES[model_type_of(cfg)]} file holds a byte-level BPE tokenizer")
    if tokenizer.vocab_size > cfg.vocab_size or is_nano and tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {cfg.vocab_size}")
    return tokenizer_bytes(tokenizer) if is_nano else tokenizer.to_section(cfg.vocab_size)


def check_exportable(cfg):
    problems = []
    if not cfg.use_rope:
        problems.append("use_rope=False (the format has no learned position embedding)")
    if cfg.bias:
        problems.append("bias=True (the format has no biases on every projection)")
    if not np.finfo(np.float32).tiny <= cfg.norm_eps <= np.finfo(np.float32).max:
        problems.append(f"norm_eps={cfg.norm_eps} (the format holds a positive float32)")
    if model_type_of(cfg) == MODEL_TYPE:
        if cfg.rope_style != "interleaved" or cfg.rope_theta != DEFAULT_ROPE_THETA:
            problems.append(f"rope_style={cfg.rope_style}, rope_theta={cfg.rope_theta:g} (a Nano file's RoPE is "
                            f"interleaved with base {DEFAULT_ROPE_THETA:g}; Qwen files need q/k norms or biases)")
        if cfg.head_dim * cfg.n_head != cfg.n_embd:
            problems.append(f"head_dim={cfg.head_dim} (a Nano file's is n_embd / n_head)")
    else:
        if cfg.qk_norm and cfg.qkv_bias:
            problems.append("both qk_norm and qkv_bias (Qwen3 files hold q/k norms, Qwen2 files biases)")
        if cfg.rope_style != "half" or not cfg.is_causal:
            problems.append("a Qwen file is causal with rope_style 'half'")
    if problems:
        raise ValueError("model cannot be exported to .bin: " + "; ".join(problems))


def float_weights(model):
    """(float32 CPU state dict without adapters, whether the head shares the embedding's weights)."""
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items() if "lora_" not in k}
    return state, torch.equal(state["output.weight"], state["tok_embeddings.weight"])


def _exportable_state(model, tokenizer):
    """The model's float32 tensors by state_dict name, RoPE tables included, and whether its head is tied."""
    cfg = model.config
    check_exportable(cfg)
    tokenizer_section(tokenizer, cfg)   # refuses a tokenizer that does not fit before anything is written
    state, is_shared_classifier = float_weights(model)
    state["rope_cos"], state["rope_sin"] = rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_theta)
    return state, is_shared_classifier


class StateTensors:
    """A state dict as a source of tensors for the writer: each tensor in one chunk, its shape checked."""

    def __init__(self, state):
        self.state = state

    def chunks(self, name, shape):
        tensor = self.state[name]
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)}, the format expects {shape}")
        yield tensor.numpy()


def _model_header(cfg, is_shared_classifier, quant_type, group_size):
    return header_bytes(MODEL_FILE, {**{name: getattr(cfg, name) for name in DIM_FIELDS},
                                     "model_type": model_type_of(cfg),
                                     "is_shared_classifier": int(is_shared_classifier), "head_dim": cfg.head_dim,
                                     "quant_type": quant_type, "group_size": group_size, **extension_words(cfg)})


def _write_atomically(path, parts):
    """Write the byte strings of an iterable to path through a temporary file."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            for part in parts:
                f.write(part)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def file_entries(cfg, is_shared_classifier, quant_type, rope_width=None):
    """(name, shape, encoding) of the file's parameters in order; encoding "f32", "q80" or "q4k" (a frame)."""
    if quant_type == QUANT_Q4K:
        return [(name, shape, "q4k" if is_q4k_frame(name, shape) else "f32")
                for name, shape in q4k_layout(cfg, rope_width)]
    return [(name, shape, "q80" if quant_type == QUANT_Q80 and quantizable else "f32")
            for name, shape, quantizable in tensor_layout(cfg, is_shared_classifier, rope_width)]


def _encoded(name, shape, encoding, tensors, group_size, quantizer):
    """The bytes of one file entry, chunk by chunk from tensors (a StateTensors or hf.HFCheckpoint)."""
    if encoding == "f32":
        for chunk in tensors.chunks(name, shape):
            yield np.ascontiguousarray(chunk, "<f4").tobytes()
    elif encoding == "q80":   # all int8 values, then all scales
        scales = []
        for chunk in tensors.chunks(name, shape):
            q, chunk_scales = quantize_q80(torch.from_numpy(chunk), group_size)
            scales.append(chunk_scales)
            yield q.tobytes()
        yield np.concatenate(scales).tobytes()
    else:   # a Q4K frame: the embedding, or one kind of matrix over all layers
        yield q4k_frame_header(shape)
        parts = [(f"layers.{i}.{name}.weight", shape[1:]) for i in range(shape[0])] if name in LINEAR_KINDS \
            else [(name, shape)]
        for part, part_shape in parts:
            for chunk in tensors.chunks(part, part_shape):
                yield quantize_q4k(torch.from_numpy(chunk), quantizer).tobytes()


def write_parameters(path, cfg, tokenizer, tensors, is_shared_classifier, quant_type, group_size=0,
                     quantizer="search", progress=True):
    """Write a model file: header, tokenizer section, then each parameter as file_entries says, streamed."""
    entries = file_entries(cfg, is_shared_classifier, quant_type)
    section = tokenizer_section(tokenizer, cfg)
    bar = _progress(sum(math.prod(shape) for _, shape, _ in entries), path, progress)

    def parts():
        yield _model_header(cfg, is_shared_classifier, quant_type, group_size)
        yield section
        for name, shape, encoding in entries:
            yield from _encoded(name, shape, encoding, tensors, group_size, quantizer)
            if bar:
                bar.update(math.prod(shape))

    _write_atomically(path, parts())
    if bar:
        bar.close()


def write_model(path, model, tokenizer, quant=False, group_size=128, progress=True):
    """Write model (a Transformer) and tokenizer as a .bin file; returns the group size used (0 for float32)."""
    cfg = model.config
    state, is_shared_classifier = _exportable_state(model, tokenizer)
    group = choose_group_size(cfg, group_size) if quant else 0
    write_parameters(path, cfg, tokenizer, StateTensors(state), is_shared_classifier,
                     QUANT_Q80 if quant else QUANT_F32, group, progress=progress)
    return group


def _check_q4k(quantizer, is_shared_classifier):
    if quantizer not in Q4K_QUANTIZERS:
        raise ValueError(f"unknown Q4K quantizer {quantizer!r} (choose from {', '.join(Q4K_QUANTIZERS)})")
    if not is_shared_classifier:
        raise ValueError("Q4K files have no output head (readers tie it to the embedding): this model's head is "
                         "untied; export it as float32 or Q80")


def write_model_q4k(path, model, tokenizer, quantizer="search", progress=True):
    """Write model and tokenizer as a Q4K .bin file (FORMAT.md); quantizer "minmax" is the original's, byte for
    byte, "search" lowers the squared error. The format has no output head: an untied model is refused."""
    state, is_shared_classifier = _exportable_state(model, tokenizer)
    _check_q4k(quantizer, is_shared_classifier)
    write_parameters(path, model.config, tokenizer, StateTensors(state), True, QUANT_Q4K, 0, quantizer, progress)


def write_hf(path, directory, quant_type=QUANT_F32, group_size=128, quantizer="search", progress=True):
    """Convert a Hugging Face Qwen2 / Qwen3 checkpoint directory to a model file (F32, Q80 or Q4K), one chunk
    of one tensor in memory at a time. Returns (model_type, group size used)."""
    with HFCheckpoint(directory) as source:
        cfg = source.config
        check_exportable(cfg)
        tokenizer = BPETokenizer.from_tokenizer_json(source.tokenizer_path)
        if tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(f"{source.tokenizer_path}: {tokenizer.vocab_size} token ids, more than config.json's "
                             f"vocab_size {cfg.vocab_size}")
        if quant_type == QUANT_Q4K:
            _check_q4k(quantizer, cfg.tie_embeddings)
        group = choose_group_size(cfg, group_size) if quant_type == QUANT_Q80 else 0
        entries = file_entries(cfg, cfg.tie_embeddings, quant_type)
        source.check([(name, shape) for name, shape, _ in entries if name not in LINEAR_KINDS] +
                     [(f"layers.{i}.{name}.weight", shape[1:]) for name, shape, _ in entries if name in LINEAR_KINDS
                      for i in range(cfg.n_layer)])
        write_parameters(path, cfg, tokenizer, source, cfg.tie_embeddings, quant_type, group, quantizer, progress)
    return source.model_type, group


def write_lora(path, lora_state, lora_config, model_config):
    """Write an adapter (state dict of lora_A / lora_B tensors) as a LoRA .bin file."""
    cfg = model_config
    targets = list(lora_config["targets"])
    unsupported = sorted(set(targets) - set(LORA_TARGETS))
    if unsupported:
        raise ValueError(f"LoRA targets {unsupported} cannot be exported: the format holds wq, wk, wv, wo only")
    rank, alpha = int(lora_config["rank"]), lora_config["alpha"]
    if float(alpha) != int(alpha):
        raise ValueError(f"lora alpha {alpha} is not an integer; the format stores it as int32")
    hd = cfg.head_dim
    dims = {"wq": (cfg.n_embd, cfg.n_head * hd), "wk": (cfg.n_embd, cfg.n_kv_head * hd),
            "wv": (cfg.n_embd, cfg.n_kv_head * hd), "wo": (cfg.n_head * hd, cfg.n_embd)}
    header = header_bytes(LORA_FILE, {"lora_rank": rank, "lora_alpha": int(alpha),
                                      **{name: getattr(cfg, name) for name in LORA_DIM_FIELDS}})
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(header)
        for target in LORA_TARGETS:
            in_dim, out_dim = dims[target]
            for part, shape in (("lora_A", (rank, in_dim)), ("lora_B", (out_dim, rank))):
                for i in range(cfg.n_layer):
                    name = f"layers.{i}.attn.{target}.{part}"
                    if target in targets:
                        tensor = lora_state[name].detach().float().cpu()
                        if tuple(tensor.shape) != shape:
                            raise ValueError(f"{name}: shape {tuple(tensor.shape)}, expected {shape}")
                    else:   # an untargeted projection gets a zero branch
                        tensor = torch.zeros(shape)
                    f.write(tensor.numpy().astype("<f4").tobytes())
    os.replace(tmp, path)


def _progress(total, path, enabled):
    if not enabled or total < (1 << 24):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="param", unit_scale=True, desc=f"writing {path}")


# ----------------------------------------------------------------------------- reading

class _Cursor:
    """Walks a file's bytes; every read is checked against the file length and names the field."""

    def __init__(self, path, data):
        self.path, self.data, self.offset = path, data, 0

    def error(self, field, message):
        return ValueError(f"{self.path}: {field}: {message}")

    def take(self, count, dtype, field):
        nbytes = count * np.dtype(dtype).itemsize
        if nbytes > len(self.data) - self.offset:
            raise self.error(field, f"needs {nbytes} bytes at offset {self.offset} but the file has "
                                    f"{len(self.data)} bytes (truncated or wrong dims)")
        array = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.offset)
        self.offset += nbytes
        return array

    def finish(self):
        if self.offset != len(self.data):
            raise self.error("file length", f"{len(self.data)} bytes but the header's dims account for {self.offset}")


def _read_file(path):
    """The file's bytes, memory-mapped: the tensors read from it are views until the model copies them."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return b""
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _read_header(cursor, kind):
    """The header's fields as {name: value}, after checking what every file kind shares."""
    if len(cursor.data) < HEADER_BYTES:
        raise cursor.error("header", f"file has {len(cursor.data)} bytes, a Nano file starts with a 256-byte header")
    header = dict(zip((name for name, _ in kind.header), kind.header_struct.unpack_from(cursor.data)))
    if (header["magic0"], header["magic1"]) != MAGIC:
        raise cursor.error("magic", f"{header['magic0']:08x} {header['magic1']:08x} is not a Nano file")
    if header["model_type"] not in kind.model_types:
        kinds = {t: k.description for k in (MODEL_FILE, LORA_FILE) for t in k.model_types}
        found = kinds.get(header["model_type"], f"model_type {header['model_type']}")
        raise cursor.error("model_type", f"{found} is not supported here (expected {kind.description})")
    version, want = (header["major_version"], header["minor_version"]), kind.version
    if version != want:
        if version in OLD_VERSIONS:
            raise cursor.error("major_version/minor_version", f"version {version[0]}.{version[1]} not supported "
                               f"(this reader reads {want[0]}.{want[1]}); export the model again with export.py")
        raise cursor.error("major_version/minor_version", f"unknown version {version[0]}.{version[1]}")
    if header["config_length"] != kind.config_length:
        raise cursor.error("config_length", f"{header['config_length']}, expected {kind.config_length}")
    words = np.frombuffer(cursor.data, dtype="<u4", count=HEADER_BYTES // 4)
    for word in range(len(kind.header), len(words)):
        if words[word]:
            raise cursor.error(f"header word {word}", f"{words[word]}, expected 0")
    cursor.offset = HEADER_BYTES
    return header


def _read_model_config(cursor, header):
    dims = {name: header[name] for name in DIM_FIELDS}
    for name, value in dims.items():
        if not 0 < value <= 1 << 24:
            raise cursor.error(name, f"{value} is out of range")
    shared, head_dim = header["is_shared_classifier"], header["head_dim"]
    quant, group = header["quant_type"], header["group_size"]
    if shared > 1:
        raise cursor.error("is_shared_classifier", f"{shared}, expected 0 or 1")
    model_type = header["model_type"]
    if model_type == MODEL_TYPE and head_dim * dims["n_head"] != dims["n_embd"]:
        raise cursor.error("head_dim", f"{head_dim} is not n_embd / n_head, which a Nano model has")
    if not 0 < head_dim <= 1 << 16:
        raise cursor.error("head_dim", f"{head_dim} is out of range")
    if quant not in (QUANT_F32, QUANT_Q80, QUANT_Q4K):
        raise cursor.error("quant_type", f"unknown value {quant:#x}")
    extensions = _read_extensions(cursor, header) if model_type == MODEL_TYPE else _read_qwen_extensions(cursor, header)
    # a Q4K file has no head whatever is_shared_classifier says (the original writes 0 for an untied source)
    tied = bool(shared) or quant == QUANT_Q4K
    try:
        cfg = ModelConfig(**dims, **extensions, head_dim=head_dim, tie_embeddings=tied)
    except ValueError as e:
        raise cursor.error("config", str(e)) from None
    if quant == QUANT_Q80:
        widths = (cfg.n_embd, cfg.n_head * cfg.head_dim, cfg.n_hidden)
        if group == 0 or any(w % group for w in widths):
            raise cursor.error("group_size", f"{group} does not divide the matmul widths {widths}")
    return cfg, tied, quant, group


def _read_extensions(cursor, header):
    """is_causal and norm_eps from the extension words; 0 in any of them means the original's behaviour."""
    flags, norm_eps, rope_theta = header["flags"], header["norm_eps"], header["rope_theta"]
    if flags & ~FLAG_NON_CAUSAL:
        raise cursor.error("flags", f"{flags:#x} has unknown bits {flags & ~FLAG_NON_CAUSAL:#x} "
                                    "(this reader knows bit 0, full attention)")
    if not math.isfinite(norm_eps) or norm_eps < 0:
        raise cursor.error("norm_eps", f"{norm_eps:g} is not a positive number")
    # model.py knows only the default RoPE base: another one is refused, not half supported
    if rope_theta not in (0, DEFAULT_ROPE_THETA):
        raise cursor.error("rope_theta", f"{rope_theta:g} is not supported (this reader uses {DEFAULT_ROPE_THETA:g})")
    return {"is_causal": not flags & FLAG_NON_CAUSAL, "norm_eps": _shortest_decimal(norm_eps or DEFAULT_NORM_EPS)}


def _read_qwen_extensions(cursor, header):
    """A Qwen file's options: its kind's q/k norms or biases, rotate-half RoPE, eps and theta (0: 1e-6, 1e6)."""
    flags, norm_eps, rope_theta = header["flags"], header["norm_eps"], header["rope_theta"]
    if flags:
        raise cursor.error("flags", f"{flags:#x}, expected 0 for a {QWEN_TYPES[header['model_type']]} model")
    for field, value in (("norm_eps", norm_eps), ("rope_theta", rope_theta)):
        if not math.isfinite(value) or value < 0:
            raise cursor.error(field, f"{value:g} is not a positive number")
    return {"qk_norm": header["model_type"] == QWEN3_TYPE, "qkv_bias": header["model_type"] == QWEN2_TYPE,
            "rope_style": "half", "norm_eps": _shortest_decimal(norm_eps or QWEN_NORM_EPS),
            "rope_theta": _shortest_decimal(rope_theta or QWEN_ROPE_THETA)}


def _shortest_decimal(value):
    """The shortest decimal with value's float32 bits, so that a config's 1e-6 reads back as 1e-6."""
    return float(np.format_float_scientific(np.float32(value), unique=True))


def _read_tokenizer(cursor, vocab_size):
    section_bytes, count = (int(x) for x in cursor.take(2, "<u4", "tokenizer section"))
    end = cursor.offset - 8 + section_bytes
    if section_bytes < 8 or end > len(cursor.data):
        raise cursor.error("tokenizer section length", f"{section_bytes} does not fit the file")
    if count != vocab_size:
        raise cursor.error("tokenizer vocab_size", f"{count} but the header says {vocab_size}")
    itos, special = [], {}
    for token_id in range(count):
        if end - cursor.offset < 8:
            raise cursor.error(f"tokenizer token {token_id}", "record runs past the section end")
        length, is_special = cursor.data[cursor.offset], cursor.data[cursor.offset + 1]
        (record_id,) = struct.unpack_from("<I", cursor.data, cursor.offset + 4)
        cursor.offset += 8
        if record_id != token_id or length == 0 or end - cursor.offset < 4 * length:
            raise cursor.error(f"tokenizer token {token_id}", f"bad record (id {record_id}, length {length})")
        chars = cursor.take(length, "<u4", f"tokenizer token {token_id}")
        if chars.max() > 0x10FFFF:
            raise cursor.error(f"tokenizer token {token_id}", "code point beyond U+10FFFF")
        token = "".join(map(chr, chars))
        itos.append(token)
        if is_special:
            special[token] = token_id
    if cursor.offset != end:
        raise cursor.error("tokenizer section length", f"{section_bytes} but the records end at a different place")
    try:
        return Tokenizer(itos, special)
    except ValueError as e:
        raise cursor.error("tokenizer", str(e)) from None


def _read_bpe_tokenizer(cursor, vocab_size):
    """A Qwen file's tokenizer section: u32 T, u32 max_token_bytes, then (f32 score, u32 n, n bytes) per id."""
    (section_bytes,) = (int(x) for x in cursor.take(1, "<u4", "tokenizer section"))
    start = cursor.offset - 4
    if section_bytes < 8 or start + section_bytes > len(cursor.data):
        raise cursor.error("tokenizer section length", f"{section_bytes} does not fit the file")
    tokenizer = BPETokenizer.from_section(bytes(cursor.data[start:start + section_bytes]), vocab_size,
                                          f"{cursor.path}: tokenizer section")
    cursor.offset = start + section_bytes
    return tokenizer


def _read_q4k_frame(cursor, name, shape):
    """A Q4K frame's blocks after checking its header and every block against the tensor's expected shape."""
    rows, cols = int(np.prod(shape[:-1])), shape[-1]
    per_row = -(-cols // Q4K_BLOCK)
    frame_bytes = int(cursor.take(1, "<u8", f"{name} frame")[0])
    marker, ndim, *dims, nblocks = (int(x) for x in cursor.take(9, "<u4", f"{name} frame header"))
    want_dims = list(shape) + [0] * (Q4K_MAX_NDIM - len(shape))
    if marker != QUANT_Q4K:
        raise cursor.error(f"{name} frame", f"type {marker:#x}, expected 0x42 (Q4K)")
    if ndim != len(shape) or dims != want_dims:
        raise cursor.error(f"{name} frame", f"ndim {ndim}, shape {dims}, but the header's dims give "
                                            f"ndim {len(shape)}, shape {want_dims}")
    if nblocks != rows * per_row:
        raise cursor.error(f"{name} frame", f"{nblocks} blocks, but {rows} rows of {cols} need {rows * per_row}")
    if frame_bytes != Q4K_FRAME_HEADER_BYTES + Q4K_BLOCK_DTYPE.itemsize * nblocks:
        raise cursor.error(f"{name} frame", f"frame_bytes {frame_bytes}, but {nblocks} blocks make "
                                            f"{Q4K_FRAME_HEADER_BYTES + Q4K_BLOCK_DTYPE.itemsize * nblocks}")
    blocks = cursor.take(nblocks, Q4K_BLOCK_DTYPE, f"{name} blocks")
    want_n = np.tile(np.minimum(Q4K_BLOCK, cols - Q4K_BLOCK * np.arange(per_row, dtype=np.int64)), rows)
    for field, bad in (("type", blocks["marker"] != QUANT_Q4K), ("n", blocks["n"] != want_n),
                       ("reserved word", blocks["zero"] != 0)):
        if bad.any():
            j = int(np.argmax(bad))
            found = {"type": blocks["marker"][j], "n": blocks["n"][j], "reserved word": blocks["zero"][j]}[field]
            expected = {"type": QUANT_Q4K, "n": want_n[j], "reserved word": 0}[field]
            limit = " (a block holds at most 256)" if field == "n" and found > Q4K_BLOCK else ""
            raise cursor.error(f"{name} block {j}", f"{field} {found}, expected {expected}{limit}")
    return blocks


def _entry_bytes(shape, encoding, group_size):
    count = math.prod(shape)
    if encoding == "q80":
        return count + 4 * (count // group_size)
    if encoding == "q4k":
        return Q4K_FRAME_HEADER_BYTES + Q4K_BLOCK_DTYPE.itemsize * math.prod(shape[:-1]) * -(-shape[-1] // Q4K_BLOCK)
    return 4 * count


def _entries_in_file(cursor, cfg, tied, quant, group):
    """file_entries of the file being read. A Qwen file's RoPE tables are [B, head_dim/2], or [B, (E/n_head)/2]
    as the original's converter writes them: whichever width the file's length fits."""
    widths = [cfg.head_dim // 2]
    if model_type_of(cfg) != MODEL_TYPE and cfg.n_embd % cfg.n_head == 0:
        widths.append(cfg.n_embd // cfg.n_head // 2)
    remaining = len(cursor.data) - cursor.offset
    for width in widths:
        entries = file_entries(cfg, tied, quant, width)
        if sum(_entry_bytes(shape, encoding, group) for _, shape, encoding in entries) == remaining:
            return entries
    return file_entries(cfg, tied, quant)   # reading then names the first tensor that does not fit


def read_bin(path):
    """Parse a model file: config, tokenizer, and its tensors as stored: {name: float32 array}, for Q80
    tensors {name: (int8 values, float32 scales)}, for a Q4K file's frames {name: blocks} with the names and
    shapes of q4k_layout. Also returns quant_type and group_size. The tokenizer is a Tokenizer for a Nano
    file, a BPETokenizer for a Qwen one (cfg.qk_norm: Qwen3, cfg.qkv_bias: Qwen2)."""
    cursor = _Cursor(path, _read_file(path))
    header = _read_header(cursor, MODEL_FILE)
    cfg, tied, quant, group = _read_model_config(cursor, header)
    if header["model_type"] == MODEL_TYPE:
        tokenizer = _read_tokenizer(cursor, cfg.vocab_size)
    else:
        tokenizer = _read_bpe_tokenizer(cursor, cfg.vocab_size)
    tensors = {}
    for name, shape, encoding in _entries_in_file(cursor, cfg, tied, quant, group):
        count = math.prod(shape)
        if encoding == "q4k":
            tensors[name] = _read_q4k_frame(cursor, name, shape)
        elif encoding == "q80":
            q = cursor.take(count, np.int8, name)
            tensors[name] = (q, cursor.take(count // group, "<f4", f"{name} scales"))
        else:
            tensors[name] = cursor.take(count, "<f4", name)
    cursor.finish()
    return cfg, tokenizer, tensors, quant, group


def q4k_tensors_dequantized(cfg, tensors):
    """read_bin's tensors of a Q4K file as float32 arrays under the float32 layout's names."""
    shapes = dict(q4k_layout(cfg))
    out = {}
    for name, data in tensors.items():
        if data.dtype != Q4K_BLOCK_DTYPE:
            out[name] = data
        elif name in LINEAR_KINDS:
            weights = dequantize_q4k(data, shapes[name][-1]).reshape(shapes[name])
            out.update({f"layers.{i}.{name}.weight": weights[i] for i in range(cfg.n_layer)})
        else:
            out[name] = dequantize_q4k(data, shapes[name][-1])
    return out


def dequantize_q80(q, scales, group_size):
    return (q.astype(np.float32).reshape(-1, group_size) * scales[:, None]).reshape(-1)


def load_bin(path):
    """A .bin model file as (Transformer in eval mode, Tokenizer); Q80 weights are dequantized. The model is
    causal unless the file's flags say full attention (seq2seq)."""
    cfg, tokenizer, tensors, quant, group = read_bin(path)
    if quant == QUANT_Q4K:
        tensors = q4k_tensors_dequantized(cfg, tensors)
    model = Transformer(cfg)
    layout = {name: shape for name, shape, _ in tensor_layout(cfg, cfg.tie_embeddings)}
    state = {}
    for name, data in tensors.items():
        array = dequantize_q80(*data, group) if isinstance(data, tuple) else data
        state[name] = torch.from_numpy(array.astype(np.float32))
    cos, sin = state.pop("rope_cos", None), state.pop("rope_sin", None)
    # without tables of width head_dim/2 (a Qwen3 Q4K file, or the original's width) the model's own stand,
    # computed from theta
    if cos is not None and cos.numel() == model.rope_cos.numel():
        model.rope_cos.copy_(cos.view_as(model.rope_cos))
        model.rope_sin.copy_(sin.view_as(model.rope_sin))
    state = {name: tensor.reshape(layout[name]) for name, tensor in state.items()}
    model.load_state_dict(state, strict=False)   # a tied head's weight is the embedding's
    model.eval()
    return model, tokenizer


def load_lora_bin(path, model_config=None):
    """A LoRA .bin as (state dict for Transformer.load_lora_state_dict, lora config). With model_config,
    refuses an adapter made for another base model."""
    cursor = _Cursor(path, _read_file(path))
    header = _read_header(cursor, LORA_FILE)
    rank, alpha = header["lora_rank"], header["lora_alpha"]
    n_layer, n_embd, n_head, n_kv_head = (header[name] for name in ("n_layer", "n_embd", "n_head", "n_kv_head"))
    if not 0 < rank <= 65536:
        raise cursor.error("lora_rank", f"{rank} is out of range")
    if model_config is not None:
        for field in LORA_DIM_FIELDS:
            if getattr(model_config, field) != header[field]:
                raise cursor.error(field, f"{header[field]} but the model has {getattr(model_config, field)} "
                                          "(adapter made for another base model)")
    if n_head == 0 or n_embd % n_head or n_kv_head == 0:
        raise cursor.error("n_head", f"n_embd {n_embd}, n_head {n_head}, n_kv_head {n_kv_head} are inconsistent")
    hd = n_embd // n_head
    dims = {"wq": (n_embd, n_head * hd), "wk": (n_embd, n_kv_head * hd), "wv": (n_embd, n_kv_head * hd),
            "wo": (n_head * hd, n_embd)}
    state = {}
    for target in LORA_TARGETS:
        in_dim, out_dim = dims[target]
        for part, shape in (("lora_A", (rank, in_dim)), ("lora_B", (out_dim, rank))):
            for i in range(n_layer):
                name = f"layers.{i}.attn.{target}.{part}"
                array = cursor.take(rank * in_dim if part == "lora_A" else out_dim * rank, "<f4", name)
                state[name] = torch.from_numpy(array.copy()).reshape(shape)
    cursor.finish()
    # a target whose matrices are all zero was not adapted (the writer fills absent targets with zeros)
    targets = [t for t in LORA_TARGETS
               if any(state[f"layers.{i}.attn.{t}.{p}"].any() for i in range(n_layer) for p in ("lora_A", "lora_B"))]
    targets = targets or list(LORA_TARGETS)
    state = {k: v for k, v in state.items() if k.split(".")[3] in targets}
    return state, {"rank": rank, "alpha": alpha, "dropout": 0.0, "targets": targets}


# ----------------------------------------------------------------------------- GGUF (llama.cpp)

GGUF_TENSOR_NAMES = {"attn_norm.weight": "attn_norm", "ffn_norm.weight": "ffn_norm",
                     "attn.wq.weight": "attn_q", "attn.wk.weight": "attn_k", "attn.wv.weight": "attn_v",
                     "attn.wo.weight": "attn_output", "ffn.w1.weight": "ffn_gate", "ffn.w3.weight": "ffn_up",
                     "ffn.w2.weight": "ffn_down"}
GGUF_NORMAL, GGUF_UNKNOWN, GGUF_CONTROL = 1, 2, 3   # llama.cpp's token types
Q8_0_BLOCK = 32   # values per Q8_0 block: rows of another width stay float32
# infer.py's Conversation for llama.cpp's chat front ends: <|instruct_mark|>q<|response_mark|>a<|eos|> per
# turn (the SFT template has no system role)
GGUF_CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}<|instruct_mark|>{{ m['content'] }}"
                      "<|response_mark|>{% elif m['role'] == 'assistant' %}{{ m['content'] }}<|eos|>{% endif %}"
                      "{% endfor %}")


def gguf_token_text(token):
    """A token as llama.cpp's rwkv vocabulary stores it: UTF-8 with backslash escapes."""
    return token.replace("\\", "\\\\")


def gguf_lead_bytes(tokenizer):
    """First bytes of multi-byte characters that begin some token but are no token themselves.

    llama.cpp's rwkv tokenizer walks a byte trie and never backs up past a character: when a character
    outside the vocabulary shares its first bytes with a token, the walk ends without a match and the
    tokenizer loops forever. A one-byte token at each such first byte ends every walk on a match."""
    firsts = {token.encode("utf-8")[0] for token in tokenizer.itos}
    return sorted(b for b in firsts if b >= 0x80)


def gguf_vocabulary(tokenizer):
    """(token texts, token types) for GGUF: Nano's tokens in id order, then one token per lead byte."""
    special_ids = set(tokenizer.special_tokens.values())
    texts, types = [], []
    for token_id, token in enumerate(tokenizer.itos):
        texts.append(gguf_token_text(token))
        types.append(GGUF_UNKNOWN if token_id == UNK_ID else GGUF_CONTROL if token_id in special_ids else GGUF_NORMAL)
    for byte in gguf_lead_bytes(tokenizer):
        texts.append(f"\\x{byte:02x}")
        types.append(GGUF_NORMAL)
    return texts, types


def check_gguf_exportable(cfg):
    check_exportable(cfg)
    if not cfg.is_causal:
        raise ValueError("model cannot be exported to GGUF: llama.cpp's llama architecture is causal only")


def gguf_tensors(model, n_extra_tokens):
    """(GGUF name, float32 array) of each weight. The rows added for the lead-byte tokens repeat the
    <|unknown|> row, so the model sees an unknown character as unknown in both engines."""
    state, is_shared_classifier = float_weights(model)

    def with_extra_rows(matrix):
        return np.concatenate([matrix, np.repeat(matrix[UNK_ID:UNK_ID + 1], n_extra_tokens, axis=0)])

    yield "token_embd.weight", with_extra_rows(state["tok_embeddings.weight"].numpy())
    if not is_shared_classifier:
        yield "output.weight", with_extra_rows(state["output.weight"].numpy())
    yield "output_norm.weight", state["norm.weight"].numpy()
    for i in range(model.config.n_layer):
        for ours, theirs in GGUF_TENSOR_NAMES.items():
            yield f"blk.{i}.{theirs}.weight", state[f"layers.{i}.{ours}"].numpy()


def write_gguf(path, model, tokenizer, q8_0=False):
    """A GGUF file for llama.cpp: architecture llama (its RoPE rotates interleaved pairs, as Nano's
    does, so q and k need no permutation), Nano's tokens as an rwkv (greedy longest match) vocabulary."""
    import gguf   # only this exporter needs the format's own library

    cfg = model.config
    check_gguf_exportable(cfg)
    texts, types = gguf_vocabulary(tokenizer)
    tmp = f"{path}.tmp"
    writer = gguf.GGUFWriter(tmp, "llama")
    writer.add_name(os.path.splitext(os.path.basename(path))[0])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if q8_0 else gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.n_hidden)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_kv_head)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(DEFAULT_ROPE_THETA)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(len(texts))
    writer.add_tokenizer_model("rwkv")
    writer.add_token_list(texts)
    writer.add_token_types(types)
    writer.add_unk_token_id(UNK_ID)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_pad_token_id(PAD_ID)
    writer.add_add_bos_token(True)   # as every Nano front end; llama.cpp ignores it for rwkv vocabularies
    writer.add_add_eos_token(False)
    writer.add_chat_template(GGUF_CHAT_TEMPLATE)
    for name, array in gguf_tensors(model, len(texts) - tokenizer.vocab_size):
        if q8_0 and array.ndim == 2 and array.shape[1] % Q8_0_BLOCK == 0:   # else kept float32, as llama.cpp's converter does
            writer.add_tensor(name, gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- CLI

def load_float_model(path):
    """(model, tokenizer) of a checkpoint .pt or of a float32 .bin (which the original's converter reads)."""
    with open(path, "rb") as f:
        start = f.read(8)
    if len(start) < 8 or struct.unpack("<II", start) != MAGIC:
        return checkpoint.load_full_model(path)
    quant = read_bin(path)[3]
    if quant != QUANT_F32:
        raise ValueError(f"{path}: quant_type {quant:#x}; a .bin source must be float32 (quantizing an already "
                         "quantized model again would add its error to the new one)")
    return load_bin(path)


def main():
    parser = argparse.ArgumentParser(description="Export a Nano checkpoint or LoRA adapter to a .bin file, or a model to GGUF.")
    parser.add_argument("output", help="the .bin file to write")
    parser.add_argument("--checkpoint", help="checkpoint .pt to export as float32")
    parser.add_argument("--quant", nargs="?", const="", metavar="CHECKPOINT",
                        help="checkpoint .pt to export as Q80 (int8 groups); with --hf, no argument")
    parser.add_argument("--q4k", nargs="?", const="", metavar="CHECKPOINT",
                        help="checkpoint .pt, or float32 .bin, to export as Q4K (4-bit); with --hf, no argument")
    parser.add_argument("--lora", help="LoRA checkpoint .pt to export as an adapter file")
    parser.add_argument("--hf", metavar="DIR", help="Hugging Face Qwen2 / Qwen2.5 / Qwen3 checkpoint directory "
                                                   "(config.json, *.safetensors, tokenizer.json): float32, or "
                                                   "Q80 with --quant, Q4K with --q4k")
    parser.add_argument("--gguf", help="checkpoint .pt (a LoRA run's is merged into its base) or model .bin "
                                       "to export as a GGUF file for llama.cpp")
    parser.add_argument("--group-size", type=int, default=128,
                        help="Q80 group size; halved until it divides every matmul width (default 128)")
    parser.add_argument("--q4k-quantizer", choices=Q4K_QUANTIZERS, default="search",
                        help="search: lower squared error (default); minmax: the original converter's, byte for byte")
    parser.add_argument("--q8_0", action="store_true", help="with --gguf: matrices as llama.cpp's Q8_0")
    args = parser.parse_args()
    sources = [name for name in ("checkpoint", "quant", "q4k", "lora", "hf", "gguf") if getattr(args, name)]
    if args.quant is not None and args.q4k is not None:
        parser.error("--quant and --q4k exclude each other")
    if len(sources) != 1:
        parser.error("give one source: --checkpoint, --quant, --q4k, --lora, --hf or --gguf")
    if (args.quant == "" or args.q4k == "") and not args.hf:
        parser.error("--quant and --q4k take a checkpoint, except with --hf")
    if args.group_size <= 0:
        parser.error(f"--group-size must be positive, got {args.group_size}")
    try:
        if args.hf:
            quant_type = QUANT_Q80 if args.quant is not None else QUANT_Q4K if args.q4k is not None else QUANT_F32
            model_type, group = write_hf(args.output, args.hf, quant_type, args.group_size, args.q4k_quantizer)
            kind = {QUANT_F32: "float32", QUANT_Q80: f"Q80, group size {group}", QUANT_Q4K: "Q4K"}[quant_type]
            print(f"wrote {args.output}: {QWEN_TYPES[model_type]}, {kind}, {os.path.getsize(args.output)} bytes")
            return
        if args.lora:
            saved = checkpoint.load(args.lora)
            state, lora_config = checkpoint.lora_of(saved, args.lora)
            write_lora(args.output, state, lora_config, checkpoint.model_config_of(saved, args.lora))
            print(f"wrote {args.output}: LoRA rank {lora_config['rank']}, alpha {lora_config['alpha']}, "
                  f"targets {lora_config['targets']}")
            return
        if args.q4k:
            model, tokenizer = load_float_model(args.q4k)
            write_model_q4k(args.output, model, tokenizer, args.q4k_quantizer)
            print(f"wrote {args.output}: Q4K ({args.q4k_quantizer} quantizer), {os.path.getsize(args.output)} bytes")
            return
        if args.gguf:
            model, tokenizer = checkpoint.load_model(args.gguf)
            model.merge_lora()
            write_gguf(args.output, model, tokenizer, q8_0=args.q8_0)
            print(f"wrote {args.output}: GGUF, {'Q8_0' if args.q8_0 else 'float32'}, "
                  f"{os.path.getsize(args.output)} bytes")
            return
        if args.q8_0:
            raise ValueError("--q8_0 applies to --gguf only (for .bin files, --quant writes Q80)")
        model, tokenizer = checkpoint.load_full_model(args.quant or args.checkpoint)
        group = write_model(args.output, model, tokenizer, quant=bool(args.quant), group_size=args.group_size)
        kind = f"Q80, group size {group}" if args.quant else "float32"
        print(f"wrote {args.output}: {kind}, {os.path.getsize(args.output)} bytes")
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()

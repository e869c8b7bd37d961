"""
Hugging Face Qwen2 / Qwen2.5 / Qwen3 checkpoints, read without Hugging Face's libraries.

    checkpoint = HFCheckpoint("~/models/Qwen3-0.6B")   # config.json, *.safetensors (memory-mapped)
    checkpoint.model_type, checkpoint.config            # 3 (Qwen3) or 2 (Qwen2), a model.ModelConfig
    checkpoint.chunks("layers.0.attn.wq.weight")        # float32 rows of a tensor, a few MB at a time

Tensors are asked for by model.py's state_dict names and converted from BF16, F16 or F32 one chunk at a
time, so exporting a model needs memory for a chunk, not for the model. The safetensors layout: a u64
little-endian header length, a JSON header {name: {dtype, shape, data_offsets}} (offsets relative to the
end of the header), then the raw little-endian tensors. A sharded checkpoint lists its files in
model.safetensors.index.json ({"weight_map": {name: file}}).
"""

import json
import math
import mmap
import os

import numpy as np

from data import read_json
from model import ModelConfig, rope_tables

ARCHITECTURES = {"Qwen3ForCausalLM": 3, "Qwen2ForCausalLM": 2}   # architecture -> .bin model_type
DTYPES = {"BF16": 2, "F16": 2, "F32": 4}                          # bytes per element
QWEN_NORM_EPS, QWEN_ROPE_THETA = 1e-6, 1e6                        # the released models' (and FORMAT.md's defaults)
CHUNK_ELEMENTS = 1 << 18                                          # rows converted at a time: about 1 MB of float32

# model.py's names for a layer's tensors -> the checkpoint's, after "model.layers.{i}."
LAYER_NAMES = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
               "attn.wq.weight": "self_attn.q_proj.weight", "attn.wk.weight": "self_attn.k_proj.weight",
               "attn.wv.weight": "self_attn.v_proj.weight", "attn.wo.weight": "self_attn.o_proj.weight",
               "attn.wq.bias": "self_attn.q_proj.bias", "attn.wk.bias": "self_attn.k_proj.bias",
               "attn.wv.bias": "self_attn.v_proj.bias",
               "attn.q_norm.weight": "self_attn.q_norm.weight", "attn.k_norm.weight": "self_attn.k_norm.weight",
               "ffn.w1.weight": "mlp.gate_proj.weight", "ffn.w2.weight": "mlp.down_proj.weight",
               "ffn.w3.weight": "mlp.up_proj.weight"}
MODEL_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
               "output.weight": "lm_head.weight"}


def hf_name(name):
    """The checkpoint's name of a model.py state_dict name."""
    if name.startswith("layers."):
        _, layer, rest = name.split(".", 2)
        return f"model.layers.{layer}.{LAYER_NAMES[rest]}"
    return MODEL_NAMES[name]


# ----------------------------------------------------------------------------- config.json

def _architecture(config, path):
    architectures = config.get("architectures")
    if not isinstance(architectures, list) or len(architectures) != 1:
        raise ValueError(f"{path}: architectures is {architectures!r}; expected one of {', '.join(ARCHITECTURES)}")
    name = architectures[0]
    if name not in ARCHITECTURES:
        raise ValueError(f"{path}: architecture {name} is not supported (supported: {', '.join(ARCHITECTURES)}; "
                         "mixture-of-experts and other families are not)")
    return name


def _rope_theta(config, path):
    """RoPE base: top-level rope_theta (transformers 4), or inside rope_parameters (transformers 5 writes it
    there) or rope_scaling; scaled RoPE variants (yarn, linear, dynamic, ...) are refused."""
    theta = config.get("rope_theta")
    for key in ("rope_parameters", "rope_scaling"):
        params = config.get(key) or {}
        if not isinstance(params, dict):
            raise ValueError(f"{path}: {key} is {params!r}, expected an object")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"{path}: {key}.rope_type {rope_type!r} is not supported (only default RoPE)")
        theta = params.get("rope_theta", theta)
    theta = QWEN_ROPE_THETA if theta is None else theta
    if not isinstance(theta, (int, float)) or not theta > 0:
        raise ValueError(f"{path}: rope_theta {theta!r} is not a positive number")
    return float(theta)


def _refuse_unsupported(config, path, architecture):
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path}: hidden_act {config['hidden_act']!r} is not supported (only silu)")
    if config.get("use_sliding_window"):
        raise ValueError(f"{path}: use_sliding_window is true; sliding-window attention is not supported")
    layer_types = config.get("layer_types") or []
    if any(kind != "full_attention" for kind in layer_types):
        raise ValueError(f"{path}: layer_types {sorted(set(layer_types))}: only full_attention is supported")
    if architecture == "Qwen3ForCausalLM" and config.get("attention_bias"):
        raise ValueError(f"{path}: attention_bias is true; Qwen3 files hold no attention biases")


def _int_field(config, path, key, default=None):
    value = config.get(key)
    value = default if value is None else value
    if value is None:
        raise ValueError(f"{path}: {key} is missing")
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{path}: {key} is {value!r}, expected a positive integer")
    return value


def model_config_from_hf(config, path):
    """(model_type, ModelConfig) of a Qwen config.json's contents; path names the file in errors."""
    architecture = _architecture(config, path)
    _refuse_unsupported(config, path, architecture)
    n_embd = _int_field(config, path, "hidden_size")
    n_head = _int_field(config, path, "num_attention_heads")
    if config.get("head_dim") is None and n_embd % n_head:
        raise ValueError(f"{path}: no head_dim, and hidden_size {n_embd} is not divisible by num_attention_heads {n_head}")
    eps = config.get("rms_norm_eps", QWEN_NORM_EPS)
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"{path}: rms_norm_eps {eps!r} is not a positive number")
    model_type = ARCHITECTURES[architecture]
    dims = dict(block_size=_int_field(config, path, "max_position_embeddings"),
                vocab_size=_int_field(config, path, "vocab_size"),
                n_layer=_int_field(config, path, "num_hidden_layers"),
                n_head=n_head,
                n_kv_head=_int_field(config, path, "num_key_value_heads", n_head),
                n_embd=n_embd,
                n_hidden=_int_field(config, path, "intermediate_size"),
                head_dim=_int_field(config, path, "head_dim", n_embd // n_head))
    options = dict(norm_eps=float(eps), qkv_bias=model_type == 2, qk_norm=model_type == 3, rope_style="half",
                   rope_theta=_rope_theta(config, path),
                   tie_embeddings=bool(config.get("tie_word_embeddings", False)))   # transformers' default for Qwen
    try:
        cfg = ModelConfig(**dims, **options)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return model_type, cfg


# ----------------------------------------------------------------------------- safetensors

class SafetensorsFile:
    """One .safetensors file, memory-mapped; its header checked against the file length."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise ValueError(f"{path}: {size} bytes, too short for a safetensors header")
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        (header_length,) = np.frombuffer(self.map, "<u8", count=1)
        if header_length > size - 8:
            raise ValueError(f"{path}: header length {header_length} runs past the file's {size} bytes (truncated?)")
        try:
            header = json.loads(bytes(self.map[8:8 + header_length]))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path}: header is not a JSON object")
        header.pop("__metadata__", None)
        self.data_start = 8 + int(header_length)
        self.entries = {name: self._checked_entry(name, entry, size - self.data_start) for name, entry in header.items()}

    def _checked_entry(self, name, entry, data_size):
        """(dtype, shape, start offset) of a header entry, after checking it fits the file."""
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise ValueError(f"{self.path}: tensor {name}: header entry lacks dtype, shape or data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPES:
            raise ValueError(f"{self.path}: tensor {name}: dtype {dtype} is not supported "
                             f"(supported: {', '.join(DTYPES)})")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"{self.path}: tensor {name}: shape {shape!r} is not a list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ValueError(f"{self.path}: tensor {name}: data_offsets {offsets!r} is not [begin, end]")
        begin, end = offsets
        if end - begin != math.prod(shape) * DTYPES[dtype] or begin < 0:
            raise ValueError(f"{self.path}: tensor {name}: data_offsets {offsets} do not hold {dtype} {shape}")
        if end > data_size:
            raise ValueError(f"{self.path}: tensor {name}: data ends at byte {end} of the data section but the file "
                             f"holds {data_size} (truncated?)")
        return dtype, tuple(shape), self.data_start + begin

    def rows(self, name, start, stop):
        """Rows start..stop of a tensor seen as [shape[0], rest] (a 1-D tensor: its elements), as float32."""
        dtype, shape, offset = self.entries[name]
        row = math.prod(shape[1:])
        count = (stop - start) * row
        begin = offset + start * row * DTYPES[dtype]
        raw = np.frombuffer(self.map, "<u2" if DTYPES[dtype] == 2 else "<f4", count=count, offset=begin)
        if dtype == "BF16":   # bfloat16 is the top half of a float32
            values = (raw.astype(np.uint32) << 16).view(np.float32)
        elif dtype == "F16":
            values = raw.view(np.float16).astype(np.float32)
        else:
            values = raw.copy()
        del raw
        self._release()
        return values.reshape((stop - start,) + shape[1:]) if len(shape) > 1 else values

    def _release(self):
        """Drop the file's pages from this process's memory once a chunk is converted (they stay in the page
        cache), so that the resident size of an export stays a few chunks, not the checkpoint's size. The whole
        mapping, not the chunk's range: the kernel maps neighbouring pages too (fault-around, large folios)."""
        if hasattr(mmap, "MADV_DONTNEED"):
            self.map.madvise(mmap.MADV_DONTNEED)

    def close(self):
        self.map.close()


# ----------------------------------------------------------------------------- a checkpoint directory

class HFCheckpoint:
    """A Qwen checkpoint directory: its config as a ModelConfig and its tensors by model.py's names."""

    def __init__(self, directory):
        self.directory = os.path.expanduser(directory)
        if not os.path.isdir(self.directory):
            raise ValueError(f"{directory}: not a directory (expected a Hugging Face checkpoint)")
        config_path = os.path.join(self.directory, "config.json")
        self.model_type, self.config = model_config_from_hf(read_json(config_path), config_path)
        self.tokenizer_path = os.path.join(self.directory, "tokenizer.json")
        if not os.path.isfile(self.tokenizer_path):
            raise ValueError(f"{self.tokenizer_path}: missing (the model's tokenizer)")
        self.files, self.file_of = {}, {}
        try:
            self._open_tensor_files()
        except BaseException:
            self.close()
            raise

    def _open_tensor_files(self):
        single = os.path.join(self.directory, "model.safetensors")
        index_path = os.path.join(self.directory, "model.safetensors.index.json")
        if os.path.isfile(index_path):
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index_path}: no weight_map object")
        elif os.path.isfile(single):
            weight_map = None
        else:
            raise ValueError(f"{self.directory}: no model.safetensors nor model.safetensors.index.json")
        for file in sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]:
            path = os.path.join(self.directory, file)
            if not os.path.isfile(path):
                raise ValueError(f"{path}: missing (listed in model.safetensors.index.json)")
            self.files[file] = SafetensorsFile(path)
        for file, tensors in self.files.items():
            for name in tensors.entries:
                if weight_map is None or weight_map.get(name) == file:
                    self.file_of[name] = tensors

    def close(self):
        for tensors in self.files.values():
            tensors.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def tensor_file(self, name, shape):
        """The file holding model.py's tensor name, after checking the checkpoint's shape is the config's."""
        theirs = hf_name(name)
        if theirs not in self.file_of:
            raise ValueError(f"{self.directory}: tensor {theirs} is missing"
                             + (" (config.json says tie_word_embeddings is false)" if name == "output.weight" else ""))
        tensors = self.file_of[theirs]
        found = tensors.entries[theirs][1]
        if found != tuple(shape):
            raise ValueError(f"{tensors.path}: tensor {theirs} has shape {list(found)}, config.json implies {list(shape)}")
        return tensors, theirs

    def chunks(self, name, shape):
        """float32 arrays of whole rows (about CHUNK_ELEMENTS each) of a tensor, which must have shape. The RoPE
        tables are computed from the config's theta."""
        if name in ("rope_cos", "rope_sin"):
            cos, sin = rope_tables(2 * shape[1], shape[0], self.config.rope_theta)
            yield (cos if name == "rope_cos" else sin).numpy()
            return
        tensors, theirs = self.tensor_file(name, shape)
        if len(shape) == 1:
            yield tensors.rows(theirs, 0, shape[0])
            return
        step = max(1, CHUNK_ELEMENTS // math.prod(shape[1:]))
        for start in range(0, shape[0], step):
            yield tensors.rows(theirs, start, min(shape[0], start + step))

    def check(self, shapes):
        """Refuse a checkpoint that lacks a tensor of (name, shape) pairs or holds it in another shape, before
        anything is written."""
        for name, shape in shapes:
            if name not in ("rope_cos", "rope_sin"):
                self.tensor_file(name, shape)

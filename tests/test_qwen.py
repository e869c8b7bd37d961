"""Qwen2 / Qwen3 in the PyTorch side: model.py's options against transformers' forward, export.py --hf (own
safetensors reader, F32 / Q80 / Q4K, sharded and bf16 checkpoints, refusals, bounded memory), reading the files
back, and infer.py's chat on a Qwen file."""

import json
import math
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the Qwen tests compare against transformers' models")
pytest.importorskip("tokenizers", reason="the Qwen tests train a tokenizer with the tokenizers package")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import export  # noqa: E402
import hf  # noqa: E402
from model import KVCache, ModelConfig, Transformer, rope_tables  # noqa: E402
from test_qwen_c import randomize_weights  # noqa: E402

VOCAB = 700   # the trained tokenizer's ids, Qwen3's 26 added tokens after them, then unused ids (as Qwen's)

# (architecture, config overrides): GQA everywhere; head_dim != hidden / heads; tied and untied heads
QWEN3 = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)
QWEN3_UNTIED = dict(QWEN3, head_dim=16, tie_word_embeddings=False)
QWEN2 = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, tie_word_embeddings=False)
QWEN2_TIED = dict(QWEN2, tie_word_embeddings=True)
CASES = {"qwen3": ("Qwen3", QWEN3), "qwen3-untied": ("Qwen3", QWEN3_UNTIED),
         "qwen2": ("Qwen2", QWEN2), "qwen2-tied": ("Qwen2", QWEN2_TIED)}


def make_hf_model(family, overrides, seed=0, vocab_size=VOCAB):
    """A random transformers Qwen model in float32 whose every tensor matters: norm weights away from 1, Qwen2's
    biases and Qwen3's q/k norm weights nonzero and not 1, theta and eps not transformers' defaults."""
    torch.manual_seed(seed)
    config_class = getattr(transformers, f"{family}Config")
    model_class = getattr(transformers, f"{family}ForCausalLM")
    config = config_class(vocab_size=vocab_size, max_position_embeddings=128, rms_norm_eps=1e-5,
                          rope_parameters={"rope_type": "default", "rope_theta": 50000.0}, **overrides)
    return randomize_weights(model_class(config).float().eval(), lambda name, p: 0.15)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from qwen_tokenizer import train_qwen_style_tokenizer
    directory = tmp_path_factory.mktemp("qwen-tokenizer")
    train_qwen_style_tokenizer(directory, vocab_size=VOCAB - 26 - 40)
    return directory


def save_checkpoint(model, directory, tokenizer_dir, **save_options):
    model.save_pretrained(directory, **save_options)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(tokenizer_dir, name), "rb") as src, open(os.path.join(directory, name), "wb") as dst:
            dst.write(src.read())
    return directory


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory, tokenizer_dir):
    """(name, transformers model, checkpoint directory) for each architecture case."""
    family, overrides = CASES[request.param]
    model = make_hf_model(family, overrides)
    directory = save_checkpoint(model, tmp_path_factory.mktemp(request.param), tokenizer_dir)
    return request.param, model, directory


def model_from_checkpoint(directory):
    """Our Transformer with the weights of a checkpoint directory, through hf.py's reader (no .bin file)."""
    with hf.HFCheckpoint(directory) as source:
        model = Transformer(source.config).eval()
        state = {}
        for name, tensor in model.state_dict().items():
            if model.config.tie_embeddings and name == "output.weight":
                continue
            state[name] = torch.from_numpy(np.concatenate(list(source.chunks(name, tuple(tensor.shape)))))
        model.load_state_dict(state, strict=False)
    return model


def reference_logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float()


def relative_error(ours, theirs):
    return float((ours.detach() - theirs).abs().max() / theirs.abs().max())


PROMPT = [5, 77, 300, 12, 650, 9, 41, 199, 3, 500, 18, 260, 33, 71, 2, 400]


# ----------------------------------------------------------------------------- model.py against transformers

def test_config_mapping_of_what_save_pretrained_writes(case):
    name, hf_model, directory = case
    with open(os.path.join(directory, "config.json")) as f:
        written = json.load(f)
    model_type, cfg = hf.model_config_from_hf(written, "config.json")
    c = hf_model.config
    assert model_type == (3 if name.startswith("qwen3") else 2)
    assert (cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.n_hidden, cfg.vocab_size, cfg.block_size) == \
        (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size,
         VOCAB, 128)
    assert cfg.head_dim == getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    assert (cfg.norm_eps, cfg.rope_theta, cfg.rope_style) == (1e-5, 50000.0, "half")
    assert cfg.tie_embeddings == c.tie_word_embeddings
    assert (cfg.qk_norm, cfg.qkv_bias) == ((True, False) if model_type == 3 else (False, True))


def test_forward_matches_transformers(case):
    name, hf_model, directory = case
    ours = model_from_checkpoint(directory)
    error = relative_error(ours(torch.tensor([PROMPT]))[0][0], reference_logits(hf_model, PROMPT))
    print(f"{name}: F32 forward error {error:.2e}")
    assert error < 1e-5, f"{name}: largest logit difference {error:.2e} of the largest logit"


def test_each_option_matters(case):
    """Turning any Qwen option off moves the logits far from the reference: the test above can fail."""
    name, hf_model, directory = case
    reference = reference_logits(hf_model, PROMPT)
    ours = model_from_checkpoint(directory)
    cfg = ours.config
    changes = [dict(rope_style="interleaved"), dict(rope_theta=10000.0), dict(norm_eps=1e-2)]
    for change in changes:
        other = Transformer(ModelConfig(**{**cfg.to_dict(), **change})).eval()
        other.load_state_dict(ours.state_dict())
        assert relative_error(other(torch.tensor([PROMPT]))[0][0], reference) > 1e-3, f"{name}: {change}"
    with torch.no_grad():
        for layer in ours.layers:
            if cfg.qk_norm:
                layer.attn.q_norm.weight.fill_(1.0)
            else:
                layer.attn.wq.bias.zero_()
    assert relative_error(ours(torch.tensor([PROMPT]))[0][0], reference) > 1e-3


def test_cached_greedy_generation_matches_transformers_generate(case):
    name, hf_model, directory = case
    ours = model_from_checkpoint(directory)
    generated = list(ours.generate(PROMPT, 24, stop_ids=()))
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor([PROMPT]), max_new_tokens=24, do_sample=False, min_new_tokens=24,
                                   pad_token_id=0)[0, len(PROMPT):].tolist()
    assert generated == theirs


def test_kv_cache_steps_equal_one_pass_and_rows_of_their_own(case):
    """Chunked prefill and per-row cache lengths (serve.py's batching) give the full pass's logits."""
    _, _, directory = case
    ours = model_from_checkpoint(directory)
    full = ours(torch.tensor([PROMPT]))[0][0]
    cache = KVCache(ours.config, 1, "cpu", capacity=len(PROMPT))
    first = ours(torch.tensor([PROMPT[:9]]), kv_cache=cache)[0][0]
    rest = ours(torch.tensor([PROMPT[9:]]), kv_cache=cache)[0][0]
    torch.testing.assert_close(torch.cat([first, rest]), full, atol=1e-4, rtol=1e-4)
    rows = KVCache(ours.config, 2, "cpu", capacity=len(PROMPT))
    rows.length = torch.tensor([0, 0])
    for position in range(len(PROMPT)):
        step = ours(torch.tensor([[PROMPT[position]], [PROMPT[min(position, 4)]]]), kv_cache=rows)[0]
        torch.testing.assert_close(step[0, 0], full[position], atol=1e-4, rtol=1e-4)
        if position == 4:
            rows.length[1] = 4   # the second row stops advancing: it holds its own, shorter sequence
    with pytest.raises(ValueError, match="KV cache"):
        ours(torch.tensor([[1]]), kv_cache=cache)


def test_training_step_and_lora_on_a_qwen_model(case):
    _, _, directory = case
    ours = model_from_checkpoint(directory).train()
    ids = torch.tensor([PROMPT])
    _, loss = ours(ids[:, :-1], targets=ids[:, 1:])
    loss.backward()
    named = dict(ours.named_parameters())
    grads = [p.grad for n, p in named.items() if "norm" in n or "bias" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    ours.zero_grad()
    ours.attach_lora(4, 8)
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {n for n in dict(ours.named_parameters())
                                                                         if "lora_" in n}


def test_old_configs_without_the_new_fields_load():
    cfg = ModelConfig.from_dict({"block_size": 16, "vocab_size": 32, "n_layer": 1, "n_head": 2, "n_kv_head": 1,
                                 "n_embd": 16, "n_hidden": 32})
    assert (cfg.head_dim, cfg.rope_style, cfg.rope_theta, cfg.tie_embeddings) == (8, "interleaved", 10000.0, True)
    model = Transformer(cfg)
    assert model.output.weight is model.tok_embeddings.weight
    with pytest.raises(ValueError, match="rope_style"):
        ModelConfig(rope_style="other")
    with pytest.raises(ValueError, match="head_dim"):
        ModelConfig(head_dim=7)


# ----------------------------------------------------------------------------- export.py --hf, read back

def export_hf(directory, path, quant=export.QUANT_F32, **options):
    export.write_hf(str(path), str(directory), quant, progress=False, **options)
    return export.load_bin(str(path))


def header_words(path):
    with open(path, "rb") as f:
        data = f.read(256)
    return struct.unpack("<64I", data), struct.unpack("<64f", data)


def test_f32_file_header_tokenizer_and_logits(case, tmp_path):
    name, hf_model, directory = case
    path = tmp_path / f"{name}.bin"
    model, tokenizer = export_hf(directory, path)
    words, floats = header_words(path)
    c = hf_model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    assert words[4] == (3 if name.startswith("qwen3") else 2)
    assert words[6:15] == (128, VOCAB, c.num_hidden_layers, c.hidden_size, c.num_attention_heads,
                           c.num_key_value_heads, c.intermediate_size, int(c.tie_word_embeddings), head_dim)
    assert (words[15], words[16], words[17]) == (0, 0, 0)
    assert floats[18] == np.float32(1e-5) and floats[19] == 50000.0
    # every tensor, biases and q/k norms included, and the RoPE tables [B, HD/2]: the length adds up
    layout = export.tensor_layout(model.config, c.tie_word_embeddings)
    section = struct.unpack_from("<I", path.read_bytes(), 256)[0]
    assert os.path.getsize(path) == 256 + section + 4 * sum(math.prod(shape) for _, shape, _ in layout)
    assert dict((n, s) for n, s, _ in layout)["rope_cos"] == (128, head_dim // 2)
    import tokenizers
    reference = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    text = "Hello, world! 你好，世界。<|im_start|>user\n  x = 42\n<|im_end|>"
    assert tokenizer.encode(text) == reference.encode(text).ids
    error = relative_error(model(torch.tensor([PROMPT]))[0][0], reference_logits(hf_model, PROMPT))
    print(f"{name}: F32 file, logits within {error:.1e} of the largest")
    assert error < 1e-5
    generated = list(model.generate(PROMPT, 12, stop_ids=()))
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor([PROMPT]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                   pad_token_id=0)[0, len(PROMPT):].tolist()
    assert generated == theirs


def quantized_reference(directory, quantize):
    """Our model with the checkpoint's weights passed through quantize(name, array) -> array (dequantized)."""
    model = model_from_checkpoint(directory)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.from_numpy(quantize(name, p.detach().numpy().copy())).reshape(p.shape))
    return model


def test_q80_file_holds_the_quantized_weights_and_stays_close(case, tmp_path):
    name, hf_model, directory = case
    model, _ = export_hf(directory, tmp_path / f"{name}-q80.bin", export.QUANT_Q80)
    group = header_words(tmp_path / f"{name}-q80.bin")[0][16]
    assert group == export.choose_group_size(model.config)

    def q80(param, array):   # matrices and the embedding in int8 groups; norms, biases, q/k norms float32
        if array.ndim < 2:
            return array
        return export.dequantize_q80(*export.quantize_q80(torch.from_numpy(array), group), group)
    expected = quantized_reference(directory, q80)
    logits = model(torch.tensor([PROMPT]))[0][0]
    torch.testing.assert_close(logits, expected(torch.tensor([PROMPT]))[0][0], atol=1e-5, rtol=1e-5)
    error = relative_error(logits, reference_logits(hf_model, PROMPT))
    print(f"{name}: Q80 group {group}, logits within {error:.1e} of the largest")
    assert error < 0.06


def test_q4k_file_layout_and_quantized_weights(case, tmp_path):
    name, hf_model, directory = case
    path = tmp_path / f"{name}-q4k.bin"
    if not hf_model.config.tie_word_embeddings:
        with pytest.raises(ValueError, match="untied"):
            export.write_hf(str(path), str(directory), export.QUANT_Q4K, progress=False)
        assert not path.exists()
        return
    model, _ = export_hf(directory, path, export.QUANT_Q4K)
    cfg = model.config
    layout = export.q4k_layout(cfg)
    names = [n for n, _ in layout]
    frames = [n for n, s in layout if export.is_q4k_frame(n, s)]
    extras = ["attn.q_norm.weight", "attn.k_norm.weight"] if cfg.qk_norm else ["attn.wq.bias", "attn.wk.bias",
                                                                                "attn.wv.bias"]
    # FORMAT.md: the frames, then Qwen3's q/k norms and no RoPE tables, or Qwen2's biases and then the tables
    assert names[names.index(frames[-1]) + 1] == f"layers.0.{extras[0]}"
    assert ("rope_cos" in names) == (not cfg.qk_norm)

    def q4k(param, array):
        if array.ndim < 2:
            return array
        blocks = export.quantize_q4k(torch.from_numpy(array))
        return export.dequantize_q4k(blocks, array.shape[-1])
    expected = quantized_reference(directory, q4k)
    logits = model(torch.tensor([PROMPT]))[0][0]
    torch.testing.assert_close(logits, expected(torch.tensor([PROMPT]))[0][0], atol=1e-5, rtol=1e-5)
    error = relative_error(logits, reference_logits(hf_model, PROMPT))
    agreement = float((logits.argmax(-1) == reference_logits(hf_model, PROMPT).argmax(-1)).float().mean())
    print(f"{name}: Q4K logits within {error:.2f} of the largest, top-1 agreement {agreement:.2f}")
    assert error < 0.8


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sharded_half_precision_checkpoint(tmp_path, tokenizer_dir, dtype):
    """bf16 / fp16 tensors spread over shards listed in model.safetensors.index.json read exactly."""
    directory = save_checkpoint(make_hf_model("Qwen2", QWEN2).to(dtype), tmp_path / "sharded", tokenizer_dir,
                                max_shard_size="100KB")
    assert len([f for f in os.listdir(directory) if f.endswith(".safetensors")]) > 2
    assert (directory / "model.safetensors.index.json").exists()
    model, _ = export_hf(directory, tmp_path / "sharded.bin")
    hf_model = make_hf_model("Qwen2", QWEN2)   # the same weights rounded to half precision, RoPE kept float32
    with torch.no_grad():
        for p in hf_model.parameters():
            p.copy_(p.to(dtype).float())
    theirs = dict(hf_model.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, theirs[hf.hf_name(name)]), name
    assert relative_error(model(torch.tensor([PROMPT]))[0][0], reference_logits(hf_model, PROMPT)) < 1e-5


def rewrite_json(path, **changes):
    with open(path) as f:
        content = json.load(f)
    content.update(changes)
    with open(path, "w") as f:
        json.dump(content, f)


@pytest.fixture
def qwen3_dir(tmp_path, tokenizer_dir):
    return save_checkpoint(make_hf_model("Qwen3", QWEN3), tmp_path / "qwen3", tokenizer_dir)


def run_export(*args):
    return subprocess.run([sys.executable, "export.py", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


@pytest.mark.parametrize("change, message", [
    (dict(architectures=["LlamaForCausalLM"]), "architecture LlamaForCausalLM is not supported"),
    (dict(architectures=["Qwen3MoeForCausalLM"]), "architecture Qwen3MoeForCausalLM is not supported"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}), "rope_type 'yarn'"),
    (dict(use_sliding_window=True), "sliding-window"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(hidden_size=None), "hidden_size is missing"),
    (dict(intermediate_size=96), r"mlp.gate_proj.weight has shape \[160, 64\], config.json implies \[96, 64\]"),
    (dict(tie_word_embeddings=False), "lm_head.weight is missing"),
])
def test_refusals_of_config_json(qwen3_dir, tmp_path, change, message):
    rewrite_json(qwen3_dir / "config.json", **change)
    with pytest.raises(ValueError, match=message):
        export.write_hf(str(tmp_path / "out.bin"), str(qwen3_dir), progress=False)
    assert not (tmp_path / "out.bin").exists() and not (tmp_path / "out.bin.tmp").exists()


def test_refusals_of_files_through_the_command_line(qwen3_dir, tmp_path):
    out = tmp_path / "out.bin"
    (qwen3_dir / "tokenizer.json").rename(tmp_path / "tokenizer.json")
    result = run_export(out, "--hf", qwen3_dir)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "error:" in result.stderr and "tokenizer.json: missing" in result.stderr
    (tmp_path / "tokenizer.json").rename(qwen3_dir / "tokenizer.json")

    weights = qwen3_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) - 1000])   # truncated: the last tensor runs past the end
    result = run_export(out, "--hf", qwen3_dir, "--quant")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "model.safetensors: tensor" in result.stderr and "truncated" in result.stderr

    header_length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + header_length])
    name = "model.layers.0.self_attn.q_proj.weight"
    header[name]["dtype"] = "F8_E4M3"
    weights.write_bytes(rewrite_header(header, data[8 + header_length:]))
    result = run_export(out, "--hf", qwen3_dir)
    assert f"tensor {name}: dtype F8_E4M3 is not supported" in result.stderr

    header = json.loads(data[8:8 + header_length])
    del header["model.layers.2.self_attn.k_norm.weight"]
    weights.write_bytes(rewrite_header(header, data[8 + header_length:]))
    result = run_export(out, "--hf", qwen3_dir, "--q4k")
    assert "tensor model.layers.2.self_attn.k_norm.weight is missing" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()

    weights.unlink()
    result = run_export(out, "--hf", qwen3_dir)
    assert "no model.safetensors nor model.safetensors.index.json" in result.stderr
    assert "--quant and --q4k exclude" in run_export(out, "--hf", qwen3_dir, "--quant", "--q4k").stderr


def rewrite_header(header, data):
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def test_original_rope_table_width_is_read_from_the_file_length(qwen3_dir, tmp_path):
    """The original's converter writes the tables [B, (E/n_head)/2]: readers decide the width from the length."""
    path = tmp_path / "ours.bin"
    model, _ = export_hf(qwen3_dir, path)
    cfg = model.config
    assert cfg.head_dim != cfg.n_embd // cfg.n_head
    data = path.read_bytes()
    table_bytes = 4 * cfg.block_size * cfg.head_dim // 2
    tables_at = len(data) - 2 * table_bytes   # tied: the tables end the file
    narrow = b"".join(t.numpy().tobytes() for t in rope_tables(cfg.n_embd // cfg.n_head, cfg.block_size, 1e6))
    original = tmp_path / "original-width.bin"
    original.write_bytes(data[:tables_at] + narrow)
    theirs, _ = export.load_bin(str(original))
    torch.testing.assert_close(theirs(torch.tensor([PROMPT]))[0][0], model(torch.tensor([PROMPT]))[0][0])
    (tmp_path / "cut.bin").write_bytes(data[:-4])
    with pytest.raises(ValueError, match="rope_sin: needs"):
        export.load_bin(str(tmp_path / "cut.bin"))


def test_export_memory_does_not_grow_with_the_model(tmp_path, tokenizer_dir):
    """Peak resident memory of an export, measured in a fresh process, for a model and one three times as deep:
    a converter that held the model (or the output) would grow by at least the output's growth; this one grows
    by a fraction of it (measured: F32 0 of 48 MiB, Q80 2.6 of 12.4 MiB; the fixed part, the tokenizer and
    torch's first operations, is the same)."""
    script = ("import sys, export\n"
              "def status(key):\n"
              "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(key)) * 1024\n"
              "open('/proc/self/clear_refs', 'w').write('5')   # restart the peak (VmHWM) from here\n"
              "before = status('VmRSS:')\n"
              "export.write_hf(sys.argv[1], sys.argv[2], int(sys.argv[3]), progress=False)\n"
              "print(status('VmHWM:') - before)\n")
    measured = {}
    for layers in (2, 6):
        overrides = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=8,
                         num_key_value_heads=4, head_dim=64, tie_word_embeddings=True)
        directory = save_checkpoint(make_hf_model("Qwen3", overrides).to(torch.bfloat16), tmp_path / f"l{layers}",
                                    tokenizer_dir)
        for quant in (export.QUANT_F32, export.QUANT_Q80):
            out = tmp_path / f"l{layers}-{quant}.bin"
            result = subprocess.run([sys.executable, "-c", script, str(out), str(directory), str(quant)],
                                    capture_output=True, text=True, cwd=ROOT, timeout=300)
            assert result.returncode == 0, result.stderr
            measured[layers, quant] = int(result.stdout.split()[-1]), os.path.getsize(out)
    for quant in (export.QUANT_F32, export.QUANT_Q80):
        (small_peak, small_size), (large_peak, large_size) = measured[2, quant], measured[6, quant]
        print(f"quant {quant:#x}: outputs {small_size / 2**20:.1f} and {large_size / 2**20:.1f} MiB, peak extra "
              f"memory {small_peak / 2**20:.1f} and {large_peak / 2**20:.1f} MiB")
        assert large_peak - small_peak < 0.5 * (large_size - small_size)
    peak, size = measured[6, export.QUANT_F32]
    assert peak < 0.25 * size   # a few chunks: the float32 output is written as it is converted


# ----------------------------------------------------------------------------- infer.py and eval.py

@pytest.fixture(scope="module")
def qwen3_file(tmp_path_factory, tokenizer_dir):
    """(transformers model, checkpoint directory, F32 .bin) of a Qwen3 model."""
    hf_model = make_hf_model("Qwen3", QWEN3)
    directory = save_checkpoint(hf_model, tmp_path_factory.mktemp("qwen3-file"), tokenizer_dir)
    path = directory / "qwen3.bin"
    export.write_hf(str(path), str(directory), progress=False)
    return hf_model, directory, path


def reference_tokenizer(directory):
    import tokenizers
    return tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))


def test_chatml_template_and_stop_ids(qwen3_file, tmp_path, tokenizer_dir):
    import checkpoint
    import infer
    _, directory, path = qwen3_file
    model, tokenizer = checkpoint.load_model(str(path))
    reference = reference_tokenizer(directory)
    question = "用一句话介绍你自己"
    opening = f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    template = infer.prompt_template(model.config, tokenizer)
    assert template.question(question) == reference.encode(opening + "<think>\n\n</think>\n\n").ids
    assert infer.prompt_template(model.config, tokenizer, think=True).question(question) == reference.encode(opening).ids
    assert template.stop_ids == (reference.token_to_id("<|endoftext|>"), reference.token_to_id("<|im_end|>"))
    assert template.continuation("Hello") == reference.encode("Hello").ids   # no BOS
    conversation = infer.Conversation(tokenizer, 128, 32, template)
    first = conversation.ask(question)
    conversation.add_answer([300, 301, template.stop_ids[1]])
    second = conversation.ask("再说一遍")
    assert second == first + [300, 301] + reference.encode("<|im_end|>\n").ids + template.question("再说一遍")
    qwen2_dir = save_checkpoint(make_hf_model("Qwen2", QWEN2), tmp_path / "qwen2", tokenizer_dir)
    qwen2, qwen2_tokenizer = export_hf(qwen2_dir, tmp_path / "qwen2.bin")
    assert infer.prompt_template(qwen2.config, qwen2_tokenizer).question(question) == reference.encode(opening).ids


def reference_greedy(hf_model, ids, count):
    with torch.no_grad():
        return hf_model.generate(torch.tensor([ids]), max_new_tokens=count, min_new_tokens=count, do_sample=False,
                                 pad_token_id=0)[0, len(ids):].tolist()


def chat_turn(reference, question):
    return reference.encode(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
                            "<think>\n\n</think>\n\n").ids


def test_infer_chats_over_two_turns_like_transformers(tmp_path, tokenizer_dir):
    """infer.py -i, greedy: each answer is transformers' greedy continuation of the ChatML conversation so far,
    stopped at <|im_end|>, the first answer closed with <|im_end|>\n, streamed as whole characters. The model's
    head is changed to say <|im_end|> where it would first say some token, so that the first answer ends early."""
    questions, limit = ["你好", "What is 2+2?"], 120
    hf_model = make_hf_model("Qwen3", QWEN3_UNTIED)
    directory = save_checkpoint(hf_model, tmp_path / "chat", tokenizer_dir)
    reference = reference_tokenizer(directory)
    im_end = reference.token_to_id("<|im_end|>")
    first = reference_greedy(hf_model, chat_turn(reference, questions[0]), 20)
    stop_at = next(k for k in range(6, 20) if first[k] not in first[:k])
    with torch.no_grad():   # a slightly larger logit than first[stop_at]'s wherever that one wins
        hf_model.lm_head.weight[im_end] = 1.05 * hf_model.lm_head.weight[first[stop_at]]
    directory = save_checkpoint(hf_model, tmp_path / "chat", tokenizer_dir)
    export.write_hf(str(tmp_path / "chat.bin"), str(directory), progress=False)
    result = subprocess.run([sys.executable, "infer.py", "-m", str(tmp_path / "chat.bin"), "-i", "-t", "0", "-r", "1",
                             "-s", str(limit)], input="\n".join(questions) + "\n", capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    history, expected, lengths = [], [], []
    for question in questions:
        prompt = history + chat_turn(reference, question)
        answer = reference_greedy(hf_model, prompt, limit - len(prompt))
        answer = answer[:answer.index(im_end)] if im_end in answer else answer
        expected.append(reference.decode(answer))
        lengths.append(len(answer))
        history = prompt + answer + reference.encode("<|im_end|>\n").ids
    assert lengths[0] == stop_at and lengths[1] > 0   # the first answer stopped at <|im_end|>
    answers = [line.removeprefix("> ") for line in result.stdout.split("\n")[1:3]]
    assert answers == expected


def test_infer_refuses_an_empty_continuation_of_a_qwen_file(qwen3_file):
    """Qwen has no <|bos|>: an empty --prompt has nothing to continue, said in a line, not a traceback."""
    result = subprocess.run([sys.executable, "infer.py", "-m", str(qwen3_file[2]), "--prompt", "", "-t", "0"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert "the prompt is empty" in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_eval_text_perplexity_and_choices_on_a_qwen_file(qwen3_file, tmp_path):
    import checkpoint
    import eval as evaluation
    hf_model, directory, path = qwen3_file
    reference = reference_tokenizer(directory)
    end_of_text = reference.token_to_id("<|endoftext|>")
    lines = ["今天天气很好。", "The quick brown fox jumps over the lazy dog.", "x = [i * i for i in range(10)]"]
    (tmp_path / "held_out.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    total, count = 0.0, 0
    for line in lines:   # documents <|endoftext|>line<|endoftext|>, every token after the first predicted
        ids = [end_of_text] + reference.encode(line).ids + [end_of_text]
        log_probs = reference_logits(hf_model, ids[:-1]).log_softmax(-1)
        total -= float(log_probs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())
        count += len(ids) - 1
    result = subprocess.run([sys.executable, "eval.py", "-m", str(path), "--text", str(tmp_path / "held_out.txt"),
                             "--json"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout)["text"]
    assert measured["tokens"] == count
    assert measured["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)

    records = [("天气", ["很好", "不好", "一般"]), ("2 + 2 =", [" 4", " 5"]), ("def f(x):", [" return x", " pass"])]
    best, worst = [], []
    for question, choices in records:   # log-likelihood of each choice after <|endoftext|>question
        context = [end_of_text] + reference.encode(question).ids
        scores = []
        for choice in choices:
            ids = context + reference.encode(choice).ids
            log_probs = reference_logits(hf_model, ids[:-1]).log_softmax(-1)
            scores.append(float(log_probs[torch.arange(len(context) - 1, len(ids) - 1),
                                          torch.tensor(ids[len(context):])].sum()))
        best.append(scores.index(max(scores)))
        worst.append(scores.index(min(scores)))
    model, tokenizer = checkpoint.load_model(str(path))
    for answers, accuracy in ((best, 1.0), (worst, 0.0)):
        choices_path = tmp_path / "mc.jsonl"
        choices_path.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                                        for (q, c), a in zip(records, answers)), encoding="utf-8")
        assert evaluation.evaluate_choices(model, tokenizer, str(choices_path))["accuracy"] == accuracy
    result = subprocess.run([sys.executable, "eval.py", "-m", str(path), "--sentiment", str(choices_path)],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode != 0 and "Nano's built-in task" in result.stderr and "Traceback" not in result.stderr


def test_qwen_files_rewrite_byte_for_byte_from_the_command_line(qwen3_file, tmp_path):
    """A Qwen file read back and written again (F32, and Q4K from the F32 file) equals what --hf writes."""
    _, directory, path = qwen3_file
    model, tokenizer = export.load_bin(str(path))
    export.write_model(str(tmp_path / "again.bin"), model, tokenizer, progress=False)
    assert (tmp_path / "again.bin").read_bytes() == path.read_bytes()
    result = run_export(tmp_path / "direct.bin", "--hf", directory, "--q4k")
    assert result.returncode == 0 and "Qwen3, Q4K" in result.stdout, result.stderr
    result = run_export(tmp_path / "from-f32.bin", "--q4k", path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "from-f32.bin").read_bytes() == (tmp_path / "direct.bin").read_bytes()
    result = run_export(tmp_path / "q80.bin", "--hf", directory, "--quant", "--group-size", "16")
    assert result.returncode == 0 and "Qwen3, Q80, group size 16" in result.stdout, result.stderr
    assert header_words(tmp_path / "q80.bin")[0][15:17] == (0x80, 16)
    result = run_export(tmp_path / "q.gguf", "--gguf", path)
    assert result.returncode != 0 and "Qwen models cannot be exported to GGUF" in result.stderr


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path, tokenizer_dir):
    directory = save_checkpoint(make_hf_model("Qwen3", QWEN3, vocab_size=600), tmp_path / "small", tokenizer_dir)
    with pytest.raises(ValueError, match="tokenizer has 660 tokens but the model's vocab_size is 600"):
        export.write_hf(str(tmp_path / "out.bin"), str(directory), progress=False)
    assert not (tmp_path / "out.bin").exists()


@pytest.mark.parametrize("word, value, message", [
    (4, 5, "model_type: model_type 5 is not supported here"),
    (4, 2, "truncated or wrong dims"),             # a Qwen3 file read as Qwen2: biases where norms are
    (17, 1, "flags: 0x1, expected 0 for a Qwen3 model"),
    (14, 0, "head_dim: 0 is out of range"),
    (64, 0xFFFFFF, "tokenizer section length"),   # word 64 is the tokenizer section's T
])
def test_corrupt_qwen_files_are_refused_naming_the_field(qwen3_file, tmp_path, word, value, message):
    _, _, path = qwen3_file
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, 4 * word, value)
    bad = tmp_path / "bad.bin"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=message):
        export.load_bin(str(bad))
    result = subprocess.run([sys.executable, "infer.py", "-m", str(bad), "--prompt", "x"], capture_output=True,
                            text=True, cwd=ROOT, timeout=60)
    assert result.returncode != 0 and "bad.bin" in result.stderr and "Traceback" not in result.stderr


def test_config_json_as_the_released_models_write_it():
    """Qwen3-0.6B's config.json (transformers 4 style: rope_theta at the top, rope_scaling null)."""
    released = {"architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "head_dim": 128,
                "hidden_act": "silu", "hidden_size": 1024, "intermediate_size": 3072, "max_position_embeddings": 40960,
                "max_window_layers": 28, "model_type": "qwen3", "num_attention_heads": 16, "num_hidden_layers": 28,
                "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
                "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
                "use_sliding_window": False, "vocab_size": 151936}
    model_type, cfg = hf.model_config_from_hf(released, "config.json")
    assert model_type == 3
    assert (cfg.n_embd, cfg.n_head, cfg.head_dim, cfg.n_kv_head, cfg.block_size) == (1024, 16, 128, 8, 40960)
    assert (cfg.norm_eps, cfg.rope_theta, cfg.tie_embeddings, cfg.qk_norm) == (1e-6, 1e6, True, True)
    assert export.choose_group_size(cfg) == 128
    qwen25 = dict(released, architectures=["Qwen2ForCausalLM"], sliding_window=32768, head_dim=None,
                  hidden_size=896, num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864)
    del qwen25["rope_theta"]   # absent: FORMAT.md's Qwen default
    model_type, cfg = hf.model_config_from_hf(qwen25, "config.json")
    assert (model_type, cfg.head_dim, cfg.qkv_bias, cfg.rope_theta) == (2, 64, True, 1e6)
    with pytest.raises(ValueError, match="config.json: rope_scaling.rope_type 'linear' is not supported"):
        hf.model_config_from_hf(dict(released, rope_scaling={"type": "linear", "factor": 2.0}), "config.json")

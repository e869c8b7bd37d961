"""export.py: the .bin layout byte for byte, round trips (float32, Q80, LoRA), and refusal of bad files."""

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import checkpoint  # noqa: E402
import export  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

SAMPLE_TEXT = "hello world, the quick brown fox. 你好，世界！今天天气很好。𠀀𠀁 emoji 😀"


def tiny_tokenizer():
    return Tokenizer.build([SAMPLE_TEXT], words=["hello", "world", "世界", "天气"])


def tiny_model(tokenizer, seed=0, **overrides):
    torch.manual_seed(seed)
    dims = dict(block_size=32, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=48,
                n_hidden=128)
    dims.update(overrides)
    model = Transformer(ModelConfig(**dims)).eval()
    with torch.no_grad():   # larger norm weights than the init's ones, so every tensor matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def words_of(path, count=64):
    with open(path, "rb") as f:
        return struct.unpack(f"<{count}I", f.read(4 * count))


def float_bits(value):
    return struct.unpack("<I", struct.pack("<f", value))[0]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok)


def test_float32_layout_and_round_trip(tmp_path, model, tok):
    path = str(tmp_path / "m.bin")
    assert export.write_model(path, model, tok) == 0
    cfg = model.config
    words = words_of(path)
    assert words[:17] == (0x42443453, 0x55524C4D, 2026, 1, 0, 36, cfg.block_size, cfg.vocab_size, cfg.n_layer,
                          cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.n_hidden, 1, cfg.head_dim, 0, 0)
    assert not any(words[17:])   # a causal model with the default eps: the original's header, byte for byte
    tokenizer_bytes = 8 + sum(8 + 4 * len(t) for t in tok.itos)
    with open(path, "rb") as f:
        data = f.read()
    assert struct.unpack_from("<II", data, 256) == (tokenizer_bytes, tok.vocab_size)
    first = struct.unpack_from("<BBBBI", data, 264)
    assert first == (len("<|padding|>"), 1, 0xFF, 0xFF, 0)
    E, L, V, F, hd = cfg.n_embd, cfg.n_layer, cfg.vocab_size, cfg.n_hidden, cfg.head_dim
    kv = cfg.n_kv_head * hd
    params = 2 * L * E + E + V * E + L * (2 * E * E + 2 * kv * E + 3 * F * E) + 2 * cfg.block_size * hd // 2
    assert len(data) == 256 + tokenizer_bytes + 4 * params
    # the first parameter is layer 0's attention norm, right after the tokenizer
    first_norm = np.frombuffer(data, "<f4", E, 256 + tokenizer_bytes)
    assert np.array_equal(first_norm, model.layers[0].attn_norm.weight.detach().numpy())

    loaded, tok2 = export.load_bin(path)
    assert loaded.config == model.config
    assert tok2.itos == tok.itos and tok2.special_tokens == tok.special_tokens
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert torch.equal(loaded.rope_cos, model.rope_cos) and torch.equal(loaded.rope_sin, model.rope_sin)


def test_q80_group_size_scales_and_error_bound(tmp_path, model, tok):
    path = str(tmp_path / "q.bin")
    group = export.write_model(path, model, tok, quant=True, group_size=128)
    assert group == 16   # 128 and 64 and 32 do not divide n_embd 48
    assert words_of(path)[15:17] == (0x80, 16)
    cfg, _, tensors, quant, group_read = export.read_bin(path)
    assert (quant, group_read) == (0x80, 16)
    state = model.state_dict()
    for name, data in tensors.items():
        if not isinstance(data, tuple):
            continue
        q, scales = data
        expected_q, expected_scales = export.quantize_q80(state[name], 16)
        assert np.array_equal(q, expected_q) and np.array_equal(scales, expected_scales), name
        w = state[name].numpy().reshape(-1, 16)
        assert np.allclose(scales, np.abs(w).max(axis=1) / 127)
        error = np.abs(export.dequantize_q80(q, scales, 16).reshape(-1, 16) - w)
        assert (error <= scales[:, None] / 2 + 1e-7).all(), name
    loaded, _ = export.load_bin(path)
    assert (loaded.layers[1].ffn.w2.weight - model.layers[1].ffn.w2.weight).abs().max() < 1e-3


def test_choose_group_size():
    cfg = ModelConfig(block_size=8, vocab_size=16, n_layer=1, n_head=16, n_kv_head=8, n_embd=512, n_hidden=1408)
    assert export.choose_group_size(cfg, 128) == 128   # 1408 = 11 * 128
    cfg = ModelConfig(block_size=8, vocab_size=16, n_layer=1, n_head=2, n_kv_head=1, n_embd=96, n_hidden=160)
    assert export.choose_group_size(cfg, 128) == 32
    assert export.choose_group_size(cfg, 16) == 16


def test_q80_all_zero_group_has_no_nan():
    q, scales = export.quantize_q80(torch.zeros(4, 8), 8)
    assert not q.any() and not scales.any()


def test_untied_head_round_trip(tmp_path, tok):
    model = tiny_model(tok)
    model.output.weight = torch.nn.Parameter(torch.randn_like(model.output.weight))
    path = str(tmp_path / "untied.bin")
    export.write_model(path, model, tok)
    assert words_of(path)[13] == 0
    loaded, _ = export.load_bin(path)
    assert torch.equal(loaded.output.weight, model.output.weight)
    assert torch.equal(loaded.tok_embeddings.weight, model.tok_embeddings.weight)


def test_refuses_what_the_format_cannot_hold(tmp_path, tok):
    # norm_eps 0 would read back as the default, 1e-50 is 0 in float32
    for overrides in ({"use_rope": False}, {"bias": True}, {"norm_eps": 0.0}, {"norm_eps": 1e-50},
                      {"norm_eps": float("nan")}):
        with pytest.raises(ValueError, match="cannot be exported"):
            export.write_model(str(tmp_path / "x.bin"), tiny_model(tok, **overrides), tok)


def logits_of(model, tok, text="hello world, 你好世界 😀"):
    with torch.no_grad():
        return model(torch.tensor([tok.encode(text)]))[0]


def test_seq2seq_model_is_recorded_in_the_flags_word(tmp_path, tok):
    model = tiny_model(tok, is_causal=False)
    path = str(tmp_path / "s2s.bin")
    export.write_model(path, model, tok)
    words = words_of(path)
    assert words[17] == export.FLAG_NON_CAUSAL and not any(words[18:])
    loaded, _ = export.load_bin(path)
    assert loaded.config.is_causal is False
    assert torch.equal(logits_of(loaded, tok), logits_of(model, tok))


def test_norm_eps_is_written_and_honoured(tmp_path, tok):
    model = tiny_model(tok, norm_eps=1e-6)
    path = str(tmp_path / "eps.bin")
    export.write_model(path, model, tok)
    words = words_of(path)
    assert words[17] == 0 and words[18] == float_bits(1e-6) and not any(words[19:])
    loaded, _ = export.load_bin(path)
    assert loaded.config == model.config
    assert torch.equal(logits_of(loaded, tok), logits_of(model, tok))
    assert not torch.allclose(logits_of(tiny_model(tok), tok), logits_of(model, tok), atol=1e-3)   # eps matters


def lora_model(tok, targets=("wq", "wk", "wv", "wo"), rank=4, alpha=8, **dims):
    model = tiny_model(tok, **dims)
    model.attach_lora(rank, alpha, targets=targets)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def test_the_shipped_lora_config_exports(tmp_path, tok):
    """config/lora.json (the main job's adapter) trains only what the LoRA file and the engines hold."""
    with open(os.path.join(ROOT, "config", "lora.json")) as f:
        lora = json.load(f)
    model = lora_model(tok, targets=lora["lora_targets"], rank=lora["lora_rank"], alpha=lora["lora_alpha"])
    export.write_lora(str(tmp_path / "main_job_lora.bin"), model.lora_state_dict(), model.lora_config, model.config)
    state, config = export.load_lora_bin(str(tmp_path / "main_job_lora.bin"), model.config)
    assert sorted(config["targets"]) == sorted(lora["lora_targets"])
    assert all(torch.equal(state[name], tensor) for name, tensor in model.lora_state_dict().items())


def test_lora_round_trip_and_layout(tmp_path, tok):
    model = lora_model(tok)
    path = str(tmp_path / "lora.bin")
    export.write_lora(path, model.lora_state_dict(), model.lora_config, model.config)
    cfg = model.config
    assert words_of(path)[:14] == (0x42443453, 0x55524C4D, 2024, 10, 10, 32, 4, 8, cfg.n_layer, cfg.n_embd,
                                   cfg.n_head, cfg.n_kv_head, cfg.n_hidden, 0)
    E, kv, r, L = cfg.n_embd, cfg.n_kv_head * cfg.head_dim, 4, cfg.n_layer
    assert os.path.getsize(path) == 256 + 4 * L * r * (3 * E + E + 2 * kv + E + E)
    with open(path, "rb") as f:   # first matrix: layer 0 wq.A, then layer 1 wq.A
        data = f.read()
    a0 = np.frombuffer(data, "<f4", r * E, 256)
    assert np.array_equal(a0, model.layers[0].attn.wq.lora_A.detach().numpy().ravel())
    state, lora_config = export.load_lora_bin(path, model.config)
    assert lora_config == {"rank": 4, "alpha": 8, "dropout": 0.0, "targets": ["wq", "wk", "wv", "wo"]}
    for name, tensor in model.lora_state_dict().items():
        assert torch.equal(state[name], tensor), name


def test_lora_subset_targets_and_refusals(tmp_path, tok):
    model = lora_model(tok, targets=("wq", "wv"))
    path = str(tmp_path / "lora.bin")
    export.write_lora(path, model.lora_state_dict(), model.lora_config, model.config)
    state, lora_config = export.load_lora_bin(path)
    assert lora_config["targets"] == ["wq", "wv"]
    fresh = tiny_model(tok)
    fresh.load_lora_state_dict(state, lora_config)
    ids = torch.tensor([tok.encode("hello 世界")])
    assert torch.allclose(fresh(ids)[0], model(ids)[0], atol=1e-6)

    with pytest.raises(ValueError, match="wq, wk, wv, wo only"):
        ffn = lora_model(tok, targets=("wq", "w1"))
        export.write_lora(path, ffn.lora_state_dict(), ffn.lora_config, ffn.config)
    with pytest.raises(ValueError, match="not an integer"):
        export.write_lora(path, model.lora_state_dict(), dict(model.lora_config, alpha=2.5), model.config)
    other = ModelConfig(block_size=32, vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                        n_hidden=128)
    with pytest.raises(ValueError, match=r"lora.bin: n_embd: 48 but the model has 64 \(adapter made for another"):
        export.load_lora_bin(path, other)
    with pytest.raises(ValueError, match=r"word13.bin: header word 13: 5, expected 0"):
        export.load_lora_bin(corrupt(path, tmp_path / "word13.bin", offset=13, word=5))
    truncated = corrupt(path, tmp_path / "short_lora.bin", truncate=os.path.getsize(path) - 4)
    with pytest.raises(ValueError, match=r"short_lora.bin: layers.1.attn.wo.lora_B: needs .* \(truncated"):
        export.load_lora_bin(truncated)
    model_file = str(tmp_path / "model.bin")
    export.write_model(model_file, model, tok)
    with pytest.raises(ValueError, match=r"model.bin: model_type: a model is not supported here"):
        export.load_lora_bin(model_file)


def corrupt(path, out, offset=None, word=None, truncate=None, append=b""):
    with open(path, "rb") as f:
        data = bytearray(f.read())
    if word is not None:
        data[4 * offset:4 * offset + 4] = struct.pack("<I", word)
    if truncate is not None:
        data = data[:truncate]
    with open(out, "wb") as f:
        f.write(bytes(data) + append)
    return str(out)


BAD_MODEL_FILES = [
    # (description, corrupt() arguments, expected message)
    ("truncated", {"truncate": -100}, r"truncated or wrong dims"),
    ("header only part", {"truncate": 100}, r"header: file has 100 bytes"),
    ("wrong magic", {"offset": 0, "word": 0x12345678}, r"magic: 12345678"),
    ("version 2024.10", {"offset": 3, "word": 10, "_major": 2024}, r"version 2024.10 not supported"),
    ("version 2025.12", {"offset": 3, "word": 12, "_major": 2025}, r"version 2025.12 not supported"),
    ("unknown version", {"offset": 3, "word": 7}, r"unknown version 2026.7"),
    ("float32 labelled Q4K", {"offset": 15, "word": 0x42}, r"tok_embeddings.weight frame: type 0x[0-9a-f]+, expected 0x42"),
    ("unknown quant", {"offset": 15, "word": 5}, r"quant_type: unknown value 0x5"),
    ("dims too large", {"offset": 7, "word": 4000}, r"tokenizer vocab_size"),
    ("extra bytes", {"append": b"\0" * 8}, r"file length"),
    ("LoRA type", {"offset": 4, "word": 10}, r"model_type"),
    ("unknown flags bit", {"offset": 17, "word": 0b10}, r"flags: 0x2 has unknown bits 0x2"),
    ("negative norm_eps", {"offset": 18, "word": float_bits(-1e-5)}, r"norm_eps: -1e-05 is not a positive number"),
    ("NaN norm_eps", {"offset": 18, "word": 0x7FC00000}, r"norm_eps: nan is not a positive number"),
    ("rope_theta 1e6", {"offset": 19, "word": float_bits(1e6)}, r"rope_theta: 1e\+06 is not supported"),
    ("word past the header fields", {"offset": 20, "word": 1}, r"header word 20: 1, expected 0"),
]


def test_reader_accepts_explicit_defaults(tmp_path, model, tok):
    """Another writer may store the defaults instead of 0."""
    path = str(tmp_path / "m.bin")
    export.write_model(path, model, tok)
    explicit = corrupt(corrupt(path, tmp_path / "e.bin", offset=18, word=float_bits(1e-5)), tmp_path / "t.bin",
                       offset=19, word=float_bits(10000.0))
    loaded, _ = export.load_bin(explicit)
    assert loaded.config == model.config
    assert torch.equal(logits_of(loaded, tok), logits_of(model, tok))


@pytest.mark.parametrize("description,how,message", BAD_MODEL_FILES, ids=[b[0] for b in BAD_MODEL_FILES])
def test_reader_refuses_bad_model_files(tmp_path, model, tok, description, how, message):
    good = str(tmp_path / "good.bin")
    export.write_model(good, model, tok)
    how = dict(how)
    major = how.pop("_major", None)
    if major is not None:
        good = corrupt(good, tmp_path / "major.bin", offset=2, word=major)
    if how.get("truncate", 0) and how["truncate"] < 0:
        how["truncate"] = os.path.getsize(good) + how["truncate"]
    bad = corrupt(good, tmp_path / "bad.bin", **how)
    with pytest.raises(ValueError, match=message) as info:
        export.load_bin(bad)
    assert "bad.bin" in str(info.value)


def write_checkpoint(path, model, tok):
    torch.save({"model": model.state_dict(), "model_config": model.config.to_dict(), "tokenizer": tok.to_dict()}, path)


def test_cli_float32_q80_and_lora(tmp_path, model, tok):
    ckpt = str(tmp_path / "ckpt.pt")
    write_checkpoint(ckpt, model, tok)
    run = lambda *args: subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), *args],  # noqa: E731
                                       capture_output=True, text=True, cwd=tmp_path)
    r = run("f.bin", "--checkpoint", ckpt)
    assert r.returncode == 0, r.stderr
    loaded, _ = export.load_bin(str(tmp_path / "f.bin"))
    assert torch.equal(loaded.layers[0].attn.wq.weight, model.layers[0].attn.wq.weight)
    r = run("q.bin", "--quant", ckpt, "--group-size", "8")
    assert r.returncode == 0 and "group size 8" in r.stdout, r.stderr
    assert words_of(str(tmp_path / "q.bin"))[16] == 8

    adapted = lora_model(tok)
    lora_ckpt = str(tmp_path / "lora.pt")
    torch.save({"lora": adapted.lora_state_dict(), "lora_config": adapted.lora_config,
                "model_config": adapted.config.to_dict()}, lora_ckpt)
    r = run("l.bin", "--lora", lora_ckpt)
    assert r.returncode == 0, r.stderr
    state, _ = export.load_lora_bin(str(tmp_path / "l.bin"))
    assert torch.equal(state["layers.1.attn.wo.lora_B"], adapted.layers[1].attn.wo.lora_B)
    r = run("x.bin", "--checkpoint", str(tmp_path / "missing.pt"))
    assert r.returncode != 0 and "missing.pt" in r.stderr
    r = run("x.bin", "--checkpoint", lora_ckpt)  # an adapter alone is no model to export
    assert r.returncode != 0 and "LoRA run's checkpoint has no 'model' entry" in r.stderr
    assert not os.path.exists(tmp_path / "x.bin")


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"model_config": {}, "weights": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        checkpoint.load(str(path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint.load(str(tmp_path / "missing.pt"))

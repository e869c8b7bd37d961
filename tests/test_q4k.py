"""Q4K (4-bit) model files: the layout against a file built here from FORMAT.md's words alone, the original's
quantizer reproduced from its description, export.py's writer, reader and CLI, the C engine's kernels (AVX-512
VNNI, AVX2, portable, WebAssembly) against PyTorch on the dequantized weights, and refusals of bad files."""

import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_export import ROOT, corrupt, tiny_model, tiny_tokenizer, write_checkpoint  # noqa: E402
from test_infer_c import (ENGINE_DIR, TRAIN_TEXT, c_greedy, infer, one_torch_thread, prompts_of, run_c,  # noqa: E402,F401
                          torch_greedy, torch_step_logits, trained)

import export  # noqa: E402

Q4K_LOGITS_TOL = 0.02   # C Q4K (int8 activations) vs PyTorch on the dequantized weights: max |diff| / max |logit|


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def run_export(*args, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), *args], capture_output=True, text=True,
                          cwd=cwd)


def file_order_weights(path):
    """A Q4K file's matrices dequantized by export.py, in file order (what --dump-weights writes)."""
    cfg, _, tensors, _, _ = export.read_bin(path)
    names = ["tok_embeddings.weight"] + list(export.LINEAR_KINDS)
    return np.concatenate([export.dequantize_q4k(tensors[n], tensors_shape(cfg, n)[-1]).ravel() for n in names])


def tensors_shape(cfg, name):
    return dict(export.q4k_layout(cfg))[name]


def c_weights(binary, path, tmp_path):
    out = str(tmp_path / "weights.f32")
    r = run_c(binary, path, "--dump-weights", out)
    assert r.returncode == 0, r.stderr
    return np.fromfile(out, dtype=np.float32)


# ----------------------------------------------------------------------------- FORMAT.md, independently

def spec_pack_block(sc, m, d, dmin, codes, n):
    """One 160-byte block exactly as FORMAT.md words it (element i: byte i>>1, low nibble when i is even)."""
    scales = bytearray(12)
    for j in range(4):
        scales[j] = sc[j] | (sc[j + 4] >> 4) << 6
        scales[j + 4] = m[j] | (m[j + 4] >> 4) << 6
        scales[j + 8] = (sc[j + 4] & 15) | (m[j + 4] & 15) << 4
    packed = bytearray(128)
    for i in range(n):
        packed[i >> 1] |= codes[i] << (4 * (i & 1))
    return struct.pack("<IIIff", 0x42, n, 0, d, dmin) + bytes(scales) + bytes(packed)


def spec_value(q, sc, d, m, dmin):
    f = np.float32
    return f(f(q) * f(f(sc) * f(d))) - f(f(m) * f(dmin))


def spec_frame(rows_shape, cols, rng):
    """A frame of random 6-bit scales, mins and 4-bit codes, with the weights FORMAT.md says it holds."""
    rows = int(np.prod(rows_shape))
    per_row = -(-cols // 256)
    blocks, weights = [], np.zeros((rows, cols), np.float32)
    for r in range(rows):
        for j in range(per_row):
            n = min(256, cols - 256 * j)
            sc, m = rng.integers(0, 64, 8).tolist(), rng.integers(0, 64, 8).tolist()
            d, dmin = float(np.float32(rng.uniform(1e-4, 1e-3))), float(np.float32(rng.uniform(0, 5e-4)))
            codes = rng.integers(0, 16, n).tolist()
            blocks.append(spec_pack_block(sc, m, d, dmin, codes, n))
            for i in range(n):
                weights[r, 256 * j + i] = spec_value(codes[i], sc[i // 32], d, m[i // 32], dmin)
    shape = list(rows_shape) + [cols]
    header = struct.pack("<QII6II", 44 + 160 * len(blocks), 0x42, len(shape), *(shape + [0] * (6 - len(shape))),
                         len(blocks))
    return header + b"".join(blocks), weights.reshape(shape)


def spec_file(path, tok, dims, rng, word13=0):
    """A whole Q4K model file from FORMAT.md: header (word 13 as the original's converter may leave it),
    tokenizer, float32 norms, the frames, the RoPE tables. Returns the weights it holds by state_dict name."""
    V, L, E, H, KV, F, B = (dims[k] for k in ("vocab_size", "n_layer", "n_embd", "n_head", "n_kv_head", "n_hidden",
                                               "block_size"))
    hd = E // H
    words = [0x42443453, 0x55524C4D, 2026, 1, 0, 36, B, V, L, E, H, KV, F, word13, hd, 0x42, 0]
    parts = [struct.pack(f"<{len(words)}I", *words) + bytes(256 - 4 * len(words)), export.tokenizer_bytes(tok)]
    state = {}
    norms = rng.uniform(0.5, 1.5, (2 * L + 1, E)).astype(np.float32)
    parts.append(norms.tobytes())
    for i in range(L):
        state[f"layers.{i}.attn_norm.weight"], state[f"layers.{i}.ffn_norm.weight"] = norms[i], norms[L + i]
    state["norm.weight"] = norms[2 * L]
    frame, state["tok_embeddings.weight"] = spec_frame((V,), E, rng)
    parts.append(frame)
    for kind, (rows, cols) in (("attn.wq", (E, E)), ("attn.wk", (KV * hd, E)), ("attn.wv", (KV * hd, E)),
                               ("attn.wo", (E, E)), ("ffn.w1", (F, E)), ("ffn.w2", (E, F)), ("ffn.w3", (F, E))):
        frame, weights = spec_frame((L, rows), cols, rng)
        parts.append(frame)
        state.update({f"layers.{i}.{kind}.weight": weights[i] for i in range(L)})
    angles = np.arange(B)[:, None] * 10000.0 ** (-2 * np.arange(hd // 2) / hd)
    parts += [np.cos(angles).astype(np.float32).tobytes(), np.sin(angles).astype(np.float32).tobytes()]
    with open(path, "wb") as f:
        f.write(b"".join(parts))
    return state


def spec_minmax_block(x):
    """The original's quantizer for one full block of 256, scalar by scalar as FORMAT.md states it."""
    f = np.float32
    s_list, b_list = [], []
    for g in range(8):
        group = [f(v) for v in x[32 * g:32 * g + 32]]
        low, high = min(group), max(max(group), f(2.0 ** -149))
        s, b = (f(f(high - low) / f(15)), f(-low)) if low <= 0 else (f(high / f(15)), f(0))
        s_list.append(s)
        b_list.append(b)
    d, dmin = f(max(s_list) / f(63)), f(max(b_list) / f(63))
    sc = [int(np.round(s / d)) & 63 if d else 0 for s in s_list]
    m = [int(np.round(b / dmin)) & 63 if dmin else 0 for b in b_list]
    codes = [int(np.round(f(f(x[i] + b_list[i // 32]) / s_list[i // 32]))) & 15 if s_list[i // 32] else 0
             for i in range(256)]
    return spec_pack_block(sc, m, float(d), float(dmin), codes, 256)


# ----------------------------------------------------------------------------- layout and quantizers

def test_original_quantizer_reproduced_byte_for_byte():
    rng = np.random.default_rng(1)
    rows = np.concatenate([rng.normal(0, 0.05, (3, 512)), rng.uniform(0.1, 0.2, (1, 512)),   # an all-positive row
                           np.zeros((1, 512))]).astype(np.float32)                          # and an all-zero one
    rows[0, :32] = 0.0   # an all-zero group inside a block
    frame = export.q4k_frame(torch.from_numpy(rows), "minmax")
    expected = b"".join(spec_minmax_block(row[256 * j:256 * j + 256]) for row in rows for j in range(2))
    assert frame[44:] == expected
    assert struct.unpack("<QII6II", frame[:44]) == (44 + 160 * 10, 0x42, 2, 5, 512, 0, 0, 0, 0, 10)


def test_file_built_from_format_md_reads_identically_in_python_and_c(infer, tmp_path, tok):
    """n_hidden 320 is not a multiple of 256, so each row of w1, w3 (and w2's input) ends in a block of 64."""
    dims = dict(block_size=24, vocab_size=tok.vocab_size, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, n_hidden=320)
    path = str(tmp_path / "spec.bin")
    state = spec_file(path, tok, dims, np.random.default_rng(0))
    model, _ = export.load_bin(path)
    assert model.config.n_hidden == 320 and model.output.weight is model.tok_embeddings.weight
    for name, weights in model.state_dict().items():
        if name in state:
            assert np.array_equal(weights.numpy(), state[name]), name
    order = ["tok_embeddings.weight"] + [f"layers.{i}.{k}.weight" for k in export.LINEAR_KINDS for i in range(2)]
    expected = np.concatenate([state[name].ravel() for name in order])
    assert np.array_equal(c_weights(infer, path, tmp_path), expected)
    prompt = [2] + tok.encode("hello 世界")
    ids, logits = c_greedy(infer, path, "hello 世界", 8, tmp_path)
    assert ids == torch_greedy(model, prompt, 8)
    ref = torch_step_logits(model, prompt, ids, len(ids))
    assert np.abs(logits.reshape(len(ids), -1) - ref).max() / np.abs(ref).max() < Q4K_LOGITS_TOL


def test_partial_blocks_and_search_quantizer(tmp_path):
    rng = np.random.default_rng(2)
    weights = torch.from_numpy(rng.normal(0, 0.05, (6, 1408)).astype(np.float32))   # Nano-56M's n_hidden
    errors = {}
    for quantizer in export.Q4K_QUANTIZERS:
        blocks = export.quantize_q4k(weights, quantizer)
        assert len(blocks) == 6 * 6 and list(blocks["n"][:6]) == [256] * 5 + [128]
        assert not blocks["codes"][5::6, 64:].any()   # codes past n are 0
        errors[quantizer] = float(((export.dequantize_q4k(blocks, 1408) - weights.numpy()) ** 2).mean())
    assert errors["search"] < 0.9 * errors["minmax"], errors


# ----------------------------------------------------------------------------- writer, CLI, C engine

def test_cli_from_checkpoint_and_from_float32_bin(tmp_path, tok):
    model = tiny_model(tok)
    ckpt = str(tmp_path / "ckpt.pt")
    write_checkpoint(ckpt, model, tok)
    assert run_export("f32.bin", "--checkpoint", ckpt, cwd=tmp_path).returncode == 0
    for source, out in ((ckpt, "a.bin"), ("f32.bin", "b.bin")):
        r = run_export(out, "--q4k", source, cwd=tmp_path)
        assert r.returncode == 0 and "Q4K" in r.stdout, r.stderr
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    r = run_export("c.bin", "--q4k", ckpt, "--q4k-quantizer", "minmax", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    words = struct.unpack("<64I", (tmp_path / "c.bin").read_bytes()[:256])
    assert words[13:17] == (1, 12, 0x42, 0)

    assert run_export("q80.bin", "--quant", ckpt, cwd=tmp_path).returncode == 0
    r = run_export("x.bin", "--q4k", "q80.bin", cwd=tmp_path)
    assert r.returncode != 0 and "must be float32" in r.stderr
    untied = tiny_model(tok)
    untied.output.weight = torch.nn.Parameter(untied.tok_embeddings.weight.detach().clone() * 2)
    export.write_model(str(tmp_path / "untied.bin"), untied, tok)
    with pytest.raises(ValueError, match="untied"):
        export.write_model_q4k(str(tmp_path / "x.bin"), untied, tok)
    r = run_export("x.bin", "--q4k", "untied.bin", cwd=tmp_path)
    assert r.returncode != 0 and "untied" in r.stderr and "Traceback" not in r.stderr
    assert not os.path.exists(tmp_path / "x.bin")


def test_trained_model_c_matches_pytorch_and_threads_agree(infer, tmp_path, trained):
    model, tok, _, _ = trained
    path = str(tmp_path / "q4k.bin")
    export.write_model_q4k(path, model, tok)
    loaded, _ = export.load_bin(path)
    assert np.array_equal(c_weights(infer, path, tmp_path), file_order_weights(path))
    worst, agree = 0.0, 0
    for prompt in prompts_of(TRAIN_TEXT, 4):
        ids, logits = c_greedy(infer, path, prompt, 10, tmp_path)
        prompt_ids = [2] + tok.encode(prompt)
        agree += ids == torch_greedy(loaded, prompt_ids, 10)
        ref = torch_step_logits(loaded, prompt_ids, ids, len(ids))
        worst = max(worst, np.abs(logits.reshape(len(ids), -1) - ref).max() / np.abs(ref).max())
    print(f"Q4K max |dlogit| / max |logit| {worst:.4f}; greedy agreement {agree}/4")
    assert worst < Q4K_LOGITS_TOL and agree == 4
    one = run_c(infer, path, "-g", "the cat", "-t", "0", "-n", "12", "--print-ids", threads=1)
    two = run_c(infer, path, "-g", "the cat", "-t", "0", "-n", "12", "--print-ids", threads=2)
    assert one.returncode == 0 and one.stdout == two.stdout


def test_every_kernel_gives_the_same_answer(infer, tmp_path, tok):
    """The native build's kernel (AVX-512 VNNI here), an AVX2-only build and the portable (scalar) one."""
    model = tiny_model(tok, n_hidden=320, n_embd=64)
    path = str(tmp_path / "q4k.bin")
    export.write_model_q4k(path, model, tok)
    subprocess.run(["make", "-C", ENGINE_DIR, "portable"], check=True, capture_output=True)
    avx2 = str(tmp_path / "infer-avx2")
    subprocess.run(["cc", "-std=c99", "-O2", "-mavx2", "-mfma", "-fopenmp", "-o", avx2, "nano.c", "bpe.c", "main.c",
                    "-lm"], cwd=ENGINE_DIR, check=True, capture_output=True)
    native_ids, native_logits = c_greedy(infer, path, "hello world", 8, tmp_path)
    for binary in (avx2, os.path.join(ENGINE_DIR, "infer-portable")):
        ids, logits = c_greedy(binary, path, "hello world", 8, tmp_path)
        assert ids == native_ids, binary
        assert np.abs(logits - native_logits).max() < 1e-4 * np.abs(native_logits).max(), binary


@pytest.mark.skipif(shutil.which("emcc") is None or shutil.which("node") is None, reason="needs emcc and node")
def test_webassembly_build_matches_native(infer, tmp_path, tok):
    subprocess.run(["make", "-C", ENGINE_DIR, "wasm-node"], check=True, capture_output=True)
    model = tiny_model(tok, n_hidden=320, n_embd=64)
    path = str(tmp_path / "q4k.bin")
    export.write_model_q4k(path, model, tok)
    native_ids, native_logits = c_greedy(infer, path, "hello 世界", 6, tmp_path)
    wasm_logits = str(tmp_path / "wasm.f32")
    r = subprocess.run(["node", os.path.join(ENGINE_DIR, "infer-node.js"), path, "-g", "hello 世界", "-t", "0",
                        "-r", "1", "-n", "6", "--print-ids", "--logits", wasm_logits],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert [int(x) for x in r.stdout.split()] == native_ids
    assert np.abs(np.fromfile(wasm_logits, dtype=np.float32) - native_logits).max() < 1e-4


# ----------------------------------------------------------------------------- bad input

def frame_offsets(path):
    """Byte offsets of each frame of a Q4K file written by export.py, in file order."""
    cfg, tok, _, _, _ = export.read_bin(path)
    offset = 256 + len(export.tokenizer_bytes(tok)) + 4 * (2 * cfg.n_layer + 1) * cfg.n_embd
    data = open(path, "rb").read()
    offsets = []
    for _ in range(1 + len(export.LINEAR_KINDS)):
        offsets.append(offset)
        offset += struct.unpack_from("<Q", data, offset)[0]
    return offsets


def patched(path, out, offset, fmt, value):
    data = bytearray(open(path, "rb").read())
    struct.pack_into(fmt, data, offset, value)
    open(out, "wb").write(bytes(data))
    return str(out)


@pytest.fixture(scope="module")
def bad_q4k(tmp_path_factory, tok):
    """Bad Q4K files, each with words its error message must contain (C and Python alike)."""
    out = tmp_path_factory.mktemp("bad_q4k")
    good = str(out / "good.bin")
    export.write_model_q4k(good, tiny_model(tok, n_hidden=320, n_embd=64), tok)
    embedding, wq, *_, w3 = frame_offsets(good)
    first_w3_block = w3 + 44
    cases = {
        "frame_bytes": (patched(good, out / "frame_bytes.bin", wq, "<Q", 12345), "frame_bytes 12345"),
        "frame type": (patched(good, out / "frame_type.bin", wq + 8, "<I", 0x80), "expected 0x42"),
        "ndim": (patched(good, out / "ndim.bin", embedding + 12, "<I", 3), "ndim 3"),
        "shape": (patched(good, out / "shape.bin", wq + 20, "<I", 63), "shape"),
        "block count": (patched(good, out / "nblocks.bin", w3 + 40, "<I", 7), "7 blocks"),
        "block n > 256": (patched(good, out / "n257.bin", first_w3_block + 4, "<I", 257), "256"),
        "block n": (patched(good, out / "n100.bin", first_w3_block + 4, "<I", 100), "n"),
        "block type": (patched(good, out / "btype.bin", first_w3_block, "<I", 0x43), "block 0"),
        "truncated": (corrupt(good, out / "truncated.bin", truncate=os.path.getsize(good) - 1000), "truncated"),
        "extra bytes": (corrupt(good, out / "extra.bin", append=b"\0" * 160), "file length"),
    }
    f32 = str(out / "f32.bin")
    export.write_model(f32, tiny_model(tok), tok)
    cases["float32 relabelled"] = (patched(f32, out / "relabelled.bin", 4 * 15, "<I", 0x42), "expected 0x42 (Q4K)")
    return good, cases


def test_bad_q4k_files_are_refused_clearly(infer, bad_q4k, tmp_path):
    _, cases = bad_q4k
    subprocess.run(["make", "-C", ENGINE_DIR, "asan"], check=True, capture_output=True)
    for name, (path, words) in cases.items():
        with pytest.raises(ValueError, match=os.path.basename(path)) as info:
            export.load_bin(path)
        assert words in str(info.value), (name, str(info.value))
        for binary in (infer, os.path.join(ENGINE_DIR, "infer-asan")):
            r = run_c(binary, path, "-g", "hello", "-n", "2")
            assert r.returncode == 1 and os.path.basename(path) in r.stderr and words in r.stderr, (name, r.stderr)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "infer.py"), "-m", cases["block n > 256"][0], "--prompt", "hi"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "256" in r.stderr and "Traceback" not in r.stderr, r.stderr


def mutations(data, offsets, rng, count):
    """Copies of a file with words overwritten by edge values (in the 524 bytes from one of offsets, such as a
    frame header and its first blocks or a tokenizer section's start, and in the header), random bytes flipped,
    or the end cut off."""
    edges = [0, 1, 2, 3, 0x42, 255, 256, 257, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x7F800000, 0x7FC00000, len(data)]
    for k in range(count):
        out = bytearray(data)
        kind = k % 4
        if kind == 0:   # a word near one of offsets
            base = offsets[rng.integers(len(offsets))]
            at = base + 4 * int(rng.integers(0, 11 + 40 * 3))
            struct.pack_into("<I", out, min(at, len(out) - 4) // 4 * 4, edges[rng.integers(len(edges))])
        elif kind == 1:   # a header word
            struct.pack_into("<I", out, 4 * int(rng.integers(0, 20)), edges[rng.integers(len(edges))])
        elif kind == 2:
            for at in rng.integers(0, len(out), 8):
                out[at] ^= 1 << int(rng.integers(8))
        else:
            out = out[:int(rng.integers(0, len(out)))]
        yield bytes(out)


def test_mutated_q4k_files_under_address_sanitizer(bad_q4k, tmp_path):
    """The fuzz harness (without libFuzzer: fuzz_replay) over mutated Q4K files, under ASan and UBSan: every
    input loads and runs a step, or is refused, without a memory error."""
    good, _ = bad_q4k
    subprocess.run(["make", "-C", ENGINE_DIR, "fuzz-replay"], check=True, capture_output=True)
    data = open(good, "rb").read()
    paths = []
    for i, mutated in enumerate(mutations(data, frame_offsets(good), np.random.default_rng(0), 200)):
        paths.append(str(tmp_path / f"m{i}.bin"))
        open(paths[-1], "wb").write(mutated)
    r = subprocess.run([os.path.join(ENGINE_DIR, "fuzz_replay"), good, *paths], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0 and f"ran {len(paths) + 1} inputs" in r.stdout, r.stderr[-3000:]

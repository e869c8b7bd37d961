"""The C engine (infer_c/) on Qwen2 and Qwen3 files (model_type 2 and 3) against transformers' forward:
float32, Q80 and Q4K logits, batched prefill, greedy continuations, and refusals of malformed files.

The files are written here by a writer that follows FORMAT.md ("Qwen models") literally, in the original
converter's layout: every id a record (empty for unused ids) in a section found by its length T, RoPE tables of
width (n_embd / n_head) / 2 over that width, and the extension words left 0 (eps 1e-6 and theta 1e6 by default)."""

import ctypes
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_export import ROOT, corrupt, float_bits  # noqa: E402

import export  # noqa: E402

transformers = pytest.importorskip("transformers")

ENGINE_DIR = os.path.join(ROOT, "infer_c")
F32_LOGITS_TOL = 1e-4    # max |C - transformers| / max |logit|
QUANT_LOGITS_TOL = 0.03  # Q80 / Q4K (int8 activations) against transformers on the dequantized weights, the same
QWEN_TYPES = {"qwen2": 2, "qwen3": 3}

# Two small random models: Qwen3 with head_dim != n_embd / n_head and an untied head (the original's layout
# for the tables then differs from ours), Qwen2 with biases, a tied head and eps and theta of its own.
MODELS = {
    "qwen3": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=24, max_position_embeddings=48, rms_norm_eps=1e-6,
                  rope_theta=1e6, tie_word_embeddings=False),
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, max_position_embeddings=48, rms_norm_eps=1e-5, rope_theta=10000.0,
                  tie_word_embeddings=True),
}
VOCAB_SIZE = 320   # ids past the tokenizer's are empty records, as in the released models' files


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_qwen(kind, seed=0, **overrides):
    """A transformers Qwen2/Qwen3 model whose every tensor matters: weights of unit-scale outputs, norm weights
    around 1 (q_norm and k_norm too), nonzero biases."""
    torch.manual_seed(seed)
    config_class = transformers.Qwen3Config if kind == "qwen3" else transformers.Qwen2Config
    model_class = transformers.Qwen3ForCausalLM if kind == "qwen3" else transformers.Qwen2ForCausalLM
    model = model_class(config_class(vocab_size=VOCAB_SIZE, **dict(MODELS[kind], **overrides))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
            elif "embed_tokens" in name:
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, p.shape[1] ** -0.5)
    return model


def dims_of(model):
    c = model.config
    return dict(V=c.vocab_size, L=c.num_hidden_layers, E=c.hidden_size, H=c.num_attention_heads,
                KV=c.num_key_value_heads, F=c.intermediate_size, B=c.max_position_embeddings,
                HD=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)


# ----------------------------------------------------------------------------- the writer, from FORMAT.md

def tokenizer_section(token_bytes, scores, vocab_size):
    """u32 T, u32 max_token_bytes, then per id: f32 score, u32 n, n bytes; ids past the list are empty."""
    records = []
    for i in range(vocab_size):
        raw, score = (token_bytes[i], scores[i]) if i < len(token_bytes) else (b"", 0.0)
        records.append(struct.pack("<fI", score, len(raw)) + raw)
    body = b"".join(records)
    return struct.pack("<II", 8 + len(body), max(len(b) for b in token_bytes)) + body


def rope_tables(positions, width, dims_over, theta):
    """cos and sin [positions, width], table[p, i] = cos/sin(p theta^(-2i / dims_over))."""
    angles = np.arange(positions)[:, None] * theta ** (-2.0 * np.arange(width) / dims_over)
    return np.cos(angles).astype("<f4").tobytes() + np.sin(angles).astype("<f4").tobytes()


def q4k_frame(tensor):
    """A Q4K frame of a tensor and the float32 values it holds."""
    blocks = export.quantize_q4k(tensor)
    shape = list(tensor.shape) + [0] * (6 - tensor.dim())
    frame = struct.pack("<QII6II", 44 + blocks.nbytes, 0x42, tensor.dim(), *shape, len(blocks)) + blocks.tobytes()
    return frame, torch.from_numpy(export.dequantize_q4k(blocks, tensor.shape[-1]).reshape(tensor.shape).copy())


def write_qwen_bin(path, model, token_bytes, scores, quant=None, group_size=32, tables="original",
                   explicit_words=False):
    """model as a model_type 2/3 .bin: quant None (float32), "q80" or "q4k"; tables "original" ((E/H)/2 wide
    over that width, as the original's converter), "head_dim" (HD/2 wide, as FORMAT.md asks us to write);
    explicit_words writes eps and theta into words 18 and 19. Returns the model with the weights the file
    holds (dequantized), the reference for the engine."""
    d, c = dims_of(model), model.config
    kind = c.model_type
    state = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    tied = c.tie_word_embeddings
    quant_type = {None: 0, "q80": 0x80, "q4k": 0x42}[quant]
    theta = c.rope_parameters["rope_theta"]
    words = [0x42443453, 0x55524C4D, 2026, 1, QWEN_TYPES[kind], 36, d["B"], d["V"], d["L"], d["E"], d["H"], d["KV"],
             d["F"], int(tied), d["HD"], quant_type, group_size if quant == "q80" else 0, 0]
    if explicit_words:
        words += [float_bits(c.rms_norm_eps), float_bits(theta)]
    parts = [struct.pack(f"<{len(words)}I", *words).ljust(256, b"\0"), tokenizer_section(token_bytes, scores, d["V"])]

    def floats(*names):
        parts.append(b"".join(state[n].numpy().astype("<f4").tobytes() for n in names))

    def matrix(name):
        if quant == "q80":
            q, scales = export.quantize_q80(state[name], group_size)
            parts.append(q.tobytes() + scales.tobytes())
            state[name] = torch.from_numpy(q.astype(np.float32).reshape(-1, group_size) *
                                           scales[:, None]).reshape(state[name].shape)
        else:
            floats(name)

    def kind_over_layers(suffix):
        names = [f"model.layers.{i}.{suffix}" for i in range(d["L"])]
        if quant == "q4k":
            frame, values = q4k_frame(torch.stack([state[n] for n in names]))
            parts.append(frame)
            state.update({n: values[i] for i, n in enumerate(names)})
        else:
            for n in names:
                matrix(n)

    layers = lambda suffix: [f"model.layers.{i}.{suffix}" for i in range(d["L"])]  # noqa: E731
    floats(*layers("input_layernorm.weight"), *layers("post_attention_layernorm.weight"), "model.norm.weight")
    if quant == "q4k":
        frame, state["model.embed_tokens.weight"] = q4k_frame(state["model.embed_tokens.weight"])
        parts.append(frame)
    else:
        matrix("model.embed_tokens.weight")
    for suffix in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.down_proj", "mlp.up_proj"):
        kind_over_layers(suffix + ".weight")
    if kind == "qwen2":
        floats(*layers("self_attn.q_proj.bias"), *layers("self_attn.k_proj.bias"), *layers("self_attn.v_proj.bias"))
    else:
        floats(*layers("self_attn.q_norm.weight"), *layers("self_attn.k_norm.weight"))
    if not (quant == "q4k" and kind == "qwen3"):
        width = d["E"] // d["H"] // 2 if tables == "original" else d["HD"] // 2
        parts.append(rope_tables(d["B"], width, 2 * width, theta))
    if tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    elif quant != "q4k":
        matrix("lm_head.weight")
    with open(path, "wb") as f:
        f.write(b"".join(parts))
    reference = type(model)(c).eval()
    reference.load_state_dict(state)
    return reference


def placeholder_vocabulary(count=300):
    """Token bytes and scores of a byte-level vocabulary: the 256 bytes, then pairs with merge ranks."""
    token_bytes = [bytes([b]) for b in range(256)] + [b"ab" * (1 + i % 3) for i in range(count - 256)]
    scores = [0.0] * 256 + [-(1.0 + i) for i in range(count - 256)]
    return token_bytes, scores


# ----------------------------------------------------------------------------- the engine through ctypes

@pytest.fixture(scope="session")
def library():
    subprocess.run(["make", "-C", ENGINE_DIR, "libnano.so"], check=True, capture_output=True)
    from serve import NanoLibrary
    lib = NanoLibrary(os.path.join(ENGINE_DIR, "libnano.so"))
    p, i = ctypes.c_void_p, ctypes.c_int
    for name, result, arguments in (("nano_forward", i, [p, p, i, i]),
                                    ("nano_logits", ctypes.POINTER(ctypes.c_float), [p, i])):
        function = getattr(lib.lib, name)
        function.restype, function.argtypes = result, arguments
    return lib


class CModel:
    """A .bin file loaded by the C core, with states to run token ids through."""

    def __init__(self, library, path):
        self.library, self.data = library, np.fromfile(path, dtype=np.uint8)
        self.handle = library.load("model", self.data, path)
        self.vocab_size = struct.unpack_from("<I", self.data, 28)[0]

    def state(self):
        state = self.library.struct("state")
        assert self.library.lib.nano_state_init(state, self.handle) == 0
        return state

    def forward(self, state, ids):
        """Logits [len(ids), V] of ids run in one pass from the state's position."""
        tokens = np.array(ids, dtype=np.int32)
        assert self.library.lib.nano_forward(state, tokens.ctypes.data, len(ids), 1) == 0
        return np.stack([np.ctypeslib.as_array(self.library.lib.nano_logits(state, t), (self.vocab_size,)).copy()
                         for t in range(len(ids))])

    def one_by_one(self, ids):
        state = self.state()
        try:
            return np.concatenate([self.forward(state, [token]) for token in ids])
        finally:
            self.library.lib.nano_state_free(state)

    def prefill(self, ids):
        state = self.state()
        try:
            return self.forward(state, ids)
        finally:
            self.library.lib.nano_state_free(state)

    def batch(self, sequences):
        """The logits after the last token of each sequence, all in one nano_forward_batch pass."""
        states = [self.state() for _ in sequences]
        try:
            pointers = (ctypes.c_void_p * len(states))(*(ctypes.addressof(s) for s in states))
            ids = np.array([t for seq in sequences for t in seq], dtype=np.int32)
            counts = np.array([len(seq) for seq in sequences], dtype=np.int32)
            logits = np.zeros((len(sequences), self.vocab_size), dtype=np.float32)
            assert self.library.lib.nano_forward_batch(pointers, ids.ctypes.data, counts.ctypes.data, len(states),
                                                       logits.ctypes.data) == 0
            return logits
        finally:
            for s in states:
                self.library.lib.nano_state_free(s)


def reference_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def relative_error(logits, reference):
    return float(np.abs(logits - reference).max() / np.abs(reference).max())


def random_ids(seed, n, high=300):
    return np.random.default_rng(seed).integers(0, high, n).tolist()


# ----------------------------------------------------------------------------- parity

@pytest.mark.parametrize("kind", ["qwen3", "qwen2"])
def test_float32_logits_match_transformers(library, tmp_path, kind):
    model = random_qwen(kind)
    token_bytes, scores = placeholder_vocabulary()
    ids = random_ids(1, 40)
    worst = {}
    for tables in ("original", "head_dim"):
        path = str(tmp_path / f"{kind}_{tables}.bin")
        reference_model = write_qwen_bin(path, model, token_bytes, scores, tables=tables,
                                         explicit_words=kind == "qwen2")
        c = CModel(library, path)
        reference = reference_logits(reference_model, ids)
        worst[tables] = relative_error(c.prefill(ids), reference)
        assert relative_error(c.one_by_one(ids), reference) < F32_LOGITS_TOL
    print(f"{kind} float32: max |dlogit| / max |logit| {worst}")
    assert max(worst.values()) < F32_LOGITS_TOL


@pytest.mark.parametrize("kind,quant", [("qwen3", "q80"), ("qwen2", "q80"), ("qwen3", "q4k"), ("qwen2", "q4k")])
def test_quantized_logits_match_transformers_on_the_dequantized_weights(library, tmp_path, kind, quant):
    model = random_qwen(kind, tie_word_embeddings=True) if quant == "q4k" else random_qwen(kind)
    token_bytes, scores = placeholder_vocabulary()
    path = str(tmp_path / f"{kind}_{quant}.bin")
    reference_model = write_qwen_bin(path, model, token_bytes, scores, quant=quant)
    ids = random_ids(2, 40)
    error = relative_error(CModel(library, path).prefill(ids), reference_logits(reference_model, ids))
    print(f"{kind} {quant}: max |dlogit| / max |logit| {error:.4f}")
    assert error < QUANT_LOGITS_TOL


@pytest.mark.parametrize("kind", ["qwen3", "qwen2"])
def test_batched_prefill_and_batch_pass_equal_token_by_token(library, tmp_path, kind):
    model = random_qwen(kind)
    token_bytes, scores = placeholder_vocabulary()
    path = str(tmp_path / f"{kind}.bin")
    write_qwen_bin(path, model, token_bytes, scores)
    c = CModel(library, path)
    sequences = [random_ids(3, 17), random_ids(4, 5), random_ids(5, 1)]
    for seq in sequences:
        assert np.abs(c.prefill(seq) - c.one_by_one(seq)).max() < 1e-5 * np.abs(c.one_by_one(seq)).max()
    last = c.batch(sequences)
    for row, seq in zip(last, sequences):
        expected = c.one_by_one(seq)[-1]
        assert np.abs(row - expected).max() < 1e-5 * np.abs(expected).max()

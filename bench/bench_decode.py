"""
Decode speed of PyTorch eager with and without the KV cache, for a Nano-56M-sized model (random
weights) on 1 and 2 threads.

    python bench/bench_decode.py [--repeats 3] [--lengths 64 512]

A run generates greedily from a 1-token prompt until the sequence holds L tokens; tokens/s is the
L - 1 new tokens over the time taken. With the cache each token is one cached step (model.generate).
Without it each token re-runs the whole sequence so far; at L = 512 that is minutes per run, so the
no-cache time is the sum of forward passes timed at every 64th length (each standing for the 64
lengths around it) — an estimate, marked as such. Runs alternate between the modes and the figure is
the median of the repeats, because this machine is shared and noisy.
Writes bench/results/bench_decode.json with the machine's description.
"""

import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import ModelConfig, Transformer  # noqa: E402
from bench.common import cpu_model, write_results  # noqa: E402

CONFIG = "config/nano-56m.json"
NO_CACHE_SAMPLING = 64  # lengths per timed forward pass in the no-cache estimate at long lengths


def greedy(logits, history):
    return int(torch.argmax(logits))


@torch.no_grad()
def decode_seconds_cached(model, length):
    start = time.perf_counter()
    for _ in model.generate([1], length - 1, sample=greedy, stop_ids=()):
        pass
    return time.perf_counter() - start


@torch.no_grad()
def decode_seconds_uncached(model, length):
    """Σ over sequence lengths 1..length-1 of one full forward pass and the argmax; sampled at
    every NO_CACHE_SAMPLING-th length beyond 64 tokens."""
    step = 1 if length <= 64 else NO_CACHE_SAMPLING
    tokens = torch.randint(model.config.vocab_size, (1, length))
    total = 0.0
    for first in range(1, length, step):
        lengths = range(first, min(first + step, length))
        start = time.perf_counter()
        logits, _ = model(tokens[:, :lengths[len(lengths) // 2]])  # the middle one stands for all
        greedy(logits[0, -1], None)
        total += (time.perf_counter() - start) * len(lengths)
    return total




def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = ModelConfig.from_json(os.path.join(root, CONFIG))
    torch.manual_seed(0)
    model = Transformer(config).eval()
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        decode_seconds_cached(model, 8)  # warm up
        for length in args.lengths:
            timings = {"cache": [], "no cache": []}
            for _ in range(args.repeats):  # alternate, so that load spikes hit both modes
                timings["cache"].append(decode_seconds_cached(model, length))
                timings["no cache"].append(decode_seconds_uncached(model, length))
            for mode, seconds in timings.items():
                rows.append({"threads": threads, "length": length, "mode": mode,
                             "tokens_per_s": (length - 1) / statistics.median(seconds),
                             "estimated": mode == "no cache" and length > 64,
                             "runs_s": [round(s, 3) for s in seconds]})
                print(f"threads {threads} length {length} {mode}: {rows[-1]['tokens_per_s']:.1f} tokens/s",
                      file=sys.stderr, flush=True)

    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
               "python": platform.python_version(), "load_average": os.getloadavg(),
               "date": time.strftime("%Y-%m-%d %H:%M"), "model": CONFIG, "parameters": model.num_params()}
    print(f"Decode tokens/s, PyTorch eager, {CONFIG} ({model.num_params():,} parameters, random weights), "
          f"{machine['cpu']}, torch {machine['torch']}, load average {machine['load_average'][0]:.1f}\n")
    print("| threads | length | with KV cache | without | speed-up |")
    print("|---|---|---|---|---|")
    for threads in args.threads:
        for length in args.lengths:
            cached, uncached = (next(r for r in rows if (r["threads"], r["length"], r["mode"]) == (threads, length, m))
                                for m in ("cache", "no cache"))
            mark = "*" if uncached["estimated"] else ""
            print(f"| {threads} | {length} | {cached['tokens_per_s']:.1f} | {uncached['tokens_per_s']:.1f}{mark} | "
                  f"{cached['tokens_per_s'] / uncached['tokens_per_s']:.1f}x |")
    print("\n* estimated from forward passes timed at every 64th length")
    write_results("bench_decode", {"machine": machine, "repeats": args.repeats, "results": rows})


if __name__ == "__main__":
    main()

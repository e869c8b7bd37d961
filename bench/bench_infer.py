"""
Decode speed of the C engine (float32, Q80, Q4K) and PyTorch (eager, KV cache) on a Nano-56M-sized model with
random weights, greedy, next to the memory-bandwidth bound (weight bytes per token / read bandwidth
measured in the same run by a STREAM-like read loop in C). Engines alternate; figures are medians.

    python bench/bench_infer.py [--rounds 3] [--tokens 128] [--threads 1 2]

Each thread count runs with OpenMP's default wait policy, as a user runs the engine; each count above one
runs again, C only, with OMP_WAIT_POLICY=passive (threads sleep when they wait), which the engine's speed
should not depend on. Prints a markdown table and writes bench/results/bench_infer.json with the machine's
description.
"""

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

# The default rows mean OpenMP's default, for the engines started here and for this process's PyTorch.
os.environ.pop("OMP_WAIT_POLICY", None)

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import export  # noqa: E402
from bench.common import cpu_model, median_ratio, write_results  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from tokenizer import EOS_ID, PAD_ID, SPECIAL_TOKENS, Tokenizer  # noqa: E402

NANO_56M = dict(block_size=512, vocab_size=16384, n_layer=16, n_embd=512, n_head=16, n_kv_head=8, n_hidden=1408)
PROMPT_TOKENS = 16
C_KINDS = ("f32", "q80", "q4k")   # the weight formats the C engine runs here

# Reads an array of argv[1] bytes (a model's weights per token) again and again with every thread, as an
# engine reads its weights token after token, so that a model that fits in the last-level cache is bounded by
# that cache's bandwidth, not by memory's; prints the best read bandwidth in GB/s, of a plain loop and of one
# that prefetches 8 KB ahead as the engine's kernels do (the one is faster from memory, the other from a
# cache, on one machine here). Four independent sums, so that the adds' latency does not hold the loop back.
# The array is in huge pages where the system grants them, as the engine's weights are (nano_file_read).
BANDWIDTH_SOURCE = r"""
#define _DEFAULT_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#define LINE 16      /* floats in a cache line */
#define AHEAD 2048   /* floats: 8 KB */

static float read_all(const float *a, size_t n, int prefetch) {
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
    #pragma omp parallel for schedule(static) reduction(+:s0, s1, s2, s3)
    for (size_t i = 0; i < n; i += 4 * LINE) {
        if (prefetch)
            for (int l = 0; l < 4; l++) __builtin_prefetch(a + i + AHEAD + l * LINE);
        for (int j = 0; j < LINE; j++) {
            s0 += a[i + j];
            s1 += a[i + LINE + j];
            s2 += a[i + 2 * LINE + j];
            s3 += a[i + 3 * LINE + j];
        }
    }
    return s0 + s1 + s2 + s3;
}

int main(int argc, char **argv) {
    size_t n = (argc > 1 ? strtoull(argv[1], NULL, 10) : (size_t)1 << 30) / sizeof(float) / (4 * LINE) * (4 * LINE);
    size_t passes = ((size_t)1 << 30) / (n * sizeof(float)) + 1;   /* about 1 GiB read per timing */
    float *a;
    if (posix_memalign((void **)&a, (size_t)2 << 20, (n + AHEAD) * sizeof(float))) return 1;
#ifdef MADV_HUGEPAGE
    madvise(a, (n + AHEAD) * sizeof(float), MADV_HUGEPAGE);
#endif
    #pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n + AHEAD; i++) a[i] = (float)(i & 7);
    double best = 1e9; float total = 0.0f;
    for (int rep = 0; rep < 12; rep++) {   /* the two loops in turn */
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        for (size_t pass = 0; pass < passes; pass++) total += read_all(a, n, rep % 2);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        double s = (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
        if (s < best) best = s;
    }
    printf("%.3f %g\n", passes * n * sizeof(float) / best / 1e9, total);
    free(a);
    return 0;
}
"""


def build_tools(workdir):
    subprocess.run(["make", "-C", os.path.join(ROOT, "infer_c"), "infer"], check=True, capture_output=True)
    source = os.path.join(workdir, "bandwidth.c")
    binary = os.path.join(workdir, "bandwidth")
    with open(source, "w") as f:
        f.write(BANDWIDTH_SOURCE)
    subprocess.run(["gcc", "-O3", "-march=native", "-ffast-math", "-fopenmp", "-o", binary, source], check=True)
    return os.path.join(ROOT, "infer_c", "infer"), binary


def make_model(workdir, config=NANO_56M, kinds=C_KINDS):
    """Random Nano-56M-sized model (or of config) written as each kind of file; <|padding|> and <|eos|> get
    zero embeddings (logit 0) so greedy decoding of random weights never stops early."""
    torch.manual_seed(0)
    chars = [chr(0x4E00 + i) for i in range(config["vocab_size"] - len(SPECIAL_TOKENS))]
    tokenizer = Tokenizer(SPECIAL_TOKENS + chars)
    model = Transformer(ModelConfig(**config)).eval()
    with torch.no_grad():
        model.tok_embeddings.weight[[PAD_ID, EOS_ID]] = 0.0  # the stop tokens
    paths = {kind: os.path.join(workdir, f"nano56m_{kind}.bin") for kind in kinds}
    writers = {"f32": lambda path: export.write_model(path, model, tokenizer, progress=False),
               "q80": lambda path: export.write_model(path, model, tokenizer, quant=True, progress=False),
               "q4k": lambda path: export.write_model_q4k(path, model, tokenizer, progress=False)}
    for kind, path in paths.items():
        writers[kind](path)
    return model, tokenizer, paths


def weight_bytes_per_token(path, config, tokenizer):
    """Bytes a decode step reads: the whole file less the header, the tokenizer and the RoPE tables."""
    rope = 2 * 4 * config.block_size * (config.head_dim // 2)
    tokenizer_bytes = 8 + sum(8 + 4 * len(t) for t in tokenizer.itos)
    return os.path.getsize(path) - 256 - tokenizer_bytes - rope


def prompt_text(tokenizer):
    return "".join(tokenizer.itos[100 + 37 * i] for i in range(PROMPT_TOKENS))


def openmp_env(threads, policy):
    """The environment of a C run: the thread count, and the wait policy unless it is the default."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    return env


def c_decode(infer, path, prompt, env, tokens, until_the_end=True):
    """The C CLI's decode tokens/s; until_the_end: refuse a run that stopped before its tokens (a real model
    may end its text sooner, random weights never do)."""
    r = subprocess.run([infer, path, "-g", prompt, "-t", "0", "-n", str(tokens), "--profile"], capture_output=True,
                       text=True, env=env, check=True)
    match = re.search(r"generated (\d+) .* decode ([\d.]+) tok/s", r.stderr)
    generated, rate = int(match.group(1)), float(match.group(2))
    if until_the_end and generated < tokens:
        raise RuntimeError(f"{path}: generation stopped after {generated} tokens")
    return rate


def torch_decode(model, prompt_ids, threads, tokens):
    torch.set_num_threads(threads)
    stream = model.generate(prompt_ids, tokens)
    next(stream)   # prefill and first token
    start, count = time.perf_counter(), 0
    for _ in stream:
        count += 1
    return count / (time.perf_counter() - start)


def bandwidth(binary, env, size):
    """GB/s reading `size` bytes over and over (the probe above)."""
    return float(subprocess.run([binary, str(size)], capture_output=True, text=True, env=env, check=True).stdout.split()[0])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per decode run")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    # (threads, OpenMP wait policy); PyTorch runs in this process, so only under the default
    variants = [(t, "default") for t in args.threads] + [(t, "passive") for t in args.threads if t > 1]
    with tempfile.TemporaryDirectory() as workdir:
        infer, bandwidth_binary = build_tools(workdir)
        model, tokenizer, paths = make_model(workdir)
        prompt = prompt_text(tokenizer)
        prompt_ids = tokenizer.encode(prompt)
        weight_bytes = {kind: weight_bytes_per_token(path, model.config, tokenizer) for kind, path in paths.items()}
        names = ("torch",) + tuple(f"{what}_{kind}" for kind in C_KINDS for what in ("bandwidth", "c"))
        samples = {v: {k: [] for k in names} for v in variants}
        for round_index in range(args.rounds):
            for threads, policy in variants:   # alternate engines and variants inside each round: the machine is shared
                s, env = samples[threads, policy], openmp_env(threads, policy)
                for kind in C_KINDS:
                    s[f"bandwidth_{kind}"].append(bandwidth(bandwidth_binary, env, weight_bytes[kind]))
                    s[f"c_{kind}"].append(c_decode(infer, paths[kind], prompt, env, args.tokens))
                if policy == "default":
                    s["torch"].append(torch_decode(model, prompt_ids, threads, args.tokens))
                print(f"round {round_index + 1}, {threads} thread(s), {policy} wait policy: " +
                      ", ".join(f"{k} {v[-1]:.1f}" for k, v in s.items() if v), file=sys.stderr)

    rows = []
    for threads, policy in variants:
        s = samples[threads, policy]
        med = {k: statistics.median(v) if v else None for k, v in s.items()}
        row = {"threads": threads, "omp_wait_policy": policy, "torch_f32_tok_s": med["torch"], "samples": s}
        for kind in C_KINDS:
            bound = med[f"bandwidth_{kind}"] * 1e9 / weight_bytes[kind]
            row.update({f"bandwidth_{kind}_gb_s": med[f"bandwidth_{kind}"], f"c_{kind}_tok_s": med[f"c_{kind}"],
                        f"bound_{kind}_tok_s": bound,
                        f"c_{kind}_of_bound": median_ratio(s[f"c_{kind}"], [b * 1e9 / weight_bytes[kind]
                                                                             for b in s[f"bandwidth_{kind}"]])})
        row["q4k_over_q80"] = median_ratio(s["c_q4k"], s["c_q80"])
        rows.append(row)

    print(f"\n{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"load average after the run {os.getloadavg()[0]:.1f}")
    print(f"\nDecode tokens/s, Nano-56M-sized model (random weights, greedy, {args.tokens} new tokens after a "
          f"{PROMPT_TOKENS}-token prompt), medians of {args.rounds} rounds (shares and Q4K / Q80: of each round's ratio)\n")
    names = {"f32": "f32", "q80": "Q80", "q4k": "Q4K"}
    print("| threads | OMP_WAIT_POLICY | read GB/s (f32 / Q80 / Q4K bytes) | PyTorch f32 | " +
          " | ".join(f"C {names[k]} | {names[k]} bound | C {names[k]} / bound" for k in C_KINDS) + " | Q4K / Q80 |")
    print("|---|---|---|---|" + "---|---|---|" * len(C_KINDS) + "---|")
    for r in rows:
        torch_rate = "–" if r["torch_f32_tok_s"] is None else f"{r['torch_f32_tok_s']:.1f}"
        reads = " / ".join(f"{r[f'bandwidth_{k}_gb_s']:.1f}" for k in C_KINDS)
        print(f"| {r['threads']} | {r['omp_wait_policy']} | {reads} | {torch_rate} | " +
              " | ".join(f"{r[f'c_{k}_tok_s']:.1f} | {r[f'bound_{k}_tok_s']:.1f} | {100 * r[f'c_{k}_of_bound']:.0f} %"
                         for k in C_KINDS) + f" | {r['q4k_over_q80']:.2f} |")
    print("\nWeight bytes read per token: " + ", ".join(f"{names[k]} {weight_bytes[k] / 1e6:.1f} MB" for k in C_KINDS))
    result = {
        "benchmark": "bench_infer", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__, "python": platform.python_version(),
                    "load_average_after": os.getloadavg()},
        "model": NANO_56M, "weight_bytes_per_token": weight_bytes, "tokens": args.tokens, "rounds": args.rounds,
        "results": rows,
    }
    write_results("bench_infer", result)


if __name__ == "__main__":
    main()

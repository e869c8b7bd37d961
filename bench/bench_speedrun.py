"""
The speedrun: how fast three recipes lower the validation loss on the built-in corpus, at a fixed
wall-clock budget per run and equal tokens per step, two seeds each:

- GPT-2 (nanoGPT's recipe): a model written here, learned positions, LayerNorm, GELU MLP, tied head,
  with the MLP widened until it has the parameter count of the Nano model; AdamW + cosine;
- Nano, AdamW + cosine: model.py with the recipe Nano trained with before Muon (AdamW 2e-3 to 2e-4);
- Nano, Muon + WSD: Muon on the blocks' matrices, AdamW on the rest, warmup-stable-decay, at
  config/pretrain.json's learning rates (the main job's recipe).

Model: config/nano-small.json (the main job's); data, batch and AdamW settings: config/pretrain.json.
Training time excludes the evaluations, which read the same batches of held-out news text
(dataset/news val.bin) every time: validation loss and bits per character. The step count of each
run is planned from its speed, as train.py's max_time does, so that every schedule ends annealed.

    python bench/bench_speedrun.py [--budget 600] [--seeds 1 2] [--threads 2] [--evals 20]

Prints a markdown table (final loss, time to reach the GPT-2 baseline's and the AdamW recipe's final
loss, as a fraction of the time they took), draws bench/results/bench_speedrun.png and writes
bench/results/bench_speedrun.json. Needs `python data.py` first.
"""

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402
from backends import PlainBackend  # noqa: E402
from bench.common import machine_info, write_results  # noqa: E402
from data import BatchSampler, Dataset, read_json  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

BASELINE, ADAMW, MUON = "GPT-2 (nanoGPT recipe)", "Nano, AdamW + cosine", "Nano, Muon + WSD"
TARGETS = {BASELINE: "baseline", ADAMW: "adamw"}  # the recipes whose final loss the others race to
# config/pretrain.json's recipe before Muon
ADAMW_COSINE = {"optimizer": "adamw", "lr_schedule": "cosine", "learning_rate": 2e-3, "min_lr": 2e-4}
RECIPES = {BASELINE: ADAMW_COSINE, ADAMW: ADAMW_COSINE,
           MUON: {"optimizer": "muon", "lr_schedule": "wsd"}}  # with pretrain.json's learning rates


# ----------------------------------------------------------------------------- the GPT-2 baseline

class GPT2Block(nn.Module):
    """Pre-LayerNorm block: multi-head causal attention, then a GELU MLP."""

    def __init__(self, n_embd, n_head, n_hidden):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.c_attn, self.attn_proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)
        self.c_fc, self.mlp_proj = nn.Linear(n_embd, n_hidden), nn.Linear(n_hidden, n_embd)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        attention = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(attention.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT2(nn.Module):
    """nanoGPT's model: token + learned position embeddings, the blocks, a final LayerNorm, the head tied to
    the token embedding; weights N(0, 0.02), the residual projections scaled by 1/sqrt(2 n_layer)."""

    def __init__(self, vocab_size, block_size, n_layer, n_embd, n_head, n_hidden):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(GPT2Block(n_embd, n_head, n_hidden) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layer))

    def forward(self, idx, targets, loss_mask=None):
        """(None, mean cross-entropy): the interface train.py's backends call."""
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.T
        return None, F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def gpt2_like(config):
    """The GPT-2 model of config's vocabulary, context, depth, width and heads whose MLP width brings its
    parameter count closest to the Nano model's."""
    target = count_params(Transformer(config))

    def build(n_hidden):
        return GPT2(config.vocab_size, config.block_size, config.n_layer, config.n_embd, config.n_head, n_hidden)

    one, two = count_params(build(1)), count_params(build(2))
    per_hidden_unit = two - one  # in every layer: c_fc's row and bias, mlp_proj's column
    return build(max(1, 1 + round((target - one) / per_hidden_unit)))


# ----------------------------------------------------------------------------- evaluation

class HeldOut:
    """The same validation batches every time, and the characters of their targets: bits per character
    divide the summed loss by them (special tokens count none)."""

    def __init__(self, dataset, tokenizer, block_size, batch_size, batches, device):
        sampler = BatchSampler([dataset], "val", block_size, batch_size, seed=0)
        self.batches = [[t.to(device) for t in sampler.next_batch()[:2]] for _ in range(batches)]
        special = set(tokenizer.special_tokens.values())
        self.chars = torch.tensor([0 if i in special else len(s) for i, s in enumerate(tokenizer.itos)],
                                  device=device)

    @torch.no_grad()
    def measure(self, model, autocast):
        """(validation loss in nats per token, bits per character)."""
        model.eval()
        nats = tokens = chars = 0.0
        for x, y in self.batches:
            with autocast:
                loss = model(x, y)[1].float().item()
            nats += loss * y.numel()
            tokens += y.numel()
            chars += int(self.chars[y].sum())
        model.train()
        return nats / tokens, nats / math.log(2) / chars


# ----------------------------------------------------------------------------- one run

def run(recipe, seed, args, pretrain, model_config, datasets, held_out, device):
    """Train one recipe for the budget; the curve [(training seconds, step, val loss, bpc)], evaluated
    every budget / evals seconds of training and at the end."""
    config = train.TrainConfig.from_dict({**pretrain, **RECIPES[recipe], "random_seed": seed, "max_time": args.budget,
                                          "max_iters": 10 ** 9, "lr_decay_iters": 10 ** 9, "device": device})
    torch.manual_seed(seed)
    model = (gpt2_like(model_config) if recipe == BASELINE else Transformer(model_config)).to(device)
    backend = PlainBackend(model, config, device, train.autocast_dtype(config, device), world_size=1)
    sampler = BatchSampler(datasets, "train", model_config.block_size, config.batch_size, seed, config.dataset_weights)
    progress = train.Progress()
    curve = [(0.0, 0, *held_out.measure(model, backend.autocast))]
    while progress.step < train.last_step(progress, config):
        start = time.perf_counter()
        x, y, mask = (t.to(device) if t is not None else None for t in sampler.next_batch())
        backend.forward_backward(x, y, mask, last_micro_step=True)
        backend.step(train.lr_scale_at(progress.step, config, train.decay_end(progress, config)))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        progress.step += 1
        progress.train_seconds += time.perf_counter() - start
        train.plan_time_budget(progress, config)
        done = progress.step >= train.last_step(progress, config)
        if done or progress.train_seconds >= len(curve) * args.budget / args.evals:
            curve.append((progress.train_seconds, progress.step, *held_out.measure(model, backend.autocast)))
            print(f"  {recipe}, seed {seed}: step {progress.step}, {progress.train_seconds:.0f} s, "
                  f"val loss {curve[-1][2]:.4f}", flush=True)
    return {"recipe": recipe, "seed": seed, "params": count_params(model), "steps": progress.step,
            "tokens_per_step": config.batch_size * model_config.block_size, "curve": curve}


# ----------------------------------------------------------------------------- the comparison

def time_to_reach(curve, target):
    """The training seconds at which the validation loss first reaches target (linear between evaluations),
    None if it never does."""
    for (t0, _, loss0, _), (t1, _, loss1, _) in zip(curve, curve[1:]):
        if loss1 <= target:
            return t0 + (t1 - t0) * (loss0 - target) / (loss0 - loss1) if loss0 > target else t0
    return None


def mean_time_to_reach(runs, target):
    """The mean over seeds, None when a seed never reaches target."""
    times = [time_to_reach(r["curve"], target) for r in runs]
    return None if None in times else statistics.mean(times)


def summarise(results):
    """One row per recipe: seeds' final losses and bpc, mean time to reach the GPT-2 baseline's and the
    AdamW recipe's final loss (means over seeds), and those times over the time the reference trained."""
    by_recipe = {name: [r for r in results if r["recipe"] == name] for name in RECIPES}
    finals = {name: statistics.mean(r["curve"][-1][2] for r in runs) for name, runs in by_recipe.items()}
    reference_times = {ref: statistics.mean(r["curve"][-1][0] for r in by_recipe[ref]) for ref in TARGETS}
    rows = []
    for name, runs in by_recipe.items():
        row = {"recipe": name, "params": runs[0]["params"], "steps": [r["steps"] for r in runs],
               "final_val_loss": [r["curve"][-1][2] for r in runs], "final_bpc": [r["curve"][-1][3] for r in runs]}
        for ref, key in TARGETS.items():
            seconds = reference_times[ref] if name == ref else mean_time_to_reach(runs, finals[ref])
            row[f"seconds_to_{key}"] = seconds
            row[f"ratio_to_{key}"] = None if seconds is None else seconds / reference_times[ref]
        rows.append(row)
    return rows, finals


def print_table(rows, finals):
    def seconds(value, ratio):
        return "never" if value is None else f"{value:.0f} s ({ratio:.2f}×)"

    print(f"\n| recipe | parameters | steps | val loss | bits/char | to GPT-2's {finals[BASELINE]:.3f} "
          f"| to AdamW's {finals[ADAMW]:.3f} |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['recipe']} | {r['params'] / 1e6:.2f}M | {' / '.join(map(str, r['steps']))} "
              f"| {' / '.join(f'{v:.3f}' for v in r['final_val_loss'])} "
              f"| {' / '.join(f'{v:.3f}' for v in r['final_bpc'])} "
              + "".join(f"| {seconds(r[f'seconds_to_{key}'], r[f'ratio_to_{key}'])} " for key in TARGETS.values())
              + "|")


def plot(results, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = dict(zip(RECIPES, ("tab:gray", "tab:blue", "tab:red")))
    for r in results:
        minutes = [t / 60 for t, *_ in r["curve"]]
        style = dict(color=colours[r["recipe"]], linestyle="-" if r["seed"] == results[0]["seed"] else "--",
                     label=f"{r['recipe']}, seed {r['seed']}")
        axes[0].plot(minutes[1:], [c[2] for c in r["curve"]][1:], **style)
        axes[1].plot(minutes[1:], [c[3] for c in r["curve"]][1:], **style)
    for ax, label in zip(axes, ("validation loss (nats/token)", "bits per character")):
        ax.set_xlabel("training time (minutes)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--budget", type=float, default=600, help="training seconds per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--evals", type=int, default=20, help="evaluations per run, evenly spaced in time")
    parser.add_argument("--eval-batches", type=int, default=10)
    parser.add_argument("--model", default=os.path.join(ROOT, "config/nano-small.json"))
    parser.add_argument("--pretrain", default=os.path.join(ROOT, "config/pretrain.json"))
    parser.add_argument("--device", default="auto", help="auto: cuda when available, else cpu")
    args = parser.parse_args()
    if args.budget <= 0 or args.evals < 1:
        parser.error("--budget and --evals must be positive")
    torch.set_num_threads(args.threads)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    os.chdir(ROOT)  # pretrain.json names its datasets relative to the repository

    try:
        model_config = ModelConfig.from_json(args.model)
        pretrain = {k: v for k, v in read_json(args.pretrain).items()
                    if k in {f.name for f in dataclasses.fields(train.TrainConfig)}}
        datasets = [Dataset(path) for path in pretrain["dataset_path"]]
        news = Dataset("dataset/news")
        tokenizer = Tokenizer.load(news.tokenizer_path())
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"bench_speedrun.py: error: {e}")
    held_out = HeldOut(news, tokenizer, model_config.block_size, pretrain.get("batch_size", 16), args.eval_batches,
                       device)
    results = []
    for seed in args.seeds:  # the recipes take turns, so that a change in the machine's load hits them alike
        for recipe in RECIPES:
            results.append(run(recipe, seed, args, pretrain, model_config, datasets, held_out, device))
    rows, finals = summarise(results)
    description = (f"{args.budget:.0f} s per run, {os.path.basename(args.model)}, {results[0]['tokens_per_step']} "
                   f"tokens/step, {device}" + (f", {args.threads} threads" if device == "cpu" else ""))
    print(f"\n{description}")
    print_table(rows, finals)
    out_dir = os.path.join(ROOT, "bench", "results")
    os.makedirs(out_dir, exist_ok=True)
    plot(results, os.path.join(out_dir, "bench_speedrun.png"), description)
    write_results("bench_speedrun", {"machine": machine_info(device=device), "settings": vars(args),
                                     "rows": rows, "runs": results})


if __name__ == "__main__":
    main()

"""
Train a Nano model: pretraining, SFT (loss on the answers only) or LoRA (base frozen, adapters saved alone).

    python train.py -m config/nano-small.json -t config/pretrain.json
    python train.py -t config/sft.json                 # from_checkpoint in the config gives the base
    python train.py -c checkpoint/pretrain/latest.pt   # resume exactly where it stopped
    python train.py -m ... -t ... --set max_iters=20 --set learning_rate=3e-4
    python train.py -m ... -t ... --set optimizer=adamw --set lr_schedule=cosine   # the recipe before Muon
    torchrun --nproc_per_node 2 train.py -m ... -t ... # DDP: gloo on CPU, nccl on GPU
    deepspeed train.py -m ... -t ... --deepspeed config/ds_zero2.json  # DeepSpeed ZeRO (or with torchrun)

The mode follows from the training config: a dataset whose meta.json says "kind": "sft" is trained
with the loss on answer tokens only (its *_mask.bin), and `use_lora` trains LoRA adapters on a frozen
base and saves only them. `dataset_path` is a list whose entries are either a prepared dataset
directory ("dataset/news") or a [train_bin, val_bin] pair; batches draw from the datasets in
proportion to their size, or to `dataset_weights` (one positive number per entry) to mix them.
`optimizer` muon trains the blocks' matrices with torch.optim.Muon at muon_learning_rate and the rest
(embedding and head, norms) with AdamW at learning_rate; `lr_schedule` wsd warms up, holds the peak and
decays linearly over the last decay_fraction of the run. The schedule scales both peaks alike.
Checkpoints and the log go to `save_checkpoint_to` (checkpoint/<run>/): latest.pt, best.pt and
train_<run>.log (one JSON object per line; plot_loss.py draws it). From Python: train(train_config,
model_config) runs the same loop in the calling process.
"""

import argparse
import gc
import json
import math
import os
import socket
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, asdict, field, fields

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
from backends import DeepSpeedBackend, PlainBackend
from data import BatchSampler, Dataset, read_json
from model import ModelConfig, Transformer
from tokenizer import Tokenizer, BOS_ID, INSTRUCT_ID, RESPONSE_ID


@dataclass
class TrainConfig:
    from_checkpoint: str = ""           # base .pt for sft / lora ("" trains from scratch)
    save_checkpoint_to: str = "checkpoint/pretrain"
    dataset_path: list = field(default_factory=lambda: ["dataset/news"])
    dataset_weights: list = field(default_factory=list)  # share of batches per dataset; [] = by size
    tokenizer_path: str = ""            # "" takes the vocabulary named in the dataset's meta.json
    random_seed: int = 1337
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    grad_clip: float = 1.0              # 0 disables clipping
    dropout: float = 0.0                # replaces the model config's dropout
    optimizer: str = "adamw"            # adamw, or muon: Muon on the blocks' matrices, AdamW on the rest
    learning_rate: float = 1e-3         # AdamW's peak (with muon: the embedding/head's, the norms')
    muon_learning_rate: float = 0.02    # Muon's peak
    muon_momentum: float = 0.95
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    decay_lr: bool = True
    lr_schedule: str = "cosine"         # cosine, or wsd: warmup, stable, then linear decay to min_lr
    decay_fraction: float = 0.2         # wsd: the share of the run that decays
    warmup_iters: int = 100
    lr_decay_iters: int = 5000
    min_lr: float = 1e-4
    max_iters: int = 5000
    max_time: float = 0.0               # seconds of training, turned into steps after warmup; 0 = no limit
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 10
    save_interval: int = 500            # latest.pt every this many steps (and at the end)
    backend: str = "auto"               # DDP backend: auto = nccl on CUDA, gloo on CPU
    device: str = "auto"                # auto = cuda when available, else cpu
    sdp_kernel: str = "auto"            # auto, math, flash, efficient, cudnn
    dtype: str = "auto"                 # autocast dtype: auto, float32, bfloat16, float16
    use_amp: bool = True                # autocast with dtype; false trains in float32
    compile: bool = False
    use_lora: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list = field(default_factory=lambda: ["wq", "wk", "wv", "wo"])

    @classmethod
    def from_dict(cls, d, source="training config"):
        known = {f.name for f in fields(cls)}
        for key in d:
            if key not in known:
                raise ValueError(f"{source}: unknown key {key!r}; known keys are {', '.join(sorted(known))}")
        config, defaults = cls(**d), cls()
        for name in known:
            value, default = getattr(config, name), getattr(defaults, name)
            # JSON has one number type: accept 3 for a float key, refuse "3", 3.5 or true for an int key
            if isinstance(default, float):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            else:
                ok = type(value) is type(default)
            if not ok:
                raise ValueError(f"{source}: {name} must be {type(default).__name__}, got {value!r}")
        for name, choices in CHOICES.items():
            if getattr(config, name) not in choices:
                raise ValueError(f"{source}: {name} must be one of {', '.join(choices)}, got {getattr(config, name)!r}")
        if not 0 < config.decay_fraction <= 1:
            raise ValueError(f"{source}: decay_fraction must be in (0, 1], got {config.decay_fraction!r}")
        return config


CHOICES = {"optimizer": ("adamw", "muon"), "lr_schedule": ("cosine", "wsd")}


def parse_override(text):
    """'key=value' from --set, the value read as JSON when it parses (numbers, true, lists), else a string."""
    key, sep, value = text.partition("=")
    if not sep:
        raise ValueError(f"--set expects key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def with_overrides(train_dict, overrides):
    """The training config with --set values. A new dataset_path drops the file's dataset_weights unless
    they are set too: weights are one per dataset, so the old ones cannot describe the new list."""
    overrides = dict(overrides)
    if "dataset_path" in overrides and "dataset_weights" not in overrides:
        overrides["dataset_weights"] = []
    if overrides.get("dataset_weights", []) is None:  # --set dataset_weights=null: by size, as []
        overrides["dataset_weights"] = []
    return {**train_dict, **overrides}


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint, so a resumed run goes on from exactly here."""
    step: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0
    best_val_loss: float = float("inf")
    time_planned_iters: int = 0         # the steps that max_time allows, fixed once (0: not yet)
    speed_mark_step: int = 0            # where the speed that plan is made from was first read
    speed_mark_seconds: float = 0.0

    @classmethod
    def from_checkpoint(cls, saved):
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})


# ----------------------------------------------------------------------------- setup

def setup_distributed(config, use_deepspeed):
    """(rank, world_size, device); torchrun's (or the deepspeed launcher's) environment variables switch DDP on.
    DeepSpeed needs a process group even for one process started without a launcher."""
    device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if use_deepspeed and "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port())
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1 and not use_deepspeed:
        return 0, 1, device
    backend = config.backend if config.backend != "auto" else ("nccl" if device.startswith("cuda") else "gloo")
    dist.init_process_group(backend=backend)
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    return dist.get_rank(), world_size, device


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def autocast_dtype(config, device):
    """The autocast dtype, or None for plain float32. auto: bf16 (fp16 without bf16) on CUDA; bf16 on a CPU
    with native bf16 matmuls (1.6-2.4x fp32 here, loss curves within 0.03 of fp32's: bench/bench_train.py)."""
    if not config.use_amp or config.dtype == "float32":
        return None
    if config.dtype != "auto":
        return {"bfloat16": torch.bfloat16, "float16": torch.float16}[config.dtype]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else None


def cpu_has_native_bf16():
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


def sdp_kernel_context(name):
    if name == "auto":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backends = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
    if name not in backends:
        raise ValueError(f"sdp_kernel must be auto or one of {', '.join(backends)}, got {name!r}")
    return sdpa_kernel(backends[name])


def load_tokenizer(config, datasets, base, base_path):
    """The vocabulary of the datasets (or tokenizer_path); it must be the one the base model learned."""
    paths = {config.tokenizer_path} if config.tokenizer_path else {d.tokenizer_path() for d in datasets}
    tokenizers = [Tokenizer.load(p) for p in sorted(paths)]
    if any(t.to_dict() != tokenizers[0].to_dict() for t in tokenizers):
        raise ValueError(f"the datasets use different vocabularies: {', '.join(sorted(paths))}")
    tokenizer = tokenizers[0]
    if base is not None and base["tokenizer"] != tokenizer.to_dict():
        raise ValueError(f"the vocabulary {sorted(paths)[0]} is not the one checkpoint {base_path} was trained with")
    return tokenizer


def model_config_for(wanted, config, base, base_path, tokenizer):
    """The model config of the base checkpoint (which wanted, if given, must agree with) or wanted."""
    if base is not None:
        model_config = checkpoint.model_config_of(base, base_path)
        if wanted is not None:
            differing = [k for k, v in wanted.to_dict().items() if k != "dropout" and v != getattr(model_config, k)]
            if differing:
                raise ValueError(f"checkpoint {base_path} holds another model shape than the model config: "
                                 + ", ".join(f"{k} {getattr(model_config, k)} vs {getattr(wanted, k)}"
                                             for k in differing))
    elif wanted is not None:
        model_config = ModelConfig.from_dict(wanted.to_dict())
    else:
        raise ValueError("give a model config (-m config/<model>.json) or a from_checkpoint in the training config")
    if model_config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"model vocab_size {model_config.vocab_size} is smaller than the vocabulary's "
                         f"{tokenizer.vocab_size} entries: raise vocab_size in the model config")
    model_config.dropout = config.dropout
    return model_config


def measure_matmul_peak(device, dtype, size=1024, seconds=0.3):
    """FLOP/s of a square matmul on this device in this dtype: the ceiling that MFU is measured against."""
    generator = torch.Generator(device=device).manual_seed(0)  # leaves the training RNG alone
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    a @ b  # warm up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 2 * size ** 3 * count / (time.perf_counter() - start)


# ----------------------------------------------------------------------------- the schedule

def last_step(progress, config):
    """The step the run ends at: max_iters, or fewer when max_time allows fewer."""
    return min(config.max_iters, progress.time_planned_iters or config.max_iters)


def decay_end(progress, config):
    """The step the schedule reaches min_lr at: lr_decay_iters, or the time budget's last step when sooner,
    so that a time-bounded run ends annealed on a slow machine too."""
    return min(config.lr_decay_iters, progress.time_planned_iters or config.lr_decay_iters)


def plan_time_budget(progress, config):
    """Turn max_time into a step count once, from the speed between a twentieth and three twentieths of it
    (past the start-up and the first evaluation; later evaluations and saves included). From then on the
    schedule and the stop depend on the step alone: the wall clock of a killed run is lost, so a schedule
    that kept reading it could not be repeated by the resumed run."""
    if config.max_time <= 0 or progress.time_planned_iters:
        return
    if not progress.speed_mark_step:
        if progress.train_seconds >= config.max_time / 20:
            progress.speed_mark_step, progress.speed_mark_seconds = progress.step, progress.train_seconds
    elif progress.train_seconds >= config.max_time * 3 / 20 and progress.step > progress.speed_mark_step:
        seconds_per_step = ((progress.train_seconds - progress.speed_mark_seconds)
                            / (progress.step - progress.speed_mark_step))
        remaining = max(0.0, config.max_time - progress.train_seconds)
        progress.time_planned_iters = progress.step + int(remaining / seconds_per_step)


def lr_scale_at(step, config, decay_iters):
    """The schedule: the factor every optimizer's peak learning rate is multiplied by at this step. Linear
    warmup, then cosine decay (or, wsd, a stable stretch and a linear decay over the last decay_fraction)
    down to min_lr / learning_rate at step decay_iters."""
    if not config.decay_lr:
        return 1.0
    if step < config.warmup_iters:
        return (step + 1) / (config.warmup_iters + 1)
    floor = config.min_lr / config.learning_rate
    if config.lr_schedule == "wsd":
        decay_start = max(config.warmup_iters, decay_iters - config.decay_fraction * decay_iters)
        progress = min(1.0, max(0.0, step - decay_start) / max(1.0, decay_iters - decay_start))
        return 1.0 - progress * (1.0 - floor)
    progress = min(1.0, (step - config.warmup_iters) / max(1, decay_iters - config.warmup_iters))
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - floor)


# ----------------------------------------------------------------------------- the run

@dataclass
class Run:
    """Everything the loop works with, made once by start_run."""
    config: TrainConfig
    model_config: ModelConfig
    model: Transformer          # the plain module: evaluation, checkpoints and samples use it
    backend: object             # PlainBackend or DeepSpeedBackend
    datasets: list
    sampler: BatchSampler
    tokenizer: Tokenizer
    progress: Progress
    rank: int
    world_size: int
    device: str
    log: "RunLog"
    params: int                 # counted before ZeRO-3 leaves each rank a shard of every parameter
    trainable_params: int
    flops_per_token: float      # matmul FLOPs of a token; SFT computes the head at the answers only

    @property
    def is_master(self):
        return self.rank == 0

    @property
    def tokens_per_step(self):
        c = self.config
        return c.batch_size * self.model_config.block_size * c.gradient_accumulation_steps * self.world_size


def start_run(config, model_config=None, resume_path=None, deepspeed_path=None):
    """Set up a run: processes, data, the model (from scratch, a base checkpoint or the resumed run's own),
    the backend, and everything a resumed run restores."""
    rank, world_size, device = setup_distributed(config, deepspeed_path is not None)
    torch.manual_seed(config.random_seed)  # the same initial weights on every rank
    datasets = [Dataset(entry) for entry in config.dataset_path]
    if len({d.is_sft for d in datasets}) > 1:
        raise ValueError("dataset_path mixes pretraining and SFT datasets")
    resume = checkpoint.load(resume_path) if resume_path else None
    # the full weights to start from: the resumed run's own, or (sft, lora) the base model's
    base_path = resume_path if resume and not config.use_lora else config.from_checkpoint
    base = resume if base_path == resume_path else checkpoint.load(base_path) if base_path else None
    if base is not None:
        checkpoint.require(base, base_path, "model", "tokenizer")
    tokenizer = load_tokenizer(config, datasets, base, base_path)
    model_config = model_config_for(model_config, config, base, base_path, tokenizer)

    model = Transformer(model_config)
    if base is not None:
        checkpoint.load_weights(model, base["model"], base_path)
    if config.use_lora and resume is not None:
        model.load_lora_state_dict(*checkpoint.lora_of(resume, resume_path))
    elif config.use_lora:
        model.attach_lora(config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_targets)
    model.to(device)
    params, trainable = model.num_params(), sum(p.numel() for p in model.parameters() if p.requires_grad)
    flops_per_token = model.flops_per_token(model_config.block_size, head=not datasets[0].is_sft)
    dtype = autocast_dtype(config, device)
    if deepspeed_path:
        backend = DeepSpeedBackend(model, config, device, dtype, world_size, deepspeed_path)
    else:
        backend = PlainBackend(model, config, device, dtype, world_size)
    sampler = BatchSampler(datasets, "train", model_config.block_size, config.batch_size, config.random_seed + rank,
                           config.dataset_weights)
    torch.manual_seed(config.random_seed + rank)  # dropout masks differ between ranks
    progress = Progress()
    if resume is not None:
        backend.load(resume, resume_path)
        progress = Progress.from_checkpoint(resume)
        sampler_state = checkpoint.restore_rng_states(resume["rng"], rank)
        if sampler_state is not None:
            sampler.generator.set_state(sampler_state)

    run_dir = config.save_checkpoint_to
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
    run_name = os.path.basename(os.path.normpath(run_dir))
    log = RunLog(os.path.join(run_dir, f"train_{run_name}.log"), resume=resume is not None, enabled=rank == 0)
    return Run(config, model_config, model, backend, datasets, sampler, tokenizer, progress, rank, world_size,
               device, log, params, trainable, flops_per_token)


def log_start(run):
    """The run's first log line (and console line): what is trained, where, how fast the hardware is."""
    params, trainable, dtype = run.params, run.trainable_params, autocast_dtype(run.config, run.device)
    first = run.datasets[0]
    mode = "lora" if run.config.use_lora else "sft" if first.is_sft else first.meta.get("kind", "pretrain")
    dtype_name = str(dtype or torch.float32).removeprefix("torch.")
    peak_flops = measure_matmul_peak(run.device, dtype or torch.float32) if run.is_master else 1.0
    run.log.write(kind="start", step=run.progress.step, mode=mode, world_size=run.world_size, device=run.device,
                  dtype=dtype_name, params=params, trainable_params=trainable, peak_flops=peak_flops)
    if run.is_master:
        print(f"{mode}: {params / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trained), "
              f"{run.world_size} process(es) on {run.device}, {dtype_name}, {run.tokens_per_step} tokens/step")
    return run.flops_per_token / peak_flops


# ----------------------------------------------------------------------------- evaluation and saving

@torch.no_grad()
def estimate_val_loss(run):
    """Mean loss over eval_iters batches of the val splits, the same batches at every evaluation."""
    config = run.config
    sampler = BatchSampler(run.datasets, "val", run.model_config.block_size, config.batch_size, config.random_seed,
                           config.dataset_weights)
    run.model.eval()
    losses = []
    with sdp_kernel_context(config.sdp_kernel):
        for _ in range(config.eval_iters):
            x, y, mask = to_device(sampler.next_batch(), run.device)
            with run.backend.autocast:
                losses.append(run.model(x, y, mask)[1].item())
    run.model.train()
    return sum(losses) / len(losses)


def to_device(batch, device):
    return [t.to(device, non_blocking=True) if t is not None else None for t in batch]


def evaluate(run):
    """The validation loss, the same on every rank that evaluates; True when it is the best so far."""
    val_loss = estimate_val_loss(run)
    if run.backend.collective_checkpoints:  # rank 0's value: all ranks must agree on saving best.pt
        val_loss = from_rank0(val_loss, run.world_size, run.device)
    improved = val_loss < run.progress.best_val_loss
    run.progress.best_val_loss = min(run.progress.best_val_loss, val_loss)
    run.log.write(kind="val", step=run.progress.step, epoch=epoch(run), val_loss=val_loss)
    if run.is_master:
        tqdm.write(f"step {run.progress.step}: val loss {val_loss:.4f}" + (" (best)" if improved else ""))
    return improved


def save_checkpoints(run, sampler_states, best, latest):
    """best.pt and/or latest.pt, each written atomically, with everything a resume needs."""
    entries = run.backend.checkpoint_entries(run.model, run.config.save_checkpoint_to, run.progress.step, latest)
    if not run.is_master:
        return
    payload = {"model_config": run.model_config.to_dict(), "train_config": asdict(run.config),
               "tokenizer": run.tokenizer.to_dict(), "rng": checkpoint.rng_states(sampler_states),
               **asdict(run.progress), **entries}
    for name, wanted in (("best.pt", best), ("latest.pt", latest)):
        if wanted:
            checkpoint.save(payload, os.path.join(run.config.save_checkpoint_to, name), run.progress.step)
    if latest:
        run.backend.saved_latest(run.config.save_checkpoint_to, entries)


def gather_sampler_states(sampler, world_size):
    """Every rank's data position, so that a resumed DDP run continues each rank's stream."""
    state = sampler.generator.get_state()
    if world_size == 1:
        return [state]
    states = [torch.empty_like(state) for _ in range(world_size)]
    dist.all_gather(states, state)
    return states


def evaluate_and_save(run, final):
    """Evaluate every eval_interval steps and at the end; best.pt on a better validation loss, latest.pt
    every save_interval steps and at the end. Under DDP rank 0 alone does it, under DeepSpeed every rank."""
    step, config = run.progress.step, run.config
    evaluating = final or step % config.eval_interval == 0
    save_latest = final or (step > 0 and step % config.save_interval == 0)
    if not (evaluating or save_latest):
        return
    sampler_states = gather_sampler_states(run.sampler, run.world_size)  # collective: every rank calls it
    if not (run.is_master or run.backend.collective_checkpoints):
        return
    improved = evaluate(run) if evaluating else False
    if improved or save_latest:
        save_checkpoints(run, sampler_states, best=improved, latest=save_latest)


def epoch(run):
    return run.progress.tokens_seen / sum(len(d.splits["train"].ids) for d in run.datasets)


# ----------------------------------------------------------------------------- the loop

def train(config, model_config=None, resume_path=None, deepspeed_path=None):
    """Train as the config says (a TrainConfig or its dict; model_config a ModelConfig or dict, None to take
    the base checkpoint's); resume_path continues a run from its checkpoint. Returns the run directory."""
    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    if isinstance(model_config, dict):
        model_config = ModelConfig.from_dict(model_config)
    run = start_run(config, model_config, resume_path, deepspeed_path)
    flops_per_token_over_peak = log_start(run)
    progress = run.progress
    bar = tqdm(total=last_step(progress, config), initial=progress.step, disable=not run.is_master,
               dynamic_ncols=True)
    run_start = time.perf_counter() - progress.train_seconds  # max_time counts the time of earlier runs too
    interval_tokens, interval_seconds = 0, 0.0
    evaluated_step = progress.step if resume_path else None  # the resumed step was evaluated and saved already
    while True:
        done = progress.step >= last_step(progress, config)
        # once in a while: evaluate, save
        if progress.step != evaluated_step:
            evaluate_and_save(run, final=done)
        if done:
            break

        # one step
        step_start = time.perf_counter()
        lr_scale = lr_scale_at(progress.step, config, decay_end(progress, config))
        with sdp_kernel_context(config.sdp_kernel):
            for micro_step in range(config.gradient_accumulation_steps):
                x, y, mask = to_device(run.sampler.next_batch(), run.device)
                loss = run.backend.forward_backward(x, y, mask, micro_step == config.gradient_accumulation_steps - 1)
        run.backend.step(lr_scale)
        progress.step += 1
        progress.tokens_seen += run.tokens_per_step
        progress.train_seconds = from_rank0(time.perf_counter() - run_start, run.world_size, run.device)
        plan_time_budget(progress, config)
        bar.total = last_step(progress, config)
        bar.update(1)
        interval_tokens += run.tokens_per_step
        interval_seconds += time.perf_counter() - step_start
        if progress.step % config.log_interval == 0 and run.is_master:
            # the loss of the last micro-batch, as nanoGPT logs it: no extra synchronisation
            tokens_per_s = interval_tokens / interval_seconds
            mfu = tokens_per_s / run.world_size * flops_per_token_over_peak
            lr = config.learning_rate * lr_scale  # AdamW's; Muon's is muon_learning_rate * lr_scale
            run.log.write(kind="train", step=progress.step, epoch=epoch(run), loss=loss.item(), lr=lr,
                          tokens_per_s=tokens_per_s, mfu=mfu)
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}", mfu=f"{mfu:.0%}")
            interval_tokens, interval_seconds = 0, 0.0
    bar.close()
    finish(run)
    return config.save_checkpoint_to


def finish(run):
    """Log that the ranks agree, close the processes' connections, print a sample."""
    if run.world_size > 1:
        checksums = [None] * run.world_size
        with run.backend.whole_parameters(run.model):
            checksum = parameter_checksum(run.model)
        dist.all_gather_object(checksums, checksum)
        run.log.write(kind="ddp", step=run.progress.step, parameter_checksums=checksums)
    model = run.backend.finish(run.model, run.is_master)
    if dist.is_initialized():
        dist.barrier()  # no rank closes its connections while another still reads from them
        dist.destroy_process_group()
    if run.is_master:
        p = run.progress
        print(f"done: step {p.step}, best val loss {p.best_val_loss:.4f}, {p.train_seconds:.0f} s, "
              f"checkpoints in {run.config.save_checkpoint_to}")
        print_sample(model, run.tokenizer, run.datasets)


@torch.no_grad()
def print_sample(model, tokenizer, datasets):
    """Greedy continuation of the first validation record: a document's opening, or an SFT question;
    for a seq2seq dataset, the answer written in one pass for the first validation input."""
    split = datasets[0].splits["val"]
    ids = split.ids
    model.eval()
    if split.record_length:
        record = torch.from_numpy(ids[:split.record_length].astype(np.int64))[None]
        answer = model(record.to(model.tok_embeddings.weight.device))[0].argmax(-1)[0].tolist()
        print(f"sample: {tokenizer.decode(record[0].tolist())!r} -> {tokenizer.decode(answer)!r}")
        return
    if datasets[0].is_sft:
        start = int(np.flatnonzero(np.asarray(ids[:100_000]) == INSTRUCT_ID)[0])
        end = start + int(np.flatnonzero(np.asarray(ids[start:start + 10_000]) == RESPONSE_ID)[0]) + 1
        prompt = ids[start:end].tolist()
    else:
        start = int(np.flatnonzero(np.asarray(ids[:100_000]) == BOS_ID)[0])
        prompt = ids[start:start + 8].tolist()
    prompt = prompt[-model.config.block_size // 2:]
    generated = list(model.generate(prompt, max_new_tokens=60))
    print(f"sample: {tokenizer.decode(prompt)!r} -> {tokenizer.decode(generated)!r}")


def parameter_checksum(model):
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def from_rank0(value, world_size, device):
    """Rank 0's value of a float, on every rank: all ranks then use the same learning rate and stop together."""
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    if world_size > 1:
        dist.broadcast(tensor, src=0)
    return tensor.item()


class RunLog:
    """One JSON object per line in checkpoint/<run>/train_<run>.log; only rank 0 writes it."""

    def __init__(self, path, resume, enabled):
        self.file = open(path, "a" if resume else "w", encoding="utf-8") if enabled else None

    def write(self, **record):
        if self.file:
            self.file.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
            self.file.flush()


# ----------------------------------------------------------------------------- command line

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-m", "--model", help="model config JSON (from the base checkpoint when omitted)")
    parser.add_argument("-t", "--train", help="training config JSON")
    parser.add_argument("-c", "--checkpoint", help="resume from this checkpoint (its configs unless -t is given)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a training key")
    parser.add_argument("--out", help="where to save checkpoints (overrides save_checkpoint_to)")
    parser.add_argument("--deepspeed", metavar="DS_CONFIG", help="train with DeepSpeed ZeRO (config/ds_zero*.json)")
    # the deepspeed launcher passes --local_rank; LOCAL_RANK in the environment says the same
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.train and not args.checkpoint:
        parser.error("give a training config (-t) or a checkpoint to resume (-c)")

    # the configuration: the checkpoint's when resuming, then -t, then --set / --out
    train_dict = read_json(args.train) if args.train else checkpoint.load(args.checkpoint)["train_config"]
    train_dict = with_overrides(train_dict, map(parse_override, args.set))
    if args.out:
        train_dict["save_checkpoint_to"] = args.out
    config = TrainConfig.from_dict(train_dict, source=args.train or args.checkpoint)
    model_config = ModelConfig.from_json(args.model) if args.model else None
    train(config, model_config, resume_path=args.checkpoint, deepspeed_path=args.deepspeed)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"train.py: error: {e}")
    # DeepSpeed's engine sits in reference cycles: free it, and the gloo handles it holds, now rather than
    # during interpreter shutdown, where they abort the process now and then ("terminate called ...")
    gc.collect()

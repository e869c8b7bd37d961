"""
Train a Nano model: pretraining, SFT (loss on the answers only) or LoRA (base frozen, adapters saved alone).

    python train.py -m config/nano-small.json -t config/pretrain.json
    python train.py -t config/sft.json                 # from_checkpoint in the config gives the base
    python train.py -c checkpoint/pretrain/latest.pt   # resume exactly where it stopped
    python train.py -m ... -t ... --set max_iters=20 --set learning_rate=3e-4
    torchrun --nproc_per_node 2 train.py -m ... -t ... # DDP: gloo on CPU, nccl on GPU
    deepspeed train.py -m ... -t ... --deepspeed config/ds_zero2.json  # DeepSpeed ZeRO (or with torchrun)

The mode follows from the training config: a dataset whose meta.json says "kind": "sft" is trained
with the loss on answer tokens only (its *_mask.bin), and `use_lora` trains LoRA adapters on a frozen
base and saves only them. `dataset_path` is a list whose entries are either a prepared dataset
directory ("dataset/news") or a [train_bin, val_bin] pair; batches draw from the datasets in
proportion to their size, or to `dataset_weights` (one positive number per entry) to mix them.
Checkpoints and the log go to `save_checkpoint_to` (checkpoint/<run>/): latest.pt, best.pt and
train_<run>.log (one JSON object per line; plot_loss.py draws it).
"""

import argparse
import gc
import json
import math
import os
import random
import shutil
import socket
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, asdict, field, fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from export import read_checkpoint
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
    learning_rate: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    decay_lr: bool = True
    warmup_iters: int = 100
    lr_decay_iters: int = 5000
    min_lr: float = 1e-4
    max_iters: int = 5000
    max_time: float = 0.0               # seconds of training (over all resumes); 0 = no limit
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
        return config

    @classmethod
    def from_json(cls, path):
        return cls.from_dict(read_json(path), source=str(path))


def read_json(path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None


def parse_override(text):
    """'key=value' from --set, the value read as JSON when it parses (numbers, true, lists), else a string."""
    key, sep, value = text.partition("=")
    if not sep:
        raise ValueError(f"--set expects key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


# ----------------------------------------------------------------------------- data

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
        """(x, y, mask or None) at start: block_size next-token pairs, or (seq2seq) one record's inputs
        and its position-aligned targets."""
        if self.targets is not None:
            end = start + self.record_length
            return as_tensor(self.ids[start:end]), as_tensor(self.targets[start:end]), None
        tokens = as_tensor(self.ids[start:start + block_size + 1])
        # mask[j] says whether predicting ids[j] counts: align it with the targets
        mask = as_tensor(self.mask[start + 1:start + block_size + 1]) if self.mask is not None else None
        return tokens[:-1], tokens[1:], mask


def as_tensor(array):
    return torch.from_numpy(array.astype(np.int64))


class Dataset:
    def __init__(self, entry):
        if isinstance(entry, str):
            train_path, val_path = os.path.join(entry, "train.bin"), os.path.join(entry, "val.bin")
        elif isinstance(entry, list) and len(entry) == 2 and all(isinstance(p, str) for p in entry):
            train_path, val_path = entry
        else:
            raise ValueError(f"dataset_path entries are a dataset directory or a [train_bin, val_bin] pair, got {entry!r}")
        self.dir = os.path.dirname(train_path) or "."
        if not os.path.exists(os.path.join(self.dir, "meta.json")):
            raise FileNotFoundError(f"no prepared dataset in {self.dir} (no meta.json): run data.py first")
        self.meta = read_json(os.path.join(self.dir, "meta.json"))
        self.is_sft = self.meta.get("kind") == "sft"
        # seq2seq: fixed-length records of inputs with position-aligned targets (non-causal models)
        record_length = self.meta["record_length"] if self.meta.get("kind") == "seq2seq" else 0
        self.splits = {split: Split(path, self.meta["dtype"], self.is_sft, record_length)
                       for split, path in (("train", train_path), ("val", val_path))}

    def tokenizer_path(self):
        return os.path.join(self.dir, self.meta["tokenizer"])


class BatchSampler:
    """Random windows of block_size + 1 tokens (seq2seq: whole records), drawn from the datasets in
    proportion to their size or to the given weights. The generator is the whole data position: saving
    its state lets a resumed run draw the same batches."""

    def __init__(self, datasets, split, block_size, batch_size, seed, weights=()):
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
                             f"({len(datasets)}), got {weights!r}")
        self.weights = torch.tensor(weights or sizes, dtype=torch.float64)
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self):
        T = self.block_size
        which = torch.multinomial(self.weights, self.batch_size, replacement=True, generator=self.generator)
        xs, ys, masks = [], [], []
        for d in which.tolist():
            split, starts = self.splits[d], self.starts[d]
            i = int(starts[int(torch.randint(len(starts), (1,), generator=self.generator))])
            x, y, mask = split.window(i, T)
            xs.append(x)
            ys.append(y)
            if mask is not None:
                masks.append(mask)
        return torch.stack(xs), torch.stack(ys), torch.stack(masks) if masks else None


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


def model_config_for(model_path, config, base, base_path, tokenizer):
    """The model config of the base checkpoint (which -m, if given, must agree with) or of -m."""
    if base is not None:
        model_config = ModelConfig.from_dict(base["model_config"], source=base_path)
        if model_path:
            wanted = ModelConfig.from_json(model_path).to_dict()
            differing = [k for k, v in wanted.items() if k != "dropout" and v != getattr(model_config, k)]
            if differing:
                raise ValueError(f"checkpoint {base_path} holds another model shape than {model_path}: "
                                 + ", ".join(f"{k} {getattr(model_config, k)} vs {wanted[k]}" for k in differing))
    elif model_path:
        model_config = ModelConfig.from_json(model_path)
    else:
        raise ValueError("give a model config (-m config/<model>.json) or a from_checkpoint in the training config")
    if model_config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"model vocab_size {model_config.vocab_size} is smaller than the vocabulary's "
                         f"{tokenizer.vocab_size} entries: raise vocab_size in the model config")
    model_config.dropout = config.dropout
    return model_config


def load_weights(model, state, source):
    own = model.state_dict()
    for name, tensor in state.items():
        if name in own and own[name].shape != tensor.shape:
            raise ValueError(f"{source}: {name} has shape {tuple(tensor.shape)}, the model {tuple(own[name].shape)}")
    model.load_state_dict(state)


def parameter_groups(model, config):
    """Weight decay on the matrices only: norms and biases are not pulled towards zero."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": config.weight_decay},
            {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]


def make_optimizer(model, config, device):
    return torch.optim.AdamW(parameter_groups(model, config), lr=config.learning_rate,
                             betas=(config.beta1, config.beta2), fused=device.startswith("cuda"))


def learning_rate_at(step, train_seconds, config):
    """Linear warmup, then cosine decay to min_lr over lr_decay_iters steps, or over max_time when that
    budget runs out first: a time-bounded run ends annealed on a slow machine too."""
    if not config.decay_lr:
        return config.learning_rate
    if step < config.warmup_iters:
        return config.learning_rate * (step + 1) / (config.warmup_iters + 1)
    progress = (step - config.warmup_iters) / max(1, config.lr_decay_iters - config.warmup_iters)
    if config.max_time > 0:
        progress = max(progress, train_seconds / config.max_time)
    progress = min(progress, 1.0)
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.learning_rate - config.min_lr)


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


# ----------------------------------------------------------------------------- checkpoints

def rng_states(sampler_states):
    numpy_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"key": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": numpy_state[2],
                      "has_gauss": numpy_state[3], "cached_gaussian": numpy_state[4]},
            "python": [list(random.getstate()[1]), random.getstate()[2]],
            "sampler": sampler_states}  # one generator state per DDP rank


def restore_rng_states(rng, rank):
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    n = rng["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate((3, tuple(rng["python"][0]), rng["python"][1]))
    return rng["sampler"][rank] if rank < len(rng["sampler"]) else None


def save_atomically(payload, path, step):
    """Write a temp file beside `path`, fsync it, rename it over `path`, fsync the directory: a crash at
    any moment leaves either the old file or the new one, never a torn one."""
    directory = os.path.dirname(path) or "."
    temp_path = f"{path}.tmp{os.getpid()}"
    with open(temp_path, "wb") as f:
        torch.save(payload, f)
        f.flush()
        if os.environ.get("NANO_DEBUG_PAUSE_IN_SAVE_AT_STEP") == str(step):
            time.sleep(3600)  # lets the tests SIGKILL a save half-way
        os.fsync(f.fileno())
    os.replace(temp_path, path)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def checkpoint_payload(model, optimizer, model_config, config, tokenizer, progress, sampler_states, deepspeed=None):
    """Everything a resume needs. A LoRA run stores its adapters and the path of its base, not the base.
    A DeepSpeed run (deepspeed = (tag, full fp32 weights)) stores the weights gathered from ZeRO's shards and
    the tag of DeepSpeed's own checkpoint, which holds every rank's optimizer shard (None: weights only)."""
    payload = {"model_config": model_config.to_dict(), "train_config": asdict(config),
               "tokenizer": tokenizer.to_dict(), "rng": rng_states(sampler_states), **progress}
    if deepspeed is not None:
        payload["deepspeed_tag"], payload["model"] = deepspeed
        return payload
    payload["optimizer"] = optimizer.state_dict()
    if config.use_lora:
        payload.update(lora=model.lora_state_dict(), lora_config=model.lora_config,
                       base_checkpoint=config.from_checkpoint)
    else:
        payload["model"] = model.state_dict()
    return payload


# ----------------------------------------------------------------------------- DeepSpeed (--deepspeed only)

def deepspeed_config(path, config, world_size, dtype):
    """The DeepSpeed JSON completed from the training config, so that the two cannot disagree: batch sizes,
    accumulation, clipping (DeepSpeed clips at 1.0 when gradient_clipping is missing), precision and AdamW.
    A key left out or set to "auto" takes the training config's value; any other value must equal it."""
    ds = read_json(path)
    if "scheduler" in ds:
        raise ValueError(f"{path}: remove \"scheduler\": the learning-rate schedule comes from the training config")
    wanted = {
        "train_micro_batch_size_per_gpu": config.batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "train_batch_size": config.batch_size * config.gradient_accumulation_steps * world_size,
        "gradient_clipping": config.grad_clip,
        "bf16.enabled": dtype == torch.bfloat16,
        "fp16.enabled": dtype == torch.float16,
        "optimizer.type": "AdamW",
        "optimizer.params.lr": config.learning_rate,
        "optimizer.params.betas": [config.beta1, config.beta2],
        "optimizer.params.weight_decay": config.weight_decay,
    }
    for dotted, value in wanted.items():
        *parents, key = dotted.split(".")
        section = ds
        for parent in parents:
            section = section.setdefault(parent, {})
        given = section.get(key, "auto")
        if given == "auto":
            section[key] = value
        elif given != value:
            raise ValueError(f"{path}: {dotted} is {given!r} but the training config gives {value!r} "
                             f"(set it to \"auto\" or leave it out)")
    return ds


def deepspeed_engine(model, config, ds_path, world_size, dtype, device):
    """The model wrapped in a DeepSpeed engine whose ZeRO optimizer partitions AdamW's state (and gradients,
    parameters) across the ranks; engine.optimizer.param_groups take the learning rate as ours do."""
    if not device.startswith("cuda"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed probes for a GPU first
    import deepspeed
    ds_config = deepspeed_config(ds_path, config, world_size, dtype)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=parameter_groups(model, config), config=ds_config)
    return engine


def full_weights(model, keep):
    """The fp32 state dict of the whole model, gathered from ZeRO's partitions of the master weights (under
    bf16 the module holds only a bf16 copy; under ZeRO-3 each rank only a shard). A collective: every rank
    calls it, the one with keep gets the state dict (tied parameters stay one tensor), the others None."""
    from deepspeed.utils import safe_get_full_fp32_param
    gathered, state = {}, {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if isinstance(tensor, torch.nn.Parameter):
            if id(tensor) not in gathered:
                master = safe_get_full_fp32_param(tensor)  # None for a parameter ZeRO does not manage
                full = master if master is not None else tensor
                gathered[id(tensor)] = full.detach().float().cpu().clone() if keep else None
            tensor = gathered[id(tensor)]
        state[name] = tensor
    return state if keep else None


def gathered_parameters(model):
    """A context in which ZeRO-3's partitioned parameters are whole on every rank (a no-op for stages 0-2)."""
    import deepspeed
    return deepspeed.zero.GatheredParameters(list(model.parameters()))


def save_deepspeed_checkpoint(engine, out_dir, step):
    """DeepSpeed's own checkpoint: every rank writes its optimizer (and ZeRO-3 parameter) shard. A new tag per
    save, so that latest.pt points at a complete one until it is replaced. Collective; returns the tag."""
    tag = f"step{step}"
    engine.save_checkpoint(deepspeed_dir(out_dir), tag=tag, save_latest=False)
    return tag


def remove_deepspeed_checkpoints_but(out_dir, tag):
    """Once latest.pt points at tag, the earlier DeepSpeed checkpoints are no longer needed."""
    for name in os.listdir(deepspeed_dir(out_dir)):
        if name != tag and name.startswith("step"):
            shutil.rmtree(os.path.join(deepspeed_dir(out_dir), name))


def deepspeed_dir(run_dir):
    return os.path.join(run_dir, "deepspeed")


def check_resume_backend(resume, path, use_deepspeed):
    """A DeepSpeed run's optimizer state lives in DeepSpeed's checkpoint, a plain run's in the .pt."""
    if use_deepspeed and "deepspeed_tag" not in resume:
        raise ValueError(f"checkpoint {path} was written without DeepSpeed: resume it without --deepspeed")
    if not use_deepspeed and "deepspeed_tag" in resume:
        raise ValueError(f"checkpoint {path} was written by a DeepSpeed run: resume it with --deepspeed")
    if use_deepspeed and resume["deepspeed_tag"] is None:
        raise ValueError(f"checkpoint {path} holds a DeepSpeed run's weights only: resume from its latest.pt")


# ----------------------------------------------------------------------------- evaluation and logging

@torch.no_grad()
def estimate_val_loss(model, datasets, model_config, config, device, autocast, seed):
    """Mean loss over eval_iters batches of the val splits, the same batches at every evaluation."""
    sampler = BatchSampler(datasets, "val", model_config.block_size, config.batch_size, seed, config.dataset_weights)
    model.eval()
    losses = []
    for _ in range(config.eval_iters):
        x, y, mask = to_device(sampler.next_batch(), device)
        with autocast:
            losses.append(model(x, y, mask)[1].item())
    model.train()
    return sum(losses) / len(losses)


def to_device(batch, device):
    return [t.to(device, non_blocking=True) if t is not None else None for t in batch]


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


class RunLog:
    """One JSON object per line in checkpoint/<run>/train_<run>.log; only rank 0 writes it."""

    def __init__(self, path, resume, enabled):
        self.file = open(path, "a" if resume else "w", encoding="utf-8") if enabled else None

    def write(self, **record):
        if self.file:
            self.file.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
            self.file.flush()


# ----------------------------------------------------------------------------- main

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

    # ---- configuration: the checkpoint's when resuming, then -t, then --set / --out
    if not args.train and not args.checkpoint:
        parser.error("give a training config (-t) or a checkpoint to resume (-c)")
    resume = read_checkpoint(args.checkpoint) if args.checkpoint else None
    if resume is not None:
        check_resume_backend(resume, args.checkpoint, args.deepspeed is not None)
    train_dict = read_json(args.train) if args.train else resume["train_config"]
    train_dict = {**train_dict, **dict(parse_override(s) for s in args.set)}
    if args.out:
        train_dict["save_checkpoint_to"] = args.out
    config = TrainConfig.from_dict(train_dict, source=args.train or args.checkpoint)
    if args.deepspeed and (config.use_lora or config.compile):
        raise ValueError("--deepspeed trains full models without torch.compile: set use_lora and compile to false")

    rank, world_size, device = setup_distributed(config, args.deepspeed is not None)
    is_master = rank == 0
    torch.manual_seed(config.random_seed)  # the same initial weights on every rank

    datasets = [Dataset(entry) for entry in config.dataset_path]
    if len({d.is_sft for d in datasets}) > 1:
        raise ValueError("dataset_path mixes pretraining and SFT datasets")
    # the full weights to start from: the resumed run's own, or (sft, lora) the base model's
    base_path = args.checkpoint if resume and not config.use_lora else config.from_checkpoint
    base = resume if base_path == args.checkpoint else read_checkpoint(base_path) if base_path else None
    if base is not None and "model" not in base:
        raise ValueError(f"checkpoint {base_path} holds no full model (a LoRA checkpoint?)")
    tokenizer = load_tokenizer(config, datasets, base, base_path)
    model_config = model_config_for(args.model, config, base, base_path, tokenizer)

    model = Transformer(model_config)
    if base is not None:
        load_weights(model, base["model"], base_path)
    if config.use_lora and resume is not None:
        model.load_lora_state_dict(resume["lora"], resume["lora_config"])
    elif config.use_lora:
        model.attach_lora(config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_targets)
    model.to(device)
    raw_model = model  # checkpoints and generation use the plain module
    # counted before ZeRO-3 leaves each rank a shard of every parameter
    num_params = raw_model.num_params()
    flops_per_token = raw_model.flops_per_token(model_config.block_size, head=not datasets[0].is_sft)
    trainable = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
    dtype = autocast_dtype(config, device)
    engine = None
    if args.deepspeed:  # the engine is the model in the loop, its ZeRO optimizer takes the learning rate
        model = engine = deepspeed_engine(model, config, args.deepspeed, world_size, dtype, device)
        optimizer = engine.optimizer
    else:
        optimizer = make_optimizer(model, config, device)
    sampler = BatchSampler(datasets, "train", model_config.block_size, config.batch_size, config.random_seed + rank,
                           config.dataset_weights)
    torch.manual_seed(config.random_seed + rank)  # dropout masks differ between ranks
    step, tokens_seen, train_seconds, best_val_loss = 0, 0, 0.0, float("inf")
    if resume is not None:
        if engine is None:
            optimizer.load_state_dict(resume["optimizer"])
        else:  # every rank's optimizer shard, from DeepSpeed's checkpoint beside the .pt
            engine.load_checkpoint(deepspeed_dir(os.path.dirname(args.checkpoint)), tag=resume["deepspeed_tag"])
        step, tokens_seen = resume["step"], resume["tokens_seen"]
        train_seconds, best_val_loss = resume["train_seconds"], resume["best_val_loss"]
        sampler_state = restore_rng_states(resume["rng"], rank)
        if sampler_state is not None:
            sampler.generator.set_state(sampler_state)
    del base, resume

    if config.compile:
        model = torch.compile(model)
    if world_size > 1 and engine is None:
        model = DistributedDataParallel(model, device_ids=[device] if device.startswith("cuda") else None)

    device_type = "cuda" if device.startswith("cuda") else "cpu"
    # DeepSpeed casts the model to bf16/fp16 itself and scales fp16 losses itself; bf16 needs no loss scaling
    autocast = torch.autocast(device_type, dtype=dtype) if dtype and engine is None else nullcontext()
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16 and engine is None)
    peak_flops = measure_matmul_peak(device, dtype or torch.float32) if is_master else 1.0

    out_dir = config.save_checkpoint_to
    run_name = os.path.basename(os.path.normpath(out_dir))
    if is_master:
        os.makedirs(out_dir, exist_ok=True)
    log = RunLog(os.path.join(out_dir, f"train_{run_name}.log"), resume=args.checkpoint is not None, enabled=is_master)
    tokens_per_step = config.batch_size * model_config.block_size * config.gradient_accumulation_steps * world_size
    train_tokens = sum(len(d.splits["train"].ids) for d in datasets)
    mode = "lora" if config.use_lora else "sft" if datasets[0].is_sft else datasets[0].meta.get("kind", "pretrain")
    dtype_name = str(dtype or torch.float32).removeprefix("torch.")
    log.write(kind="start", step=step, mode=mode, world_size=world_size, device=device, dtype=dtype_name,
              params=num_params, trainable_params=trainable, peak_flops=peak_flops)
    if is_master:
        print(f"{mode}: {num_params / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trained), "
              f"{world_size} process(es) on {device}, {dtype_name}, {tokens_per_step} tokens/step")

    def evaluate_and_save(step, final):
        """Evaluate; save best.pt on improvement and latest.pt every save_interval steps and at the end.
        Under DeepSpeed every rank takes part: a ZeRO-3 forward gathers each layer from all ranks, and
        every rank writes its shard of DeepSpeed's checkpoint."""
        nonlocal best_val_loss
        evaluate = final or step % config.eval_interval == 0
        save_latest = final or (step > 0 and step % config.save_interval == 0)
        if not (evaluate or save_latest):
            return
        sampler_states = gather_sampler_states(sampler, world_size)  # collective: every rank calls it
        if not is_master and engine is None:
            return
        val_loss, improved = None, False
        if evaluate:
            with sdp_kernel_context(config.sdp_kernel):
                val_loss = estimate_val_loss(raw_model, datasets, model_config, config, device, autocast,
                                             config.random_seed)
            if engine is not None:  # rank 0's value: all ranks must agree on saving best.pt
                val_loss = from_rank0(val_loss, world_size, device)
            improved = val_loss < best_val_loss
            best_val_loss = min(best_val_loss, val_loss)
            log.write(kind="val", step=step, epoch=tokens_seen / train_tokens, val_loss=val_loss)
            if is_master:
                progress_bar.write(f"step {step}: val loss {val_loss:.4f}" + (" (best)" if improved else ""))
        if not (improved or save_latest):
            return
        progress = {"step": step, "tokens_seen": tokens_seen, "train_seconds": train_seconds,
                    "best_val_loss": best_val_loss}
        deepspeed = None
        if engine is not None:  # best.pt alone needs only the weights, latest.pt also DeepSpeed's checkpoint
            tag = save_deepspeed_checkpoint(engine, out_dir, step) if save_latest else None
            deepspeed = (tag, full_weights(raw_model, keep=is_master))
            if not is_master:
                return
        payload = checkpoint_payload(raw_model, optimizer, model_config, config, tokenizer, progress, sampler_states,
                                     deepspeed)
        for name, wanted in (("best.pt", improved), ("latest.pt", save_latest)):
            if wanted:
                save_atomically(payload, os.path.join(out_dir, name), step)
        if engine is not None and save_latest:
            remove_deepspeed_checkpoints_but(out_dir, tag)

    progress_bar = tqdm(total=config.max_iters, initial=step, disable=not is_master, dynamic_ncols=True)
    if step == 0:
        evaluate_and_save(0, final=False)

    # ---- the training loop
    run_start = time.perf_counter() - train_seconds  # max_time counts the time of earlier runs too
    interval_tokens, interval_seconds = 0, 0.0
    done = step >= config.max_iters or 0 < config.max_time <= train_seconds
    while not done:
        step_start = time.perf_counter()
        lr = learning_rate_at(step, train_seconds, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with sdp_kernel_context(config.sdp_kernel):
            for micro_step in range(config.gradient_accumulation_steps):
                last_micro_step = micro_step == config.gradient_accumulation_steps - 1
                if engine is not None:  # DeepSpeed reduces gradients (ZeRO-1) and steps only at the boundary
                    engine.set_gradient_accumulation_boundary(last_micro_step)
                elif world_size > 1:  # synchronise gradients only after the last micro-step
                    model.require_backward_grad_sync = last_micro_step
                x, y, mask = to_device(sampler.next_batch(), device)
                with autocast:
                    _, loss = model(x, y, mask)
                    loss = loss / config.gradient_accumulation_steps
                if engine is not None:
                    engine.backward(loss, scale_wrt_gas=False)  # divided above already
                else:
                    scaler.scale(loss).backward()
        if engine is not None:
            engine.step()  # clips at gradient_clipping (our grad_clip) across the shards, steps, zeroes the grads
        else:
            if config.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += tokens_per_step
        interval_tokens += tokens_per_step
        interval_seconds += time.perf_counter() - step_start
        train_seconds = elapsed_seconds(run_start, world_size, device)
        progress_bar.update(1)

        if step % config.log_interval == 0 and is_master:
            # the loss of the last micro-batch, as nanoGPT logs it: no extra synchronisation
            train_loss = loss.item() * config.gradient_accumulation_steps
            tokens_per_s = interval_tokens / interval_seconds
            mfu = tokens_per_s / world_size * flops_per_token / peak_flops
            log.write(kind="train", step=step, epoch=tokens_seen / train_tokens, loss=train_loss, lr=lr,
                      tokens_per_s=tokens_per_s, mfu=mfu)
            progress_bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}",
                                     mfu=f"{mfu:.0%}")
            interval_tokens, interval_seconds = 0, 0.0
        done = step >= config.max_iters or 0 < config.max_time <= train_seconds
        evaluate_and_save(step, final=done)
    progress_bar.close()
    if world_size > 1:
        with gathered_parameters(raw_model) if engine is not None else nullcontext():  # ZeRO-3 holds shards
            checksum = parameter_checksum(raw_model)
        checksums = [None] * world_size
        dist.all_gather_object(checksums, checksum)
        log.write(kind="ddp", step=step, parameter_checksums=checksums)
    if engine is not None:  # rank 0 generates the sample alone, which a ZeRO-3 module cannot: a plain copy
        weights = full_weights(raw_model, keep=is_master)
        engine.destroy()  # its pending communication handles must go before the process group does
        if is_master:
            raw_model = Transformer(model_config)
            raw_model.load_state_dict(weights)
    if dist.is_initialized():
        dist.barrier()  # no rank closes its connections while another still reads from them
        dist.destroy_process_group()
    if is_master:
        print(f"done: step {step}, best val loss {best_val_loss:.4f}, {train_seconds:.0f} s, checkpoints in {out_dir}")
        print_sample(raw_model, tokenizer, datasets)


def gather_sampler_states(sampler, world_size):
    """Every rank's data position, so that a resumed DDP run continues each rank's stream."""
    state = sampler.generator.get_state()
    if world_size == 1:
        return [state]
    states = [torch.empty_like(state) for _ in range(world_size)]
    dist.all_gather(states, state)
    return states


def elapsed_seconds(run_start, world_size, device):
    """Seconds of training so far; under DDP rank 0's clock, so that all ranks use the same learning
    rate and stop at the same step."""
    return from_rank0(time.perf_counter() - run_start, world_size, device)


def from_rank0(value, world_size, device):
    """Rank 0's value of a float, on every rank."""
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    if world_size > 1:
        dist.broadcast(tensor, src=0)
    return tensor.item()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"train.py: error: {e}")
    # DeepSpeed's engine sits in reference cycles: free it, and the gloo handles it holds, now rather than
    # during interpreter shutdown, where they abort the process now and then ("terminate called ...")
    gc.collect()

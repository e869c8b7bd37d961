"""
The backends of train.py's loop, one small interface each: load (a resumed run's state), forward_backward
(one micro-batch), step (the optimizer at a learning rate), checkpoint_entries and saved_latest (what a
checkpoint holds and what follows saving it), whole_parameters (a context with every parameter whole on
every rank) and finish.

    PlainBackend       one process, or DDP under torchrun
    DeepSpeedBackend   DeepSpeed ZeRO (--deepspeed config/ds_zero*.json): AdamW's state (stage 1), the
                       gradients (2) and the parameters (3) partitioned across the ranks; deepspeed, a large
                       optional dependency, is imported only when it is asked for
"""

import os
import shutil
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from data import read_json
from model import Transformer


def parameter_groups(model, config, exclude=()):
    """Weight decay on the matrices only: norms and biases are not pulled towards zero."""
    excluded = {id(p) for p in exclude}
    trainable = [p for p in model.parameters() if p.requires_grad and id(p) not in excluded]
    return [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": config.weight_decay},
            {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]


def muon_parameters(model):
    """The 2-D weights inside the blocks (their LoRA adapters in a LoRA run): Muon orthogonalises the updates
    of hidden matrices; the embedding (tied with the head) and the vectors are no such matrices."""
    return [p for name, p in model.named_parameters()
            if p.requires_grad and p.dim() == 2 and name.startswith("layers.")]


def make_optimizers(model, config, device):
    """[(optimizer, peak learning rate)]: AdamW over everything, or Muon over the blocks' matrices and AdamW
    over the rest, each at its own learning rate, which the schedule scales."""
    muon = []
    if config.optimizer == "muon":
        muon = muon_parameters(model)
    adamw = torch.optim.AdamW(parameter_groups(model, config, exclude=muon), lr=config.learning_rate,
                              betas=(config.beta1, config.beta2), fused=device.startswith("cuda"))
    if not muon:
        return [(adamw, config.learning_rate)]
    return [(adamw, config.learning_rate),
            (torch.optim.Muon(muon, lr=config.muon_learning_rate, weight_decay=config.weight_decay,
                              momentum=config.muon_momentum), config.muon_learning_rate)]


OPTIMIZER_KEYS = ("optimizer", "muon_optimizer")  # the checkpoint entries of make_optimizers' states, in order


class PlainBackend:
    """One process, or DDP under torchrun: AdamW (and Muon) over the module, autocast, a GradScaler for fp16."""

    collective_checkpoints = False  # rank 0 alone evaluates and saves

    def __init__(self, model, config, device, dtype, world_size):
        self.config, self.world_size = config, world_size
        self.optimizers = make_optimizers(model, config, device)
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        device_type = "cuda" if device.startswith("cuda") else "cpu"
        self.autocast = torch.autocast(device_type, dtype=dtype) if dtype else nullcontext()
        self.scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)
        self.module = torch.compile(model) if config.compile else model
        if world_size > 1:
            self.module = DistributedDataParallel(self.module, device_ids=[device] if device_type == "cuda" else None)

    def load(self, saved, path):
        if "deepspeed_tag" in saved:
            raise ValueError(f"checkpoint {path} was written by a DeepSpeed run: resume it with --deepspeed")
        trained_with = saved["train_config"].get("optimizer", "adamw")
        if trained_with != self.config.optimizer:
            raise ValueError(f"checkpoint {path} was trained with optimizer {trained_with!r}: resume it with that "
                             f"optimizer, not {self.config.optimizer!r}")
        for (optimizer, _), key in zip(self.optimizers, OPTIMIZER_KEYS):
            optimizer.load_state_dict(saved[key])

    def forward_backward(self, x, y, mask, last_micro_step):
        """The loss of one micro-batch, its gradient accumulated; DDP synchronises after the last one only."""
        if self.world_size > 1:
            self.module.require_backward_grad_sync = last_micro_step
        with self.autocast:
            _, loss = self.module(x, y, mask)
        self.scaler.scale(loss / self.config.gradient_accumulation_steps).backward()
        return loss

    def step(self, lr_scale):
        """One step of each optimizer at its peak learning rate times the schedule's lr_scale; the gradient
        clipped over all parameters together."""
        for optimizer, peak_lr in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = peak_lr * lr_scale
        if self.config.grad_clip > 0:
            for optimizer, _ in self.optimizers:
                self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(self.parameters, self.config.grad_clip)
        for optimizer, _ in self.optimizers:
            self.scaler.step(optimizer)
        self.scaler.update()
        for optimizer, _ in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def checkpoint_entries(self, model, run_dir, step, resumable):
        """The weights (a LoRA run: its adapters and the path of its base) and the optimizer state."""
        entries = {key: optimizer.state_dict() for (optimizer, _), key in zip(self.optimizers, OPTIMIZER_KEYS)}
        if self.config.use_lora:
            entries.update(lora=model.lora_state_dict(), lora_config=model.lora_config,
                           base_checkpoint=self.config.from_checkpoint)
        else:
            entries["model"] = model.state_dict()
        return entries

    def saved_latest(self, run_dir, entries):
        pass  # the .pt holds everything

    def whole_parameters(self, model):
        return nullcontext()  # every rank holds all of them

    def finish(self, model, is_master):
        return model


class DeepSpeedBackend:
    """DeepSpeed ZeRO: its engine is the module and its optimizer partitions AdamW's state (and gradients,
    parameters) across the ranks. Every rank takes part in evaluation and saving: a ZeRO-3 forward gathers
    each layer from all ranks, and every rank writes its shard of DeepSpeed's checkpoint."""

    collective_checkpoints = True

    def __init__(self, model, config, device, dtype, world_size, ds_path):
        if config.use_lora or config.compile:
            raise ValueError("--deepspeed trains full models without torch.compile: set use_lora and compile to false")
        if config.optimizer != "adamw":
            raise ValueError("--deepspeed partitions AdamW's state only: Muon with DeepSpeed is not supported, "
                             "set optimizer to adamw (or train Muon without --deepspeed, under torchrun for DDP)")
        if not device.startswith("cuda"):
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed probes for a GPU first
        import deepspeed
        ds_config = deepspeed_config(ds_path, config, world_size, dtype)
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=parameter_groups(model, config),
                                               config=ds_config)
        self.autocast = nullcontext()  # DeepSpeed casts the model to bf16/fp16 and scales fp16 losses itself
        self.config, self.is_master = config, dist.get_rank() == 0

    def load(self, saved, path):
        if "deepspeed_tag" not in saved:
            raise ValueError(f"checkpoint {path} was written without DeepSpeed: resume it without --deepspeed")
        if saved["deepspeed_tag"] is None:
            raise ValueError(f"checkpoint {path} holds a DeepSpeed run's weights only: resume from its latest.pt")
        self.engine.load_checkpoint(deepspeed_dir(os.path.dirname(path)), tag=saved["deepspeed_tag"])

    def forward_backward(self, x, y, mask, last_micro_step):
        # ZeRO reduces the gradients (ZeRO-1) and steps only at the accumulation boundary
        self.engine.set_gradient_accumulation_boundary(last_micro_step)
        _, loss = self.engine(x, y, mask)
        self.engine.backward(loss / self.config.gradient_accumulation_steps, scale_wrt_gas=False)
        return loss

    def step(self, lr_scale):
        for group in self.engine.optimizer.param_groups:
            group["lr"] = self.config.learning_rate * lr_scale
        self.engine.step()  # clips at gradient_clipping (our grad_clip) across the shards, steps, zeroes the grads

    def checkpoint_entries(self, model, run_dir, step, resumable):
        """Collective. The fp32 weights gathered from ZeRO's shards (rank 0 keeps them), and for latest.pt
        the tag of DeepSpeed's own checkpoint, which holds every rank's optimizer shard."""
        tag = None
        if resumable:  # a new tag per save: latest.pt points at a complete one until it is replaced
            tag = f"step{step}"
            self.engine.save_checkpoint(deepspeed_dir(run_dir), tag=tag, save_latest=False)
        return {"deepspeed_tag": tag, "model": full_weights(model, keep=self.is_master)}

    def saved_latest(self, run_dir, entries):
        """Once latest.pt points at its tag, the earlier DeepSpeed checkpoints are no longer needed."""
        for name in os.listdir(deepspeed_dir(run_dir)):
            if name != entries["deepspeed_tag"] and name.startswith("step"):
                shutil.rmtree(os.path.join(deepspeed_dir(run_dir), name))

    def whole_parameters(self, model):
        """A context in which ZeRO-3's partitioned parameters are whole on every rank (a no-op for 0-2)."""
        import deepspeed
        return deepspeed.zero.GatheredParameters(list(model.parameters()))

    def finish(self, model, is_master):
        """A plain copy of the weights for rank 0's sample, which a ZeRO-3 module cannot generate."""
        weights = full_weights(model, keep=is_master)
        self.engine.destroy()  # its pending communication handles must go before the process group does
        if not is_master:
            return None
        plain = Transformer(model.config)
        plain.load_state_dict(weights)
        return plain


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


def deepspeed_dir(run_dir):
    return os.path.join(run_dir, "deepspeed")

"""
Nano checkpoints (.pt): the one place that writes, reads and interprets them, for every script.

A checkpoint is a dict of tensors and plain values that torch.load(weights_only=True) accepts:
    model_config, train_config, tokenizer   the configs and the vocabulary, as dicts
    model                                   the full weights (absent from a LoRA run's checkpoints)
    lora, lora_config, base_checkpoint      a LoRA run: its adapters and the path of its frozen base
    optimizer | deepspeed_tag               AdamW's state, or the tag of DeepSpeed's sharded checkpoint
    muon_optimizer                          Muon's state (a run with optimizer muon)
    rng, step, tokens_seen, train_seconds, best_val_loss, planned_iters   where the run stands

    save(payload, path)               atomically: a crash leaves the old file or the new one, never a torn one
    load(path)                        a checkpoint dict, with a clear error for missing or corrupt files
    load_model(path, device)          (Transformer, Tokenizer) from a .pt (full or LoRA) or an exported .bin
                                      (a Qwen .bin: the Transformer with Qwen's options and a BPETokenizer)
    attach_lora(model, path)          plug a LoRA run's .pt or an exported LoRA .bin into a model
"""

import os
import pickle
import random
import time

import numpy as np
import torch

from model import ModelConfig, Transformer
from tokenizer import Tokenizer


# ----------------------------------------------------------------------------- files

def save(payload, path, step=None):
    """Write a temp file beside path, fsync it, rename it over path, fsync the directory."""
    directory = os.path.dirname(path) or "."
    temp_path = f"{path}.tmp{os.getpid()}"
    with open(temp_path, "wb") as f:
        torch.save(payload, f)
        f.flush()
        if step is not None and os.environ.get("NANO_DEBUG_PAUSE_IN_SAVE_AT_STEP") == str(step):
            time.sleep(3600)  # lets the tests SIGKILL a save half-way
        os.fsync(f.fileno())
    os.replace(temp_path, path)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(path):
    """A Nano checkpoint: tensors and plain values only; a missing, unreadable or foreign file says which."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f"{path}: not a readable checkpoint (truncated or corrupt?): {e}") from None
    if not isinstance(checkpoint, dict) or "model_config" not in checkpoint:
        raise ValueError(f"{path}: not a Nano checkpoint (no model_config)")
    return checkpoint


def require(checkpoint, path, *keys):
    missing = [key for key in keys if key not in checkpoint]
    if missing:
        what = "a LoRA run's checkpoint" if "lora" in checkpoint else "a full model's checkpoint"
        raise ValueError(f"{path}: {what} has no {', '.join(map(repr, missing))} entry")


# ----------------------------------------------------------------------------- models

def model_config_of(checkpoint, path):
    return ModelConfig.from_dict(checkpoint["model_config"], source=f"{path} model_config")


def tokenizer_of(checkpoint, path):
    require(checkpoint, path, "tokenizer")
    return Tokenizer.from_dict(checkpoint["tokenizer"], source=f"{path} tokenizer")


def load_weights(model, state, path):
    """Load a state dict, naming the first tensor whose shape differs from the model's."""
    own = model.state_dict()
    for name, tensor in state.items():
        if name in own and own[name].shape != tensor.shape:
            raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model {tuple(own[name].shape)}")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path}: the weights do not fit the model config: {e}") from None


def build_model(checkpoint, path):
    """The Transformer of a full model's checkpoint, its weights loaded."""
    require(checkpoint, path, "model")
    model = Transformer(model_config_of(checkpoint, path))
    load_weights(model, checkpoint["model"], path)
    return model


def base_path_of(lora_path, base_path):
    """A LoRA run names its base as it was given to train.py: relative to the working directory
    then, or to the LoRA file when the run has moved."""
    for candidate in (base_path, os.path.join(os.path.dirname(lora_path), base_path)):
        if os.path.exists(candidate):
            return candidate
    raise FileNotFoundError(f"{lora_path}: its base checkpoint {base_path!r} does not exist")


def load_model(path, device="cpu"):
    """(model in eval mode, tokenizer) from a train.py checkpoint (full, or LoRA on its base) or an
    exported .bin."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"model file {path!r} does not exist")
    if path.endswith(".bin"):
        from export import load_bin  # the .bin reader lives with the .bin writer
        model, tokenizer = load_bin(path)
    else:
        checkpoint = load(path)
        if "lora" in checkpoint:
            require(checkpoint, path, "lora_config", "base_checkpoint")
            model, tokenizer = load_model(base_path_of(path, checkpoint["base_checkpoint"]))
            model.load_lora_state_dict(checkpoint["lora"], checkpoint["lora_config"])
        else:
            model, tokenizer = build_model(checkpoint, path), tokenizer_of(checkpoint, path)
    return model.to(device).eval(), tokenizer


def load_full_model(path):
    """(model in eval mode, tokenizer) of a full model's .pt, refusing a LoRA run's (which holds no weights)."""
    checkpoint = load(path)
    return build_model(checkpoint, path).eval(), tokenizer_of(checkpoint, path)


def lora_of(checkpoint, path):
    """(adapter state dict, lora config) of a LoRA run's checkpoint."""
    if "lora" not in checkpoint:
        raise ValueError(f"{path}: not a LoRA checkpoint (no 'lora' entry)")
    require(checkpoint, path, "lora_config")
    return checkpoint["lora"], checkpoint["lora_config"]


def attach_lora(model, path):
    """Plug the adapter of a LoRA run's .pt or an exported LoRA .bin into model (replacing any)."""
    if path.endswith(".bin"):
        from export import load_lora_bin
        state, lora_config = load_lora_bin(path, model.config)
    else:
        state, lora_config = lora_of(load(path), path)
    device = model.tok_embeddings.weight.device
    model.load_lora_state_dict({name: t.to(device) for name, t in state.items()}, lora_config)
    return model


def train_config_of(path):
    """The training config a checkpoint was written with ({} for an exported .bin, which has none)."""
    if path.endswith(".bin"):
        return {}
    return load(path).get("train_config") or {}


# ----------------------------------------------------------------------------- random states

def rng_states(sampler_states):
    """Every random stream of the process, and each DDP rank's data sampler, as tensors and plain values."""
    numpy_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"key": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": numpy_state[2],
                      "has_gauss": numpy_state[3], "cached_gaussian": numpy_state[4]},
            "python": [list(random.getstate()[1]), random.getstate()[2]],
            "sampler": sampler_states}  # one generator state per DDP rank


def restore_rng_states(rng, rank):
    """Restore the process's streams; returns this rank's sampler state (None for a rank the run did not have)."""
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    n = rng["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate((3, tuple(rng["python"][0]), rng["python"][1]))
    return rng["sampler"][rank] if rank < len(rng["sampler"]) else None

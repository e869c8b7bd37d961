"""DeepSpeed ZeRO as a backend of train.py, on CPU (gloo) with 2 processes: ZeRO-2 and ZeRO-3 train as a
single plain process does on the same global batch, resume continues the same losses, the consolidated
checkpoint holds the live weights and loads in infer.py, and the DeepSpeed config cannot contradict the
training config."""

import importlib.util
import os
import sys

import pytest
import torch

import checkpoint
import backends
import train
from model import ModelConfig, Transformer
from test_multinode import launch
from test_train import MODEL, data, read_log, train_losses, write_train_config  # noqa: F401 (data is a fixture)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="pip install deepspeed==0.19.8")
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # for the consolidation API imported here; train.py sets its own

# ZeRO sums gradients across ranks and clips from partial norms: float32 rounding differs (seen: 7e-7)
TOLERANCE = 1e-5
# clipping at 0.05 instead of DeepSpeed's default 1.0 moves the weights of these runs by 3e-3
RUN = dict(max_iters=6, eval_interval=1, save_interval=3, grad_clip=0.05)


class TwoRankSampler:
    """A single process's training batches, taken in turn from rank 1's and rank 0's streams (rank r draws
    with seed random_seed + r): with twice the accumulation steps the single process sees the global batch
    of a 2-process run, and its last micro-batch, whose loss the log holds, is rank 0's."""

    def __init__(self, datasets, split, block_size, batch_size, seed, weights=()):
        self.streams = [PlainSampler(datasets, split, block_size, batch_size, seed + rank, weights) for rank in (1, 0)]
        self.generator = self.streams[1].generator  # the data position checkpoints save
        self.turn = 0

    def next_batch(self):
        batch = self.streams[self.turn].next_batch()
        self.turn = 1 - self.turn
        return batch


PlainSampler = train.BatchSampler


def plain_reference(monkeypatch, tmp_path, data, gradient_accumulation_steps):  # noqa: F811
    """The single-process run (no DeepSpeed) on the global batch of a 2-process run with half the steps."""
    out = str(tmp_path / "plain")
    config = write_train_config(tmp_path / "plain.json", dataset_path=[str(data / "pretrain")], save_checkpoint_to=out,
                                gradient_accumulation_steps=gradient_accumulation_steps, **RUN)
    monkeypatch.setattr(train, "BatchSampler", lambda datasets, split, *rest: (
        TwoRankSampler if split == "train" else PlainSampler)(datasets, split, *rest))
    monkeypatch.setattr(sys, "argv", ["train.py", "-m", MODEL, "-t", config])
    train.main()
    return out


def deepspeed_run(tmp_path, data, name, ds_config, nodes=1, **overrides):  # noqa: F811
    out = str(tmp_path / name)
    config = write_train_config(tmp_path / f"{name}.json", dataset_path=[str(data / "pretrain")],
                                save_checkpoint_to=out, **{**RUN, **overrides})
    launch(["-m", MODEL, "-t", config, "--deepspeed", ds_config], nodes, str(tmp_path))
    return out


@pytest.fixture(scope="module")
def zero2_run(data, tmp_path_factory):  # noqa: F811
    return deepspeed_run(tmp_path_factory.mktemp("zero2"), data, "zero2", "config/ds_zero2.json")


@pytest.fixture(scope="module")
def zero3_run(data, tmp_path_factory):  # noqa: F811
    """ZeRO-3 with 2 accumulation steps, launched as two 1-process "nodes" on loopback."""
    return deepspeed_run(tmp_path_factory.mktemp("zero3"), data, "zero3", "config/ds_zero3.json", nodes=2,
                         gradient_accumulation_steps=2)


def assert_runs_agree(deepspeed_dir, plain_dir):
    for kind, key in (("train", "loss"), ("val", "val_loss")):
        ours = {r["step"]: r[key] for r in read_log(deepspeed_dir, kind)}
        plain = {r["step"]: r[key] for r in read_log(plain_dir, kind)}
        assert sorted(ours) == sorted(plain) and len(ours) >= 6
        for step in plain:
            assert ours[step] == pytest.approx(plain[step], abs=TOLERANCE), (kind, step)
    weights = checkpoint.load(os.path.join(deepspeed_dir, "latest.pt"))["model"]
    plain_weights = checkpoint.load(os.path.join(plain_dir, "latest.pt"))["model"]
    assert weights.keys() == plain_weights.keys()
    for name in weights:
        torch.testing.assert_close(weights[name], plain_weights[name], atol=TOLERANCE, rtol=0, msg=name)


def test_zero2_trains_as_one_plain_process_on_the_global_batch(zero2_run, data, tmp_path, monkeypatch):  # noqa: F811
    assert read_log(zero2_run, "start")[0]["world_size"] == 2
    assert_runs_agree(zero2_run, plain_reference(monkeypatch, tmp_path, data, gradient_accumulation_steps=2))


def test_zero3_with_accumulation_trains_as_one_plain_process(zero3_run, data, tmp_path, monkeypatch):  # noqa: F811
    assert_runs_agree(zero3_run, plain_reference(monkeypatch, tmp_path, data, gradient_accumulation_steps=4))


def test_resume_continues_the_same_losses(zero2_run, data, tmp_path):  # noqa: F811
    out = deepspeed_run(tmp_path, data, "resumed", "config/ds_zero2.json", max_iters=3)
    assert "step3" in os.listdir(os.path.join(out, "deepspeed"))
    launch(["-c", os.path.join(out, "latest.pt"), "--deepspeed", "config/ds_zero2.json", "--set", "max_iters=6"],
           nodes=1, log_dir=str(tmp_path))
    straight, resumed = train_losses(zero2_run), train_losses(out)
    assert sorted(resumed) == sorted(straight) == list(range(1, 7))
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(straight[step], abs=1e-6), step
    # only the DeepSpeed checkpoint that latest.pt names is kept
    assert [name for name in os.listdir(os.path.join(out, "deepspeed")) if name.startswith("step")] == ["step6"]


def test_consolidated_checkpoint_holds_the_live_weights(zero3_run):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    saved = checkpoint.load(os.path.join(zero3_run, "latest.pt"))
    assert saved["step"] == 6 and saved["deepspeed_tag"] == "step6"
    # the live parameters at the end of the run, gathered from ZeRO-3's shards on each rank
    (live,) = read_log(zero3_run, "ddp")
    model = Transformer(ModelConfig.from_dict(saved["model_config"]))
    model.load_state_dict(saved["model"])
    assert live["parameter_checksums"] == [train.parameter_checksum(model)] * 2
    # DeepSpeed's own offline consolidation of its checkpoint agrees to the bit
    offline = get_fp32_state_dict_from_zero_checkpoint(os.path.join(zero3_run, "deepspeed"), tag="step6")
    assert offline.keys() == saved["model"].keys()
    for name, tensor in offline.items():
        assert torch.equal(tensor, saved["model"][name]), name
    # best.pt holds weights only, and infer.py loads both
    assert checkpoint.load(os.path.join(zero3_run, "best.pt"))["deepspeed_tag"] in (None, "step6")
    loaded, _ = checkpoint.load_model(os.path.join(zero3_run, "latest.pt"))
    assert train.parameter_checksum(loaded) == live["parameter_checksums"][0]


def test_deepspeed_config_is_completed_from_the_training_config(tmp_path):
    config = train.TrainConfig(batch_size=4, gradient_accumulation_steps=3, grad_clip=0.5, learning_rate=2e-3)
    ds = backends.deepspeed_config("config/ds_zero2.json", config, world_size=2, dtype=torch.bfloat16)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 24 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    assert ds["optimizer"] == {"type": "AdamW", "params": {"torch_adam": True, "lr": 2e-3, "betas": [0.9, 0.95],
                                                           "weight_decay": 0.1}}
    conflicting = tmp_path / "clip.json"
    conflicting.write_text('{"gradient_clipping": 1.0, "zero_optimization": {"stage": 2}}')
    with pytest.raises(ValueError, match="gradient_clipping is 1.0 but the training config gives 0.5"):
        backends.deepspeed_config(str(conflicting), config, world_size=2, dtype=None)


def test_resume_refuses_the_other_backend(zero2_run, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py", "-c", os.path.join(zero2_run, "latest.pt")])
    with pytest.raises(ValueError, match="written by a DeepSpeed run: resume it with --deepspeed"):
        train.main()

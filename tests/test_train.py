"""train.py and plot_loss.py on a tiny model (config/nano-tiny.json) and tiny datasets written here with
numpy in the layout data.py writes: exact resume after a SIGKILL during a save, DDP on two processes,
SFT masking, LoRA adapter-only checkpoints, clear errors, the loss plot."""

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import backends
import checkpoint
import data as data_module
import train
from backends import PlainBackend
from model import ModelConfig, Transformer
from tokenizer import Tokenizer, BOS_ID, EOS_ID, INSTRUCT_ID, RESPONSE_ID

MODEL = "config/nano-tiny.json"
WORDS = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "green", "quick", "slow"]


def write_dataset(directory, vocab_path, kind, splits):
    """splits: {"train": (ids, mask or None), "val": (...)} -> dataset/<name>/ as data.py writes it."""
    os.makedirs(directory, exist_ok=True)
    for split, (ids, mask) in splits.items():
        np.asarray(ids, dtype=np.uint16).tofile(os.path.join(directory, f"{split}.bin"))
        if mask is not None:
            np.asarray(mask, dtype=np.uint8).tofile(os.path.join(directory, f"{split}_mask.bin"))
    meta = {"kind": kind, "dtype": "uint16", "tokenizer": os.path.relpath(vocab_path, directory),
            "vocab_size": Tokenizer.load(vocab_path).vocab_size, "block_size": 64,
            "train_tokens": len(splits["train"][0]), "val_tokens": len(splits["val"][0])}
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump(meta, f)


def pretrain_ids(tokenizer, rng, documents):
    ids = []
    for _ in range(documents):
        text = " ".join(rng.choice(WORDS, size=rng.integers(5, 30)))
        ids += [BOS_ID] + tokenizer.encode(text) + [EOS_ID]
    return ids


def sft_records(tokenizer, rng, records):
    """Question: words; answer: "yes" when the first word is alpha, else "no". Mask: answer + eos."""
    ids, mask = [], []
    for _ in range(records):
        words = rng.choice(WORDS, size=rng.integers(3, 12))
        question = tokenizer.encode(" ".join(words))
        answer = tokenizer.encode("yes" if words[0] == "alpha" else "no") + [EOS_ID]
        record = [INSTRUCT_ID] + question + [RESPONSE_ID] + answer
        ids += record
        mask += [0] * (len(record) - len(answer)) + [1] * len(answer)
    return ids, mask


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    tokenizer = Tokenizer.build([" ".join(WORDS) + " yes no"])
    vocab_path = str(root / "vocab.json")
    tokenizer.save(vocab_path)
    rng = np.random.default_rng(0)
    write_dataset(root / "pretrain", vocab_path, "pretrain",
                  {"train": (pretrain_ids(tokenizer, rng, 300), None), "val": (pretrain_ids(tokenizer, rng, 30), None)})
    write_dataset(root / "sft", vocab_path, "sft",
                  {"train": sft_records(tokenizer, rng, 400), "val": sft_records(tokenizer, rng, 40)})
    return root


def write_train_config(path, **overrides):
    config = {"dataset_path": [], "save_checkpoint_to": "", "device": "cpu", "dtype": "float32",
              "batch_size": 4, "max_iters": 20, "learning_rate": 3e-3, "warmup_iters": 2,
              "lr_decay_iters": 20, "min_lr": 3e-4, "log_interval": 1, "eval_interval": 10,
              "save_interval": 10, "eval_iters": 2, **overrides}
    with open(path, "w") as f:
        json.dump(config, f)
    return str(path)


def train_command(*args):
    return [sys.executable, "train.py", *args]


def run_train(*args, env=None):
    result = subprocess.run(train_command(*args), capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def read_log(run_dir, kind):
    run = os.path.basename(run_dir)
    with open(os.path.join(run_dir, f"train_{run}.log")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def train_losses(run_dir):
    """{step: loss}, the latest line winning (a resumed run appends after the killed run's lines)."""
    return {r["step"]: r["loss"] for r in read_log(run_dir, "train")}


def straight_and_killed_runs(data, root, **overrides):
    """20 pretraining steps run straight, and the same run SIGKILLed while it saves at step 20 (after latest.pt
    of step 10), then resumed with -c: (straight dir, resumed dir, the step latest.pt held at the kill)."""
    straight, out = str(root / "straight"), str(root / "killed")
    for name, run_dir in (("straight", straight), ("killed", out)):
        write_train_config(root / f"{name}.json", dataset_path=[str(data / "pretrain")], save_checkpoint_to=run_dir,
                           **overrides)
    run_train("-m", MODEL, "-t", str(root / "straight.json"))
    env = {**os.environ, "NANO_DEBUG_PAUSE_IN_SAVE_AT_STEP": "20"}
    process = subprocess.Popen(train_command("-m", MODEL, "-t", str(root / "killed.json")), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120

    def paused_in_the_step_20_save():
        if not os.path.isdir(out) or not any(".tmp" in name for name in os.listdir(out)):
            return False
        return 20 in train_losses(out)

    while not paused_in_the_step_20_save():
        assert process.poll() is None and time.time() < deadline, "the run ended before the paused save"
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = checkpoint.load(os.path.join(out, "latest.pt"))
    run_train("-c", os.path.join(out, "latest.pt"))
    return straight, out, saved["step"]


@pytest.fixture(scope="module")
def adamw_runs(data, tmp_path_factory):
    return straight_and_killed_runs(data, tmp_path_factory.mktemp("adamw"))


@pytest.fixture(scope="module")
def muon_runs(data, tmp_path_factory):
    return straight_and_killed_runs(data, tmp_path_factory.mktemp("muon"), optimizer="muon", lr_schedule="wsd",
                                    muon_learning_rate=0.02, decay_fraction=0.3)


@pytest.fixture(scope="module")
def straight_run(adamw_runs):
    """20 uninterrupted pretraining steps; also the base model of the SFT and LoRA tests."""
    return adamw_runs[0]


@pytest.fixture(scope="module", params=["adamw_runs", "muon_runs"])
def killed_and_resumed_run(request):
    """(straight dir, resumed dir, the step latest.pt held at the kill), AdamW + cosine and Muon + WSD."""
    return request.getfixturevalue(request.param)


def test_kill_during_save_leaves_the_previous_latest_checkpoint(killed_and_resumed_run):
    _, _, step_at_kill = killed_and_resumed_run
    assert step_at_kill == 10  # the torn save of step 20 never replaced latest.pt


def test_resume_after_kill_repeats_the_straight_losses(killed_and_resumed_run):
    straight_run, resumed_dir, _ = killed_and_resumed_run
    straight, resumed = train_losses(straight_run), train_losses(resumed_dir)
    assert sorted(straight) == sorted(resumed) == list(range(1, 21))
    for step in range(1, 21):
        assert resumed[step] == pytest.approx(straight[step], abs=1e-6), step
    assert checkpoint.load(os.path.join(resumed_dir, "latest.pt"))["step"] == 20


def test_muon_checkpoint_holds_both_optimizers_and_the_wsd_schedule_drives_them(muon_runs):
    _, resumed_dir, _ = muon_runs
    saved = checkpoint.load(os.path.join(resumed_dir, "latest.pt"))
    adamw_state, muon_state = saved["optimizer"]["state"].values(), saved["muon_optimizer"]["state"].values()
    assert adamw_state and all("exp_avg" in s for s in adamw_state)
    assert muon_state and all("momentum_buffer" in s for s in muon_state)
    # 20 steps, warmup 2, the last 30 % decaying: the lr logged after step s is the one step s - 1 used
    lrs = {r["step"]: r["lr"] for r in read_log(resumed_dir, "train")}
    assert [lrs[s] for s in (1, 2)] == pytest.approx([3e-3 / 3, 3e-3 * 2 / 3])
    assert all(lrs[s] == pytest.approx(3e-3) for s in range(3, 15))
    assert all(lrs[s + 1] < lrs[s] for s in range(15, 20))


def test_wsd_schedule_and_both_optimizers_at_their_own_peaks():
    config = train.TrainConfig(optimizer="muon", lr_schedule="wsd", learning_rate=1e-3, muon_learning_rate=0.02,
                               min_lr=1e-4, warmup_iters=10, decay_fraction=0.2)
    scales = [train.lr_scale_at(step, config, 110) for step in range(111)]
    assert scales[:10] == pytest.approx([(step + 1) / 11 for step in range(10)])
    assert scales[10:89] == [1.0] * 79  # stable until the last 22 steps
    assert scales[99] == pytest.approx(1 - 11 / 22 * 0.9) and scales[110] == pytest.approx(0.1)
    assert train.lr_scale_at(110, dataclasses.replace(config, lr_schedule="cosine"), 110) == pytest.approx(0.1)

    model = Transformer(ModelConfig.from_json(MODEL))
    backend = PlainBackend(model, config, "cpu", None, 1)
    (adamw, adamw_peak), (muon, muon_peak) = backend.optimizers
    assert isinstance(muon, torch.optim.Muon) and (adamw_peak, muon_peak) == (1e-3, 0.02)
    names = {id(p): n for n, p in model.named_parameters()}
    on_muon = {names[id(p)] for group in muon.param_groups for p in group["params"]}
    on_adamw = {names[id(p)] for group in adamw.param_groups for p in group["params"]}
    assert on_muon == {n for n, p in model.named_parameters() if n.startswith("layers.") and p.dim() == 2}
    assert on_adamw == set(names.values()) - on_muon and "tok_embeddings.weight" in on_adamw
    x = torch.randint(0, 100, (2, 16))
    backend.forward_backward(x, x, None, True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    backend.step(0.5)
    assert [g["lr"] for g in adamw.param_groups] == [5e-4, 5e-4] and muon.param_groups[0]["lr"] == 0.01
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())  # both optimizers stepped

    model.attach_lora(4, 8.0)  # a LoRA run: Muon takes the adapters' matrices, nothing else is trained
    lora = {n for n, p in model.named_parameters() if p.requires_grad}
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in backends.muon_parameters(model)} == lora


def kill_when(command, ready, extra_delay=0.0):
    """Start command and SIGKILL it extra_delay seconds after ready() holds; True if it was killed (False:
    it finished first)."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while process.poll() is None:
        assert time.time() < deadline, "the run neither got ready nor ended"
        if ready():
            time.sleep(extra_delay)
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.02)
    assert process.returncode == 0
    return False


def logged_steps(run_dir):
    path = os.path.join(run_dir, f"train_{os.path.basename(run_dir)}.log")
    if not os.path.exists(path):
        return []
    with open(path) as f:  # a line torn by the kill is not a step
        return [r["step"] for r in map(json.loads, filter(lambda line: line.endswith("\n"), f)) if r["kind"] == "train"]


def test_resume_after_kills_at_random_moments_repeats_the_straight_losses(data, tmp_path):
    """Killed at random moments (the default dtype: bf16 where the CPU has it), resumed from latest.pt after
    each kill, sometimes killed again: the losses are those of the uninterrupted run, step for step."""
    def config(name):
        return write_train_config(tmp_path / f"{name}.json", dataset_path=[str(data / "pretrain")], dtype="auto",
                                  save_checkpoint_to=str(tmp_path / name), max_iters=30, lr_decay_iters=30,
                                  save_interval=3, eval_interval=5)
    run_train("-m", MODEL, "-t", config("straight"))
    out = str(tmp_path / "killed")
    rng = random.Random(14)
    resumed_from = []
    command = train_command("-m", MODEL, "-t", config("killed"))
    for kill_step in sorted(rng.sample(range(2, 29), 4)):
        if not kill_when(command, lambda: any(s >= kill_step for s in logged_steps(out)), rng.uniform(0, 0.3)):
            break
        resumed_from.append(checkpoint.load(os.path.join(out, "latest.pt"))["step"])
        command = train_command("-c", os.path.join(out, "latest.pt"))
    run_train(*command[2:])
    assert len(resumed_from) >= 3 and resumed_from[0] > 0, resumed_from
    straight, resumed = train_losses(str(tmp_path / "straight")), train_losses(out)
    assert sorted(resumed) == sorted(straight) == list(range(1, 31))
    assert resumed == straight  # bit for bit


def test_time_budget_becomes_a_step_count_that_resume_keeps(data, tmp_path):
    """max_time is turned into a step count once; a run killed after that and resumed logs, for every step
    both processes ran, the same loss, and ends at the same step the killed run had planned."""
    out = str(tmp_path / "timed")
    config = write_train_config(tmp_path / "timed.json", dataset_path=[str(data / "pretrain")], save_checkpoint_to=out,
                                max_iters=100_000, lr_decay_iters=100_000, max_time=6.0, save_interval=10,
                                eval_interval=1000, log_interval=1)
    latest = os.path.join(out, "latest.pt")

    def planned_and_between_saves():  # so that the resumed run repeats a few steps
        steps = logged_steps(out)
        return (bool(steps) and steps[-1] % 10 == 5 and os.path.exists(latest)
                and checkpoint.load(latest)["time_planned_iters"] > 0)

    assert kill_when(train_command("-m", MODEL, "-t", config), planned_and_between_saves)
    planned = checkpoint.load(latest)["time_planned_iters"]
    assert planned > 10
    run_train("-c", latest)
    lines = read_log(out, "train")
    by_step = {}
    for line in lines:
        by_step.setdefault(line["step"], set()).add((line["loss"], line["lr"]))
    assert all(len(values) == 1 for values in by_step.values()), "a repeated step logged another loss or lr"
    assert len(lines) > len(by_step)  # some steps were run by both processes
    assert max(by_step) == planned == checkpoint.load(latest)["step"]
    assert lines[-1]["lr"] < 1.1 * 3e-4  # annealed to min_lr (3e-4) by the planned end


def test_learning_rate_anneals_by_the_planned_end():
    config = train.TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, lr_decay_iters=1000, max_time=100.0)
    progress = train.Progress(step=10, train_seconds=5.0)
    train.plan_time_budget(progress, config)  # 5 % of the budget: where the speed is measured from
    assert progress.time_planned_iters == 0 and train.last_step(progress, config) == config.max_iters
    progress.step, progress.train_seconds = 30, 15.0
    train.plan_time_budget(progress, config)  # 0.5 s a step since the mark: 85 s left allow 170 more
    assert progress.time_planned_iters == 200 and train.last_step(progress, config) == 200
    assert 1e-3 * train.lr_scale_at(200, config, train.decay_end(progress, config)) == pytest.approx(1e-4)
    progress.step, progress.train_seconds = 100, 30.0
    train.plan_time_budget(progress, config)  # planned once, never again
    assert progress.time_planned_iters == 200


def test_a_new_dataset_path_drops_the_old_dataset_weights():
    shipped = {"dataset_path": ["dataset/news", "dataset/reviews"], "dataset_weights": [0.4, 0.6]}
    assert train.with_overrides(shipped, [("dataset_path", ["mine"])])["dataset_weights"] == []
    assert train.with_overrides(shipped, [("dataset_weights", None)])["dataset_weights"] == []
    both = train.with_overrides(shipped, [("dataset_path", ["a", "b"]), ("dataset_weights", [1, 3])])
    assert both["dataset_weights"] == [1, 3]
    assert train.with_overrides(shipped, [])["dataset_weights"] == [0.4, 0.6]


def test_checkpoint_contents_load_with_weights_only(straight_run):
    saved = checkpoint.load(os.path.join(straight_run, "latest.pt"))
    for key in ("model", "model_config", "tokenizer", "train_config", "optimizer", "rng", "step", "best_val_loss"):
        assert key in saved, key
    assert not any(k.startswith("_orig_mod.") for k in saved["model"])
    assert set(saved["rng"]) >= {"torch", "numpy", "python", "sampler"}
    assert read_log(straight_run, "val")[-1]["val_loss"] < read_log(straight_run, "val")[0]["val_loss"]
    best = checkpoint.load(os.path.join(straight_run, "best.pt"))
    assert best["best_val_loss"] == min(r["val_loss"] for r in read_log(straight_run, "val"))
    line = read_log(straight_run, "train")[-1]
    assert {"time", "step", "epoch", "loss", "lr", "tokens_per_s", "mfu"} <= set(line)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_ddp_two_processes_end_with_identical_parameters(data, tmp_path, optimizer):
    out = str(tmp_path / "ddp")
    config = write_train_config(tmp_path / "pretrain.json", dataset_path=[str(data / "pretrain")],
                                save_checkpoint_to=out, max_iters=6, eval_interval=3, save_interval=3,
                                optimizer=optimizer)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "train.py", "-m", MODEL, "-t", config]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    (ddp,) = read_log(out, "ddp")
    first, second = ddp["parameter_checksums"]
    assert first == second
    assert read_log(out, "start")[0]["world_size"] == 2
    # each rank draws its own stream: both rank's data positions are in the checkpoint, and differ
    saved = checkpoint.load(os.path.join(out, "latest.pt"))
    rank0, rank1 = saved["rng"]["sampler"]
    assert not torch.equal(rank0, rank1)
    assert ("muon_optimizer" in saved) == (optimizer == "muon")


def test_sft_batches_count_only_answer_tokens(data):
    datasets = [data_module.Dataset(str(data / "sft"))]
    sampler = data_module.BatchSampler(datasets, "train", block_size=64, batch_size=8, seed=0)
    x, y, mask = sampler.next_batch()
    tokenizer = Tokenizer.load(str(data / "vocab.json"))
    answer_ids = set(tokenizer.encode("yes") + tokenizer.encode("no")) | {EOS_ID}
    assert (x[:, 0] == INSTRUCT_ID).all()  # windows start at a record
    assert set(y[mask == 1].tolist()) <= answer_ids
    # the target right after each <|response_mark|> (the answer's first token) counts
    assert (mask[x == RESPONSE_ID] == 1).all()

    # question targets do not contribute: scrambling them changes neither the loss nor a gradient
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_json(MODEL))

    def loss_and_grads(targets):
        model.zero_grad()
        _, loss = model(x, targets, mask)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    loss, grads = loss_and_grads(y)
    scrambled = torch.where(mask == 1, y, torch.randint_like(y, 7, tokenizer.vocab_size))
    assert not torch.equal(scrambled, y)
    scrambled_loss, scrambled_grads = loss_and_grads(scrambled)
    assert scrambled_loss == loss
    assert all(torch.equal(a, b) for a, b in zip(grads, scrambled_grads))


def test_lora_run_saves_only_adapters_and_leaves_the_base_unchanged(data, straight_run, tmp_path):
    base_path = os.path.join(straight_run, "latest.pt")
    base_bytes = open(base_path, "rb").read()
    out = str(tmp_path / "lora")
    config = write_train_config(tmp_path / "lora.json", dataset_path=[str(data / "sft")], save_checkpoint_to=out,
                                from_checkpoint=base_path, use_lora=True, lora_rank=4, max_iters=8)
    result = run_train("-t", config)
    assert "sample:" in result.stdout
    assert read_log(out, "start")[0]["mode"] == "lora"
    adapter = checkpoint.load(os.path.join(out, "latest.pt"))
    assert "model" not in adapter
    assert adapter["lora"] and all("lora_" in name for name in adapter["lora"])
    assert adapter["lora_config"]["rank"] == 4 and adapter["base_checkpoint"] == base_path
    assert any(t.abs().sum() > 0 for n, t in adapter["lora"].items() if n.endswith("lora_B"))  # it learned
    assert open(base_path, "rb").read() == base_bytes

    # the base weights are frozen: plugging the adapters into the base changes only the adapter tensors
    base = checkpoint.load(base_path)
    model = Transformer(ModelConfig.from_dict(base["model_config"]))
    model.load_state_dict(base["model"])
    model.load_lora_state_dict(adapter["lora"], adapter["lora_config"])
    for name, tensor in model.state_dict().items():
        if "lora_" not in name:
            assert torch.equal(tensor, base["model"][name]), name


def test_sft_run_trains_on_the_masked_loss(data, straight_run, tmp_path):
    out = str(tmp_path / "sft")
    config = write_train_config(tmp_path / "sft.json", dataset_path=[str(data / "sft")], save_checkpoint_to=out,
                                from_checkpoint=os.path.join(straight_run, "latest.pt"), max_iters=8)
    run_train("-t", config)
    assert read_log(out, "start")[0]["mode"] == "sft"
    assert "model" in checkpoint.load(os.path.join(out, "latest.pt"))


def run_main(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["train.py", *args])
    train.main()


def test_unknown_training_key_is_named(data, tmp_path, monkeypatch):
    config = write_train_config(tmp_path / "bad.json", dataset_path=[str(data / "pretrain")], lora_rnak=4)
    with pytest.raises(ValueError, match="unknown key 'lora_rnak'"):
        run_main(monkeypatch, "-m", MODEL, "-t", config)
    config = write_train_config(tmp_path / "good.json", dataset_path=[str(data / "pretrain")])
    with pytest.raises(ValueError, match="max_iters must be int, got 'ten'"):
        run_main(monkeypatch, "-m", MODEL, "-t", config, "--set", "max_iters=ten")


def test_clear_errors(data, straight_run, tmp_path, monkeypatch):
    missing = write_train_config(tmp_path / "missing.json", dataset_path=[str(tmp_path / "nowhere")])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        run_main(monkeypatch, "-m", MODEL, "-t", missing)

    small = dict(json.load(open(MODEL)), vocab_size=8)
    small_path = tmp_path / "small.json"
    small_path.write_text(json.dumps(small))
    config = write_train_config(tmp_path / "ok.json", dataset_path=[str(data / "pretrain")],
                                save_checkpoint_to=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="vocab_size 8 is smaller"):
        run_main(monkeypatch, "-m", str(small_path), "-t", config)

    wider = dict(json.load(open(MODEL)), n_embd=128, n_hidden=352)
    wider_path = tmp_path / "wider.json"
    wider_path.write_text(json.dumps(wider))
    with pytest.raises(ValueError, match="another model shape.*n_embd 64 vs 128"):
        run_main(monkeypatch, "-m", str(wider_path), "-t", config,
                 "--set", f"from_checkpoint={os.path.join(straight_run, 'latest.pt')}")


def test_optimizer_errors(data, muon_runs, tmp_path, monkeypatch):
    config = write_train_config(tmp_path / "adamw.json", dataset_path=[str(data / "pretrain")],
                                save_checkpoint_to=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="optimizer must be one of adamw, muon, got 'sgd'"):
        run_main(monkeypatch, "-m", MODEL, "-t", config, "--set", "optimizer=sgd")
    with pytest.raises(ValueError, match="lr_schedule must be one of cosine, wsd, got 'linear'"):
        run_main(monkeypatch, "-m", MODEL, "-t", config, "--set", "lr_schedule=linear")
    with pytest.raises(ValueError, match=r"decay_fraction must be in \(0, 1\], got 0"):
        run_main(monkeypatch, "-m", MODEL, "-t", config, "--set", "decay_fraction=0")
    muon_latest = os.path.join(muon_runs[1], "latest.pt")
    with pytest.raises(ValueError, match="trained with optimizer 'muon': resume it with that optimizer, not 'adamw'"):
        run_main(monkeypatch, "-c", muon_latest, "-t", config)
    result = subprocess.run(train_command("-m", MODEL, "-t", config, "--set", "optimizer=muon",
                                          "--deepspeed", "config/ds_zero1.json"),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "Muon with DeepSpeed is not supported, set optimizer to adamw" in result.stderr


def test_plot_loss_writes_a_png(straight_run, tmp_path):
    log = os.path.join(straight_run, "train_straight.log")
    png = tmp_path / "loss.png"
    result = subprocess.run([sys.executable, "plot_loss.py", "-n", log, "-o", str(png)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "20 training and 3 validation points" in result.stdout


def test_dataset_weights_set_the_mix(data, tmp_path, monkeypatch):
    vocab_path = str(data / "vocab.json")
    constant = [7] * 2000  # every window of this dataset is all 7s
    write_dataset(tmp_path / "sevens", vocab_path, "pretrain", {"train": (constant, None), "val": (constant, None)})
    datasets = [data_module.Dataset(str(data / "pretrain")), data_module.Dataset(str(tmp_path / "sevens"))]

    def share_of_sevens(weights):
        sampler = data_module.BatchSampler(datasets, "train", 32, 8, seed=0, weights=weights)
        batches = [sampler.next_batch()[0] for _ in range(100)]
        return float(torch.cat(batches).eq(7).all(dim=1).double().mean())

    by_size = len(constant) / (len(constant) + len(datasets[0].splits["train"].ids))
    assert abs(share_of_sevens(()) - by_size) < 0.07
    assert abs(share_of_sevens([1, 3]) - 0.75) < 0.07
    assert abs(share_of_sevens([3, 1]) - 0.25) < 0.07

    config = write_train_config(tmp_path / "bad.json", dataset_path=[str(data / "pretrain")], dataset_weights=[1, 2])
    with pytest.raises(ValueError, match="dataset_weights must be one positive number per dataset_path entry"):
        run_main(monkeypatch, "-m", MODEL, "-t", config)


@pytest.mark.parametrize("name, recipe", [("pretrain", ("muon", "wsd")), ("sft", ("muon", "wsd")),
                                          ("lora", ("adamw", "cosine"))])
def test_the_shipped_training_configs_load_with_the_measured_recipes(name, recipe):
    config = train.TrainConfig.from_dict(data_module.read_json(f"config/{name}.json"), source=name)
    assert (config.optimizer, config.lr_schedule) == recipe  # the measured winners (README)

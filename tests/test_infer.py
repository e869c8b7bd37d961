"""infer.py: sampling rules, loading, prompts, and the command line driven through a pty and pipes.

The tiny models here are trained in a second on repetitive text, so their answers are known:
`cyclic` continues "abcdefgh" forever, `sentiment` answers 好棒赞 reviews 正面 and 差烂坏 ones 负面
(in the instruct template and in the few-shot format of eval.py's prompted method).
"""

import functools
import os
import pty
import random
import select
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import infer
from model import ModelConfig, Transformer
from tokenizer import Tokenizer, BOS_ID, EOS_ID, INSTRUCT_ID, RESPONSE_ID

CYCLE = "abcdefgh"
POSITIVE, NEGATIVE = "好棒赞", "差烂坏"


# tiny models run fastest on one thread, above all when the machine is busy
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def train_tiny(tokenizer, stream, steps, block_size=32, seed=0):
    """A 2-layer model trained on random windows of the token stream (on one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_on_windows(tokenizer, stream, steps, block_size, seed)
    finally:
        torch.set_num_threads(threads)


def train_on_windows(tokenizer, stream, steps, block_size, seed):
    torch.manual_seed(seed)
    config = ModelConfig(block_size=block_size, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2,
                         n_kv_head=1, n_embd=48, n_hidden=96)
    model = Transformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.tensor(stream)
    for _ in range(steps):
        starts = torch.randint(len(data) - block_size - 1, (16,)).tolist()
        x = torch.stack([data[s:s + block_size] for s in starts])
        y = torch.stack([data[s + 1:s + block_size + 1] for s in starts])
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def checkpoint_dict(model, tokenizer, mode="pretrain"):
    return {"model": model.state_dict(), "model_config": model.config.to_dict(),
            "tokenizer": tokenizer.to_dict(), "train_config": {"mode": mode}, "step": 0}


@functools.cache
def cyclic_checkpoint():
    tokenizer = Tokenizer.build([CYCLE])
    model = train_tiny(tokenizer, [BOS_ID] + tokenizer.encode(CYCLE * 300), steps=150)
    return checkpoint_dict(model, tokenizer)


def random_review(rng, label):
    return "".join(rng.choice(POSITIVE if label == "正面" else NEGATIVE) for _ in range(rng.randint(2, 6)))


def sentiment_records(count, seed):
    rng = random.Random(seed)
    labels = [rng.choice(("正面", "负面")) for _ in range(count)]
    return [(random_review(rng, label), label) for label in labels]


@functools.cache
def sentiment_checkpoint():
    """Trained on both SFT records and the few-shot documents of eval.py's prompted method."""
    tokenizer = Tokenizer.build([POSITIVE + NEGATIVE + "正面负面。情感："])
    stream = []
    for review, label in sentiment_records(600, seed=1):
        stream += [INSTRUCT_ID] + tokenizer.encode(review) + [RESPONSE_ID] + tokenizer.encode(label) + [EOS_ID]
        stream += [BOS_ID] + tokenizer.encode(review + "。情感：" + label) + [EOS_ID]
    model = train_tiny(tokenizer, stream, steps=150, block_size=64)
    return checkpoint_dict(model, tokenizer, mode="sft")


def save(checkpoint, path, **changes):
    torch.save({**checkpoint, **changes}, path)
    return str(path)


def run_infer(*args, stdin=None, timeout=60):
    return subprocess.run([sys.executable, "infer.py", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=ONE_THREAD)


# ---------------------------------------------------------------- sampling

def test_temperature_zero_is_argmax():
    sample = infer.make_sampler(temperature=0, repetition_penalty=1.0)
    for seed in range(5):
        logits = torch.randn(100, generator=torch.Generator().manual_seed(seed))
        assert sample(logits, []) == int(logits.argmax())


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.0, 2.5, 0.0])
    kept = torch.isfinite(infer.top_k_filter(logits, 3)).nonzero().flatten().tolist()
    assert kept == [1, 3, 4]
    sample = infer.make_sampler(temperature=5.0, top_k=3, repetition_penalty=1.0, seed=0)
    assert {sample(logits, []) for _ in range(300)} == {1, 3, 4}


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([0.15, 0.05, 0.5, 0.3]).log()
    def kept(p):
        return set(torch.isfinite(infer.top_p_filter(logits, p)).nonzero().flatten().tolist())
    assert kept(0.4) == {2}
    assert kept(0.75) == {2, 3}
    assert kept(0.85) == {2, 3, 0}
    assert kept(1.0) == {0, 1, 2, 3}
    sample = infer.make_sampler(temperature=1.0, top_k=0, top_p=0.75, repetition_penalty=1.0, seed=0)
    assert {sample(logits, []) for _ in range(300)} == {2, 3}


def test_fixed_seed_reproduces():
    logits = torch.zeros(50)
    def draws(seed):
        sample = infer.make_sampler(temperature=1.0, top_k=0, seed=seed)
        return [sample(logits, []) for _ in range(40)]
    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_repetition_penalty_is_sign_aware():
    logits = torch.tensor([2.0, -2.0, 1.0, -1.0])
    penalised = infer.apply_repetition_penalty(logits, [0, 1, 1], 2.0)
    assert penalised.tolist() == [1.0, -4.0, 1.0, -1.0]  # seen: 2 / 2 and -2 * 2; unseen unchanged
    assert logits.tolist() == [2.0, -2.0, 1.0, -1.0]  # the caller's logits are left alone
    # with the penalty, greedy no longer picks a seen token that barely led
    sample = infer.make_sampler(temperature=0, repetition_penalty=1.5)
    assert sample(torch.tensor([1.2, 1.0]), [0]) == 1


# ---------------------------------------------------------------- loading and prompts

def lora_run(tmp_path):
    """A base checkpoint and a LoRA run on it with non-zero adapters, the adapted model's logits on
    a few tokens, and those tokens."""
    base_path = save(cyclic_checkpoint(), tmp_path / "base.pt")
    model, tokenizer = checkpoint.load_model(base_path)
    torch.manual_seed(1)
    model.attach_lora(rank=2, alpha=4.0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_()
    tokens = torch.tensor([[BOS_ID] + tokenizer.encode("abcd")])
    lora_path = save({"lora": model.lora_state_dict(), "lora_config": model.lora_config,
                      "model_config": model.config.to_dict(), "tokenizer": tokenizer.to_dict(),
                      "base_checkpoint": "base.pt"}, tmp_path / "lora.pt")  # relative to the LoRA file
    return base_path, lora_path, tokens, model(tokens)[0]


def test_load_full_and_lora_checkpoints(tmp_path):
    base_path, lora_path, tokens, expected = lora_run(tmp_path)
    model, tokenizer = checkpoint.load_model(base_path)
    assert tokenizer.itos[7:] == list(CYCLE)
    greedy = infer.make_sampler(temperature=0, repetition_penalty=1.0)
    assert tokenizer.decode(model.generate([BOS_ID] + tokenizer.encode("ab"), 6, greedy)) == "cdefgh"
    lora_model, _ = checkpoint.load_model(lora_path)  # loads its base, then attaches
    torch.testing.assert_close(lora_model(tokens)[0], expected)
    torch.testing.assert_close(checkpoint.attach_lora(model, lora_path)(tokens)[0], expected)


def test_load_exported_bin(tmp_path):
    pytest.importorskip("export")  # export.py is another part of Nano; test when it is there
    base_path, lora_path, tokens, expected = lora_run(tmp_path)
    for source, output in (("--checkpoint", base_path), ("--lora", lora_path)):
        subprocess.run([sys.executable, "export.py", output.replace(".pt", ".bin"), source, output],
                       check=True, capture_output=True, env=ONE_THREAD)
    from_pt, _ = checkpoint.load_model(base_path)
    from_bin, _ = checkpoint.load_model(base_path.replace(".pt", ".bin"))
    torch.testing.assert_close(from_bin(tokens)[0], from_pt(tokens)[0], atol=1e-5, rtol=1e-5)
    checkpoint.attach_lora(from_bin, lora_path.replace(".pt", ".bin"))
    torch.testing.assert_close(from_bin(tokens)[0], expected, atol=1e-5, rtol=1e-5)


def test_unknown_characters_warn(capsys):
    tokenizer = Tokenizer.build([CYCLE])
    assert infer.encode_text(tokenizer, "abz") == [7, 8, 1]
    assert "'z'" in capsys.readouterr().err


def test_conversation_drops_oldest_turns_and_resets():
    tokenizer = Tokenizer.build([CYCLE])
    conversation = infer.Conversation(tokenizer, context_length=16, answer_room=4)
    first = conversation.ask("ab")
    assert first == [INSTRUCT_ID, 7, 8, RESPONSE_ID]
    conversation.add_answer([9, 10, EOS_ID])
    second = conversation.ask("cd")
    assert second == [INSTRUCT_ID, 7, 8, RESPONSE_ID, 9, 10, EOS_ID, INSTRUCT_ID, 9, 10, RESPONSE_ID]
    conversation.add_answer([11])
    third = conversation.ask("efg")  # 5 tokens: both earlier turns (7 + 5) no longer fit in 16 - 4 - 5
    assert third == [INSTRUCT_ID, 9, 10, RESPONSE_ID, 11, EOS_ID, INSTRUCT_ID, 11, 12, 13, RESPONSE_ID]
    conversation.reset()
    assert conversation.ask("ab") == first


def test_conversation_cuts_a_question_longer_than_the_answer_room_leaves(capsys):
    tokenizer = Tokenizer.build([CYCLE])
    conversation = infer.Conversation(tokenizer, context_length=16, answer_room=4)
    conversation.ask("ab")
    conversation.add_answer([9])
    question = tokenizer.encode(CYCLE * 2)   # 16 tokens, 18 with the marks: more than 16 - 4
    assert conversation.ask(CYCLE * 2) == [INSTRUCT_ID] + question[-10:] + [RESPONSE_ID]   # the earlier turn is gone
    assert "question is 18 tokens, longer than the context of 12: keeping its last 11" in capsys.readouterr().err


# ---------------------------------------------------------------- command line

def test_prompt_longer_than_context_is_cut_with_a_message(tmp_path):
    path = save(cyclic_checkpoint(), tmp_path / "cyclic.pt")
    result = run_infer("-m", path, "--prompt", CYCLE * 10 + "ab", "-t", "0", "-r", "1", "-s", "40")
    assert result.returncode == 0, result.stderr
    assert "longer than the context of 32: keeping its last 31" in result.stderr
    assert result.stdout.startswith("cdefgh")


def test_think_on_a_model_that_does_not_think_is_a_warning(tmp_path):
    path = save(cyclic_checkpoint(), tmp_path / "cyclic.pt")
    plain, thinking = (run_infer("-m", path, "--prompt", "ab", "-t", "0", "-s", "6", *flag) for flag in ([], ["--think"]))
    assert plain.returncode == thinking.returncode == 0, thinking.stderr
    assert "--think: only a Qwen3 model thinks" in thinking.stderr and "--think" not in plain.stderr
    assert thinking.stdout == plain.stdout


def test_non_causal_model_runs_as_seq2seq(tmp_path):
    tokenizer = Tokenizer.build([CYCLE])
    config = ModelConfig(block_size=8, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_kv_head=2,
                         n_embd=16, n_hidden=32, is_causal=False)
    torch.manual_seed(0)
    model = Transformer(config).eval()
    tokens = tokenizer.encode("hgfe")
    expected = tokenizer.decode(model(torch.tensor([tokens]))[0][0].argmax(-1).tolist())
    path = save(checkpoint_dict(model, tokenizer), tmp_path / "seq2seq.pt")
    result = run_infer("-m", path, "--prompt", "hgfe")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


def test_multi_turn_conversation_and_reset_through_a_pipe(tmp_path):
    path = save(sentiment_checkpoint(), tmp_path / "sft.pt")
    result = run_infer("-m", path, "-i", "-t", "0", "-r", "1", "--profile", stdin="好棒\n差烂\n/reset\n好棒\n")
    assert result.returncode == 0, result.stderr
    answers = [line for line in result.stdout.splitlines() if "面" in line]
    assert [a.split("> ")[-1] for a in answers] == ["正面", "负面", "正面"]
    assert "[conversation reset]" in result.stdout
    prefills = [int(line.split("prefill ")[1].split()[0]) for line in result.stderr.splitlines()
                if line.startswith("[profile]")]
    # <i>好棒<r> = 4 tokens; then that turn (4 + 正面 + <eos> = 7) + <i>差烂<r>; after /reset 4 again
    assert prefills == [4, 11, 4]


class TerminalReader:
    """Reads a pty's output; read_until consumes it up to and including what it waited for."""

    def __init__(self, fd):
        self.fd = fd
        self.pending = ""

    def read_until(self, wanted, timeout=30):
        deadline = time.monotonic() + timeout
        while wanted not in self.pending:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"timed out waiting for {wanted!r}; got {self.pending[-300:]!r}"
            if select.select([self.fd], [], [], remaining)[0]:
                self.pending += os.read(self.fd, 4096).decode("utf-8", errors="replace")
        end = self.pending.index(wanted) + len(wanted)
        consumed, self.pending = self.pending[:end], self.pending[end:]
        return consumed


def test_interactive_streams_and_ctrl_c_stops_only_the_answer(tmp_path):
    path = save(cyclic_checkpoint(), tmp_path / "cyclic.pt")
    controller, terminal = pty.openpty()
    process = subprocess.Popen([sys.executable, "infer.py", "-m", path, "-t", "0", "-r", "1", "-s", "1000000"],
                               stdin=terminal, stdout=terminal, stderr=terminal, start_new_session=True,
                               env=ONE_THREAD)
    os.close(terminal)
    terminal_output = TerminalReader(controller)
    try:
        terminal_output.read_until("> ")
        for _ in range(2):  # the session survives an interrupt and answers again
            os.write(controller, b"ab\n")
            # the answer never ends (a million tokens): seeing it grow proves it streams
            streamed = terminal_output.read_until("cdefghabcdefghab" * 4)
            assert "[stopped]" not in streamed
            process.send_signal(signal.SIGINT)
            terminal_output.read_until("[stopped]")
            terminal_output.read_until("> ")
            assert process.poll() is None
        os.write(controller, b"/quit\n")
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
        os.close(controller)


def test_a_missing_model_is_a_message_not_a_traceback():
    result = run_infer("-m", "no/such/model.pt", "--prompt", "ab")
    assert result.returncode == 1
    assert "no/such/model.pt' does not exist" in result.stderr and "Traceback" not in result.stderr


def test_help_documents_the_repetition_penalty_rule():
    result = run_infer("--help")
    assert "positive logit is divided by the penalty" in " ".join(result.stdout.split())

"""
Transformers on problems beyond language: the same model.py and train.py, trained from scratch on
synthetic tasks and scored by exact match on fresh random inputs with greedy decoding.

    python problem.py sort                       # generate the data, train, evaluate (under 10 minutes)
    python problem.py bool --max-time 120 --seed 7 --eval-size 20000
    python problem.py sort --eval-only checkpoint/problem-sort/latest.pt

The tasks, as the original Nano defines them:
  q           a number of up to 8 digits left-padded with "-" to 8 characters -> how many closed loops
              its digits have (0, 6, 9: one; 8: two), as one character of 0-9a-z. Causal.
  sort        8 digits -> the same digits sorted. Non-causal (seq2seq), rotary positions.
  palindrome  8 digits -> reversed. Non-causal (seq2seq), learned absolute positions.
  bool        a prefix boolean expression over 0/1 with + (or) and * (and), nested at most 4 deep,
              e.g. "(+ (* 0 1) (* 1 1)) =" -> "1". Causal.

Causal tasks are SFT datasets (train.py's "sft" kind): records <|instruct_mark|> question
<|response_mark|> answer <|eos|>, the loss on the answer and its eos only; they are decoded greedily.
Seq2seq tasks are "seq2seq" datasets: records <|bos|> question with the position-aligned targets
<|bos|> answer; they are decoded by the argmax at every position of one pass. The vocabulary is the
task's characters. Data go to dataset/problem-<task>/, checkpoints to checkpoint/problem-<task>/, and
each task's model and training settings are in config/problem-<task>.json.
"""

import argparse
import json
import os
import random
import sys
import time
from array import array
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

import checkpoint
import train as nano_train
from data import Dataset, dataset_files
from tokenizer import Tokenizer, BOS_ID, EOS_ID, INSTRUCT_ID, RESPONSE_ID

ROOT = os.path.dirname(os.path.abspath(__file__))
DIGITS = "0123456789"


# ----------------------------------------------------------------------------- the tasks

Q_LOOPS = {"0": 1, "6": 1, "9": 1, "8": 2}
Q_ANSWERS = "0123456789abcdefghijklmnopqrstuvwxyz"


def random_q_number(rng):
    """A number below 10^k for k uniform in 1..8, so that short, padded numbers are common too."""
    return str(rng.randrange(10 ** rng.randint(1, 8))).rjust(8, "-")


def q_answer(question):
    return Q_ANSWERS[sum(Q_LOOPS.get(c, 0) for c in question)]


def random_digits(rng):
    return f"{rng.randrange(10 ** 8):08d}"


BOOL_MAX_DEPTH = 4
BOOL_LEAF_PROBABILITY = 0.2


def random_expression(rng, depth=0):
    """A leaf with probability 0.2 (always at the depth limit), else (op A B) with + (or) or * (and)."""
    if depth == BOOL_MAX_DEPTH or rng.random() < BOOL_LEAF_PROBABILITY:
        return rng.choice("01")
    return f"({rng.choice('+*')} {random_expression(rng, depth + 1)} {random_expression(rng, depth + 1)})"


def full_expression(depth=0):
    """The longest expression: the full tree, an operator at every node above the depth limit."""
    if depth == BOOL_MAX_DEPTH:
        return "1"
    return f"(+ {full_expression(depth + 1)} {full_expression(depth + 1)})"


def bool_answer(question):
    """Prefix notation evaluates right to left with a stack: operands are pushed, an operator takes two."""
    stack = []
    for c in reversed(question):
        if c in "01":
            stack.append(c == "1")
        elif c in "+*":
            a, b = stack.pop(), stack.pop()
            stack.append(a or b if c == "+" else a and b)
    return "1" if stack.pop() else "0"


@dataclass
class Task:
    name: str
    seq2seq: bool                          # non-causal model, answer aligned with the question
    alphabet: str                          # every character of questions and answers
    longest_question: str                  # the question of the most tokens
    answer_length: int                     # tokens of the longest answer
    random_question: Callable[[random.Random], str]
    answer: Callable[[str], str]
    words: tuple = ()                      # multi-character tokens of the vocabulary

    def tokenizer(self):
        return Tokenizer.build([self.alphabet], words=self.words)

    def record_length(self):
        """Tokens of the longest record: <|bos|> question (seq2seq), or the SFT template around both."""
        question_length = len(self.tokenizer().encode(self.longest_question))
        if self.seq2seq:
            return 1 + question_length
        return 1 + question_length + 1 + self.answer_length + 1

    def block_size(self):
        # an SFT window of block_size + 1 tokens holds the longest record; a seq2seq record is one window
        return self.record_length() - (0 if self.seq2seq else 1)


TASKS = {task.name: task for task in (
    Task("q", False, "-" + Q_ANSWERS, "88888888", 1, random_q_number, q_answer),
    Task("sort", True, DIGITS, "00000000", 8, random_digits, lambda q: "".join(sorted(q))),
    Task("palindrome", True, DIGITS, "00000000", 8, random_digits, lambda q: q[::-1]),
    # every space follows one of + * 0 1 ): merged with it, an expression costs one token per other character
    Task("bool", False, "01+*() =", full_expression() + " =", 1, lambda rng: random_expression(rng) + " =",
         bool_answer, words=("+ ", "* ", "0 ", "1 ", ") ")),
)}


def task_rng(task, split, seed):
    """Separate, reproducible streams for train, val and eval (string seeds are stable across runs)."""
    return random.Random(f"problem-{task.name}-{split}-{seed}")


# ----------------------------------------------------------------------------- datasets

def write_dataset(task, directory, train_records, val_records, seed):
    """Random records in the dataset layout data.py writes, with the task's vocabulary beside them."""
    os.makedirs(directory, exist_ok=True)
    tokenizer = task.tokenizer()
    tokenizer.save(os.path.join(directory, "vocab.json"))
    counts = {}
    for split, records in (("train", train_records), ("val", val_records)):
        rng = task_rng(task, split, seed)
        questions = [task.random_question(rng) for _ in range(records)]
        arrays = seq2seq_arrays(task, tokenizer, questions) if task.seq2seq else sft_arrays(task, tokenizer, questions)
        for suffix, values in arrays.items():
            with open(os.path.join(directory, f"{split}{suffix}.bin"), "wb") as f:
                values.tofile(f)
        counts[split] = len(arrays[""])
    meta = {"kind": "seq2seq" if task.seq2seq else "sft", "dtype": "uint16", "tokenizer": "vocab.json",
            "vocab_size": tokenizer.vocab_size, "block_size": task.block_size(),
            "train_tokens": counts["train"], "val_tokens": counts["val"],
            "train_documents": train_records, "val_documents": val_records, "task": task.name, "seed": seed}
    if task.seq2seq:
        meta["record_length"] = task.record_length()
    with open(os.path.join(directory, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)


def sft_arrays(task, tokenizer, questions):
    """ids and loss mask of <|instruct_mark|> question <|response_mark|> answer <|eos|> records."""
    ids, mask = array("H"), array("B")
    for question in questions:
        answer = tokenizer.encode(task.answer(question)) + [EOS_ID]
        prompt = [INSTRUCT_ID] + tokenizer.encode(question) + [RESPONSE_ID]
        ids.extend(prompt + answer)
        mask.extend([0] * len(prompt) + [1] * len(answer))
    return {"": ids, "_mask": mask}


def seq2seq_arrays(task, tokenizer, questions):
    """Inputs <|bos|> question and position-aligned targets <|bos|> answer. <|bos|> opens a record as it
    opens every Nano document (train.py's end-of-run sample prompts from one)."""
    inputs, targets = array("H"), array("H")
    for question in questions:
        inputs.extend([BOS_ID] + tokenizer.encode(question))
        targets.extend([BOS_ID] + tokenizer.encode(task.answer(question)))
    return {"": inputs, "_target": targets}


def training_questions(directory):
    """The questions of a dataset's train split, read back from train.bin."""
    dataset = Dataset(directory)
    tokenizer = Tokenizer.load(dataset.tokenizer_path())
    train_split = dataset.splits["train"]
    ids = np.asarray(train_split.ids)
    if train_split.record_length:
        length = train_split.record_length
        spans = [(start + 1, start + length) for start in range(0, len(ids), length)]
    else:
        spans = zip(train_split.starts + 1, np.flatnonzero(ids == RESPONSE_ID))
    return {tokenizer.decode(ids[start:end].tolist()) for start, end in spans}


# ----------------------------------------------------------------------------- training

def train(task, settings, dataset_dir, out_dir, seed, max_iters=None, max_time=None):
    """Train on the dataset with the task's settings, in this process; returns the final checkpoint's path."""
    tokenizer = task.tokenizer()
    # the vocabulary is exactly the task's (export.py wants them equal); causality follows the task
    model_config = {**settings["model"], "block_size": task.block_size(), "vocab_size": tokenizer.vocab_size,
                    "is_causal": not task.seq2seq}
    train_config = {**settings["train"], "dataset_path": [dataset_dir], "save_checkpoint_to": out_dir,
                    "random_seed": seed}
    if max_iters is not None:
        train_config["max_iters"] = max_iters
        train_config["lr_decay_iters"] = max_iters
    if max_time is not None:
        train_config["max_time"] = max_time
    run_dir = nano_train.train(train_config, model_config)
    return os.path.join(run_dir, "latest.pt")


# ----------------------------------------------------------------------------- evaluation

def fresh_examples(task, count, seed, seen):
    """count (question, answer) pairs drawn from the eval stream, skipping questions in `seen` (the
    training questions); also returns how many were skipped."""
    rng = task_rng(task, "eval", seed)
    examples, skipped = [], 0
    while len(examples) < count:
        question = task.random_question(rng)
        if question in seen:
            skipped += 1
        else:
            examples.append((question, task.answer(question)))
    return examples, skipped


def accuracy(predict, examples):
    """Exact-match accuracy of predict(questions) -> answers, and the examples it got wrong."""
    predictions = predict([question for question, _ in examples])
    wrong = [(q, a, p) for (q, a), p in zip(examples, predictions) if p != a]
    return 1 - len(wrong) / len(examples), wrong


def model_predictor(model, tokenizer, task, batch_size=1000):
    """predict(questions) -> answers with the model: one argmax pass (seq2seq) or greedy decoding."""

    @torch.no_grad()
    def predict_seq2seq(questions):
        answers = []
        for start in range(0, len(questions), batch_size):
            ids = torch.tensor([[BOS_ID] + tokenizer.encode(q) for q in questions[start:start + batch_size]])
            logits, _ = model(ids)
            answers += [tokenizer.decode(row[1:]) for row in logits.argmax(-1).tolist()]
        return answers

    def predict_causal(questions):
        prompts = [[INSTRUCT_ID] + tokenizer.encode(q) + [RESPONSE_ID] for q in questions]
        # prompts of one length form a rectangular batch: no padding, so exactly what generate() computes
        by_length = defaultdict(list)
        for i, prompt in enumerate(prompts):
            by_length[len(prompt)].append(i)
        answers = [None] * len(questions)
        for indices in by_length.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start:start + batch_size]
                generated = greedy_decode(model, [prompts[i] for i in chunk], task.answer_length + 1)
                for i, ids in zip(chunk, generated):
                    answers[i] = tokenizer.decode(ids[:ids.index(EOS_ID)] if EOS_ID in ids else ids)
        return answers

    return predict_seq2seq if task.seq2seq else predict_causal


@torch.no_grad()
def greedy_decode(model, prompts, max_new_tokens):
    """Greedy continuations of equally long prompts; each step re-runs the (short) sequences."""
    ids = torch.tensor(prompts)
    for _ in range(max_new_tokens):
        logits, _ = model(ids)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[:, len(prompts[0]):].tolist()


def evaluate_checkpoint(task, checkpoint_path, eval_size, seed):
    """Exact match of a checkpoint on eval_size fresh inputs that its training data did not contain."""
    model, tokenizer = checkpoint.load_model(checkpoint_path)
    if tokenizer.to_dict() != task.tokenizer().to_dict():
        raise ValueError(f"{checkpoint_path} was not trained on task {task.name} (another vocabulary)")
    dataset_dir = dataset_files(checkpoint.train_config_of(checkpoint_path)["dataset_path"][0])[0]
    examples, skipped = fresh_examples(task, eval_size, seed, training_questions(dataset_dir))
    score, wrong = accuracy(model_predictor(model, tokenizer, task), examples)
    print(f"{task.name}: exact match {score:.2%} ({len(examples) - len(wrong)}/{len(examples)}) on fresh inputs; "
          f"{skipped} drawn inputs were in the training data and skipped")
    for question, answer, prediction in wrong[:5]:
        print(f"  wrong: {question!r} -> {prediction!r}, expected {answer!r}")
    return score


# ----------------------------------------------------------------------------- main

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("--eval-only", metavar="CKPT", help="evaluate this checkpoint, no data or training")
    parser.add_argument("--seed", type=int, default=1, help="seed of the data and the run (default 1)")
    parser.add_argument("--eval-size", type=int, default=10_000, help="fresh inputs to score (default 10000)")
    parser.add_argument("--max-time", type=float, help="seconds of training (default: the task's config)")
    parser.add_argument("--max-iters", type=int, help="training steps (default: the task's config)")
    parser.add_argument("--train-records", type=int, help="training examples to generate (default: the task's config)")
    parser.add_argument("--config", help="settings JSON (default config/problem-<task>.json)")
    parser.add_argument("--dataset", help="dataset directory (default dataset/problem-<task>)")
    parser.add_argument("--out", help="checkpoint directory (default checkpoint/problem-<task>)")
    args = parser.parse_args()
    task = TASKS[args.task]

    started = time.time()
    checkpoint_path = args.eval_only
    if checkpoint_path is None:
        with open(args.config or os.path.join(ROOT, "config", f"problem-{task.name}.json"), encoding="utf-8") as f:
            settings = json.load(f)
        dataset_dir = args.dataset or os.path.join("dataset", f"problem-{task.name}")
        out_dir = args.out or os.path.join("checkpoint", f"problem-{task.name}")
        write_dataset(task, dataset_dir, args.train_records or settings["train_records"], settings["val_records"],
                      args.seed)
        print(f"{task.name}: data in {dataset_dir} ({time.time() - started:.0f} s)")
        checkpoint_path = train(task, settings, dataset_dir, out_dir, args.seed, args.max_iters, args.max_time)
    evaluated = time.time()
    evaluate_checkpoint(task, checkpoint_path, args.eval_size, args.seed)
    print(f"{task.name}: evaluated in {time.time() - evaluated:.0f} s, {time.time() - started:.0f} s in all")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"problem.py: error: {e}")

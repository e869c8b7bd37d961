"""problem.py: the task generators against hand-checked answers, the datasets it writes, a few training
steps of every task through train.py, the evaluation code on hand-made predictors, batched greedy
decoding against model.generate, and a trained sort model giving the same outputs in the C engine."""

import json
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoint
import problem
from model import ModelConfig, Transformer
from tokenizer import BOS_ID, EOS_ID, INSTRUCT_ID, RESPONSE_ID

TASKS = problem.TASKS


# ----------------------------------------------------------------------------- generators

def test_q_counts_closed_loops():
    assert problem.q_answer("--114514") == "0"
    assert problem.q_answer("88888888") == "g"      # 16 loops
    assert problem.q_answer("---60918") == "5"      # 6, 0, 9: one each; 8: two
    rng = random.Random(0)
    numbers = [problem.random_q_number(rng) for _ in range(2000)]
    assert all(re.fullmatch(r"-*(0|[1-9][0-9]*)", n) and len(n) == 8 for n in numbers)
    assert {len(n.lstrip("-")) for n in numbers} == set(range(1, 9))


def test_sort_and_palindrome():
    assert TASKS["sort"].answer("11451411") == "11111445"
    assert TASKS["palindrome"].answer("12345678") == "87654321"
    assert re.fullmatch(r"[0-9]{8}", TASKS["sort"].random_question(random.Random(0)))


@pytest.mark.parametrize("expression, value", [
    ("(+ (* 0 1) (* 1 1)) =", "1"), ("(* (+ 0 1) 0) =", "0"), ("1 =", "1"), ("(+ 0 0) =", "0"),
    ("(* 1 (+ 0 (* 1 1))) =", "1"), ("(+ (* 1 0) (* 0 (+ 1 1))) =", "0")])
def test_bool_known_expressions(expression, value):
    assert problem.bool_answer(expression) == value


def reduce_innermost(expression):
    """An independent evaluator: rewrite innermost (op a b) groups until one value is left."""
    def value(m):
        a, b = int(m[2]), int(m[3])
        return str(a | b if m[1] == "+" else a & b)
    while "(" in expression:
        expression = re.sub(r"\(([+*]) ([01]) ([01])\)", value, expression)
    return expression.removesuffix(" =")


def nesting_depth(expression):
    depth = deepest = 0
    for c in expression:
        depth += {"(": 1, ")": -1}.get(c, 0)
        deepest = max(deepest, depth)
    return deepest


def test_bool_random_expressions_obey_the_depth_limit_and_evaluate_right():
    task, rng = TASKS["bool"], random.Random(0)
    questions = [task.random_question(rng) for _ in range(3000)]
    assert all(task.answer(q) == reduce_innermost(q) for q in questions)
    assert max(map(nesting_depth, questions)) == problem.BOOL_MAX_DEPTH
    leaves = sum(q in ("0 =", "1 =") for q in questions) / len(questions)
    assert 0.17 < leaves < 0.23                     # the root is a leaf with probability 0.2
    assert len(problem.full_expression()) == 91     # 15 operators "(op A B)" of 5 characters, 16 leaves
    assert len(set(task.answer(q) for q in questions)) == 2


def test_block_size_fits_the_longest_record():
    tokenizer = TASKS["bool"].tokenizer()
    longest = max(len(tokenizer.encode(TASKS["bool"].random_question(random.Random(i)))) for i in range(2000))
    # <|instruct_mark|> question <|response_mark|> answer <|eos|>: a window of block_size + 1 tokens
    assert longest + 4 <= TASKS["bool"].block_size() + 1 == 1 + 62 + 1 + 1 + 1
    assert TASKS["q"].block_size() == 11 and TASKS["sort"].block_size() == 9


# ----------------------------------------------------------------------------- datasets

@pytest.mark.parametrize("name", sorted(TASKS))
def test_written_dataset_holds_the_records(name, tmp_path):
    task = TASKS[name]
    problem.write_dataset(task, str(tmp_path), train_records=50, val_records=10, seed=3)
    meta = json.loads((tmp_path / "meta.json").read_text())
    tokenizer = task.tokenizer()
    ids = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    rng = problem.task_rng(task, "train", 3)
    questions = [task.random_question(rng) for _ in range(50)]
    assert problem.training_questions(str(tmp_path)) == set(questions)
    if task.seq2seq:
        assert meta["kind"] == "seq2seq" and meta["record_length"] == task.record_length()
        targets = np.fromfile(tmp_path / "train_target.bin", dtype=np.uint16)
        first = slice(1, task.record_length())
        assert tokenizer.decode(ids[first].tolist()) == questions[0]
        assert tokenizer.decode(targets[first].tolist()) == task.answer(questions[0])
    else:
        assert meta["kind"] == "sft"
        mask = np.fromfile(tmp_path / "train_mask.bin", dtype=np.uint8)
        end = int(np.flatnonzero(ids == EOS_ID)[0]) + 1
        record, record_mask = ids[:end].tolist(), mask[:end].tolist()
        answer = tokenizer.encode(task.answer(questions[0])) + [EOS_ID]
        assert record == [INSTRUCT_ID] + tokenizer.encode(questions[0]) + [RESPONSE_ID] + answer
        assert record_mask == [0] * (len(record) - len(answer)) + [1] * len(answer)
        assert len(mask) == len(ids) == meta["train_tokens"]


# ----------------------------------------------------------------------------- evaluation

def test_accuracy_of_hand_made_predictors():
    task = TASKS["bool"]
    examples, _ = problem.fresh_examples(task, 1000, seed=0, seen=set())
    perfect = lambda questions: [task.answer(q) for q in questions]
    half_wrong = lambda questions: [task.answer(q) if i % 2 == 0 else "x" for i, q in enumerate(questions)]
    assert problem.accuracy(perfect, examples) == (1.0, [])
    score, wrong = problem.accuracy(half_wrong, examples)
    assert score == 0.5 and len(wrong) == 500 and wrong[0] == (examples[1][0], examples[1][1], "x")


def test_fresh_examples_skip_training_questions():
    task = TASKS["sort"]
    first, skipped = problem.fresh_examples(task, 100, seed=0, seen=set())
    assert skipped == 0
    seen = {q for q, _ in first}
    again, skipped = problem.fresh_examples(task, 100, seed=0, seen=seen)
    assert skipped >= 100 and not seen & {q for q, _ in again}


def tiny_model(task):
    torch.manual_seed(0)
    config = ModelConfig(block_size=task.block_size(), vocab_size=task.tokenizer().vocab_size, n_layer=2,
                         n_head=2, n_kv_head=2, n_embd=32, n_hidden=64, is_causal=not task.seq2seq)
    return Transformer(config).eval()


@pytest.mark.parametrize("name", ["q", "bool"])
def test_batched_greedy_decoding_matches_generate(name):
    task = TASKS[name]
    model, tokenizer = tiny_model(task), task.tokenizer()
    questions = [task.random_question(random.Random(i)) for i in range(30)]
    predicted = problem.model_predictor(model, tokenizer, task, batch_size=7)(questions)
    for question, answer in zip(questions, predicted):
        prompt = [INSTRUCT_ID] + tokenizer.encode(question) + [RESPONSE_ID]
        generated = list(model.generate(prompt, task.answer_length + 1, stop_ids=(EOS_ID,)))
        assert answer == tokenizer.decode([i for i in generated if i != EOS_ID])


# ----------------------------------------------------------------------------- training through train.py

def run_problem(name, tmp_path, *flags):
    command = [sys.executable, "problem.py", name, "--dataset", str(tmp_path / "data"), "--out",
               str(tmp_path / "run"), "--train-records", "2000", "--eval-size", "200", *flags]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def sort_run(tmp_path_factory):
    """A sort model trained for 150 steps: enough for confident outputs (the C test compares argmaxes)."""
    root = tmp_path_factory.mktemp("sort")
    return root, run_problem("sort", root, "--max-iters", "150")


@pytest.mark.parametrize("name", ["q", "palindrome", "bool"])
def test_a_few_training_steps(name, tmp_path):
    stdout = run_problem(name, tmp_path, "--max-iters", "3")
    assert re.search(rf"{name}: exact match \d+\.\d\d% \(\d+/200\)", stdout)
    saved = checkpoint.load(str(tmp_path / "run" / "latest.pt"))
    assert saved["step"] == 3 and saved["model_config"]["is_causal"] == (name != "palindrome")


def test_sort_trains_and_evaluates_again(sort_run):
    root, stdout = sort_run
    assert re.search(r"sort: exact match \d+\.\d\d% \(\d+/200\)", stdout)
    again = subprocess.run([sys.executable, "problem.py", "sort", "--eval-only", str(root / "run" / "latest.pt"),
                            "--eval-size", "200"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert re.search(r"exact match .*", stdout)[0] == re.search(r"exact match .*", again.stdout)[0]


def test_sort_model_gives_the_same_outputs_in_the_c_engine(sort_run, tmp_path):
    root, _ = sort_run
    subprocess.run(["make", "-s", "-C", "infer_c", "infer"], check=True, capture_output=True, timeout=120)
    model_bin = str(tmp_path / "sort.bin")
    subprocess.run([sys.executable, "export.py", model_bin, "--checkpoint", str(root / "run" / "latest.pt")],
                   check=True, capture_output=True, timeout=60)
    model, tokenizer = checkpoint.load_full_model(str(root / "run" / "latest.pt"))
    questions = [TASKS["sort"].random_question(random.Random(i)) for i in range(20)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for question in questions:
        c_run = subprocess.run(["infer_c/infer", model_bin, "--seq2seq", "--print-ids", "-g", f"<|bos|>{question}"],
                               capture_output=True, text=True, timeout=30, env=env, check=True)
        with torch.no_grad():
            logits, _ = model(torch.tensor([[BOS_ID] + tokenizer.encode(question)]))
        assert list(map(int, c_run.stdout.split())) == logits[0].argmax(-1).tolist()

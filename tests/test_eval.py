"""eval.py on tiny trained models (see test_infer.py) and hand-made files whose answers are known."""

import json
import subprocess
import sys

import numpy as np
import pytest

import eval as nano_eval
import checkpoint
from test_infer import CYCLE, ONE_THREAD, cyclic_checkpoint, save, sentiment_checkpoint, sentiment_records
from tokenizer import Tokenizer, EOS_ID, INSTRUCT_ID, RESPONSE_ID


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def write_jsonl(path, records):
    return write_lines(path, [json.dumps(r, ensure_ascii=False) for r in records])


@pytest.fixture
def cyclic(tmp_path):
    return checkpoint.load_model(save(cyclic_checkpoint(), tmp_path / "cyclic.pt"))


@pytest.fixture
def sentiment(tmp_path):
    return checkpoint.load_model(save(sentiment_checkpoint(), tmp_path / "sft.pt"))


def test_text_windows_score_every_target_once():
    ids = list(range(100))  # each id is its own position
    scored = []
    for window, first_scored in nano_eval.text_windows(ids, block_size=32):
        assert len(window) <= 33  # at most block_size inputs
        assert first_scored >= min(window[first_scored], 16)  # half a context of history, once there is one
        scored += window[first_scored:]
    assert scored == list(range(1, 100))


def test_perplexity_and_bits_per_character(cyclic, tmp_path):
    model, tokenizer = cyclic
    lines = [CYCLE * 3, CYCLE * 12 + "abc"]  # the second line is longer than the 32-token context
    learned = nano_eval.evaluate_text(model, tokenizer, write_lines(tmp_path / "cycle.txt", lines))
    assert learned["characters"] == 25 + 100
    assert learned["tokens"] == 25 + 100  # every character and each <|eos|>, never a <|bos|>
    # the <|eos|> after a never-ending cycle is the only surprise: about log2(V) bits per line
    assert learned["bits_per_character"] < 0.5
    scrambled = nano_eval.evaluate_text(model, tokenizer, write_lines(tmp_path / "scrambled.txt", ["hgfedcba" * 3]))
    assert scrambled["perplexity"] > 10 * learned["perplexity"]


def test_choice_scorer_picks_the_continuation_the_model_learned(cyclic, tmp_path):
    model, tokenizer = cyclic
    records = [{"question": "ab", "choices": ["dc", "cd", "ca"], "answer": 1},
               {"question": "abcdef", "choices": ["gh", "hg"], "answer": 0},
               {"question": "efg", "choices": ["ha", "hh", "ab"], "answer": 2}]  # labelled wrong on purpose
    result = nano_eval.evaluate_choices(model, tokenizer, write_jsonl(tmp_path / "mc.jsonl", records))
    assert result == {"n": 3, "accuracy": 2 / 3, "accuracy_length_normalised": 2 / 3}


def test_qa_exact_match_and_contains(sentiment, tmp_path):
    model, tokenizer = sentiment
    records = [{"question": "好棒赞", "answer": "正面"},   # exact
               {"question": "差烂", "answer": "负"},       # contained only
               {"question": "好好", "answer": "负面"}]     # wrong
    result = nano_eval.evaluate_qa(model, tokenizer, write_jsonl(tmp_path / "qa.jsonl", records))
    assert result == {"n": 3, "exact_match": 1 / 3, "contains": 2 / 3}


def write_sentiment_dataset(folder, kind):
    """A dataset folder as data.py writes it: SFT train.bin + meta.json, and test.jsonl."""
    folder.mkdir()
    tokenizer = Tokenizer.from_dict(sentiment_checkpoint()["tokenizer"])
    ids = []
    for review, label in sentiment_records(40, seed=2):
        ids += [INSTRUCT_ID] + tokenizer.encode(review) + [RESPONSE_ID] + tokenizer.encode(label) + [EOS_ID]
    np.array(ids, dtype=np.uint16).tofile(folder / "train.bin")
    (folder / "meta.json").write_text(json.dumps({"kind": kind, "dtype": "uint16"}))
    test = [{"question": review, "answer": label} for review, label in sentiment_records(30, seed=3)]
    return write_jsonl(folder / "test.jsonl", test), test


def test_few_shot_examples_come_from_the_training_split(tmp_path):
    test_path, test = write_sentiment_dataset(tmp_path / "sentiment", "sft")
    tokenizer = Tokenizer.from_dict(sentiment_checkpoint()["tokenizer"])
    examples = nano_eval.few_shot_examples(tokenizer, str(tmp_path / "sentiment"), 4)
    assert [label for _, label in examples] == ["正面", "负面", "正面", "负面"]
    training = dict((review, label) for review, label in sentiment_records(40, seed=2))
    assert all(training[review] == label and 4 <= len(review) <= 24 for review, label in examples)


@pytest.mark.parametrize("kind, method", [("sft", "instruct"), ("pretrain", "prompted")])
def test_sentiment_command_line_picks_the_method_from_the_run(tmp_path, kind, method):
    test_path, test = write_sentiment_dataset(tmp_path / "sentiment", kind)
    checkpoint = sentiment_checkpoint()
    model_path = save(checkpoint, tmp_path / "model.pt",
                      train_config={"dataset_path": [str(tmp_path / "sentiment")], "use_lora": False})
    result = subprocess.run([sys.executable, "eval.py", "-m", model_path, "--sentiment", test_path,
                             "--few-shot", "2", "--json"], capture_output=True, text=True, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    sentiment = json.loads(result.stdout)["sentiment"]
    positives = sum(r["answer"] == "正面" for r in test) / len(test)
    assert sentiment["method"] == method
    assert sentiment["few_shot"] == (2 if method == "prompted" else 0)
    assert sentiment["majority_baseline"] == pytest.approx(max(positives, 1 - positives))
    assert sentiment["accuracy"] == 1.0 and sentiment["strict_accuracy"] == 1.0
    assert ("uncalibrated_accuracy" in sentiment) == (method == "prompted")


def test_calibration_divides_out_the_prompts_bias():
    """Both reviews favour label 0, but the content-free inputs favour it more than the second review does:
    calibrated, the second review is label 1 (Zhao et al. 2021, eq. 1 with W = diag(p_cf)^-1, b = 0)."""
    reviews, content_free = [[3.0, 0.0], [1.0, 0.0]], [[2.0, 0.0], [2.5, 0.0], [1.5, 0.0]]
    assert nano_eval.calibrated_choices(reviews, content_free) == [0, 1]
    assert nano_eval.calibrated_choices(reviews, [[0.0, 0.0]]) == [0, 0]  # an unbiased prompt changes nothing
    # p(label 0) of the second review, 0.731, falls below p_cf(0) = mean softmax = 0.878, p(1) 0.269 above 0.122
    p_cf = np.mean([1 / (1 + np.exp(-d)) for d in (2.0, 2.5, 1.5)])
    assert 0.731 / p_cf < 0.269 / (1 - p_cf)


def test_sentiment_cuts_long_reviews_and_prints_a_table(tmp_path):
    test_path, _ = write_sentiment_dataset(tmp_path / "sentiment", "sft")
    long_review = [{"question": "差" * 200 + "好棒赞好", "answer": "正面"}]  # the end of a review decides
    write_jsonl(tmp_path / "long.jsonl", long_review)
    model_path = save(sentiment_checkpoint(), tmp_path / "model.pt")
    result = subprocess.run([sys.executable, "eval.py", "-m", model_path, "--sentiment", str(tmp_path / "long.jsonl"),
                             "--qa", test_path], capture_output=True, text=True, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    assert "| sentiment | accuracy | 1.0000 |" in result.stdout
    assert "| qa | exact_match | 1.0000 |" in result.stdout

"""The sentiment baselines in bench/bench_sentiment.py learn what they should on a toy task."""

import json

import pytest
import torch

from bench.bench_sentiment import TfidfFeatures, char_ngrams, logistic_regression, measured_row, naive_bayes

TRAIN = [("很好很满意", "正面"), ("质量好", "正面"), ("满意，好用", "正面"), ("物流快，好", "正面"),
         ("很差很失望", "负面"), ("质量差", "负面"), ("失望，难用", "负面"), ("物流慢，差", "负面")]
HELD_OUT = [("好，满意", "正面"), ("差，失望", "负面")]


def test_char_ngrams_lists_every_ngram_up_to_the_longest():
    assert char_ngrams("abc", 2) == ["a", "b", "c", "ab", "bc"]


def test_naive_bayes_classifies_unseen_texts_by_their_characters():
    assert naive_bayes(TRAIN, [text for text, _ in HELD_OUT]) == [label for _, label in HELD_OUT]


def test_tfidf_rows_are_unit_length_and_unseen_ngrams_dropped():
    features = TfidfFeatures([text for text, _ in TRAIN], 3)
    rows = features.transform(["很好", "没见过的字"]).to_dense()
    assert torch.allclose(rows[0].norm(), torch.tensor(1.0))
    assert rows[1].abs().sum() == 0


def test_logistic_regression_separates_the_toy_task():
    features = TfidfFeatures([text for text, _ in TRAIN], 2)
    targets = torch.tensor([float(label == "正面") for _, label in TRAIN])
    weights, bias = logistic_regression(features.transform([text for text, _ in TRAIN]), targets, 1e-3)
    scores = torch.sparse.mm(features.transform([text for text, _ in HELD_OUT]), weights).squeeze(1) + bias
    assert scores[0] > 0 > scores[1]


def test_a_measured_model_row_is_read_from_eval_json(tmp_path):
    good, bad = tmp_path / "sft.json", tmp_path / "bad.json"
    good.write_text(json.dumps({"sentiment": {"n": 3, "accuracy": 0.875}}))
    bad.write_text(json.dumps({"text": {}}))
    assert measured_row(f"SFT={good}") == ("SFT", 0.875)
    with pytest.raises(ValueError, match="not the output of eval.py --sentiment --json"):
        measured_row(f"x={bad}")
    with pytest.raises(ValueError, match="--beside expects NAME=FILE"):
        measured_row(str(good))

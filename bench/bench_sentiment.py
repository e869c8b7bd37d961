"""
Classical baselines for the built-in sentiment task, on the same train / val / test split as `python
data.py`: what accuracy a model that reads no context beyond character n-grams reaches, to put the main
job's SFT figure in proportion.

    python bench/bench_sentiment.py [--ngram 3] [--beside SFT=checkpoint/sft/sentiment.json ...]

- majority: the most frequent training label.
- naive Bayes: multinomial over character uni- and bigram counts, add-one smoothing.
- logistic regression: character 1..N-gram TF-IDF (sublinear tf, L2-normalised rows), L2 penalty; the
  penalty is chosen on validation, the chosen one's test accuracy is the figure to compare.

--beside NAME=FILE adds a row for a model measured by `eval.py --sentiment --json > FILE` on the same
test split (the main job's SFT and LoRA models), so that they are read side by side.
Prints a markdown table and writes bench/results/bench_sentiment.json.
"""

import argparse
import json
import math
import os
import sys
import time
from collections import Counter

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
from bench.common import machine_info, write_results  # noqa: E402

PENALTIES = (1e-6, 3e-6, 1e-5, 3e-5, 1e-4)


def char_ngrams(text, n_max):
    return [text[i:i + n] for n in range(1, n_max + 1) for i in range(len(text) - n + 1)]


def accuracy(predicted, labels):
    return sum(p == y for p, y in zip(predicted, labels)) / len(labels)


def naive_bayes(train, texts):
    """Labels for texts from a multinomial naive Bayes over character uni- and bigrams of train."""
    counts = {label: Counter() for _, label in train}
    for text, label in train:
        counts[label].update(char_ngrams(text, 2))
    vocabulary = set().union(*counts.values())
    priors = Counter(label for _, label in train)

    def log_likelihoods(label):
        total = sum(counts[label].values()) + len(vocabulary)
        return {gram: math.log((counts[label][gram] + 1) / total) for gram in vocabulary}, math.log(1 / total)

    tables = {label: log_likelihoods(label) for label in counts}

    def score(grams, label):
        table, unseen = tables[label]
        return math.log(priors[label]) + sum(table.get(gram, unseen) for gram in grams)

    return [max(counts, key=lambda label: score(grams, label)) for grams in (char_ngrams(t, 2) for t in texts)]


class TfidfFeatures:
    """Character 1..n_max-gram TF-IDF fitted on the training texts; unseen n-grams are dropped."""

    def __init__(self, texts, n_max):
        self.n_max = n_max
        document_frequency = Counter(gram for text in texts for gram in set(char_ngrams(text, n_max)))
        self.index = {gram: i for i, gram in enumerate(document_frequency)}
        n = len(texts)
        self.idf = torch.tensor([math.log((1 + n) / (1 + df)) + 1 for df in document_frequency.values()])

    def transform(self, texts):
        rows, columns, values = [], [], []
        for row, text in enumerate(texts):
            for gram, tf in Counter(char_ngrams(text, self.n_max)).items():
                if (column := self.index.get(gram)) is not None:
                    rows.append(row)
                    columns.append(column)
                    values.append(1 + math.log(tf))
        values = torch.tensor(values) * self.idf[columns]
        norms = torch.zeros(len(texts)).index_add_(0, torch.tensor(rows), values ** 2).sqrt()
        values = values / norms[rows].clamp_min(1e-12)
        return torch.sparse_coo_tensor(torch.tensor([rows, columns]), values, (len(texts), len(self.index)),
                                       check_invariants=True).coalesce()


def logistic_regression(features, targets, penalty):
    """(weights, bias) minimising the mean logistic loss + penalty / 2 * |weights|^2, by L-BFGS."""
    weights = torch.zeros(features.shape[1], 1, requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights, bias], max_iter=2000, tolerance_grad=1e-7,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        logits = torch.sparse.mm(features, weights).squeeze(1) + bias
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
        loss = loss + penalty / 2 * weights.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weights.detach(), bias.detach()


def measured_row(text):
    """(name, test accuracy) from NAME=FILE, FILE the JSON eval.py --sentiment --json prints."""
    name, sep, path = text.partition("=")
    if not sep:
        raise ValueError(f"--beside expects NAME=FILE, got {text!r}")
    with open(path, encoding="utf-8") as f:
        try:
            return name, json.load(f)["sentiment"]["accuracy"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}: not the output of eval.py --sentiment --json") from None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--ngram", type=int, default=3, help="longest character n-gram for logistic regression")
    parser.add_argument("--seed", type=int, default=1337, help="the split's seed (data.py's --seed)")
    parser.add_argument("--beside", action="append", default=[], metavar="NAME=FILE",
                        help="a model's test accuracy from eval.py --sentiment --json, as a row of the table")
    args = parser.parse_args()
    try:
        measured = [measured_row(text) for text in args.beside]
    except (ValueError, OSError) as e:
        parser.error(str(e))

    start = time.perf_counter()
    train, val, test = data.split_reviews(data.read_reviews(), args.seed)
    texts = {name: [text for text, _ in s] for name, s in (("train", train), ("val", val), ("test", test))}
    truth = {name: [label for _, label in s] for name, s in (("train", train), ("val", val), ("test", test))}

    def accuracies(predict):
        """Validation and test accuracy of predict(split name) -> labels."""
        return {name: accuracy(predict(name), truth[name]) for name in ("val", "test")}

    labels = sorted(set(truth["train"]))
    majority = Counter(truth["train"]).most_common(1)[0][0]
    rows = [(f"majority ({majority})", accuracies(lambda name: [majority] * len(truth[name]))),
            ("naive Bayes, char 1-2-grams", accuracies(lambda name: naive_bayes(train, texts[name])))]

    tfidf = TfidfFeatures(texts["train"], args.ngram)
    features = {name: tfidf.transform(split_texts) for name, split_texts in texts.items()}
    targets = torch.tensor([float(label == labels[1]) for label in truth["train"]])
    sweep = []
    for penalty in PENALTIES:
        weights, bias = logistic_regression(features["train"], targets, penalty)

        def predict(name):
            positive = (torch.sparse.mm(features[name], weights).squeeze(1) + bias) > 0
            return [labels[int(p)] for p in positive]

        scores = accuracies(predict)
        sweep.append((penalty, scores))
        rows.append((f"logistic regression, char 1-{args.ngram}-gram TF-IDF, L2 {penalty:g}", scores))
    chosen_penalty, chosen = max(sweep, key=lambda item: item[1]["val"])

    print(f"{len(train):,} / {len(val):,} / {len(test):,} reviews (train / val / test), "
          f"{len(tfidf.index):,} n-gram features, {time.perf_counter() - start:.0f} s\n")
    print("| model | val accuracy | test accuracy |")
    print("|---|---:|---:|")
    for name, scores in rows:
        print(f"| {name} | {scores['val']:.1%} | {scores['test']:.1%} |")
    for name, test_accuracy in measured:
        print(f"| {name} | | {test_accuracy:.1%} |")
    print(f"\nchosen on validation: L2 {chosen_penalty:g}, test accuracy {chosen['test']:.1%}")
    write_results("bench_sentiment", {
        "machine": machine_info(), "ngram": args.ngram, "features": len(tfidf.index),
        "rows": [{"model": name, **scores} for name, scores in rows],
        "chosen_penalty": chosen_penalty, "chosen": chosen})


if __name__ == "__main__":
    main()

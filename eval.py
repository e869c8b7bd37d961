"""
Measure a Nano model (.pt checkpoint or exported .bin, optionally with a LoRA adapter).

    python eval.py -m checkpoint/base/best.pt --text held_out.txt        # perplexity, bits/char
    python eval.py -m MODEL --choices mc.jsonl                           # multiple choice
    python eval.py -m checkpoint/sft/best.pt --qa qa.jsonl               # SFT QA, greedy
    python eval.py -m checkpoint/sft/best.pt --sentiment                 # built-in task
    python eval.py -m MODEL --text a.txt --sentiment --json              # several, for machines

How each task is scored:
- text: every non-empty line is a document `<|bos|>line<|eos|>`, as in pretraining. Every token after
  the <|bos|> is predicted (the <|eos|> stands for the line break); a document longer than the
  context is read in windows that overlap by half, so each token sees at least half a context of
  history. Perplexity is per token; bits per character divide the same total by the characters
  (line breaks counted).
- choices: JSONL {"question", "choices": [...], "answer": index}. Each choice is scored by its
  log-likelihood after `<|bos|>question` (or the instruct template with --instruct); accuracy of the
  highest raw sum, and of the highest sum divided by the choice's length in characters.
- qa: SFT JSONL {"question", "answer"}: greedy answer in the instruct template; exact match (after
  stripping spaces) and "contains" (the reference answer appears in the output).
- sentiment: dataset/sentiment/test.jsonl, labels 正面 / 负面, next to the majority-class baseline.
  One forward pass per batch of reviews: the label whose first token has the higher logit at the
  answer position wins (what greedy decoding picks between the two labels); "strict" counts a review
  right only if the unrestricted argmax is that token. Reviews are cut from the left to fit the
  context. Two ways to ask:
    instruct  `<|instruct_mark|>review<|response_mark|>` (default for SFT and LoRA runs);
    prompted  K (--few-shot, default 4) reviews of 4-24 characters from the task's training split
              (train.bin next to the test file: the first found, labels alternating), each
              `<|bos|>review。情感：label<|eos|>`, then `<|bos|>review。情感：`; examples are dropped
              while they leave less than a quarter of the context for the review. The default for
              pretraining runs (the train_config's dataset_path leads to a meta.json of kind
              "pretrain"). The shared examples are prefilled once into a KV cache that every batch
              reuses. A base model's prompt favours one label whatever the review says, so its
              accuracy is contextually calibrated (Zhao et al. 2021, "Calibrate Before Use"): each
              review's two label probabilities are divided by their mean over content-free reviews
              ("N/A", "", "[MASK]") in the same prompt; uncalibrated_accuracy is the raw comparison.
Qwen files (export.py --hf) use their own framing: documents and choice questions open with
<|endoftext|> (Qwen's document separator; it has no BOS) and documents end with it, --instruct and qa
use the ChatML template of infer.py. The sentiment task is Nano's (its prompts are Nano's special tokens).
"""

import argparse
import json
import math
import os
from collections import Counter

import numpy as np
import torch
from tqdm import tqdm

import checkpoint
import infer
from data import Split, dataset_files, read_meta
from tokenizer import BOS_ID, EOS_ID, INSTRUCT_ID, RESPONSE_ID, PAD_ID, UNK_ID, Tokenizer
from model import KVCache

SENTIMENT_LABELS = ("正面", "负面")
PROMPTED_SUFFIX = "。情感："
CONTENT_FREE_REVIEWS = ("N/A", "", "[MASK]")  # what the prompted method calibrates on
BATCH_TOKENS = 4096  # tokens per forward pass: bounds the [batch, time, vocab] logits in memory
BATCH_LOGITS = BATCH_TOKENS * 16384  # and at most this many logits (Qwen's 151936-token vocabulary: 441 tokens)
BATCH_ROWS = 64  # sequences per forward pass: bounds the KV cache, allocated for the whole context


def read_jsonl(path, keys):
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid JSON ({e})") from None
            missing = [k for k in keys if k not in record]
            if missing:
                raise ValueError(f"{path}:{number}: missing key(s) {', '.join(missing)}")
            records.append(record)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def batches_by_length(sequences, max_tokens=BATCH_TOKENS, max_rows=BATCH_ROWS):
    """Indices of sequences grouped into batches of similar length, each at most max_tokens padded."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    batch = []
    for i in order:
        if batch and ((len(batch) + 1) * len(sequences[i]) > max_tokens or len(batch) == max_rows):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def right_padded(sequences, device):
    """Right padding leaves a causal model's logits at the real positions unchanged."""
    width = max(map(len, sequences))
    return torch.tensor([s + [PAD_ID] * (width - len(s)) for s in sequences], device=device)


def encode_all(tokenizer, texts, source):
    """Token ids of each text, with one warning for all characters outside the vocabulary."""
    encoded = [tokenizer.encode(text) for text in texts]
    if not isinstance(tokenizer, Tokenizer):   # a BPE vocabulary covers every byte: id 1 is a token like others
        return encoded
    unknown = sum(ids.count(UNK_ID) for ids in encoded)
    if unknown:
        infer.warn(f"{source}: {unknown} character(s) not in the vocabulary are scored as <|unknown|>")
    return encoded


def progress(batches, description):
    """A progress bar on a terminal's stderr, nothing elsewhere."""
    return tqdm(list(batches), desc=description, unit="batch", leave=False, disable=None)


def model_device(model):
    return model.tok_embeddings.weight.device


# ---------------------------------------------------------------- log-likelihood

@torch.no_grad()
def scored_log_likelihoods(model, sequences, score_from):
    """For each sequence (at most block_size + 1 ids), the sum of log p(token | tokens before it) over
    the tokens at positions >= its score_from (which must be >= 1)."""
    totals = [0.0] * len(sequences)
    max_tokens = max(1, min(BATCH_TOKENS, BATCH_LOGITS // model.config.vocab_size))
    for batch in progress(batches_by_length(sequences, max_tokens), "scoring"):
        tokens = right_padded([sequences[i] for i in batch], model_device(model))
        logits, _ = model(tokens[:, :-1])
        targets = tokens[:, 1:]
        log_probs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
        positions = torch.arange(1, tokens.size(1), device=tokens.device)
        for row, i in enumerate(batch):
            scored = (positions >= score_from[i]) & (positions < len(sequences[i]))
            totals[i] = float(log_probs[row][scored].sum())
    return totals


def text_windows(ids, block_size):
    """Cover targets 1..len(ids)-1 with windows of at most block_size inputs that start half a
    context back: (window ids, first scored position inside the window)."""
    stride = max(1, block_size // 2)
    windows = []
    for first_target in range(1, len(ids), stride):
        last_target = min(first_target + stride, len(ids)) - 1
        start = max(0, last_target - block_size)
        windows.append((ids[start:last_target + 1], first_target - start))
    return windows


def evaluate_text(model, tokenizer, path):
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    if not lines:
        raise ValueError(f"{path}: no text")
    template = infer.prompt_template(model.config, tokenizer)
    windows = []
    for ids in encode_all(tokenizer, lines, path):
        windows += text_windows(template.document_start + ids + template.document_end, infer.context_of(model.config))
    nll = -sum(scored_log_likelihoods(model, [w for w, _ in windows], [s for _, s in windows]))
    predicted_tokens = sum(len(w) - s for w, s in windows)
    characters = sum(len(line) + 1 for line in lines)
    return {"tokens": predicted_tokens, "characters": characters,
            "perplexity": math.exp(nll / predicted_tokens),
            "bits_per_character": nll / math.log(2) / characters}


# ---------------------------------------------------------------- multiple choice

def evaluate_choices(model, tokenizer, path, instruct=False):
    records = read_jsonl(path, ("question", "choices", "answer"))
    questions = encode_all(tokenizer, [r["question"] for r in records], path)
    choices = iter(encode_all(tokenizer, [c for r in records for c in r["choices"]], path))
    template = infer.prompt_template(model.config, tokenizer)
    block = infer.context_of(model.config)
    sequences, score_from = [], []
    for number, (record, question) in enumerate(zip(records, questions), 1):
        context = template.wrap_question(record["question"], question) if instruct else \
            template.document_start + question
        for _ in record["choices"]:
            continuation = next(choices)
            room = block - len(continuation)
            if room < 1:
                raise ValueError(f"{path}: record {number} has a choice longer than the context")
            kept = context[-room:]  # a long question loses its beginning
            sequences.append(kept + continuation)
            score_from.append(len(kept))
    scores = iter(scored_log_likelihoods(model, sequences, score_from))
    correct = correct_normalised = 0
    for record in records:
        raw = [next(scores) for _ in record["choices"]]
        normalised = [score / max(1, len(choice)) for score, choice in zip(raw, record["choices"])]
        correct += raw.index(max(raw)) == record["answer"]
        correct_normalised += normalised.index(max(normalised)) == record["answer"]
    return {"n": len(records), "accuracy": correct / len(records),
            "accuracy_length_normalised": correct_normalised / len(records)}


# ---------------------------------------------------------------- QA

def evaluate_qa(model, tokenizer, path):
    records = read_jsonl(path, ("question", "answer"))
    greedy = infer.make_sampler(temperature=0, repetition_penalty=1.0)
    template = infer.prompt_template(model.config, tokenizer)
    block = infer.context_of(model.config)
    exact = contains = 0
    for record in records:
        expected = str(record["answer"]).strip()
        prompt = infer.keep_last_tokens(template.question(record["question"]), block - 1)
        max_new = len(tokenizer.encode(expected)) + 16
        new_ids = list(model.generate(prompt, max_new, sample=greedy, stop_ids=template.stop_ids))
        output = tokenizer.decode([t for t in new_ids if t not in template.stop_ids]).strip()
        exact += output == expected
        contains += expected in output
    return {"n": len(records), "exact_match": exact / len(records), "contains": contains / len(records)}


# ---------------------------------------------------------------- sentiment

def training_mode(model_path, lora_path):
    """'pretrain', 'sft' or 'lora' as the checkpoint's training run says, None when it cannot tell."""
    if lora_path:
        return "lora"
    if not model_path.endswith(".pt"):
        return None
    saved = checkpoint.load(model_path)
    train_config = saved.get("train_config") or {}
    if "lora" in saved or train_config.get("use_lora"):
        return "lora"
    for entry in train_config.get("dataset_path") or []:
        directory = dataset_files(entry)[0]
        if os.path.exists(os.path.join(directory, "meta.json")):
            return read_meta(directory).get("kind")
    return None


def few_shot_examples(tokenizer, dataset_dir, count, min_chars=4, max_chars=24):
    """count (review, label) pairs of 4..24 characters from the task's training split
    (dataset_dir/train.bin), labels alternating, in file order: never the test reviews."""
    if count == 0:
        return []
    ids = Split(os.path.join(dataset_dir, "train.bin"), read_meta(dataset_dir)["dtype"], with_mask=False).ids
    by_label = {label: [] for label in SENTIMENT_LABELS}
    for start in np.flatnonzero(ids == INSTRUCT_ID):
        record = ids[start:start + 4 * max_chars].tolist()
        if RESPONSE_ID not in record or EOS_ID not in record:
            continue
        response, end = record.index(RESPONSE_ID), record.index(EOS_ID)
        review, label = tokenizer.decode(record[1:response]), tokenizer.decode(record[response + 1:end])
        if label in by_label and min_chars <= len(review) <= max_chars and len(by_label[label]) < count:
            by_label[label].append((review, label))
        if all(len(examples) >= count for examples in by_label.values()):
            break
    interleaved = [pair for pairs in zip(*by_label.values()) for pair in pairs]
    if len(interleaved) < count:
        raise ValueError(f"{dataset_dir}/train.bin: found only {len(interleaved)} usable examples for --few-shot {count}")
    return interleaved[:count]


@torch.no_grad()
def next_token_choices(model, prefix, bodies, candidate_ids):
    """For each body: the logits of candidate_ids and the argmax over the whole vocabulary, at the
    next position after prefix + body. The prefix is run once and its keys and values copied into
    every batch's cache; bodies are right-padded."""
    device = model_device(model)
    prefix_cache = KVCache(model.config, 1, device)
    model(torch.tensor([prefix], device=device), kv_cache=prefix_cache)
    result = [None] * len(bodies)
    for batch in progress(batches_by_length(bodies), "classifying"):
        cache = KVCache(model.config, len(batch), device)
        for shared, own in zip(prefix_cache.keys + prefix_cache.values, cache.keys + cache.values):
            own[:, :, :len(prefix)] = shared[:, :, :len(prefix)]
        cache.length = len(prefix)
        logits, _ = model(right_padded([bodies[i] for i in batch], device), kv_cache=cache)
        for row, i in enumerate(batch):
            next_logits = logits[row, len(bodies[i]) - 1]
            result[i] = (next_logits[candidate_ids].tolist(), int(next_logits.argmax()))
    return result


def few_shot_prefix(tokenizer, examples):
    """<|bos|>review。情感：label<|eos|> per example, then the <|bos|> that opens the question."""
    prefix = []
    for review, label in examples:
        prefix += [BOS_ID] + tokenizer.encode(review + PROMPTED_SUFFIX + label) + [EOS_ID]
    return prefix + [BOS_ID]


def sentiment_prompts(tokenizer, reviews, method, examples, block_size):
    """(shared prefix, one body per review, examples used). Examples are dropped, with a warning,
    until a quarter of the context is left for the review; reviews are cut from the left to fit."""
    if method == "instruct":
        prefix, suffix = [INSTRUCT_ID], [RESPONSE_ID]
    else:
        suffix = tokenizer.encode(PROMPTED_SUFFIX)
        while True:
            prefix = few_shot_prefix(tokenizer, examples)
            if not examples or block_size - len(prefix) - len(suffix) >= block_size // 4:
                break
            infer.warn(f"{len(examples)} few-shot examples leave too little of the {block_size}-token "
                       f"context for the review: using {len(examples) - 1}")
            examples = examples[1:]
    room = block_size - len(prefix) - len(suffix)
    if room < 1:
        raise ValueError(f"the {block_size}-token context has no room for a review")
    bodies = [ids[-room:] + suffix for ids in encode_all(tokenizer, reviews, "sentiment test reviews")]
    content_free = [tokenizer.encode(text)[-room:] + suffix for text in CONTENT_FREE_REVIEWS]
    return prefix, bodies, content_free, examples


def calibrated_choices(label_logits, content_free_logits):
    """The index of each row's winning label once the prompt's own bias is divided out: the labels'
    probabilities (softmax over the labels) over their mean probabilities on content-free inputs."""
    probabilities = torch.tensor(label_logits).softmax(-1)
    bias = torch.tensor(content_free_logits).softmax(-1).mean(0)
    return (probabilities / bias).argmax(-1).tolist()


def evaluate_sentiment(model, tokenizer, path, method, few_shot):
    records = read_jsonl(path, ("question", "answer"))
    unlabelled = [n for n, r in enumerate(records, 1) if r["answer"] not in SENTIMENT_LABELS]
    if unlabelled:
        raise ValueError(f"{path}: record {unlabelled[0]} has an answer other than {' or '.join(SENTIMENT_LABELS)}")
    label_ids = [tokenizer.encode(label)[0] for label in SENTIMENT_LABELS]
    if label_ids[0] == label_ids[1]:
        raise ValueError(f"the labels {SENTIMENT_LABELS} start with the same token in this vocabulary")
    examples = few_shot_examples(tokenizer, os.path.dirname(path), few_shot) if method == "prompted" else []
    prefix, bodies, content_free, examples = sentiment_prompts(tokenizer, [r["question"] for r in records], method,
                                                               examples, model.config.block_size)
    choices = next_token_choices(model, prefix, bodies + content_free, label_ids)
    label_logits, argmaxes = zip(*choices[:len(bodies)])
    raw = [logits.index(max(logits)) for logits in label_logits]
    answers = [SENTIMENT_LABELS.index(r["answer"]) for r in records]
    majority = Counter(answers).most_common(1)[0][1]
    result = {"n": len(records), "method": method, "few_shot": len(examples)}
    if method == "prompted":
        calibrated = calibrated_choices(label_logits, [logits for logits, _ in choices[len(bodies):]])
        result.update(accuracy=share_equal(calibrated, answers), uncalibrated_accuracy=share_equal(raw, answers))
    else:
        result.update(accuracy=share_equal(raw, answers))
    strict = share_equal(argmaxes, [label_ids[answer] for answer in answers])
    return {**result, "strict_accuracy": strict, "majority_baseline": majority / len(records)}


def share_equal(predictions, answers):
    return sum(p == a for p, a in zip(predictions, answers)) / len(answers)


# ---------------------------------------------------------------- command line

def print_table(results):
    print("| task | metric | value |")
    print("|---|---|---|")
    for task, metrics in results.items():
        for name, value in metrics.items():
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            print(f"| {task} | {name} | {shown} |")


def evaluate(args):
    """The results of every task asked for, by task name."""
    model, tokenizer = checkpoint.load_model(args.model, args.device)
    if args.lora:
        checkpoint.attach_lora(model, args.lora)
    results = {}
    if args.text:
        results["text"] = evaluate_text(model, tokenizer, args.text)
    if args.choices:
        results["choices"] = evaluate_choices(model, tokenizer, args.choices, args.instruct)
    if args.qa:
        results["qa"] = evaluate_qa(model, tokenizer, args.qa)
    if args.sentiment:
        if not isinstance(tokenizer, Tokenizer):
            raise ValueError(f"{args.model}: --sentiment is Nano's built-in task (its prompts use Nano's special "
                             "tokens); this is a Qwen model")
        method = args.sentiment_method
        if method is None:
            method = "prompted" if training_mode(args.model, args.lora) == "pretrain" else "instruct"
        results["sentiment"] = evaluate_sentiment(model, tokenizer, args.sentiment, method, args.few_shot)
    return results


def main():
    parser = argparse.ArgumentParser(description="Evaluate a Nano model.", epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", required=True, help="checkpoint .pt or exported model .bin")
    parser.add_argument("-l", "--lora", help="LoRA adapter .pt or .bin")
    parser.add_argument("--text", help="UTF-8 text file: perplexity and bits per character")
    parser.add_argument("--choices", help="multiple-choice JSONL")
    parser.add_argument("--qa", help="SFT JSONL: greedy answers, exact match and contains")
    parser.add_argument("--sentiment", nargs="?", const="dataset/sentiment/test.jsonl", default=None,
                        metavar="TEST_JSONL", help="the built-in sentiment task (default file: %(const)s)")
    parser.add_argument("--sentiment-method", choices=("instruct", "prompted"),
                        help="how to ask (default: prompted for a pretraining run, else instruct)")
    parser.add_argument("--few-shot", type=int, default=4, help="training examples in the prompted method")
    parser.add_argument("--instruct", action="store_true", help="ask choice questions in the instruct template")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if not (args.text or args.choices or args.qa or args.sentiment):
        parser.error("give at least one of --text, --choices, --qa, --sentiment")

    try:
        results = evaluate(args)
    except (OSError, ValueError) as error:  # a missing or malformed file: say which, no traceback
        raise SystemExit(f"eval.py: {error}")
    if args.json:
        print(json.dumps(results, ensure_ascii=False))
    else:
        print_table(results)


if __name__ == "__main__":
    main()

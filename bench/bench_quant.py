"""
What quantization costs a trained model: float32, Q80 and Q4K (the original's min/max quantizer and
export.py's search) side by side. Perplexity and bits per character on held-out text with eval.py's
scoring (PyTorch on each file's dequantized weights), the weights' relative squared error, file size,
and greedy continuations of the C engine on N prompts against float32's.

    python bench/bench_quant.py -m checkpoint/pretrain/best.pt --val dataset/news/val.bin [--documents 300]
    python bench/bench_quant.py -m ckpt.pt --text held_out.txt [--prompts 20] [--tokens 32]

With --val the held-out documents are the <|bos|>...<|eos|> documents of a prepared split, decoded with
the model's tokenizer. Prints a markdown table and writes bench/results/bench_quant.json.
"""

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import checkpoint  # noqa: E402
import eval as evaluation  # noqa: E402
import export  # noqa: E402
from bench.common import machine_info, write_results  # noqa: E402
from tokenizer import BOS_ID, EOS_ID  # noqa: E402

FORMATS = ("float32", "Q80", "Q4K min/max", "Q4K search")
PROMPT_CHARS = 8


def write_formats(model, tokenizer, directory):
    paths = {name: os.path.join(directory, name.replace(" ", "_").replace("/", "") + ".bin") for name in FORMATS}
    export.write_model(paths["float32"], model, tokenizer, progress=False)
    export.write_model(paths["Q80"], model, tokenizer, quant=True, progress=False)
    export.write_model_q4k(paths["Q4K min/max"], model, tokenizer, "minmax", progress=False)
    export.write_model_q4k(paths["Q4K search"], model, tokenizer, "search", progress=False)
    return paths


def documents_of_split(path, tokenizer, count):
    """The first count documents of a prepared split (uint16 ids, <|bos|>doc<|eos|>) as text lines."""
    ids = np.fromfile(path, dtype=np.uint16)
    docs, start = [], None
    for i, token in enumerate(ids):
        if token == BOS_ID:
            start = i + 1
        elif token == EOS_ID and start is not None:
            text = tokenizer.decode(ids[start:i].tolist()).replace("\n", " ").strip()
            if text:
                docs.append(text)
            start = None
            if len(docs) == count:
                break
    return docs


def relative_squared_error(reference, model):
    """sum (w - w')^2 / sum w^2 over the matrices a quantized format quantizes (the embedding and projections)."""
    ref, got = reference.state_dict(), model.state_dict()
    names = [n for n in ref if n.endswith("weight") and ref[n].dim() == 2 and n != "output.weight"]
    error = sum(float(((ref[n] - got[n]) ** 2).sum()) for n in names)
    return error / sum(float((ref[n] ** 2).sum()) for n in names)


def c_greedy(path, prompt, tokens):
    r = subprocess.run([os.path.join(ROOT, "infer_c", "infer"), path, "-g", prompt, "-t", "0", "-r", "1", "-n",
                        str(tokens), "--print-ids"], capture_output=True, text=True, check=True,
                       env=dict(os.environ, OMP_NUM_THREADS="2"))
    return [int(x) for x in r.stdout.split()]


def agreement(reference, continuation):
    """Tokens that match float32's before the first difference, as a fraction of float32's continuation."""
    same = 0
    for a, b in zip(reference, continuation):
        if a != b:
            break
        same += 1
    return same / max(len(reference), 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-m", "--model", required=True, help="trained checkpoint .pt")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="held-out UTF-8 text, a document per line")
    source.add_argument("--val", help="a prepared split (val.bin) made with the model's tokenizer")
    parser.add_argument("--documents", type=int, default=300, help="held-out documents scored (default 300)")
    parser.add_argument("--prompts", type=int, default=20, help="prompts for the greedy comparison (default 20)")
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt (default 32)")
    args = parser.parse_args()
    torch.manual_seed(0)
    subprocess.run(["make", "-C", os.path.join(ROOT, "infer_c"), "infer"], check=True, capture_output=True)
    model, tokenizer = checkpoint.load_full_model(args.model)
    if args.val:
        docs = documents_of_split(args.val, tokenizer, args.documents)
    else:
        with open(args.text, encoding="utf-8") as f:
            docs = [line.strip() for line in f if line.strip()][:args.documents]
    prompts = [d[:PROMPT_CHARS] for d in docs if len(d) > PROMPT_CHARS][:args.prompts]

    rows = []
    with tempfile.TemporaryDirectory() as directory:
        text_path = os.path.join(directory, "held_out.txt")
        with open(text_path, "w", encoding="utf-8") as f:
            f.write("\n".join(docs) + "\n")
        paths = write_formats(model, tokenizer, directory)
        reference = None
        for name, path in paths.items():
            loaded, _ = export.load_bin(path)
            with torch.no_grad():
                scores = evaluation.evaluate_text(loaded, tokenizer, text_path)
            continuations = [c_greedy(path, prompt, args.tokens) for prompt in prompts]
            reference = reference or continuations
            rows.append({"format": name, "file_bytes": os.path.getsize(path),
                         "relative_squared_error": relative_squared_error(model, loaded),
                         "perplexity": scores["perplexity"], "bits_per_character": scores["bits_per_character"],
                         "identical_continuations": sum(a == b for a, b in zip(reference, continuations)),
                         "mean_agreement": float(np.mean([agreement(a, b) for a, b in zip(reference, continuations)]))})
            print(f"{name}: perplexity {scores['perplexity']:.3f}", file=sys.stderr)
    base = rows[0]["perplexity"]
    print(f"\n{args.model} ({model.num_params() / 1e6:.1f}M parameters); {len(docs)} held-out documents, "
          f"{scores['tokens']} tokens; greedy: {len(prompts)} prompts of {PROMPT_CHARS} characters, {args.tokens} "
          "tokens, C engine on 2 threads\n")
    print("| weights | file MB | weight rel. sq. error | perplexity | vs float32 | bits/char | "
          "continuations identical to float32 | tokens agreeing before the first difference |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['format']} | {r['file_bytes'] / 1e6:.2f} | {r['relative_squared_error']:.2e} | "
              f"{r['perplexity']:.3f} | {100 * (r['perplexity'] / base - 1):+.2f} % | {r['bits_per_character']:.4f} | "
              f"{r['identical_continuations']}/{len(prompts)} | {100 * r['mean_agreement']:.0f} % |")
    write_results("bench_quant", {"machine": machine_info(), "model": args.model, "documents": len(docs),
                                  "prompts": prompts, "tokens": args.tokens, "results": rows})


if __name__ == "__main__":
    main()

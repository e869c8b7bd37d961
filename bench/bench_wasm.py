"""
Decode speed of the browser page (infer/index.html, WebAssembly SIMD, headless Chromium) next to the
native C engine (infer_c/infer) on one thread, on the same Nano-56M-sized random model, in one run.

    python bench/bench_wasm.py [--config config/nano-56m.json] [--tokens 128] [--repeats 3] [--formats float32 Q80 Q4K]
                               [--page P] [--baseline P0]

Each round runs native then browser (alternating, so drifts of a shared machine hit both alike) for each
weight format, and with --baseline another build of the page after it, to compare builds side by side;
the figures are medians over rounds of the decode tokens/s that each engine measures around its own
forward passes (prefill excluded), the ratios medians of each round's own ratio. Prints a markdown table
and writes bench/results/bench_wasm.json with the machine's description.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from playwright.sync_api import expect, sync_playwright

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import machine_info as common_machine_info, median_ratio, write_results  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from tokenizer import EOS_ID, PAD_ID, SPECIAL_TOKENS, Tokenizer  # noqa: E402

CHROMIUM = os.environ.get("NANO_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
PAGE = os.path.join(ROOT, "infer", "index.html")
PROMPT = "你好世界"


EXPORT_FLAGS = {"float32": "--checkpoint", "Q80": "--quant", "Q4K": "--q4k"}


def make_model(config_path, directory, formats):
    """A random model of the config's size with a CJK vocabulary, exported by export.py. Stop tokens get a
    zero embedding row, so greedy decoding never picks them and every run decodes the full length."""
    cfg = ModelConfig.from_json(config_path)
    tokenizer = Tokenizer(SPECIAL_TOKENS + [chr(0x4E00 + i) for i in range(cfg.vocab_size - len(SPECIAL_TOKENS))])
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        model.tok_embeddings.weight[[PAD_ID, EOS_ID]] = 0.0
    checkpoint = os.path.join(directory, "model.pt")
    torch.save({"model": model.state_dict(), "model_config": cfg.to_dict(), "tokenizer": tokenizer.to_dict()},
               checkpoint)
    files = {}
    for name in formats:
        path = os.path.join(directory, f"model-{name}.bin")
        subprocess.run([sys.executable, "export.py", path, EXPORT_FLAGS[name], checkpoint], cwd=ROOT, check=True,
                       capture_output=True)
        files[name] = path
    return cfg, files, model.num_params()


def run_native(model_path, tokens):
    result = subprocess.run([os.path.join(ROOT, "infer_c", "infer"), model_path, "-g", PROMPT, "-t", "0",
                             "-n", str(tokens + 1), "--profile"],
                            capture_output=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    rate = re.search(r"decode ([0-9.]+) tok/s", result.stderr.decode()).group(1)
    return float(rate), result.stdout.decode("utf-8")[:-1]


class BrowserPage:
    """The committed page in headless Chromium, with one model file loaded at a time."""

    def __init__(self, playwright, page_path):
        self.browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        self.page = self.browser.new_page()
        self.page.goto("file://" + os.path.abspath(page_path))
        self.page.wait_for_selector("body[data-state=no-model]", timeout=60000)   # the page's CSP forbids eval
        self.loaded = None

    def run(self, model_path, tokens):
        page = self.page
        if self.loaded != model_path:
            page.set_input_files("#model-file", model_path)
            page.wait_for_selector("body[data-state=ready]", timeout=300000)
            self.loaded = model_path
        page.fill("#temperature", "0")
        page.fill("#max-new", str(tokens + 1))
        page.select_option("#mode", "continue")
        page.fill("#prompt", PROMPT)
        page.click("#send")
        reply = page.locator(".generated").last
        expect(reply).to_have_attribute("data-done", re.compile("."), timeout=600000)
        page.wait_for_selector("body[data-state=ready]")
        if page.is_visible("#error"):
            raise RuntimeError("the page reports: " + page.inner_text("#error"))
        rate = float(page.evaluate("document.body.dataset.decodeTokensPerSecond"))
        return rate, reply.text_content()

    def close(self):
        self.browser.close()


def machine_info():
    chromium = subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True).stdout.strip()
    return common_machine_info(chromium=chromium, native_threads=1, date=time.strftime("%Y-%m-%d"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "config", "nano-56m.json"))
    parser.add_argument("--tokens", type=int, default=128, help="decode steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; medians are taken over them")
    parser.add_argument("--formats", nargs="+", choices=tuple(EXPORT_FLAGS), default=list(EXPORT_FLAGS),
                        help="weight formats to measure (default: all)")
    parser.add_argument("--page", default=PAGE, help="the built page to measure")
    parser.add_argument("--baseline", help="another build of the page, measured in the same rounds")
    args = parser.parse_args()

    subprocess.run(["make", "-C", os.path.join(ROOT, "infer_c"), "infer"], check=True, capture_output=True)
    with tempfile.TemporaryDirectory() as directory, sync_playwright() as playwright:
        cfg, files, n_params = make_model(args.config, directory, args.formats)
        pages = {"wasm": BrowserPage(playwright, args.page)}
        if args.baseline:
            pages["baseline"] = BrowserPage(playwright, args.baseline)
        rates = {name: {"native": [], **{engine: [] for engine in pages}} for name in files}
        same_text = {name: True for name in files}
        for round_index in range(args.repeats):
            for name, path in files.items():
                native_rate, native_text = run_native(path, args.tokens)
                rates[name]["native"].append(native_rate)
                for engine, page in pages.items():
                    rate, text = page.run(path, args.tokens)
                    rates[name][engine].append(rate)
                    same_text[name] &= text == native_text
                print(f"round {round_index + 1} {name}: " +
                      ", ".join(f"{engine} {runs[-1]:.1f} tok/s" for engine, runs in rates[name].items()), file=sys.stderr)
        for page in pages.values():
            page.close()

    rows = []
    for name in files:
        runs = rates[name]
        row = {"weights": name, "native_tokens_per_s": statistics.median(runs["native"]),
               "wasm_tokens_per_s": statistics.median(runs["wasm"]), "ratio": median_ratio(runs["wasm"], runs["native"]),
               "same_greedy_text": same_text[name], "native_runs": runs["native"], "wasm_runs": runs["wasm"]}
        if args.baseline:
            row.update({"baseline_tokens_per_s": statistics.median(runs["baseline"]), "baseline_runs": runs["baseline"],
                        "over_baseline": median_ratio(runs["wasm"], runs["baseline"])})
        rows.append(row)
    info = machine_info()
    print(f"\nDecode speed, {os.path.basename(args.config)} ({n_params / 1e6:.0f}M "
          f"parameters, random weights), greedy, {args.tokens} tokens, median of {args.repeats}; "
          f"{info['cpu']}, {info['chromium']}\n")
    baseline = " | baseline page (tok/s) | page / baseline" if args.baseline else ""
    print(f"| weights | native C, 1 thread (tok/s) | WASM SIMD in Chromium (tok/s) | WASM / native{baseline} | same text |")
    print("|---|---:|---:|---:|" + ("---:|---:|" if args.baseline else "") + "---|")
    for row in rows:
        compared = f" | {row['baseline_tokens_per_s']:.1f} | {row['over_baseline']:.2f}" if args.baseline else ""
        print(f"| {row['weights']} | {row['native_tokens_per_s']:.1f} | {row['wasm_tokens_per_s']:.1f} | "
              f"{row['ratio']:.2f}{compared} | {'yes' if row['same_greedy_text'] else 'no'} |")
    write_results("bench_wasm", {"machine": info, "config": cfg.to_dict(), "parameters": n_params, "tokens": args.tokens,
                                 "repeats": args.repeats, "prompt": PROMPT, "page": args.page, "baseline": args.baseline,
                                 "results": rows})


if __name__ == "__main__":
    main()

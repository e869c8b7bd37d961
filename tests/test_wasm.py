"""
The browser page (infer/index.html): the committed single-file build, opened from file:// in headless
Chromium (Debian's /usr/bin/chromium driven by the Python playwright package), must generate exactly
what the C engine (infer_c/infer) generates for the same model, prompt and greedy sampling, with and
without a LoRA adapter; refuse bad files with a readable message; and make no network request.
The committed page must be current: its recorded source hash matches the sources, and (with emcc)
a rebuild is byte-identical.
"""

import importlib.util
import os
import re
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:   # the browser tests skip, saying why
    expect = sync_playwright = None

from infer import CONTEXT_LIMIT
from model import ModelConfig, Transformer
from tokenizer import SPECIAL_TOKENS, Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(ROOT, "infer", "index.html")
C_CLI = os.path.join(ROOT, "infer_c", "infer")
CHROMIUM = os.environ.get("NANO_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
ALLOWED_SCHEMES = ("file:", "data:", "blob:")
# characters of the test vocabulary: ASCII, a little Chinese, and emoji above U+FFFF
CHARSET = ("abcdefghijklmnopqrstuvwxyz ,.!?\n" "你好世界模型" "😀🚀🎉🐍🌍💡🔥🍀")
NEW_TOKENS = 40


def load_build_page():
    spec = importlib.util.spec_from_file_location("build_page", os.path.join(ROOT, "infer", "build_page.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def browser_missing():
    if not os.path.exists(CHROMIUM):
        return f"chromium not found at {CHROMIUM} (apt-get install chromium)"
    if sync_playwright is None:
        return "the playwright Python package is not installed (pip install playwright)"
    return None


# ----------------------------------------------------------------------------- committed build

def test_committed_page_records_current_sources():
    build_page = load_build_page()
    with open(PAGE, encoding="utf-8") as f:
        page = f.read()
    recorded = f'<meta name="nano-sources-sha256" content="{build_page.sources_sha256()}">'
    assert recorded in page, "infer/index.html is older than its sources: run `make -C infer` and commit it"


@pytest.mark.skipif(shutil.which("emcc") is None, reason="emcc not found (apt-get install emscripten)")
def test_rebuild_is_byte_identical(tmp_path):
    output = tmp_path / "index.html"
    subprocess.run(["make", "-C", os.path.join(ROOT, "infer"), f"BUILD_DIR={tmp_path / 'build'}", f"PAGE={output}"],
                   check=True, capture_output=True, text=True)
    with open(PAGE, "rb") as committed, open(output, "rb") as rebuilt:
        assert committed.read() == rebuilt.read(), "rebuilding infer/index.html changes it: commit the rebuilt page"


# ----------------------------------------------------------------------------- model files

def random_model(tokenizer, seed, **config_overrides):
    """A random model whose weights are large enough that greedy choices are clear-cut (no near ties
    that float rounding in different SIMD widths could flip)."""
    config = dict(block_size=64, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                  n_hidden=176, dropout=0.0, bias=False, use_rope=True, norm_eps=1e-5, is_causal=True)
    config.update(config_overrides)
    cfg = ModelConfig.from_dict(config)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5 if "tok_embeddings" in name else 0.15)
    return model, cfg


def save_checkpoint(path, model, tokenizer):
    torch.save({"model": model.state_dict(), "model_config": model.config.to_dict(),
                "tokenizer": tokenizer.to_dict()}, path)


def save_model(path, tokenizer, seed, **config_overrides):
    """A random model whose emoji rows of the tied embedding are scaled up so that it writes emoji
    often: the output then tests their decoding."""
    model, cfg = random_model(tokenizer, seed, **config_overrides)
    with torch.no_grad():
        emoji_ids = [i for i, token in enumerate(tokenizer.itos) if ord(token[0]) > 0xFFFF]
        model.tok_embeddings.weight[emoji_ids] *= 3.0
    save_checkpoint(path, model, tokenizer)
    return model, cfg


def save_lora(path, model, cfg, tokenizer, base_path, seed):
    torch.manual_seed(seed)
    model.attach_lora(rank=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)   # non-zero B: the adapter changes the output
    torch.save({"lora": model.lora_state_dict(), "lora_config": model.lora_config, "model_config": cfg.to_dict(),
                "tokenizer": tokenizer.to_dict(), "base_checkpoint": str(base_path)}, path)
    model.detach_lora()


def export(output, flag, checkpoint):
    subprocess.run([sys.executable, "export.py", str(output), flag, str(checkpoint)], cwd=ROOT, check=True,
                   capture_output=True)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("wasm")
    subprocess.run(["make", "-C", os.path.join(ROOT, "infer_c"), "infer"], check=True, capture_output=True)
    tokenizer = Tokenizer(SPECIAL_TOKENS + list(dict.fromkeys(CHARSET)))
    model, cfg = save_model(directory / "model.pt", tokenizer, seed=1)
    save_lora(directory / "lora.pt", model, cfg, tokenizer, directory / "model.pt", seed=2)
    other, other_cfg = save_model(directory / "other.pt", tokenizer, seed=3, n_layer=3)
    save_lora(directory / "other_lora.pt", other, other_cfg, tokenizer, directory / "other.pt", seed=4)
    paths = {name: directory / f"{name}.bin" for name in ("model", "lora", "other_lora", "truncated", "q4k")}
    export(paths["model"], "--checkpoint", directory / "model.pt")
    export(paths["q4k"], "--q4k", directory / "model.pt")
    export(paths["lora"], "--lora", directory / "lora.pt")
    export(paths["other_lora"], "--lora", directory / "other_lora.pt")
    data = paths["model"].read_bytes()
    paths["truncated"].write_bytes(data[: len(data) * 2 // 3])
    return paths


def run_c(model_path, *args, stdin=""):
    """stdout and stderr of the C CLI."""
    result = subprocess.run([C_CLI, str(model_path), *args], input=stdin.encode(), capture_output=True, check=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    return result.stdout.decode("utf-8"), result.stderr.decode("utf-8")


def c_engine(files, prompt_flag, prompt, lora=False):
    extra = ["-l", str(files["lora"])] if lora else []
    text, _ = run_c(files["model"], prompt_flag, prompt, "-t", "0", "-n", str(NEW_TOKENS), *extra)
    assert text.endswith("\n")
    return text[:-1]   # the CLI ends its output with one newline of its own


def c_chat(model_path, questions, *args):
    """The C CLI's interactive conversation: its output (each answer and a newline) and stderr, where
    each answer's profile gives the length of its prompt (c_prompt_lengths)."""
    return run_c(model_path, "--profile", *args, stdin="".join(q + "\n\n" for q in questions))


def c_prompt_lengths(log):
    return [int(n) for n in re.findall(r"\[profile\] prompt (\d+) tokens", log)]


# ----------------------------------------------------------------------------- browser

@pytest.fixture(scope="module")
def browser_page():
    reason = browser_missing()
    if reason:
        pytest.skip(reason)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context()
        page = context.new_page()
        page.requests = []
        page.errors = []
        context.on("request", lambda request: page.requests.append(request.url))
        page.on("pageerror", lambda error: page.errors.append(str(error)))
        page.on("console", lambda message: message.type == "error" and page.errors.append(message.text))
        page.goto("file://" + PAGE)
        page.wait_for_selector("body[data-state=no-model]", timeout=30000)
        yield page
        browser.close()


# Waits use selectors and expect(), not wait_for_function: the page's CSP forbids the eval that it needs.
def wait_idle(page):
    page.wait_for_selector("body[data-state=ready], body[data-state=no-model]", timeout=60000)


def pick_file(page, selector, path):
    page.set_input_files(selector, str(path))
    wait_idle(page)


def error_text(page):
    return page.inner_text("#error") if page.is_visible("#error") else ""


def set_greedy(page):
    page.fill("#temperature", "0")
    page.fill("#max-new", str(NEW_TOKENS))


def generate(page, prompt, mode):
    page.select_option("#mode", mode)
    page.fill("#prompt", prompt)
    page.click("#send")
    reply = page.locator(".generated").last
    expect(reply).to_have_attribute("data-done", re.compile("."), timeout=60000)
    page.wait_for_selector("body[data-state=ready]")
    assert error_text(page) == ""
    assert reply.get_attribute("data-done") == "finished"
    return page.evaluate("[...document.querySelectorAll('.generated')].pop().textContent")


def prompt_tokens(page):
    """The length of the last prompt, as the page reports it."""
    return int(re.search(r"(\d+) prompt", page.inner_text("#speed")).group(1))


def test_load_model_shows_config(browser_page, files):
    page = browser_page
    pick_file(page, "#model-file", files["model"])
    assert error_text(page) == ""
    assert page.evaluate("document.body.dataset.state") == "ready"
    config = page.inner_text("#model-config")
    assert "n_layer\t2" in config and "block_size\t64" in config and "float32" in config


def test_greedy_matches_c_engine(browser_page, files):
    page = browser_page
    set_greedy(page)
    prompt = "hello 你好 😀🚀 world"
    text = generate(page, prompt, "continue")
    assert text == c_engine(files, "-g", prompt)
    assert len(text) > 0
    answer = generate(page, "hi 🎉", "instruct")
    assert answer == c_engine(files, "-i", "hi 🎉")


def test_q4k_model_is_labelled_and_matches_c_engine(browser_page, files):
    """A Q4K file in the page (the wasm SIMD kernel) against the native engine (its own kernel); the float32
    model is loaded back for the tests after this one."""
    page = browser_page
    pick_file(page, "#model-file", files["q4k"])
    assert error_text(page) == "" and "Q4K" in page.inner_text("#model-config")
    set_greedy(page)
    prompt = "hello 你好 world"
    native, _ = run_c(files["q4k"], "-g", prompt, "-t", "0", "-n", str(NEW_TOKENS))
    assert generate(page, prompt, "continue") == native[:-1]
    pick_file(page, "#model-file", files["model"])
    assert error_text(page) == ""


def test_emoji_survive_the_round_trip(browser_page, files):
    # "🍀" and friends are single tokens above U+FFFF: encoded from JS, decoded back to JS strings
    page = browser_page
    page.click("#new-conversation")
    wait_idle(page)
    prompt = "🍀🔥💡🌍🐍"
    text = generate(page, prompt, "continue")
    assert text == c_engine(files, "-g", prompt)
    assert any(ord(c) > 0xFFFF for c in text), f"the model produced no emoji to check: {text!r}"
    assert "\ufffd" not in text and "<|unknown|>" not in text


def test_multi_turn_matches_c_engine(browser_page, files):
    # short answers, so that the first turn still fits before the second question
    page = browser_page
    page.click("#new-conversation")
    wait_idle(page)
    page.fill("#max-new", "20")
    first = generate(page, "good day", "instruct")
    second = generate(page, "and then?", "instruct")
    text, log = c_chat(files["model"], ["good day", "and then?"], "-t", "0", "-n", "20")
    assert text == f"{first}\n{second}\n"
    prompts = c_prompt_lengths(log)
    assert prompts[1] == prompt_tokens(page) > prompts[0] + len("and then?") + 2, "the first turn was dropped"
    set_greedy(page)


def test_lora_load_and_unload(browser_page, files):
    page = browser_page
    page.click("#new-conversation")
    wait_idle(page)
    prompt = "the model says"
    base = generate(page, prompt, "continue")
    pick_file(page, "#lora-file", files["lora"])
    assert error_text(page) == ""
    assert "rank 4" in page.inner_text("#lora-name")
    adapted = generate(page, prompt, "continue")
    assert adapted == c_engine(files, "-g", prompt, lora=True)
    assert adapted != base, "the adapter does not change the output: the test proves nothing"
    page.click("#unload-lora")
    wait_idle(page)
    assert generate(page, prompt, "continue") == base


def test_lora_for_another_model_is_refused(browser_page, files):
    page = browser_page
    pick_file(page, "#lora-file", files["other_lora"])
    message = error_text(page)
    assert "other_lora.bin" in message and "n_layer" in message and "another base model" in message
    assert page.inner_text("#lora-name") == ""
    assert generate(page, "still", "continue") == c_engine(files, "-g", "still")


def test_stop_keeps_the_page_responsive(browser_page, files):
    page = browser_page
    page.fill("#temperature", "1")
    page.fill("#max-new", "1000000")   # far beyond the context: runs until stopped
    page.select_option("#mode", "continue")
    page.fill("#prompt", "go")
    page.click("#send")
    reply = page.locator(".generated").last
    expect(reply).to_have_text(re.compile(".{20}", re.S), timeout=30000)
    # the main thread answers while the worker generates
    assert page.evaluate("document.body.dataset.state") == "generating"
    page.click("#stop")
    expect(reply).to_have_attribute("data-done", "stopped", timeout=10000)
    assert page.evaluate("document.body.dataset.state") == "ready"
    assert "tokens/s" in page.inner_text("#speed")
    set_greedy(page)


def test_truncated_or_wrong_file_shows_error(browser_page, files):
    page = browser_page
    pick_file(page, "#model-file", files["truncated"])
    message = error_text(page)
    assert "truncated.bin" in message and "truncated" in message.split("truncated.bin", 1)[1]
    pick_file(page, "#model-file", files["lora"])   # an adapter is not a model
    assert "not a model" in error_text(page)
    # the worker survived, and the model loaded before stays loaded
    assert "model.bin" in page.inner_text("#model-name")
    assert generate(page, "again", "continue") == c_engine(files, "-g", "again")
    page.click("#unload-model")
    wait_idle(page)
    assert page.evaluate("document.body.dataset.state") == "no-model"
    pick_file(page, "#model-file", files["truncated"])
    assert "truncated" in error_text(page) and page.evaluate("document.body.dataset.state") == "no-model"
    pick_file(page, "#model-file", files["model"])
    assert error_text(page) == ""
    assert generate(page, "again", "continue") == c_engine(files, "-g", "again")


def sparse_file(path, size):
    """A file of size bytes that takes no disk space: the page sees its size, the tests never read it."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def worker_request(page, request, answer):
    """Sends the page's worker a request and returns its answer (the message of type `answer`); an error
    message from the worker fails the test."""
    reply = page.evaluate("""([request, answer]) => new Promise(resolve => {
        const listener = event => {
            if (event.data.type !== answer && event.data.type !== "error") return;
            worker.removeEventListener("message", listener);
            resolve(event.data);
        };
        worker.addEventListener("message", listener);
        worker.postMessage(request);
    })""", [request, answer])
    assert reply["type"] == answer, reply
    return reply


def limit_memory(page, limit):
    """The page's test hook: the engine assumes a memory of limit bytes (0: what wasm32 allows); returns it."""
    return worker_request(page, {"type": "limit-memory", "bytes": limit}, "memory-limited")["capacity"]


def mb(size):
    return f"{size / 1e6:.1f} MB"


def test_loading_streams_the_file_and_shows_progress(browser_page, files):
    page = browser_page
    pick_file(page, "#model-file", files["model"])
    size = files["model"].stat().st_size
    assert error_text(page) == ""
    assert page.get_attribute("#load-progress", "max") == page.get_attribute("#load-progress", "value") == str(size)
    assert page.is_hidden("#load-progress"), "the progress bar stays after loading"
    assert generate(page, "again", "continue") == c_engine(files, "-g", "again")


def test_file_larger_than_wasm_memory_is_refused(browser_page, files, tmp_path):
    page = browser_page
    capacity = limit_memory(page, 0)
    assert 4000e6 < capacity < 2**32, capacity   # wasm32's 4 GB less a page, less the engine's data and stack
    huge = sparse_file(tmp_path / "huge.bin", 5 * 10**9)
    pick_file(page, "#model-file", huge)
    assert error_text(page) == (f"load-model: huge.bin: this model needs {mb(5e9)}, and a browser tab's WebAssembly "
                                f"memory holds at most {mb(capacity)}: use a Q80/Q4K file (export.py --quant or --q4k)")
    # refused before reading: the model loaded before is still there
    assert "model.bin" in page.inner_text("#model-name")
    assert generate(page, "again", "continue") == c_engine(files, "-g", "again")


def test_model_over_an_artificial_limit_is_refused(browser_page, files):
    page = browser_page
    size = files["model"].stat().st_size
    state = int(re.search(r"state_bytes\t(\d+)", page.inner_text("#model-config")).group(1))
    limit_memory(page, size - 1)   # the file alone does not fit: refused before it is read
    pick_file(page, "#model-file", files["model"])
    assert error_text(page) == (f"load-model: model.bin: this model needs {mb(size)}, and a browser tab's "
                                f"WebAssembly memory holds at most {mb(size - 1)}: use a Q80/Q4K file "
                                f"(export.py --quant or --q4k)")
    limit_memory(page, size + state - 1)   # the file fits, its activations and KV cache do not
    pick_file(page, "#model-file", files["model"])
    assert error_text(page) == (f"load-model: model.bin: this model needs {mb(size + state)} ({mb(size)} of file "
                                f"and {mb(state)} of activations and KV cache), and a browser tab's WebAssembly "
                                f"memory holds at most {mb(size + state - 1)}: use a Q80/Q4K file "
                                f"(export.py --quant or --q4k)")
    assert page.evaluate("document.body.dataset.state") == "ready", "the model loaded before was dropped"
    limit_memory(page, 0)
    pick_file(page, "#model-file", files["model"])
    assert error_text(page) == ""
    assert generate(page, "again", "continue") == c_engine(files, "-g", "again")


def test_allocation_failure_is_reported(browser_page, files, tmp_path):
    """With the size check out of the way, malloc itself fails for a file just under 4 GB: the loaded model
    gives way first, then the page says what happened and stays usable."""
    page = browser_page
    limit_memory(page, 2**32 - 1)
    big = sparse_file(tmp_path / "big.bin", 2**32 - 2**20)
    pick_file(page, "#model-file", big)
    assert error_text(page) == (f"load-model: big.bin: this model needs {mb(2**32 - 2**20)}, more than the browser "
                                f"could give: a tab's WebAssembly memory holds at most {mb(2**32 - 1)}, less what "
                                f"is in use: use a Q80/Q4K file (export.py --quant or --q4k)")
    assert page.evaluate("document.body.dataset.state") == "no-model"
    limit_memory(page, 0)
    pick_file(page, "#model-file", files["model"])
    assert error_text(page) == ""
    assert generate(page, "again", "continue") == c_engine(files, "-g", "again")


# ----------------------------------------------------------------------------- Qwen files

WASM_F32_LOGITS_TOL = 1e-5    # max |page - C| / max |C|: the same core, only SIMD widths and sums differ
WASM_QUANT_LOGITS_TOL = 1e-4  # Q80 / Q4K: a float difference could flip the rounding of a quantized activation
# name: kind, quantization, config overrides; "long" has more positions than the page gives a model (4096),
# "chat" room for two turns of a conversation
QWEN_FILES = {"qwen3": ("qwen3", None, {}), "qwen3_q80": ("qwen3", "q80", {}), "qwen3_q4k": ("qwen3", "q4k", {}),
              "qwen2": ("qwen2", None, {}), "long": ("qwen3", None, {"max_position_embeddings": 5000}),
              "chat": ("qwen3", None, {"max_position_embeddings": 256})}


@pytest.fixture(scope="module")
def qwen_c():
    """tests/test_qwen_c.py: its FORMAT.md writer of Qwen files, its random models and its ctypes handle on the
    C core (they need transformers)."""
    pytest.importorskip("transformers")
    import test_qwen_c
    return test_qwen_c


@pytest.fixture(scope="module")
def qwen_vocabulary(qwen_c, tmp_path_factory):
    """test_qwen_c's vocabulary: the reference tokenizer, and the token bytes and scores a .bin holds."""
    return qwen_c.vocabulary.__wrapped__(tmp_path_factory)


@pytest.fixture(scope="module")
def qwen_files(qwen_c, qwen_vocabulary, tmp_path_factory):
    """Random Qwen3 (head_dim other than n_embd / n_head, untied head) and Qwen2 (biases) files, each with its
    tokenizer section's length making the file's parameters start off a 4-byte boundary."""
    directory = tmp_path_factory.mktemp("qwen")
    _, token_bytes, scores = qwen_vocabulary
    paths = {}
    for name, (kind, quant, overrides) in QWEN_FILES.items():
        paths[name] = directory / f"{name}.bin"
        qwen_c.write_qwen_bin(paths[name], qwen_c.random_qwen(kind, seed=5, **overrides), token_bytes, scores,
                              quant=quant)
        section_length = struct.unpack_from("<I", paths[name].read_bytes(), 256)[0]
        assert section_length % 4 != 0, "the test should place the parameters off the file's alignment"
    return paths


@pytest.mark.parametrize("name", [name for name in QWEN_FILES if name != "chat"])
def test_qwen_logits_equal_the_native_engine(browser_page, qwen_c, qwen_files, name):
    page = browser_page
    pick_file(page, "#model-file", qwen_files[name])
    assert error_text(page) == ""
    config = page.inner_text("#model-config")
    kind, quant, overrides = QWEN_FILES[name]
    assert f"architecture\t{kind.capitalize()}" in config and "in_place\ttrue" in config
    positions = overrides.get("max_position_embeddings", qwen_c.MODELS[kind]["max_position_embeddings"])
    assert f"block_size\t{positions}" in config and f"context\t{min(positions, CONTEXT_LIMIT)}" in config
    ids = qwen_c.random_ids(seed=7, n=12)
    page_logits = np.array(worker_request(page, {"type": "logits", "ids": ids}, "logits")["logits"],
                           dtype=np.float32).reshape(len(ids), -1)
    native = qwen_c.CModel(qwen_c.library.__wrapped__(), str(qwen_files[name])).prefill(ids)
    error = qwen_c.relative_error(page_logits, native)
    assert error < (WASM_F32_LOGITS_TOL if quant is None else WASM_QUANT_LOGITS_TOL), error
    print(f"{name}: page against C, max relative logit difference {error:.2e}")


def set_thinking(page, on):
    if page.is_checked("#think") != on:
        page.click("#think")


def test_qwen_chat_matches_c_engine(browser_page, qwen_c, qwen_files):
    """Greedy chat in the page, thinking off (the default) and on, and a two-turn conversation whose first turn
    is kept: the same text as the C CLI's; a continuation has no <|bos|>."""
    page = browser_page
    path = qwen_files["chat"]
    pick_file(page, "#model-file", path)
    assert error_text(page) == "" and not page.is_disabled("#think") and not page.is_checked("#think")
    set_greedy(page)
    question, other = qwen_c.QUESTIONS[0], qwen_c.QUESTIONS[2]   # Chinese; emoji and <|im_end|> typed
    first = generate(page, question, "instruct")
    second = generate(page, other, "instruct")
    text, log = c_chat(path, [question, other], "-t", "0", "-n", str(NEW_TOKENS))
    assert text == f"{first}\n{second}\n"
    prompts = c_prompt_lengths(log)
    assert prompts[1] == prompt_tokens(page) > prompts[0] + NEW_TOKENS // 2, "the first turn was dropped"

    page.click("#new-conversation")   # single questions from here, as -i asks them
    wait_idle(page)
    set_thinking(page, True)
    thought = generate(page, qwen_c.QUESTIONS[1], "instruct")
    native, _ = run_c(path, "-i", qwen_c.QUESTIONS[1], "--think", "-t", "0", "-n", str(NEW_TOKENS))
    assert thought == native[:-1]
    set_thinking(page, False)
    page.click("#new-conversation")
    wait_idle(page)
    unthought = generate(page, qwen_c.QUESTIONS[1], "instruct")
    native, _ = run_c(path, "-i", qwen_c.QUESTIONS[1], "-t", "0", "-n", str(NEW_TOKENS))
    assert unthought == native[:-1] and unthought != thought

    continued = generate(page, "今天天气很好，", "continue")
    native, _ = run_c(path, "-g", "今天天气很好，", "-t", "0", "-n", str(NEW_TOKENS))
    assert continued == native[:-1]


def model_that_stops(qwen_c, vocabulary, prompt_ids, steps):
    """A random Qwen3 whose head row of <|im_end|> beats the greedy token at step `steps` after the prompt."""
    reference = vocabulary[0]
    model = qwen_c.random_qwen("qwen3", seed=3)
    with torch.no_grad():
        greedy = model.generate(torch.tensor([prompt_ids]), max_new_tokens=steps, do_sample=False)[0]
        hidden = model.model(greedy[None]).last_hidden_state[0, -2]   # what picks the last step's token
        row = model.lm_head.weight[greedy[-1]] + 0.1 * hidden / hidden.norm()
        model.lm_head.weight[reference.token_to_id("<|im_end|>")] = row
    return model


def test_qwen_answer_ends_at_the_stop_token(browser_page, qwen_c, qwen_vocabulary, tmp_path):
    page = browser_page
    reference, token_bytes, scores = qwen_vocabulary
    question, steps = qwen_c.QUESTIONS[0], 5
    prompt = reference.encode(qwen_c.chat_text(question, "qwen3")).ids
    path = tmp_path / "stops.bin"
    qwen_c.write_qwen_bin(path, model_that_stops(qwen_c, qwen_vocabulary, prompt, steps), token_bytes, scores)
    native_ids = [int(i) for i in run_c(path, "-i", question, "-t", "0", "-r", "1", "-n", "30", "--print-ids")[0].split()]
    assert len(native_ids) < steps, "the native engine went past <|im_end|>: the test tests nothing"
    pick_file(page, "#model-file", path)
    page.fill("#max-new", "30")
    page.fill("#repetition-penalty", "1")
    answer = generate(page, question, "instruct")
    assert answer == run_c(path, "-i", question, "-t", "0", "-r", "1", "-n", "30")[0][:-1]
    # the stop token is generated, counted and not shown
    assert f"{len(native_ids) + 1} generated" in page.inner_text("#speed")
    page.fill("#repetition-penalty", "")
    set_greedy(page)


def test_qwen_text_streams_whole_characters(browser_page, qwen_c, qwen_vocabulary, qwen_files):
    """A random Qwen2 writes tokens that end inside a character: the page shows what the C CLI prints, the
    answer's bytes decoded at once."""
    page = browser_page
    _, token_bytes, _ = qwen_vocabulary
    path = qwen_files["qwen2"]
    pick_file(page, "#model-file", path)
    split_characters = 0
    for prompt in ("中文", "你好，世界", "😀"):
        text = generate(page, prompt, "continue")
        native, _ = run_c(path, "-g", prompt, "-t", "0", "-n", str(NEW_TOKENS))
        assert text == native[:-1]
        ids = run_c(path, "-g", prompt, "-t", "0", "-n", str(NEW_TOKENS), "--print-ids")[0].split()
        split_characters += sum(not qwen_c.is_utf8(token_bytes[int(i)]) for i in ids)
    assert split_characters > 0, "no token of the answers ends inside a character: the test tests nothing"


def test_no_network_requests_and_no_console_errors(browser_page):
    page = browser_page
    assert page.errors == []   # a blocked request (the page's CSP) would show here
    assert any(url.startswith("file:") for url in page.requests), "the request listener saw nothing"
    offending = [url for url in page.requests if not url.startswith(ALLOWED_SCHEMES)]
    assert offending == [], f"the page made network requests: {offending}"

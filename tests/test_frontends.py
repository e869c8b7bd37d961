"""
The three front ends agree: python infer.py (on the .pt checkpoint and on the exported .bin), the C CLI
(infer_c/infer) and the browser page (the same C core as WebAssembly, in headless Chromium) generate the
same text from the same model and flags. Greedy (-t 0) with every other default left alone, so that the
defaults must be the same everywhere: the repetition penalty changes greedy choices (checked here); top-k
and top-p, which greedy ignores, are compared as the page's inputs and the CLI's usage show them. Raw and
instruct prompts, and a conversation that outgrows the context (turns dropped, a question cut, the same
warning).
"""

import os
import re
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_wasm import (C_CLI, browser_page, c_chat, c_prompt_lengths, error_text, generate,  # noqa: E402,F401
                       pick_file, prompt_tokens, random_model, run_c, save_checkpoint, wait_idle)

import export  # noqa: E402
from infer import SAMPLING_DEFAULTS, answer_room  # noqa: E402
from tokenizer import EOS_ID, SPECIAL_TOKENS, Tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK_SIZE = 48
RAW_PROMPT, QUESTION = "hello world", "how are you?"
# the fourth question alone leaves less than the answer room: it is cut to its first and last tokens
CONVERSATION = ["hello world", "how are you?", "good day",
                "the quick brown fox jumps over the lazy dog, again and again and again!",
                "tell me more", "你好模型"]
GREEDY = {"temperature": 0}
GREEDY_WITHOUT_PENALTY = {"temperature": 0, "repetition_penalty": 1.0}
PYTHON_FLAGS = {"temperature": "-t", "top_k": "-k", "top_p": "--top_p", "repetition_penalty": "-r"}
C_FLAGS = {"temperature": "-t", "top_k": "-k", "top_p": "-p", "repetition_penalty": "-r"}
PAGE_INPUTS = {"temperature": "#temperature", "top_k": "#top-k", "top_p": "#top-p",
               "repetition_penalty": "#repetition-penalty"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A random model, as a checkpoint and exported; its <|eos|> row is scaled up so that answers end at
    different lengths and a conversation keeps some turns and drops others."""
    directory = tmp_path_factory.mktemp("frontends")
    subprocess.run(["make", "-C", os.path.join(ROOT, "infer_c"), "infer"], check=True, capture_output=True)
    tokenizer = Tokenizer(SPECIAL_TOKENS + list("abcdefghijklmnopqrstuvwxyz ,.!?你好世界模型"))
    model, _ = random_model(tokenizer, seed=0, block_size=BLOCK_SIZE)
    with torch.no_grad():
        model.tok_embeddings.weight[EOS_ID] *= 2.0
    paths = {"pt": directory / "model.pt", "bin": directory / "model.bin"}
    save_checkpoint(paths["pt"], model, tokenizer)
    export.write_model(str(paths["bin"]), model, tokenizer)
    return paths


def flags(table, settings):
    return [word for name, value in settings.items() for word in (table[name], str(value))]


def python_infer(model_path, *args, stdin=None):
    result = subprocess.run([sys.executable, "infer.py", "-m", str(model_path), *args], input=stdin, cwd=ROOT,
                            capture_output=True, text=True, check=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    return result.stdout, result.stderr


def python_text(model_path, mode, prompt, settings):
    instruct = ["-i"] if mode == "instruct" else []
    text, _ = python_infer(model_path, *instruct, "--prompt", prompt, *flags(PYTHON_FLAGS, settings))
    return text


def c_text(files, mode, prompt, settings):
    text, _ = run_c(files["bin"], "-i" if mode == "instruct" else "-g", prompt, *flags(C_FLAGS, settings))
    return text


@pytest.fixture(scope="module")
def page(browser_page, files):
    """The page with the model loaded, and the settings it started with (the engine's defaults)."""
    started_with = {name: browser_page.input_value(selector) for name, selector in PAGE_INPUTS.items()}
    started_with["max_new_tokens"] = browser_page.input_value("#max-new")
    pick_file(browser_page, "#model-file", files["bin"])
    assert error_text(browser_page) == ""
    return browser_page, started_with


def page_text(page, mode, prompt, settings):
    """The page's answer to one prompt (a new conversation), the other settings as the page started."""
    page, started_with = page
    for name, selector in PAGE_INPUTS.items():
        page.fill(selector, str(settings.get(name, started_with[name])))
    page.click("#new-conversation")
    wait_idle(page)
    return generate(page, prompt, mode) + "\n"   # the CLIs end with a newline of their own


# ----------------------------------------------------------------------------- defaults

def test_the_page_starts_with_the_defaults_of_infer_py(page):
    _, started_with = page
    assert {name: float(started_with[name]) for name in SAMPLING_DEFAULTS} == SAMPLING_DEFAULTS
    assert started_with["max_new_tokens"] == "0"   # 0: until the context is full


def test_the_c_cli_documents_the_defaults_of_infer_py(files):
    result = subprocess.run([C_CLI], capture_output=True, text=True)
    shown = {name: float(re.search(rf"  {flag} \w+ .*\(default ([\d.]+)\)", result.stderr).group(1))
             for name, flag in C_FLAGS.items()}
    assert shown == SAMPLING_DEFAULTS
    assert "-n INT       max new tokens, 0 = until the context is full (default 0)" in result.stderr


def test_the_default_penalty_changes_greedy_text(files):
    # otherwise the comparisons below would not show that every front end applies it
    for mode, prompt in (("continue", RAW_PROMPT), ("instruct", QUESTION)):
        assert c_text(files, mode, prompt, GREEDY) != c_text(files, mode, prompt, GREEDY_WITHOUT_PENALTY), mode


# ----------------------------------------------------------------------------- one prompt

@pytest.mark.parametrize("mode, prompt", [("continue", RAW_PROMPT), ("instruct", QUESTION)])
@pytest.mark.parametrize("front_end", ["python .pt", "python .bin", "page"])
def test_same_greedy_text_as_the_c_cli(front_end, mode, prompt, files, request):
    for settings in (GREEDY, GREEDY_WITHOUT_PENALTY):
        if front_end == "page":
            text = page_text(request.getfixturevalue("page"), mode, prompt, settings)
        else:
            text = python_text(files[front_end.split(".")[1]], mode, prompt, settings)
        assert text == c_text(files, mode, prompt, settings), settings


# ----------------------------------------------------------------------------- conversation

@pytest.fixture(scope="module")
def c_conversation(files):
    """The C CLI's answers, the length of each prompt, and its warnings."""
    text, log = c_chat(files["bin"], CONVERSATION, "-t", "0")
    return text, c_prompt_lengths(log), warnings(log)


def warnings(log):
    return re.findall(r"\[warning\].*", log)   # the C CLI's follow its "> " on the same line


def test_the_conversation_drops_old_turns_and_cuts_a_long_question(c_conversation):
    _, prompts, warnings = c_conversation
    questions = [len(q) + 2 for q in CONVERSATION]   # one token a character, and the two marks
    limit = BLOCK_SIZE - answer_room(BLOCK_SIZE)
    assert any(p > q for p, q in zip(prompts, questions)), "no earlier turn was kept"
    assert any(p == q for p, q in zip(prompts[1:], questions[1:])), "no earlier turn was dropped"
    assert prompts[3] == limit
    assert warnings == [f"[warning] question is {questions[3]} tokens, longer than the context of {limit}: "
                        f"keeping its last {limit - 1}"]


def test_python_holds_the_same_conversation(files, c_conversation):
    c_answers, c_prompts, c_warnings = c_conversation
    text, log = python_infer(files["bin"], "-i", "-t", "0", "--profile", stdin="".join(q + "\n" for q in CONVERSATION))
    # after its banner: the input prompt "> ", then the answer, for each question; the last prompt meets EOF
    assert text.split("\n", 1)[1] == "".join(f"> {answer}\n" for answer in c_answers.split("\n")[:-1]) + "> \n"
    assert [int(n) for n in re.findall(r"prefill (\d+) tokens", log)] == c_prompts
    assert warnings(log) == c_warnings


def test_the_page_holds_the_same_conversation(page, c_conversation):
    c_answers, c_prompts, c_warnings = c_conversation
    browser, started_with = page
    for name, selector in PAGE_INPUTS.items():
        browser.fill(selector, str(GREEDY.get(name, started_with[name])))
    browser.click("#new-conversation")
    wait_idle(browser)
    answers, prompts, shown = [], [], []
    for question in CONVERSATION:
        answers.append(generate(browser, question, "instruct"))
        prompts.append(prompt_tokens(browser))
        if browser.is_visible("#warning"):
            shown.append("[warning] " + browser.inner_text("#warning"))
    assert "".join(answer + "\n" for answer in answers) == c_answers
    assert prompts == c_prompts
    assert shown == c_warnings

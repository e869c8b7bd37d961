"""
serve.py, the OpenAI-compatible server, driven by the official `openai` client and raw HTTP: on the C core
(.bin) it must answer exactly what the C CLI prints for the same file, prompt and seed, with and without a
LoRA adapter; on PyTorch (.pt) exactly what infer.py prints. Sixteen concurrent streaming clients with
clients that hang up and bad bodies in the mix each get the text their prompt gets alone, decoded in
shared batches. Keys, body limits, context bounds, paths under / and the page served from / (a real
Chromium chatting through the server) are checked too.
"""

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_wasm import browser_page, random_model, run_c, save_checkpoint, save_lora  # noqa: E402,F401

import export  # noqa: E402
from tokenizer import EOS_ID, PAD_ID, SPECIAL_TOKENS, Tokenizer  # noqa: E402

openai = pytest.importorskip("openai")
from playwright.sync_api import expect  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "test-key-123"
CHARSET = "abcdefghijklmnopqrstuvwxyz ,.!?你好世界模型"
GREEDY = {"temperature": 0}
MAX_BODY = 8192


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("serve")
    subprocess.run(["make", "-C", os.path.join(ROOT, "infer_c")], check=True, capture_output=True)
    tokenizer = Tokenizer(SPECIAL_TOKENS + list(CHARSET))
    model, cfg = random_model(tokenizer, seed=0, block_size=64)
    paths = {name: directory / name for name in ("model.pt", "model.bin", "q80.bin", "q4k.bin", "lora.pt", "lora.bin",
                                                 "slow.bin", "seq2seq.bin", "wide.pt", "q80_64.bin", "wide_lora.pt",
                                                 "wide_lora.bin")}
    save_checkpoint(paths["model.pt"], model, tokenizer)
    export.write_model(str(paths["model.bin"]), model, tokenizer, progress=False)
    export.write_model(str(paths["q80.bin"]), model, tokenizer, quant=True, group_size=32, progress=False)
    export.write_model_q4k(str(paths["q4k.bin"]), model, tokenizer, progress=False)
    save_lora(paths["lora.pt"], model, cfg, tokenizer, paths["model.pt"], seed=2)
    subprocess.run([sys.executable, "export.py", str(paths["lora.bin"]), "--lora", str(paths["lora.pt"])],
                   cwd=ROOT, check=True, capture_output=True)
    # wide and long enough that a whole answer takes a while: a dropped client's slot must come back at once
    slow, _ = random_model(tokenizer, seed=5, block_size=1024, n_embd=512, n_head=8, n_kv_head=8, n_hidden=1024,
                           n_layer=4)
    with torch.no_grad():   # a zero logit for the stop tokens, below the best of the others: it never stops
        slow.tok_embeddings.weight[[PAD_ID, EOS_ID]] = 0.0
    export.write_model(str(paths["slow.bin"]), slow, tokenizer, progress=False)
    # every width a multiple of 64, for Q80 groups of 64: the AVX-512 kernel, which meets eight rows at once
    wide, wide_cfg = random_model(tokenizer, seed=7, block_size=64, n_hidden=192)
    save_checkpoint(paths["wide.pt"], wide, tokenizer)
    export.write_model(str(paths["q80_64.bin"]), wide, tokenizer, quant=True, group_size=64, progress=False)
    save_lora(paths["wide_lora.pt"], wide, wide_cfg, tokenizer, paths["wide.pt"], seed=8)
    subprocess.run([sys.executable, "export.py", str(paths["wide_lora.bin"]), "--lora", str(paths["wide_lora.pt"])],
                   cwd=ROOT, check=True, capture_output=True)
    seq2seq, _ = random_model(tokenizer, seed=6, is_causal=False)
    export.write_model(str(paths["seq2seq.bin"]), seq2seq, tokenizer, progress=False)
    return paths


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """serve.py as a subprocess on 127.0.0.1 and a free port."""

    def __init__(self, *args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, "serve.py", *map(str, args), "--port", str(self.port)],
                                        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.time() + 60
        while time.time() < deadline and self.process.poll() is None:
            try:
                urllib.request.urlopen(self.url + "/health", timeout=1)
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"serve.py did not start: {self.process.stdout.read().decode()}")

    def client(self, api_key="none"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60)

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def c_server(files):
    server = Server("-m", files["model.bin"], "--lora", f"style={files['lora.bin']}", "--max-body-bytes", MAX_BODY)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def torch_server(files):
    server = Server("-m", files["model.pt"], "-l", files["lora.pt"], "--api-key", KEY)
    yield server
    server.stop()


def request(server, method, path, body=None, headers=None):
    """(status, parsed JSON or text) of a raw HTTP request; path is sent as is, not normalized."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    connection.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    text = response.read().decode("utf-8", errors="replace")
    connection.close()
    try:
        return response.status, json.loads(text)
    except ValueError:
        return response.status, text


def assert_openai_error(status, body, want_status):
    assert status == want_status, body
    assert set(body["error"]) >= {"message", "type", "param", "code"} and body["error"]["message"]


def c_cli(files, flag, prompt, *args):
    text, _ = run_c(files["model.bin"], flag, prompt, *args)
    return text[:-1]   # the CLI ends with a newline of its own


def python_infer(files, *args):
    result = subprocess.run([sys.executable, "infer.py", "-m", str(files["model.pt"]), *args], cwd=ROOT,
                            capture_output=True, text=True, check=True)
    return result.stdout[:-1]


def chat(client, content, model=None, **settings):
    response = client.chat.completions.create(model=model or "", messages=[{"role": "user", "content": content}],
                                              **settings)
    return response.choices[0].message.content


# ----------------------------------------------------------------------------- the same text as the CLIs

def test_chat_and_completion_equal_the_c_cli(c_server, files):
    client = c_server.client()
    for prompt in ("hello world", "你好"):
        assert chat(client, prompt, "model.bin", **GREEDY) == c_cli(files, "-i", prompt, "-t", "0")
        completion = client.completions.create(model="model.bin", prompt=prompt, **GREEDY)
        assert completion.choices[0].text == c_cli(files, "-g", prompt, "-t", "0")
    # sampled: the C engine's sampler with the same seed, every default of the CLI
    assert chat(client, "hello", seed=1234) == c_cli(files, "-i", "hello", "-s", "1234")
    assert chat(client, "hello", seed=1234) != chat(client, "hello", seed=99)


def test_lora_adapter_is_selected_by_model(c_server, files):
    client = c_server.client()
    assert [m.id for m in client.models.list().data] == ["model.bin", "style"]
    styled = chat(client, "good day", "style", **GREEDY)
    assert styled == c_cli(files, "-i", "good day", "-t", "0", "-l", str(files["lora.bin"]))
    assert styled != chat(client, "good day", "model.bin", **GREEDY)
    status, body = request(c_server, "POST", "/v1/chat/completions",
                           {"model": "nope", "messages": [{"role": "user", "content": "hi"}]})
    assert_openai_error(status, body, 404)
    assert body["error"]["code"] == "model_not_found"


def test_conversation_equals_the_c_cli_conversation(c_server, files):
    # the CLI's interactive mode holds the same <|instruct_mark|>q<|response_mark|>a<|eos|> turns
    questions = ["hello", "how are you"]
    answers, _ = run_c(files["model.bin"], "-t", "0", "-n", "8", stdin="".join(q + "\n\n" for q in questions))
    first, second = [line for line in answers.split("\n") if line][:2]
    client = c_server.client()
    messages = [{"role": "user", "content": questions[0]}]
    assert client.chat.completions.create(model="", messages=messages, max_tokens=8, **GREEDY) \
        .choices[0].message.content == first
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": questions[1]}]
    assert client.chat.completions.create(model="", messages=messages, max_tokens=8, **GREEDY) \
        .choices[0].message.content == second


def test_torch_engine_equals_infer_py(torch_server, files):
    client = torch_server.client(KEY)
    assert chat(client, "hello world", **GREEDY) == python_infer(files, "-i", "--prompt", "hello world", "-t", "0")
    completion = client.completions.create(model="model.pt", prompt="good", max_tokens=12, **GREEDY)
    assert completion.choices[0].text == python_infer(files, "--prompt", "good", "-t", "0", "-s", str(5 + 12))
    assert completion.usage.prompt_tokens == 5 and completion.usage.completion_tokens == 12
    assert completion.choices[0].finish_reason == "length"
    lora = chat(client, "good day", str(files["lora.pt"]), **GREEDY)
    assert lora == python_infer(files, "-i", "--prompt", "good day", "-t", "0", "-l", str(files["lora.pt"]))


# ----------------------------------------------------------------------------- the OpenAI API

def test_streaming_chat_matches_the_whole_answer(c_server):
    client = c_server.client()
    whole = client.chat.completions.create(model="", messages=[{"role": "user", "content": "stream me"}], **GREEDY)
    chunks = list(client.chat.completions.create(model="", messages=[{"role": "user", "content": "stream me"}],
                                                 stream=True, stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and len(text) > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens


@pytest.mark.parametrize("interval", [0, 1000])
def test_stream_interval_sets_how_often_text_goes_out(files, interval):
    """At --stream-interval 0 each token is an event of its own; at an interval longer than the answer the first
    token goes out at once and the rest together at the end."""
    server = Server("-m", files["model.bin"], "--stream-interval", interval)
    try:
        client = server.client()
        whole = client.completions.create(model="", prompt="hello", max_tokens=40, **GREEDY)
        chunks = client.completions.create(model="", prompt="hello", max_tokens=40, stream=True, **GREEDY)
        pieces = [chunk.choices[0].text for chunk in chunks if chunk.choices[0].text]
        assert "".join(pieces) == whole.choices[0].text
        assert len(pieces) == (whole.usage.completion_tokens if interval == 0 else 2), pieces
    finally:
        server.stop()


def test_stop_strings_and_finish_reasons(c_server, files):
    client = c_server.client()
    full = c_cli(files, "-g", "hello", "-t", "0")
    stop = full[5:8]
    cut = client.completions.create(model="", prompt="hello", stop=[stop], **GREEDY)
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(model="", prompt="hello", stop=stop,
                                                                           stream=True, **GREEDY))
    assert streamed == cut.choices[0].text
    short = client.completions.create(model="", prompt="hello", max_tokens=3, **GREEDY)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3


def test_system_message_opens_the_first_question(c_server, files):
    client = c_server.client()
    answer = client.chat.completions.create(model="", max_tokens=10, **GREEDY, messages=[
        {"role": "system", "content": "be nice"}, {"role": "user", "content": "hello"}]).choices[0].message.content
    assert answer == c_cli(files, "-i", "be nice\nhello", "-t", "0", "-n", "10")
    parts = client.chat.completions.create(model="", max_tokens=10, **GREEDY, messages=[
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]}])
    assert parts.choices[0].message.content == answer


def test_wrong_key_is_refused(torch_server):
    with pytest.raises(openai.AuthenticationError):
        torch_server.client("wrong").models.list()
    with pytest.raises(openai.AuthenticationError):
        chat(torch_server.client("wrong"), "hi")
    for path, method in (("/v1/models", "GET"), ("/v1/completions", "POST"), ("/v1/chat/completions", "POST")):
        assert_openai_error(*request(torch_server, method, path, {"prompt": "x"}), 401)
    assert request(torch_server, "GET", "/health")[0] == 200


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_k": "many"}, "top_k"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({}, "messages"),
])
def test_malformed_bodies_are_400(c_server, body, param):
    status, answer = request(c_server, "POST", "/v1/chat/completions", body)
    assert_openai_error(status, answer, 400)
    assert answer["error"]["param"] == param


def test_malformed_body_through_the_client(c_server):
    with pytest.raises(openai.BadRequestError):
        c_server.client().chat.completions.create(model="", messages=[{"role": "user", "content": "x"}],
                                                  temperature=-1)
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        assert_openai_error(*request(c_server, "POST", "/v1/completions", raw), 400)


def test_body_size_is_limited(c_server):
    big = {"prompt": "a" * MAX_BODY}
    assert_openai_error(*request(c_server, "POST", "/v1/completions", big), 413)
    # chunked, without a declared length
    connection = http.client.HTTPConnection("127.0.0.1", c_server.port, timeout=30)
    connection.request("POST", "/v1/completions", body=iter([b'{"prompt": "', b"a" * MAX_BODY, b'"}']),
                       headers={"Content-Type": "application/json"}, encode_chunked=True)
    response = connection.getresponse()
    assert response.status == 413 and "error" in json.loads(response.read())
    connection.close()


def test_context_bounds_are_400(c_server):
    client = c_server.client()
    with pytest.raises(openai.BadRequestError, match="leaves 58 of the context of 64"):
        client.completions.create(model="", prompt="hello", max_tokens=59)
    assert client.completions.create(model="", prompt="hello", max_tokens=58, **GREEDY).usage.total_tokens <= 64
    status, body = request(c_server, "POST", "/v1/completions", {"prompt": "a" * 70})
    assert_openai_error(status, body, 400)
    assert body["error"]["code"] == "context_length_exceeded"
    # by default the answer may fill the context, never more
    usage = client.completions.create(model="", prompt="a" * 60, **GREEDY).usage
    assert usage.prompt_tokens == 61 and usage.completion_tokens <= 3


def test_nothing_but_the_page_under_root(c_server):
    status, page = request(c_server, "GET", "/")
    assert status == 200 and "nano-sources-sha256" in page and "connect-src data: 'self';" in page
    for path in ("/../../../../etc/passwd", "/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "//etc/passwd", "/index.html",
                 "/infer/index.html", "/serve.py", "/..%2fserve.py", "/static/../serve.py", "/etc/passwd"):
        status, body = request(c_server, "GET", path)
        assert status == 404, path
        assert "root:" not in json.dumps(body) and "import" not in json.dumps(body)


def test_refuses_bad_files_and_arguments(files, tmp_path):
    broken = tmp_path / "broken.bin"
    broken.write_bytes(files["model.bin"].read_bytes()[:1000])
    for args, message in [(["-m", broken], "broken.bin"), (["-m", tmp_path / "none.pt"], "does not exist"),
                          (["-m", files["seq2seq.bin"]], "non-causal"),
                          (["-m", files["model.bin"], "-l", files["lora.pt"]], "takes .bin adapters"),
                          (["-m", files["model.bin"], "--parallel", "0"], "--parallel"),
                          (["-m", files["model.bin"], "--stream-interval", "-1"], "--stream-interval"),
                          (["-m", files["model.bin"], "--stream-interval", "nan"], "--stream-interval")]:
        result = subprocess.run([sys.executable, "serve.py", *map(str, args), "--port", str(free_port())], cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


# ----------------------------------------------------------------------------- under load

PROMPTS = [f"{a} {b}" for a in ("hello", "good", "world", "你好") for b in ("day", "fox", "moon", "sea")]


def stream_text(client, prompt, chat_mode):
    if chat_mode:
        chunks = client.chat.completions.create(model="", messages=[{"role": "user", "content": prompt}], stream=True,
                                                max_tokens=40, **GREEDY)
        return "".join(c.choices[0].delta.content or "" for c in chunks)
    chunks = client.completions.create(model="", prompt=prompt, stream=True, max_tokens=40, **GREEDY)
    return "".join(c.choices[0].text for c in chunks)


def hang_up_mid_stream(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request("POST", "/v1/completions", body=json.dumps({"prompt": "drop", "stream": True}),
                       headers={"Content-Type": "application/json"})
    connection.getresponse().read(64)
    connection.close()


def test_sixteen_concurrent_streams_each_get_their_own_text(c_server):
    client = c_server.client()
    alone = {(prompt, chat_mode): stream_text(client, prompt, chat_mode) for prompt in PROMPTS
             for chat_mode in (True, False)}
    assert len(set(alone.values())) > len(alone) // 2   # distinct prompts, mostly distinct answers
    got, failures = {}, []
    before = request(c_server, "GET", "/health")[1]

    def streaming_client(index):
        try:
            for round_ in range(3):
                key = (PROMPTS[(index + round_) % len(PROMPTS)], (index + round_) % 2 == 0)
                got.setdefault(key, []).append(stream_text(client, *key))
                if index % 4 == 0:
                    hang_up_mid_stream(c_server)
                if index % 4 == 1:
                    assert request(c_server, "POST", "/v1/chat/completions", b"{broken")[0] == 400
        except Exception as error:  # noqa: BLE001  (reported below, with the client's number)
            failures.append(f"client {index}: {error!r}")

    threads = [threading.Thread(target=streaming_client, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures, failures
    assert sum(map(len, got.values())) == 48
    for key, texts in got.items():
        assert texts == [alone[key]] * len(texts), key
    assert stream_text(client, PROMPTS[0], True) == alone[(PROMPTS[0], True)]   # and it keeps answering
    health = request(c_server, "GET", "/health")[1]
    # the decoding steps were shared, not taken one by one
    mean_batch = (health["batched_tokens"] - before["batched_tokens"]) / (health["steps"] - before["steps"])
    assert mean_batch > 1.5, (before, health)   # one by one would be exactly 1
    assert health["running"] == 0 and health["waiting"] == 0


def test_a_client_that_hangs_up_frees_its_slot(files):
    server = Server("-m", files["slow.bin"], "--parallel", "1")
    try:
        client = server.client()
        start = time.perf_counter()
        assert client.completions.create(model="", prompt="hello", max_tokens=400, **GREEDY) \
            .usage.completion_tokens == 400
        whole = time.perf_counter() - start
        stream = client.completions.create(model="", prompt="hello", max_tokens=400, stream=True, **GREEDY)
        next(iter(stream))
        stream.close()
        start = time.perf_counter()
        client.completions.create(model="", prompt="next", max_tokens=2, **GREEDY)   # the one slot is free again
        assert time.perf_counter() - start < whole / 3, (whole, time.perf_counter() - start)
    finally:
        server.stop()


def test_the_server_answers_while_a_long_prompt_runs(files):
    """A step with a prompt in it runs beside the event loop: while a prompt of most of the context is read,
    /health still answers, and says that a request is running."""
    server = Server("-m", files["slow.bin"])
    try:
        finished = {}
        completion = threading.Thread(target=lambda: finished.update(reply=request(
            server, "POST", "/v1/completions", {"prompt": "ab " * 300, "max_tokens": 1, "temperature": 0})))
        completion.start()
        answers_while_running = 0
        while completion.is_alive():
            status, health = request(server, "GET", "/health")
            answers_while_running += status == 200 and health["running"] == 1
        completion.join()
        assert finished["reply"][0] == 200, finished
        assert answers_while_running >= 2
    finally:
        server.stop()


# ----------------------------------------------------------------------------- the page

def test_the_page_chats_through_the_server(browser_page, c_server, files):
    page = browser_page
    page.goto(c_server.url + "/")
    page.wait_for_selector("body[data-state=ready]", timeout=30000)
    assert page.input_value("#backend") == "server" and page.input_value("#server-model") == "model.bin"
    assert page.is_hidden("#model-file")
    page.fill("#temperature", "0")
    page.fill("#max-new", "12")
    page.select_option("#mode", "instruct")
    answers = []
    for question in ("hello", "how are you"):
        page.fill("#prompt", question)
        page.click("#send")
        reply = page.locator(".generated").last
        expect(reply).to_have_attribute("data-done", re.compile("."), timeout=60000)
        page.wait_for_selector("body[data-state=ready]")
        assert reply.get_attribute("data-done") == "finished" and page.inner_text("#error") == ""
        answers.append(reply.text_content())
    cli, _ = run_c(files["model.bin"], "-t", "0", "-n", "12", stdin="hello\n\nhow are you\n\n")
    assert answers == [line for line in cli.split("\n") if line][:2]
    assert any(url.endswith("/v1/chat/completions") for url in page.requests)
    assert not page.errors, page.errors


# ----------------------------------------------------------------------------- the batched step itself

def make_engine(files, kind):
    import serve
    if kind == "torch":
        return serve.TorchEngine(str(files["model.pt"]), {"style": str(files["lora.pt"])}, "cpu", slots=6)
    lora = files["wide_lora.bin" if kind == "q80_64.bin" else "lora.bin"]
    return serve.CEngine(str(files[kind]), {"style": str(lora)}, slots=6)


@pytest.mark.parametrize("kind", ["model.bin", "q80.bin", "q80_64.bin", "q4k.bin", "torch"])
def test_batched_step_equals_each_sequence_alone(files, kind):
    """A decoding step of sequences at different positions, some with an adapter, gives each the logits it
    gets alone: on the C core bit for bit (nano_forward_batch runs the same kernels on the same rows), on
    PyTorch to float rounding (a batched matmul may sum in another order). Releasing a sequence in the middle
    (PyTorch moves the last row into its place) changes nothing for the others."""
    import numpy as np
    engine = make_engine(files, kind)
    as_array = (lambda t: t.float().numpy().copy()) if kind == "torch" else (lambda a: a.copy())
    same = np.array_equal if kind != "torch" else (lambda a, b: np.allclose(a, b, rtol=1e-4, atol=1e-4))
    prompts = [[2, 10, 11, 12], [2, 20], [2, 30, 31, 32, 33, 34, 35], [4, 12, 13, 5]]
    adapters = [None, "style", None, "style"]
    alone = []
    for prompt, adapter in zip(prompts, adapters):
        sequence = engine.start(adapter)
        rows = [as_array(logits) for logits in engine.step([sequence], [prompt])]
        for token in (7, 8, 9, 10):
            rows += [as_array(logits) for logits in engine.step([sequence], [[token]])]   # valid until the next step
        engine.release(sequence)
        alone.append(np.stack(rows))
    # passes of the sequences that step: the last two join with their prompts beside the others' tokens, then
    # the first two end
    feeds = [[prompt] + [[token] for token in (7, 8, 9, 10)] for prompt in prompts]
    together = [[] for _ in prompts]
    started = [engine.start(adapter) for adapter in adapters]
    for number, stepping in enumerate(([0, 1], [0, 1, 2, 3], [0, 1, 2, 3], [2, 3], [2, 3], [2, 3])):
        inputs = [feeds[i][len(together[i])] for i in stepping]
        for i, row in zip(stepping, engine.step([started[i] for i in stepping], inputs)):
            together[i].append(as_array(row))
        if number == 2:
            for i in (0, 1):
                engine.release(started[i])
    for i, (single, batched) in enumerate(zip(alone, together)):
        assert same(single[:len(batched)], np.stack(batched)), i
    assert not np.allclose(alone[1][1:], alone[3][1:])   # different sequences: different logits


@pytest.mark.parametrize("kind", ["q80.bin", "q4k.bin", "torch"])
def test_steps_in_one_decode_call_draw_what_steps_one_by_one_draw(files, kind):
    """engine.decode, which runs several steps in one call (on the C core, nano_decode_batch), gives each
    sequence the tokens that as many passes and draws one by one give it, with sampling settings and seeds of
    its own (a repetition penalty among them, so each draw must see the tokens drawn before); and it refuses,
    having run nothing, steps that would go past the context."""
    import serve
    settings = [{"temperature": 0.9, "top_k": 20, "top_p": 1.0, "repetition_penalty": 1.3, "seed": 11},
                {"temperature": 1.2, "top_k": 0, "top_p": 0.8, "repetition_penalty": 1.0, "seed": 12},
                {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.5, "seed": None}]
    prompts, adapters = [[2, 10, 11, 12], [2, 20], [4, 12, 13, 5]], [None, "style", None]

    def started(engine):
        sequences = [engine.start(adapter) for adapter in adapters]
        samplers = [engine.sampler(each) for each in settings]
        engine.step(sequences, prompts)
        histories = [list(prompt) for prompt in prompts]
        for history, token in zip(histories, engine.sample(samplers, histories)):
            history.append(token)
        return sequences, samplers, histories

    engine = make_engine(files, kind)
    sequences, samplers, histories = started(engine)
    for _ in range(12):
        engine.step(sequences, [[history[-1]] for history in histories])
        for history, token in zip(histories, engine.sample(samplers, histories)):
            history.append(token)
    one_by_one = [history[len(prompt) + 1:] for history, prompt in zip(histories, prompts)]
    for sequence in sequences:
        engine.release(sequence)

    sequences, samplers, histories = started(engine)
    in_calls = [[] for _ in prompts]
    for steps in (1, 5, 6):
        draws = engine.decode(sequences, [history[-1] for history in histories], samplers, histories, steps)
        assert len(draws) == steps
        for history, drawn, tokens in zip(histories, in_calls, zip(*draws)):
            history.extend(tokens)
            drawn.extend(tokens)
    assert in_calls == one_by_one
    assert len(set(map(tuple, one_by_one))) == 3   # three sequences, three answers
    if kind != "torch":
        positions = [serve.NanoLibrary.StateHead.from_buffer(sequence).pos for sequence in sequences]
        assert positions == [len(history) - 1 for history in histories]
        with pytest.raises(RuntimeError, match="refused"):
            engine.decode(sequences, [history[-1] for history in histories], samplers, histories,
                          engine.context - min(positions) + 1)
        assert [serve.NanoLibrary.StateHead.from_buffer(sequence).pos for sequence in sequences] == positions


def test_a_failing_job_or_step_ends_alone_and_the_loop_goes_on(files, capfd):
    """Whatever goes wrong in a decoding step (here a job's text handling, then the engine itself, raising what
    nothing expects), the requests in that step end with an error and the next requests are served."""
    import asyncio
    import infer
    import serve
    engine = make_engine(files, "model.bin")
    template = infer.prompt_template(engine.config, engine.tokenizer, think=False)
    scheduler = serve.Scheduler(engine, engine.slots, 0)

    async def run(jobs):
        events = {job: [] for job in jobs}
        ended = asyncio.Event()

        def emitter(job):
            def emit(event):
                events[job].append(event)
                ended.set()
            return emit
        for job in jobs:
            job.emit = emitter(job)
            scheduler.submit(job)
        while not all(any("error" in e or "finish_reason" in e for e in events[job]) for job in jobs):
            ended.clear()
            await ended.wait()
        return [events[job][-1] for job in jobs]

    def job():
        return serve.Job(template, engine.tokenizer.encode("hello"), 8, [],
                         engine.sampler(serve.sampling_settings({"temperature": 0})), None, None)

    async def scenario():
        task = asyncio.create_task(scheduler.run())
        broken, healthy = job(), job()
        broken.take = lambda token: 1 / 0
        ends = await run([broken, healthy])
        assert "ZeroDivisionError" in ends[0]["error"] and ends[1]["finish_reason"] == "length"
        real_step, calls = engine.step, []
        engine.step = lambda *args: calls.append(1) or (real_step(*args) if len(calls) > 1 else {}["no such key"])
        ends = await run([job(), job()])
        assert all("KeyError" in end["error"] for end in ends)
        ends = await run([job()])
        assert ends[0]["finish_reason"] == "length" and ends[0]["completion_tokens"] == 8
        task.cancel()
    # on a thread of its own, for playwright's fixtures hold an event loop in this one; a loop that died would
    # leave the requests waiting, and the timeout fails the test
    outcome = []

    def play():
        try:
            asyncio.run(asyncio.wait_for(scenario(), 60))
            outcome.append(None)
        except BaseException as error:  # noqa: BLE001  (raised below, on the test's thread)
            outcome.append(error)
    player = threading.Thread(target=play)
    player.start()
    player.join()
    if outcome[0] is not None:
        raise outcome[0]
    assert len(engine.free_states) == engine.slots   # every slot came back
    assert "Traceback" in capfd.readouterr().err


def test_prompts_beyond_one_pass_are_split(files):
    # two prompts of 40 tokens hold more than the 64 rows of one pass: two passes, the same logits
    import numpy as np
    engine = make_engine(files, "model.bin")
    prompts = [[2] + [10 + i % 20 for i in range(39)], [2] + [30 - i % 15 for i in range(39)]]
    alone = []
    for prompt in prompts:
        sequence = engine.start(None)
        alone.append(engine.step([sequence], [prompt])[0].copy())
        engine.release(sequence)
    together = engine.step([engine.start(None), engine.start(None)], prompts)
    assert all(np.array_equal(a, b) for a, b in zip(alone, together))


# ----------------------------------------------------------------------------- Qwen files

QWEN_POSITIONS = 40960   # Qwen3's own context: served with infer.CONTEXT_LIMIT positions


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """A random Qwen3 file of 40960 positions (tests/test_qwen_c.py's writer, the original's layout), the
    transformers model it holds, the reference tokenizer, and serve.py on the file's C engine."""
    qwen_c = pytest.importorskip("test_qwen_c")
    from qwen_tokenizer import train_qwen_style_tokenizer
    from tokenizer import BPETokenizer
    directory = tmp_path_factory.mktemp("qwen_serve")
    tokenizer_path = train_qwen_style_tokenizer(directory, vocab_size=qwen_c.TOKENIZER_MERGES)
    bpe = BPETokenizer.from_tokenizer_json(tokenizer_path)
    path = directory / "qwen3.bin"
    model = qwen_c.write_qwen_bin(str(path), qwen_c.random_qwen("qwen3", seed=3, max_position_embeddings=QWEN_POSITIONS),
                                  bpe.token_bytes, bpe.scores)
    reference = qwen_c.tokenizers.Tokenizer.from_file(str(tokenizer_path))
    server = Server("-m", path)
    yield {"server": server, "path": path, "model": model, "reference": reference, "qwen_c": qwen_c}
    server.stop()


def qwen_chat(qwen, messages, think=None, max_tokens=16):
    extra = {"repetition_penalty": 1.0, **({"chat_template_kwargs": {"enable_thinking": think}} if think is not None else {})}
    return qwen["server"].client().chat.completions.create(model="", messages=messages, temperature=0,
                                                           max_tokens=max_tokens, extra_body=extra)


def test_qwen_file_is_served_with_the_front_ends_context(qwen):
    import infer
    status, health = request(qwen["server"], "GET", "/health")
    assert status == 200 and health["context"] == infer.CONTEXT_LIMIT < QWEN_POSITIONS


@pytest.mark.parametrize("think", [False, True])
def test_qwen_chat_equals_the_c_cli(qwen, think):
    """The ChatML turn (Qwen3's empty think block unless enable_thinking) and the answer streamed through the
    stream decoder, against the CLI's -i [--think]: the same greedy text, split characters included."""
    for question in ("用一句话介绍你自己", "What is 2+2?\n\nanswer <think> briefly"):
        answer = qwen_chat(qwen, [{"role": "user", "content": question}], think).choices[0].message.content
        cli, _ = run_c(qwen["path"], "-i", question, "-t", "0", "-r", "1", "-n", "16", *(["--think"] if think else []))
        assert answer == cli[:-1]


def test_qwen_conversation_equals_transformers(qwen):
    """A system message, a question, an answer and the next question, rendered as Qwen's chat template renders
    them: the prompt has the reference tokenizer's ids and the answer is transformers' greedy continuation."""
    messages = [{"role": "system", "content": "你是一个小模型。"}, {"role": "user", "content": "你好"},
                {"role": "assistant", "content": "你好！有什么可以帮你？"}, {"role": "user", "content": "讲个故事"}]
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    prompt_ids = qwen["reference"].encode(text + "<|im_start|>assistant\n<think>\n\n</think>\n\n").ids
    want = qwen["qwen_c"].transformers_greedy(qwen["model"], prompt_ids, 12, qwen["reference"])
    response = qwen_chat(qwen, messages, max_tokens=12)
    assert response.usage.prompt_tokens == len(prompt_ids)
    assert response.choices[0].message.content == qwen["reference"].decode(want, skip_special_tokens=False)


def test_qwen_empty_completion_is_400_and_the_server_goes_on(qwen):
    """A Qwen prompt has no <|bos|>: an empty one has nothing to continue, refused before it reaches the batch."""
    status, body = request(qwen["server"], "POST", "/v1/completions", {"prompt": "", "max_tokens": 2})
    assert_openai_error(status, body, 400)
    assert body["error"]["param"] == "prompt"
    assert qwen_chat(qwen, [{"role": "user", "content": "hi"}], max_tokens=2).choices[0].message.content is not None


def test_qwen_thinking_option_is_checked(qwen):
    status, body = request(qwen["server"], "POST", "/v1/chat/completions",
                           {"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"enable_thinking": "yes"}})
    assert_openai_error(status, body, 400)
    assert body["error"]["param"] == "chat_template_kwargs"

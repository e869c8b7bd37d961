"""
Serve a Nano model over HTTP: the OpenAI API that chat clients speak, and the browser page.

    python serve.py -m checkpoint/sft/best.pt [-l checkpoint/lora/best.pt] [--port 8000]
    python serve.py -m model_q80.bin --lora style=lora.bin --api-key $KEY --host 0.0.0.0
    curl localhost:8000/v1/chat/completions -d '{"messages":[{"role":"user","content":"你好"}],"stream":true}'
    open http://localhost:8000/      the page of infer/index.html, answering through this server

Routes: POST /v1/chat/completions and /v1/completions (streamed as server-sent events when "stream" is
true), GET /v1/models (the base model and each named LoRA adapter, chosen per request by "model"),
GET /health, GET / (the page). Errors come in the OpenAI error shape.

Engines: a .bin file runs on the C core (infer_c/libnano.so, the nano.c of the CLI and the page) through
ctypes; a .pt checkpoint runs on PyTorch (model.py), on the CPU or a GPU. One decoding loop, a task of the
event loop, serves every request: each step it admits waiting requests, advances every running request by
one token (a new one by its prompt), then lets the streams send what the step made (a stream's text goes out
at most every --stream-interval seconds, the first token at once). On the C core that
step is one forward pass of all the requests, the new ones' prompts included (nano_forward_batch: the
weights are read once for all of them); on PyTorch, one pass of the running requests of each model (base
or adapter), a row of a KV cache each at its own position, and a prefill of each new one. While no prompt
is new, one call of the engine runs as many steps as a stream interval holds (nano_decode_batch on the C
core), each step's tokens the next one's inputs.
Each request samples with its own settings (infer.py's sampler on PyTorch, the CLI's nano_sample on the
C core, so a seed reproduces what those print) and stops on its own conditions; a client that goes away
frees its slot when the call it is in ends.

Prompts follow infer.py's templates. A Nano model's completion continues <|bos|>text and its chat is
<|instruct_mark|>question<|response_mark|>answer<|eos|> per turn, a system message opening the first
question; a Qwen file's chat is ChatML, every message <|im_start|>role\ncontent<|im_end|>\n, with Qwen3's
empty think block unless the request's chat_template_kwargs has "enable_thinking": true. The context is
the model's, at most infer.CONTEXT_LIMIT positions unless --context says otherwise; prompt and answer must
fit it: a request that cannot is refused (400), never cut.
"""

import argparse
import asyncio
import collections
import concurrent.futures
import contextlib
import ctypes
import gc
import json
import os
import sys
import time
import traceback
import uuid

import numpy as np
import torch

import checkpoint
import infer
from model import KVCache

ROOT = os.path.dirname(os.path.abspath(__file__))
LIBRARY = os.path.join(ROOT, "infer_c", "libnano.so")
PAGE = os.path.join(ROOT, "infer", "index.html")
MAX_BODY_BYTES = 1 << 20
MAX_STOP_STRINGS = 4
STREAM_INTERVAL = 0.02   # seconds between a stream's events (SGLang's --stream-interval counts tokens instead)


class ApiError(Exception):
    """A refused request: HTTP status and the OpenAI error object's fields."""

    def __init__(self, status, message, param=None, kind="invalid_request_error", code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self):
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ----------------------------------------------------------------------------- the C engine

class NanoLibrary:
    """nano.h's functions through ctypes. The structs are opaque byte buffers of the library's own sizes,
    except the start of NanoState (model, lora, pos), which a new request resets."""

    class StateHead(ctypes.Structure):
        _fields_ = [("model", ctypes.c_void_p), ("lora", ctypes.c_void_p), ("pos", ctypes.c_int)]

    class File(ctypes.Structure):   # NanoFile
        _fields_ = [("data", ctypes.c_void_p), ("size", ctypes.c_size_t), ("base", ctypes.c_void_p),
                    ("mapped", ctypes.c_int)]

    def __init__(self, path=LIBRARY):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} does not exist: build it with `make -C infer_c`")
        lib = ctypes.CDLL(path)
        p, i, f, size = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_size_t
        signatures = {
            "nano_file_read": (i, [p, ctypes.c_char_p, i, ctypes.c_char_p, size]),
            "nano_file_free": (None, [p]),
            "nano_model_load": (i, [p, p, size, ctypes.c_char_p, ctypes.c_char_p, size]),
            "nano_model_free": (None, [p]),
            "nano_model_limit_context": (None, [p, i]),
            "nano_model_tile": (i, [p]),
            "nano_lora_load": (i, [p, p, p, size, ctypes.c_char_p, ctypes.c_char_p, size]),
            "nano_state_init": (i, [p, p]),
            "nano_state_free": (None, [p]),
            "nano_state_attach_lora": (i, [p, p]),
            "nano_forward_batch": (i, [p, p, p, i, p]),
            "nano_sampler_init": (i, [p, i, f, i, f, f, ctypes.c_uint64]),
            "nano_sampler_free": (None, [p]),
            "nano_sampler_see": (None, [p, i]),
            "nano_sample": (i, [p, p]),
            "nano_sample_batch": (None, [p, p, i, p]),
            "nano_decode_batch": (i, [p, p, p, i, i, p]),
        }
        for name, (result, arguments) in signatures.items():
            function = getattr(lib, name)
            function.restype, function.argtypes = result, arguments
        self.lib = lib
        self.sizes = {kind: size.in_dll(lib, f"nano_{kind}_size").value for kind in ("model", "lora", "state", "sampler")}

    def struct(self, kind):
        return ctypes.create_string_buffer(self.sizes[kind])

    def read(self, path, is_model):
        """The file in memory as the CLI reads it (nano_file_read); free it with nano_file_free."""
        file, err = self.File(), ctypes.create_string_buffer(512)
        if self.lib.nano_file_read(ctypes.byref(file), path.encode(), is_model, err, len(err)):
            raise ValueError(err.value.decode(errors="replace"))
        return file

    def load(self, kind, address, size, name, *model):
        """A NanoModel or NanoLora from the size bytes of a file at address (kept alive by the caller)."""
        handle, err = self.struct(kind), ctypes.create_string_buffer(512)
        loader = self.lib.nano_model_load if kind == "model" else self.lib.nano_lora_load
        if loader(handle, *model, address, size, name.encode(), err, len(err)):
            raise ValueError(err.value.decode(errors="replace"))
        return handle


class CSampler:
    """The sampler of infer.py's make_sampler, done by the C engine's nano_sample (CEngine.sample draws for a
    batch of them at once); the tokens of a history it has not seen yet are marked seen first, as
    nano_generate does, and each token drawn by nano_sample_batch, which marks it itself."""

    def __init__(self, library, vocab_size, settings):
        self.library, self.handle, self.seen = library, library.struct("sampler"), 0
        seed = settings["seed"] if settings["seed"] is not None else int.from_bytes(os.urandom(8), "little")
        if library.lib.nano_sampler_init(self.handle, vocab_size, settings["temperature"], settings["top_k"],
                                         settings["top_p"], settings["repetition_penalty"], seed & (2**64 - 1)):
            raise MemoryError("out of memory for a sampler")
        self.address = ctypes.addressof(self.handle)

    def see(self, history, draws=1):
        """Before draws: the history's new tokens (a prompt), and the tokens drawn next, which join it."""
        for token in history[self.seen:]:
            self.library.lib.nano_sampler_see(self.address, token)
        self.seen = len(history) + draws

    def __del__(self):
        self.library.lib.nano_sampler_free(self.handle)


class CEngine:
    """A .bin model (and .bin adapters) on the C core, with a NanoState (KV cache of context positions) per slot."""

    def __init__(self, path, adapters, slots, context=None):
        self.library = NanoLibrary()
        from export import read_bin  # the Python reader of the file, for the config and the vocabulary
        self.config, self.tokenizer, _, _, _ = read_bin(path)
        self.files = {path: self.library.read(path, is_model=True)}
        self.model = self.library.load("model", self.files[path].data, self.files[path].size, path)
        if not self.files[path].mapped:   # a mapped file is read-only
            self.library.lib.nano_model_tile(self.model)
        self.context = min(context or infer.context_of(self.config), self.config.block_size)
        self.library.lib.nano_model_limit_context(self.model, self.context)
        self.adapters = {None: None}
        self.adapter_names = list(adapters)
        for name, adapter_path in adapters.items():
            if not adapter_path.endswith(".bin"):
                raise ValueError(f"{adapter_path}: a .bin model takes .bin adapters (export.py --lora)")
            self.files[adapter_path] = self.library.read(adapter_path, is_model=False)
            file = self.files[adapter_path]
            self.adapters[name] = self.library.load("lora", file.data, file.size, adapter_path, self.model)
        self.free_states = []
        self.slots = min(slots, self.context)   # nano_forward_batch takes up to a context of rows
        for _ in range(self.slots):
            state = self.library.struct("state")
            if self.library.lib.nano_state_init(state, self.model):
                raise MemoryError(f"out of memory for {slots} KV caches: ask for fewer --parallel")
            self.free_states.append(state)
        self.logits = np.zeros((self.slots, self.config.vocab_size), dtype=np.float32)
        self.tokens = np.zeros(self.slots, dtype=np.int32)   # the tokens of a batch's draws
        self.logits_address, self.tokens_address = self.logits.ctypes.data, self.tokens.ctypes.data
        self.sampler_handles = (ctypes.c_void_p * self.slots)()

    def sampler(self, settings):
        return CSampler(self.library, self.config.vocab_size, settings)

    def start(self, adapter):
        """A new sequence: a free slot's state, emptied, with the adapter attached."""
        state = self.free_states.pop()
        if self.library.lib.nano_state_attach_lora(state, self.adapters[adapter]):
            self.free_states.append(state)
            raise MemoryError("out of memory for the adapter's buffer")
        NanoLibrary.StateHead.from_buffer(state).pos = 0
        return state

    def step(self, sequences, inputs):
        """inputs[i] (a prompt, or the token of a decoding step) into each sequence, batched: one pass, or several
        when they hold more tokens than the context. A row of logits each, valid until the next step."""
        first = 0
        while first < len(sequences):
            end, rows = first + 1, len(inputs[first])
            while end < len(sequences) and rows + len(inputs[end]) <= self.context:
                rows += len(inputs[end])
                end += 1
            self.forward_batch(sequences[first:end], inputs[first:end], self.logits[first:end])
            first = end
        return list(self.logits[:len(sequences)])

    def sample(self, samplers, histories):
        """Each sequence's next token from its row of the last step's logits, by its sampler, in one call."""
        self.library.lib.nano_sample_batch(self.handles(samplers, histories, 1), self.logits_address, len(samplers),
                                           self.tokens_address)
        return self.tokens[:len(samplers)].tolist()

    def decode(self, sequences, tokens, samplers, histories, steps):
        """steps decoding steps of the sequences, tokens their inputs, each step's draws the next step's inputs, in
        one call of the C core (nano_decode_batch); a list of each step's draws."""
        states = self.states(sequences)
        draws = np.zeros((steps + 1, len(sequences)), dtype=np.int32)
        draws[0] = tokens
        if self.library.lib.nano_decode_batch(states, self.handles(samplers, histories, steps), draws.ctypes.data,
                                              len(sequences), steps, self.logits_address):
            raise RuntimeError("nano_decode_batch refused the steps (a sequence past its context?)")
        return draws[1:].tolist()

    def handles(self, samplers, histories, draws):
        """The samplers' addresses for a call that draws `draws` tokens each, their histories seen first."""
        for i, (sampler, history) in enumerate(zip(samplers, histories)):
            sampler.see(history, draws)
            self.sampler_handles[i] = sampler.address
        return self.sampler_handles

    @staticmethod
    def states(sequences):
        """The sequences' NanoStates as the array of pointers nano.h's batch calls take."""
        return (ctypes.c_void_p * len(sequences))(*(ctypes.addressof(s) for s in sequences))

    def forward_batch(self, sequences, inputs, logits):
        states = self.states(sequences)
        counts = np.array([len(ids) for ids in inputs], dtype=np.int32)
        ids = np.array([token for tokens in inputs for token in tokens], dtype=np.int32)
        if self.library.lib.nano_forward_batch(states, ids.ctypes.data, counts.ctypes.data, len(sequences),
                                               logits.ctypes.data):
            raise RuntimeError("nano_forward_batch refused the pass (a sequence past its context?)")

    def release(self, state):
        self.free_states.append(state)

    def __del__(self):   # the states (all released by now), the model, then the files they point into
        lib = self.library.lib
        for state in getattr(self, "free_states", []):
            lib.nano_state_free(state)
        if hasattr(self, "model"):
            lib.nano_model_free(self.model)
        for file in getattr(self, "files", {}).values():
            lib.nano_file_free(ctypes.byref(file))


# ----------------------------------------------------------------------------- the PyTorch engine

class TorchSequence:
    """A sequence on PyTorch: its model (the base or an adapter's) and its row in that model's batch, from
    its prefill on."""

    def __init__(self, batch):
        self.batch, self.row = batch, None


class TorchBatch:
    """The running sequences of one model in the rows 0..n-1 of one KV cache with a length per row, so that a
    decoding step is one forward pass of n rows (model.py's per-row KVCache)."""

    def __init__(self, model, slots, device, context):
        self.model, self.device, self.context = model, device, context
        self.cache = KVCache(model.config, slots, device, model.tok_embeddings.weight.dtype, capacity=context)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)
        self.sequences = []

    @torch.inference_mode()
    def prefill(self, sequence, prompt_ids):
        """The logits after the prompt, run alone; its keys and values then move into the next row."""
        alone = KVCache(self.model.config, 1, self.device, self.model.tok_embeddings.weight.dtype, capacity=self.context)
        logits, _ = self.model(torch.tensor([prompt_ids], device=self.device), kv_cache=alone)
        sequence.row = len(self.sequences)
        self.copy_row(alone, 0, sequence.row, len(prompt_ids))
        self.lengths[sequence.row] = len(prompt_ids)
        self.sequences.append(sequence)
        return logits[0, -1]

    def copy_row(self, source, source_row, row, length):
        for keys, values, source_keys, source_values in zip(self.cache.keys, self.cache.values, source.keys,
                                                            source.values):
            keys[row, :, :length] = source_keys[source_row, :, :length]
            values[row, :, :length] = source_values[source_row, :, :length]

    @torch.inference_mode()
    def step(self, tokens_by_row):
        n = len(self.sequences)
        self.cache.length = self.lengths[:n]   # a view: the forward pass advances each row's length in place
        logits, _ = self.model(torch.tensor(tokens_by_row, device=self.device)[:, None], kv_cache=self.cache)
        return logits[:, -1]

    def release(self, sequence):
        """The last row moves into the freed one, so that the running rows stay 0..n-1."""
        if sequence.row is None:
            return
        last = self.sequences.pop()
        if last is not sequence:
            self.copy_row(self.cache, last.row, sequence.row, int(self.lengths[last.row]))
            self.lengths[sequence.row] = self.lengths[last.row]
            last.row = sequence.row
            self.sequences[sequence.row] = last


class TorchEngine:
    """A .pt checkpoint (or a .bin off the CPU) on PyTorch: a model and a batch of rows per adapter."""

    def __init__(self, path, adapters, device, slots, context=None):
        base, self.tokenizer = checkpoint.load_model(path, device)
        self.config, self.slots, self.adapter_names = base.config, slots, list(adapters)
        self.context = min(context or infer.context_of(self.config), self.config.block_size)
        self.batches = {None: TorchBatch(base, slots, device, self.context)}
        for name, adapter_path in adapters.items():
            model, _ = checkpoint.load_model(path, device)
            self.batches[name] = TorchBatch(checkpoint.attach_lora(model, adapter_path), slots, device, self.context)

    def sampler(self, settings):
        return infer.make_sampler(settings["temperature"], settings["top_k"], settings["top_p"],
                                  settings["repetition_penalty"], settings["seed"])

    def start(self, adapter):
        return TorchSequence(self.batches[adapter])

    def step(self, sequences, inputs):
        """A decoding pass per model in use, all its running sequences in it, then the prompt of each new one
        alone (model.py's per-row cache takes one token per row); a row of logits each."""
        logits = {}
        for batch in {sequence.batch for sequence in sequences if sequence.row is not None}:
            tokens_by_row = [None] * len(batch.sequences)
            for sequence, ids in zip(sequences, inputs):
                if sequence.batch is batch and sequence.row is not None:
                    tokens_by_row[sequence.row] = ids[0]
            if None in tokens_by_row:
                raise RuntimeError("the running sequences of a model must step together")
            rows = batch.step(tokens_by_row)
            logits.update((sequence, rows[sequence.row]) for sequence in batch.sequences)
        for sequence, ids in zip(sequences, inputs):
            if sequence not in logits:
                logits[sequence] = sequence.batch.prefill(sequence, ids)
        self.last_logits = [logits[sequence] for sequence in sequences]
        return self.last_logits

    def sample(self, samplers, histories):
        """Each sequence's next token from its row of the last step's logits, by its sampler."""
        return [sample(logits, history) for sample, logits, history in zip(samplers, self.last_logits, histories)]

    def decode(self, sequences, tokens, samplers, histories, steps):
        """steps decoding steps, each step's draws the next step's inputs; a list of each step's draws."""
        histories, draws = [list(history) for history in histories], []
        for _ in range(steps):
            self.step(sequences, [[token] for token in tokens])
            tokens = self.sample(samplers, histories)
            for history, token in zip(histories, tokens):
                history.append(token)
            draws.append(tokens)
        return draws

    def release(self, sequence):
        sequence.batch.release(sequence)


def load_engine(model_path, adapters, device, slots, context=None):
    engine = CEngine(model_path, adapters, slots, context) if model_path.endswith(".bin") and device == "cpu" \
        else TorchEngine(model_path, adapters, device, slots, context)
    if not engine.config.is_causal:
        raise ValueError(f"{model_path} is a non-causal (seq2seq) model: serve.py serves language models; "
                         "use infer.py")
    return engine


# ----------------------------------------------------------------------------- requests

class Job:
    """One request in the decoding loop: its prompt, sampler and stop conditions, and where its text goes.
    emit(event) is called on the event loop with {"text"} pieces, then one {"finish_reason", ...}."""

    def __init__(self, template, prompt_ids, max_tokens, stop, sampler, adapter, emit):
        self.stop_ids, self.prompt_ids, self.max_tokens, self.stop = template.stop_ids, prompt_ids, max_tokens, stop
        self.sampler, self.adapter, self.emit = sampler, adapter, emit
        self.decoder = template.tokenizer.stream_decoder()   # a BPE token may end inside a character
        self.history, self.new_ids = list(prompt_ids), []
        self.next_input = list(prompt_ids)    # what the next forward pass feeds this sequence
        self.text, self.sent = "", 0            # the answer so far, and how much of it went out
        self.sendable, self.send_due = 0, 0.0   # how much of it may go out, and from when
        self.sequence = None
        self.cancelled = False

    def take_draws(self, tokens):
        """The job's tokens of a call's steps, until one finishes it; the finish reason, or None to go on."""
        for token in tokens:
            if self.cancelled:
                return None
            reason = self.take(token)
            if reason:
                return reason
        return None

    def take(self, token):
        """Sample bookkeeping for one token; returns the finish reason, or None to go on."""
        if token in self.stop_ids:
            return self.close_text() or "stop"
        self.new_ids.append(token)
        self.history.append(token)
        self.next_input = [token]
        self.text += self.decoder.push(token)
        if self.cut_at_stop_string():
            return "stop"
        if len(self.new_ids) == self.max_tokens:
            return self.close_text() or "length"
        # text that may be the start of a stop string waits until it is known not to be
        held = max((len(s) - 1 for s in self.stop), default=0)
        self.sendable = len(self.text) - held
        return None

    def send_if_due(self, now, interval):
        """The text goes out at most once per interval, the first piece at once: an event costs the server and its
        client more than a small model's decoding step does, and a reader sees no difference at 50 a second."""
        if now >= self.send_due and self.sendable > self.sent:
            self.send(self.sendable)
            self.send_due = now + interval

    def cut_at_stop_string(self):
        hits = [self.text.find(s) for s in self.stop if s in self.text]
        if hits:
            self.text = self.text[:min(hits)]
        return bool(hits)

    def close_text(self):
        """The bytes of a character the answer ended inside of join the text (as U+FFFD); "stop" when that
        completes a stop string."""
        self.text += self.decoder.flush()
        return "stop" if self.cut_at_stop_string() else None

    def send(self, upto):
        if upto > self.sent:
            self.emit({"text": self.text[self.sent:upto]})
            self.sent = upto

    def finish(self, reason):
        self.send(len(self.text))
        self.emit({"finish_reason": reason, "prompt_tokens": len(self.prompt_ids),
                   "completion_tokens": len(self.new_ids)})


class Scheduler:
    """The decoding loop, a task of the server's event loop: admits waiting jobs into free slots, runs one forward
    pass of every running job (the prompts of the new ones, a token of the others), samples each one's next
    token, lets the streams send it, repeats.
    The engine's calls run on one thread of their own, so that the server goes on answering while a long prompt
    is read, and always the same one: OpenMP keeps a team of threads per calling thread, and two teams on two
    cores put their threads to sleep between passes (waking them cost a small model's one-stream decoding a
    fifth of its speed: 1.26x from one thread in an A/B of two servers). When every job is decoding, one call of
    the engine runs as many steps as fit in a stream interval (text goes out no more often than that anyway):
    the hand-over to that thread and the loop's own work between two passes are then done once per call, not
    once per token."""

    MAX_STEPS = 64   # steps in one call, at most (a small model makes ~90 in an interval)

    def __init__(self, engine, slots, stream_interval):
        self.engine, self.slots, self.stream_interval = engine, slots, stream_interval
        self.waiting = collections.deque()
        self.arrived = asyncio.Event()
        self.running = []
        self.steps = self.batched_tokens = 0    # decoding steps and the tokens they made: how full batches are
        self.step_seconds, self.paced_rows = 0.0, 0   # the last decoding call's time per step, and its rows
        self.engine_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="engine")

    def submit(self, job):
        self.waiting.append(job)
        self.arrived.set()

    def admit(self):
        while len(self.running) < self.slots and self.waiting:
            job = self.waiting.popleft()
            if job.cancelled:
                continue
            try:
                job.sequence = self.engine.start(job.adapter)
            except MemoryError as error:
                job.emit({"error": str(error)})
                continue
            self.running.append(job)

    def take_all(self, draws):
        """The tokens each running job drew, a list of them per step; finished, cancelled and failed jobs leave
        their slots."""
        now = time.monotonic()
        still_running = []
        for row, job in enumerate(self.running):
            try:
                reason = job.take_draws([tokens[row] for tokens in draws])
                if reason:
                    job.finish(reason)
                elif not job.cancelled:
                    job.send_if_due(now, self.stream_interval)
            except Exception as error:  # noqa: BLE001  (a job that fails ends alone)
                reason = fail(job, error)
            if reason or job.cancelled:
                self.engine.release(job.sequence)
            else:
                still_running.append(job)
        self.running = still_running

    def count(self, steps):
        self.steps += steps
        self.batched_tokens += steps * len(self.running)

    def prefill_step(self):
        """One pass with the new jobs' prompts in it, and a draw for each job."""
        self.engine.step([job.sequence for job in self.running], [job.next_input for job in self.running])
        self.count(1)
        return [self.engine.sample([job.sampler for job in self.running], [job.history for job in self.running])]

    def decoding_steps(self):
        """As many steps as the stream interval holds at the last call's pace, none past a job's max_tokens; one
        step when the batch has grown since (a pace of fewer rows would overestimate how many fit)."""
        if len(self.running) > self.paced_rows:
            return 1
        fit = int(self.stream_interval / self.step_seconds) if self.step_seconds > 0 else self.MAX_STEPS
        room = min(job.max_tokens - len(job.new_ids) for job in self.running)
        return max(1, min(fit, room, self.MAX_STEPS))

    def decode(self):
        steps, start = self.decoding_steps(), time.perf_counter()
        draws = self.engine.decode([job.sequence for job in self.running], [job.next_input[0] for job in self.running],
                                   [job.sampler for job in self.running], [job.history for job in self.running], steps)
        self.step_seconds, self.paced_rows = (time.perf_counter() - start) / steps, len(self.running)
        self.count(steps)
        return draws

    async def run(self):
        loop = asyncio.get_running_loop()
        while True:
            if not self.running and not self.waiting:
                self.arrived.clear()
                await self.arrived.wait()
            self.admit()
            if not self.running:
                continue
            try:
                step = self.prefill_step if any(len(job.next_input) > 1 for job in self.running) else self.decode
                draws = await loop.run_in_executor(self.engine_thread, step)
                self.take_all(draws)
            except Exception as error:  # noqa: BLE001  (the engine failed: the step's jobs end, the loop goes on)
                for job in self.running:
                    fail(job, error)
                    self.engine.release(job.sequence)
                self.running = []
                continue
            # Two turns of the event loop: in the first the streams send what this step made; in the second,
            # with nothing new for them, a stream whose client left is cancelled (anyio cancels only a task
            # that is waiting, and each step would otherwise hand it a token just before)
            await asyncio.sleep(0)
            await asyncio.sleep(0)


def fail(job, error):
    """A job ends with the error, which its client gets as a 503. The engine's refusals (MemoryError,
    RuntimeError) say what went wrong; anything else is a bug, whose traceback goes to the log."""
    refused = isinstance(error, (MemoryError, RuntimeError))
    if not refused:
        traceback.print_exception(error)
    job.emit({"error": str(error) if refused else f"internal error: {type(error).__name__}: {error}"})
    return "error"


# ----------------------------------------------------------------------------- request bodies

def field(body, name, kinds, default=None, check=None, need=""):
    """body[name] if it has one of the types kinds (bool is not a number) and passes check, else a 400."""
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds) or check and not check(value):
        raise ApiError(400, f"'{name}' must be {need}, got {json.dumps(value)[:80]}", param=name)
    return value


def sampling_settings(body):
    defaults = infer.SAMPLING_DEFAULTS
    number = (int, float)
    return {
        "temperature": float(field(body, "temperature", number, defaults["temperature"],
                                   lambda v: 0 <= v < float("inf"), "a number >= 0 (0 is greedy)")),
        "top_p": float(field(body, "top_p", number, defaults["top_p"], lambda v: 0 < v <= 1, "in (0, 1]")),
        "top_k": field(body, "top_k", (int,), defaults["top_k"], lambda v: v >= 0, "an integer >= 0 (0 is off)"),
        "repetition_penalty": float(field(body, "repetition_penalty", number, defaults["repetition_penalty"],
                                          lambda v: 0 < v < float("inf"), "a number > 0 (1 is off)")),
        "seed": field(body, "seed", (int,), None, lambda v: -2**63 <= v < 2**64, "a 64-bit integer"),
    }


def stop_strings(body):
    stop = field(body, "stop", (str, list), [], need=f"a string or a list of at most {MAX_STOP_STRINGS} strings")
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOP_STRINGS} non-empty strings",
                       param="stop")
    return stop


def message_text(content):
    """A message's content: a string, or the list of {"type": "text", "text": ...} parts newer clients send."""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                         for p in content):
        return "".join(part["text"] for part in content)
    return content


def chat_prompt(template, messages):
    """The ids of a conversation in the model's template; it must end with the question to answer."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    turns, question_open = [], False   # a system or user message waits for its answer
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        content = message_text(message.get("content")) if isinstance(message, dict) else None
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise ApiError(400, f"messages[{index}] must be {{\"role\": system|user|assistant, \"content\": "
                                "string or text parts}", param="messages")
        if role == "assistant" and not question_open:
            raise ApiError(400, f"messages[{index}]: an assistant message must follow a user message",
                           param="messages")
        question_open = role != "assistant"
        turns.append((role, content))
    if messages[-1]["role"] != "user":
        raise ApiError(400, "the last message must be the user's", param="messages")
    return template.conversation(turns)


def completion_prompt(template, body):
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string (one prompt per request)", param="prompt")
    ids = template.continuation(prompt)
    if not ids:   # a model without <|bos|> (Qwen) has nothing to continue
        raise ApiError(400, "'prompt' is empty: this model has no beginning-of-text token to continue from",
                       param="prompt")
    return ids


def thinking(body):
    """Qwen3's thinking, asked for as vLLM and SGLang take it: chat_template_kwargs {"enable_thinking": true}."""
    options = field(body, "chat_template_kwargs", (dict,), {}, need='an object such as {"enable_thinking": true}')
    think = options.get("enable_thinking", False)
    if not isinstance(think, bool):
        raise ApiError(400, "'chat_template_kwargs.enable_thinking' must be true or false", param="chat_template_kwargs")
    return think


def answer_budget(body, prompt_length, context):
    """max_tokens, checked against the room the prompt leaves in the context (all of it by default)."""
    room = context - prompt_length
    if room < 1:
        raise ApiError(400, f"the prompt is {prompt_length} tokens: the model's context of {context} tokens "
                            "leaves no room for an answer", param="messages", code="context_length_exceeded")
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    asked = field(body, name, (int,), room, lambda v: v >= 1, "an integer >= 1")
    if asked > room:
        raise ApiError(400, f"'{name}' is {asked}, but a prompt of {prompt_length} tokens leaves {room} of the "
                            f"context of {context}", param=name, code="context_length_exceeded")
    return asked


# ----------------------------------------------------------------------------- the app

def page_for_server(path=PAGE):
    """infer/index.html, allowed to talk to the server it comes from (its own policy forbids any network)."""
    with open(path, encoding="utf-8") as f:
        page = f.read()
    policy = "connect-src data:;"
    if policy not in page:
        raise ValueError(f"{path}: its Content-Security-Policy has no '{policy}' to open for the server")
    return page.replace(policy, "connect-src data: 'self';", 1)


def create_app(engine, base_name, api_key=None, max_body_bytes=MAX_BODY_BYTES, stream_interval=STREAM_INTERVAL):
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    scheduler = Scheduler(engine, engine.slots, stream_interval)

    @contextlib.asynccontextmanager
    async def decoding(app):
        task = asyncio.create_task(scheduler.run())
        yield
        task.cancel()

    app = FastAPI(title="Nano", docs_url=None, redoc_url=None, openapi_url=None, lifespan=decoding)
    page = page_for_server()
    created = int(time.time())
    model_names = [base_name] + engine.adapter_names

    @app.exception_handler(ApiError)
    async def api_error(request, error):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, error):   # unknown routes and methods, in the same shape
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(error.status_code, str(error.detail), kind=kind).body(),
                            status_code=error.status_code)

    def authorize(request):
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           kind="authentication_error", code="invalid_api_key")

    async def json_body(request):
        """The body as a JSON object, refused past max_body_bytes whether or not it declares its length."""
        authorize(request)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_body_bytes:
            raise ApiError(413, f"request body over {max_body_bytes} bytes")
        data = b""
        async for chunk in request.stream():
            data += chunk
            if len(data) > max_body_bytes:
                raise ApiError(413, f"request body over {max_body_bytes} bytes")
        try:
            body = json.loads(data)
        except (ValueError, UnicodeDecodeError) as error:
            raise ApiError(400, f"the body is not JSON: {error}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    def adapter_of(body):
        name = field(body, "model", (str,), None, need="a model id of GET /v1/models") or base_name   # "" too
        if name not in model_names:
            raise ApiError(404, f"model {name!r} does not exist: GET /v1/models lists them", param="model",
                           code="model_not_found")
        return None if name == base_name else name

    def template_of(body):
        return infer.prompt_template(engine.config, engine.tokenizer, think=thinking(body))

    async def generate(request, body, template, prompt_ids, shape):
        """Run a job; the whole response, or its server-sent events when body['stream']."""
        field(body, "n", (int,), 1, lambda v: v == 1, "1 (one choice per request)")
        stream = field(body, "stream", (bool,), False, need="true or false")
        adapter = adapter_of(body)
        max_tokens = answer_budget(body, len(prompt_ids), engine.context)
        stop, settings = stop_strings(body), sampling_settings(body)
        events = asyncio.Queue()
        job = Job(template, prompt_ids, max_tokens, stop, engine.sampler(settings), adapter,
                  events.put_nowait)
        scheduler.submit(job)
        reply = {"id": f"{shape['id_prefix']}-{uuid.uuid4().hex}", "created": int(time.time()),
                 "model": body.get("model") or base_name}

        async def next_event():
            event = await events.get()
            if "error" in event:
                raise ApiError(503, event["error"], kind="server_error")
            return event

        if not stream:
            try:
                pieces = []
                while "finish_reason" not in (event := await next_event()):
                    pieces.append(event["text"])
            finally:
                job.cancelled = True   # a client that left before the end frees its slot too
            return {**reply, "object": shape["object"], "choices": [shape["choice"]("".join(pieces), event)],
                    "usage": usage(event)}

        include_usage = isinstance(body.get("stream_options"), dict) and body["stream_options"].get("include_usage")

        text_event = sse_of_text(lambda text: {**reply, "object": shape["chunk_object"], "choices": [shape["delta"](text)]})

        async def server_sent_events():
            try:
                for chunk in shape["opening"]():
                    yield sse({**reply, "object": shape["chunk_object"], "choices": [chunk]})
                while "finish_reason" not in (event := await next_event()):
                    yield text_event(event["text"])
                yield sse({**reply, "object": shape["chunk_object"], "choices": [shape["last"](event)],
                           **({"usage": usage(event)} if include_usage else {})})
                yield "data: [DONE]\n\n"
            except ApiError as error:
                yield sse(error.body())
            finally:
                job.cancelled = True

        return StreamingResponse(server_sent_events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    chat_shape = {
        "id_prefix": "chatcmpl", "object": "chat.completion", "chunk_object": "chat.completion.chunk",
        "choice": lambda text, end: {"index": 0, "message": {"role": "assistant", "content": text},
                                     "finish_reason": end["finish_reason"], "logprobs": None},
        "opening": lambda: [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
        "delta": lambda text: {"index": 0, "delta": {"content": text}, "finish_reason": None},
        "last": lambda end: {"index": 0, "delta": {}, "finish_reason": end["finish_reason"]},
    }
    completion_shape = {
        "id_prefix": "cmpl", "object": "text_completion", "chunk_object": "text_completion",
        "choice": lambda text, end: {"index": 0, "text": text, "finish_reason": end["finish_reason"], "logprobs": None},
        "opening": lambda: [],
        "delta": lambda text: {"index": 0, "text": text, "finish_reason": None, "logprobs": None},
        "last": lambda end: {"index": 0, "text": "", "finish_reason": end["finish_reason"], "logprobs": None},
    }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await json_body(request)
        template = template_of(body)
        return await generate(request, body, template, chat_prompt(template, body.get("messages")), chat_shape)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await json_body(request)
        template = template_of(body)
        return await generate(request, body, template, completion_prompt(template, body), completion_shape)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "nano",
                                            **({"parent": base_name} if name != base_name else {})}
                                           for name in model_names]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": len(scheduler.running), "waiting": len(scheduler.waiting),
                "slots": engine.slots, "context": engine.context,
                "steps": scheduler.steps, "batched_tokens": scheduler.batched_tokens,
                "defaults": {**infer.SAMPLING_DEFAULTS, "max_new_tokens": 0}}   # the page fills its settings in

    @app.get("/")
    async def index():
        return HTMLResponse(page)

    return app


def sse(payload):
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def sse_of_text(payload_of):
    """text -> sse(payload_of(text)), the payload encoded once around a marker: each token's event then costs the
    encoding of its text alone."""
    marker = "\0text\0"
    head, tail = sse(payload_of(marker)).split(json.dumps(marker))
    return lambda text: head + json.dumps(text, ensure_ascii=False) + tail


def usage(end):
    return {"prompt_tokens": end["prompt_tokens"], "completion_tokens": end["completion_tokens"],
            "total_tokens": end["prompt_tokens"] + end["completion_tokens"]}


# ----------------------------------------------------------------------------- command line

def parse_adapters(specs):
    """--lora name=path or --lora path (then named by its path), in order."""
    adapters = {}
    for spec in specs:
        name, _, path = spec.rpartition("=") if "=" in spec else (spec, "", spec)
        if not name or not path:
            raise ValueError(f"--lora {spec!r}: expected NAME=PATH or PATH")
        if name in adapters:
            raise ValueError(f"--lora {spec!r}: the name {name!r} is used twice")
        if not os.path.exists(path):
            raise FileNotFoundError(f"LoRA adapter {path!r} does not exist")
        adapters[name] = path
    return adapters


def build_parser():
    parser = argparse.ArgumentParser(description="Serve a Nano model: OpenAI-compatible API and the chat page.")
    parser.add_argument("-m", "--model", required=True, help="exported model .bin (C engine) or checkpoint .pt")
    parser.add_argument("-l", "--lora", action="append", default=[], metavar="[NAME=]PATH",
                        help="a LoRA adapter, selectable by 'model': NAME (or PATH); repeatable")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("NANO_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 routes (default: $NANO_API_KEY, else none)")
    parser.add_argument("--parallel", type=int, default=16, help="requests decoded together (default %(default)s)")
    parser.add_argument("--context", type=int, default=None,
                        help=f"positions of each request's context (default: the model's, at most {infer.CONTEXT_LIMIT})")
    parser.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES)
    parser.add_argument("--stream-interval", type=float, default=STREAM_INTERVAL, metavar="SECONDS",
                        help="a stream sends its new text at most this often, and a decoding call lasts about "
                             "this long (default %(default)s; 0: every token, a call per step)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help=".pt models run here; a .bin runs on the C engine on the CPU, on PyTorch elsewhere")
    return parser


def main():
    args = build_parser().parse_args()
    try:
        if args.parallel < 1:
            raise ValueError(f"--parallel must be >= 1, got {args.parallel}")
        if not 0 <= args.stream_interval < float("inf"):
            raise ValueError(f"--stream-interval must be a number of seconds >= 0, got {args.stream_interval}")
        if args.context is not None and args.context < 1:
            raise ValueError(f"--context must be >= 1, got {args.context}")
        engine = load_engine(args.model, parse_adapters(args.lora), args.device, args.parallel, args.context)
    except (OSError, ValueError, KeyError, MemoryError) as error:
        sys.exit(f"serve.py: {error}")
    # the model's and the vocabulary's objects (a Qwen vocabulary is 150k of them) live as long as the server:
    # the collector's full passes, which the decoding loop's small allocations set off, need not walk them
    gc.freeze()
    app = create_app(engine, os.path.basename(args.model), args.api_key, args.max_body_bytes, args.stream_interval)
    import uvicorn
    print(f"serve.py: {args.model} on http://{args.host}:{args.port}/ ({type(engine).__name__}, {engine.slots} slots)",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()

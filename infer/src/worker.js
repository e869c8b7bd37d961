// Nano engine worker: owns the WebAssembly engine and the conversation; talks to the page only by messages.
// Every request is answered, failures included ({type: "error"}), so the worker never dies silently.
// build_page.py prepends the Emscripten module (NanoEngine) to this file.
"use strict";

const TOKEN_BATCH_MS = 30;
const PROGRESS_MS = 100;    // load progress goes to the page at most this often
const PLACEMENT_BYTES = 260; // what nano_model_placement reads: the header and the tokenizer section's length

let engine = null;          // the instantiated module, once NanoEngine() resolves
let special = null;         // Nano's special token ids, from the engine (nano.h): {pad, bos, eos, …}
let modelInfo = null;       // config of the loaded model, null when none
let turns = [];             // instruct mode: token ids of each kept turn, each answer closed (answerEnd)
let question = [];          // instruct mode: the prompt ids of the question being answered
let stopRequested = false;
let onToken = null;         // set during a generation: receives each sampled token id

function post(message) { self.postMessage(message); }

function reportError(error, context) {
    const message = error instanceof Error ? error.message : String(error);
    post({type: "error", context, message});
}

// A task boundary that lets queued messages ("stop") run, without setTimeout's minimum delay.
const yieldChannel = new MessageChannel();
function yieldToEventLoop() {
    return new Promise(resolve => {
        yieldChannel.port1.onmessage = () => resolve();
        yieldChannel.port2.postMessage(null);
    });
}

const engineReady = NanoEngine({
    // called by wasm_api.c for every sampled token; a nonzero result stops nano_generate
    onToken: async token => {
        onToken(token);
        await yieldToEventLoop();
        return stopRequested ? 1 : 0;
    },
    onAbort: reason => post({type: "fatal", message: "the engine stopped: " + reason}),
    print: text => console.log(text),
    printErr: text => console.warn(text),
}).then(module => {
    engine = module;
    special = JSON.parse(engine.UTF8ToString(engine._wasm_special_ids()));
    post({type: "ready", defaults: JSON.parse(engine.UTF8ToString(engine._wasm_sampling_defaults()))});
}, error => post({type: "fatal", message: "the engine could not start: " + error}));

// ------------------------------------------------------------------ heap helpers

// Pointers come back from WebAssembly as signed 32-bit numbers: those above 2 GB would read as negative.
const address = pointer => pointer >>> 0;

// Runs use(pointer) with a copy of bytes in the heap.
function withHeapBytes(bytes, use) {
    const pointer = address(engine._malloc(Math.max(bytes.length, 1)));
    if (!pointer) throw new Error("out of memory");
    try {
        engine.HEAPU8.set(bytes, pointer);
        return use(pointer);
    } finally {
        engine._free(pointer);
    }
}

const utf8 = new TextEncoder();
function withCString(text, use) { return withHeapBytes(utf8.encode(text + "\0"), use); }

function heapCapacity() { return address(engine._wasm_memory_capacity()); }

// Where a model file must start modulo 4 for the engine to use it in place (an adapter: 0, aligned).
async function placementOf(file, what) {
    if (what !== "model") return 0;
    const start = new Uint8Array(await file.slice(0, PLACEMENT_BYTES).arrayBuffer());
    return withHeapBytes(start, pointer => engine._wasm_model_placement(pointer, start.length));
}

// A heap buffer of the file's size at that placement, or 0 (with lastError()) when this tab cannot hold it.
function fileBuffer(file, what, placement) {
    return withCString(file.name, name => withCString(what, kind =>
        address(engine._wasm_file_buffer(name, kind, file.size, placement))));
}

// Streams the file straight into the heap, chunk by chunk: the file is never held twice. HEAPU8 is read for
// every chunk, since a memory growth (none is expected here) would detach an older view.
async function readIntoHeap(file, pointer) {
    const reader = file.stream().getReader();
    let loaded = 0, lastReport = performance.now();
    const report = () => post({type: "load-progress", name: file.name, loaded, total: file.size});
    for (;;) {
        let chunk;
        try {
            chunk = await reader.read();
        } catch (error) {
            throw new Error(`${file.name}: cannot read the file: ${error.message}`);
        }
        if (chunk.done) break;
        if (loaded + chunk.value.byteLength > file.size) throw fileChanged(file);
        engine.HEAPU8.set(chunk.value, pointer + loaded);
        loaded += chunk.value.byteLength;
        if (performance.now() - lastReport >= PROGRESS_MS) {
            report();
            lastReport = performance.now();
        }
    }
    if (loaded !== file.size) throw fileChanged(file);
    report();
}

function fileChanged(file) { return new Error(`${file.name}: the file changed while it was read: pick it again`); }

// The file in a heap buffer that the engine's loader takes over. When the memory is short, makeRoom() may free
// something (it says whether it did) before the one more try.
async function fileToHeap(file, what, makeRoom) {
    const placement = await placementOf(file, what);
    let pointer = fileBuffer(file, what, placement);
    if (!pointer && file.size <= heapCapacity() && makeRoom()) pointer = fileBuffer(file, what, placement);
    if (!pointer) throw new Error(lastError());
    try {
        await readIntoHeap(file, pointer);
    } catch (error) {
        engine._free(pointer);
        throw error;
    }
    return pointer;
}

function lastError() { return engine.UTF8ToString(engine._wasm_error()); }

// The ids the last wasm_encode, wasm_chat_prompt or wasm_chat_answer_end made, given their count.
function keptIds(count) {
    if (count < 0) throw new Error(lastError());
    const start = engine._wasm_encoded_ids() >>> 2;
    return Array.from(engine.HEAP32.subarray(start, start + count));
}

function encode(text) { return keptIds(withCString(text, pointer => engine._wasm_encode(pointer))); }

function chatPrompt(text, thinking) {
    return keptIds(withCString(text, pointer => engine._wasm_chat_prompt(pointer, thinking ? 1 : 0)));
}

function answerEnd() { return keptIds(engine._wasm_chat_answer_end()); }

function isStopToken(id) { return engine._wasm_stop_token(id) !== 0; }

function requireModel() {
    if (!modelInfo) throw new Error("load a model first");
}

// ------------------------------------------------------------------ requests

// The model in use gives way to a new one that does not fit beside it; the old one stays if the new one fits.
function unloadForRoom() {
    if (!engine._wasm_model_loaded()) return false;
    engine._wasm_unload_model();
    return true;
}

async function loadModel({file}) {
    try {
        const pointer = await fileToHeap(file, "model", unloadForRoom);
        const status = withCString(file.name, name => engine._wasm_load_model(pointer, file.size, name));
        if (status !== 0) throw new Error(lastError());
    } catch (error) {
        if (modelInfo && !engine._wasm_model_loaded()) unloadModel();   // it gave way, or ran out of memory
        throw error;
    }
    turns = [];
    modelInfo = JSON.parse(engine.UTF8ToString(engine._wasm_model_info()));
    post({type: "model-loaded", name: file.name, bytes: file.size, info: modelInfo});
}

function unloadModel() {
    engine._wasm_unload_model();
    modelInfo = null;
    turns = [];
    post({type: "model-unloaded"});
}

async function loadLora({file}) {
    requireModel();
    const pointer = await fileToHeap(file, "LoRA adapter", () => false);
    const status = withCString(file.name, name => engine._wasm_load_lora(pointer, file.size, name));
    if (status !== 0) throw new Error(lastError());
    post({type: "lora-loaded", name: file.name, rank: engine._wasm_lora_rank(), alpha: engine._wasm_lora_alpha()});
}

// ------------------------------------------------------------------ requests of the tests

// The capacity the engine assumes, in bytes (0: what wasm32 allows), for the memory checks.
function limitMemory({bytes}) {
    engine._wasm_limit_memory(bytes);
    post({type: "memory-limited", capacity: heapCapacity()});
}

// The logits after each token of ids, from position 0: vocab_size numbers per token.
function logits({ids}) {
    requireModel();
    const count = ids.length * modelInfo.vocab_size;
    const idsPointer = address(engine._malloc(4 * Math.max(ids.length, 1)));
    const outPointer = address(engine._malloc(4 * Math.max(count, 1)));
    try {
        if (!idsPointer || !outPointer) throw new Error("out of memory for the logits");
        engine.HEAP32.set(ids, idsPointer >>> 2);
        if (engine._wasm_logits(idsPointer, ids.length, outPointer) !== 0) throw new Error(lastError());
        const start = outPointer >>> 2;
        post({type: "logits", logits: Array.from(engine.HEAPF32.subarray(start, start + count))});
    } finally {
        engine._free(idsPointer);
        engine._free(outPointer);
    }
}

function unloadLora() {
    engine._wasm_unload_lora();
    post({type: "lora-unloaded"});
}

// ------------------------------------------------------------------ prompts

// The prompt rule of every Nano front end: a continuation of a Nano model starts with <|bos|>, as pretraining
// documents do (a Qwen model has none); an instruction is the model's chat turn (nano_chat_prompt: thinking
// matters to Qwen3 only) after the turns of the conversation that fit.
function promptIds(mode, text, thinking) {
    if (mode === "instruct") return conversationPrompt(text, thinking);
    return (modelInfo.tokenizer === "trie" ? [special.bos] : []).concat(encode(text));
}

// Trimmed like infer.py's Conversation and main.c's conversation_ask: the oldest whole turns go when the
// prompt would leave less than the answer room (a quarter of the context) for the answer.
function conversationPrompt(text, thinking) {
    const limit = modelInfo.context - engine._wasm_answer_room();
    question = keepLastTokens(chatPrompt(text, thinking), limit);
    const turnsLength = () => turns.reduce((sum, turn) => sum + turn.length, 0);
    while (turns.length && turnsLength() > limit - question.length) turns.shift();
    return turns.flat().concat(question);
}

// A question too long on its own keeps its first token (<|instruct_mark|>, <|im_start|>) and its most recent
// ones, and the page says so: a silently cut question reads as garbage.
function keepLastTokens(ids, limit) {
    if (ids.length <= limit) return ids;
    const kept = Math.max(limit - 1, 0);
    post({type: "warning", message: `question is ${ids.length} tokens, longer than the context of ${limit}: ` +
                                    `keeping its last ${kept}`});
    return ids.slice(0, 1).concat(ids.slice(ids.length - kept));
}

// Closes the asked turn after the answer (<|eos|>, or Qwen's <|im_end|>\n), also when it was cut short, as in
// the training template.
function addAnswer(answer) {
    turns.push(question.concat(answer, answerEnd()));
}

// ------------------------------------------------------------------ generation

async function generate({mode, text, settings}) {
    requireModel();
    if (!text) throw new Error("type a prompt first");
    const prompt = promptIds(mode, text, settings.thinking);
    const generated = [];
    stopRequested = false;
    // tokens go to the page in batches, at most every TOKEN_BATCH_MS: a fast model would flood it
    let pendingText = "", pendingCount = 0, lastSent = performance.now();
    const sendPending = () => {
        if (pendingCount || pendingText) post({type: "tokens", text: pendingText, count: pendingCount});
        pendingText = "";
        pendingCount = 0;
        lastSent = performance.now();
    };
    onToken = token => {
        generated.push(token);
        if (isStopToken(token)) return;
        pendingText += engine.UTF8ToString(engine._wasm_stream_token(token));
        pendingCount++;
        if (performance.now() - lastSent >= TOKEN_BATCH_MS) sendPending();
    };
    const promptPointer = address(engine._malloc(4 * prompt.length));
    if (!promptPointer) throw new Error("out of memory for the prompt");
    engine.HEAP32.set(prompt, promptPointer >>> 2);
    let status;
    try {
        status = await engine.ccall("wasm_generate", "number",
            ["number", "number", "number", "number", "number", "number", "number", "number"],
            [promptPointer, prompt.length, settings.temperature, settings.topK, settings.topP,
             settings.repetitionPenalty, settings.maxNew, settings.seed >>> 0], {async: true});
    } finally {
        engine._free(promptPointer);
        onToken = null;
        pendingText += engine.UTF8ToString(engine._wasm_stream_flush());   // an unfinished character, as U+FFFD
        sendPending();
    }
    if (status !== 0) throw new Error(lastError());
    if (mode === "instruct") addAnswer(generated.filter(id => !isStopToken(id)));
    const decodeSeconds = engine._wasm_decode_seconds(), decodeSteps = engine._wasm_decode_steps();
    post({
        type: "done",
        stopped: stopRequested,
        promptTokens: prompt.length,
        generatedTokens: generated.length,
        prefillSeconds: engine._wasm_prefill_seconds(),
        decodeSeconds,
        decodeSteps,
        decodeTokensPerSecond: decodeSeconds > 0 ? decodeSteps / decodeSeconds : 0,
    });
}

function resetConversation() {
    turns = [];
    post({type: "conversation-reset"});
}

const handlers = {
    "load-model": loadModel,
    "unload-model": unloadModel,
    "load-lora": loadLora,
    "unload-lora": unloadLora,
    "generate": generate,
    "reset-conversation": resetConversation,
    "limit-memory": limitMemory,
    "logits": logits,
};

// Requests run one at a time, in order; "stop" jumps the queue (it is read between two tokens).
let queue = engineReady;
self.onmessage = event => {
    const request = event.data;
    if (request.type === "stop") {
        stopRequested = true;
        return;
    }
    queue = queue.then(async () => {
        if (!engine) throw new Error("the engine is not running");
        const handler = handlers[request.type];
        if (!handler) throw new Error("unknown request " + request.type);
        await handler(request);
    }).catch(error => reportError(error, request.type));
};

// anything that escapes the queue is reported, and cancelled so that the page does not treat it as fatal
self.addEventListener("error", event => {
    event.preventDefault();
    reportError(event.message || "worker error", "worker");
});
self.addEventListener("unhandledrejection", event => {
    event.preventDefault();
    reportError(event.reason, "worker");
});

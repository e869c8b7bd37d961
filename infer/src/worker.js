// Nano engine worker: owns the WebAssembly engine and the conversation; talks to the page only by messages.
// Every request is answered, failures included ({type: "error"}), so the worker never dies silently.
// build_page.py prepends the Emscripten module (NanoEngine) to this file.
"use strict";

const TOKEN_BATCH_MS = 30;

let engine = null;          // the instantiated module, once NanoEngine() resolves
let special = null;         // the special token ids, from the engine (nano.h): {pad, bos, eos, instruct, response, …}
let modelInfo = null;       // config of the loaded model, null when none
let turns = [];             // instruct mode: token ids of each kept turn, <|eos|> after each answer
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

function withCString(text, use) {
    const size = engine.lengthBytesUTF8(text) + 1;
    const pointer = engine._malloc(size);
    if (!pointer) throw new Error("out of memory");
    try {
        engine.stringToUTF8(text, pointer, size);
        return use(pointer);
    } finally {
        engine._free(pointer);
    }
}

// Copies a file into the WebAssembly heap; the engine takes ownership of the copy.
function copyToHeap(buffer, name) {
    const pointer = engine._malloc(Math.max(buffer.byteLength, 1));
    if (!pointer) throw new Error(`${name}: out of memory for ${buffer.byteLength} bytes`);
    engine.HEAPU8.set(new Uint8Array(buffer), pointer);   // HEAPU8 read after malloc: the heap may have grown
    return pointer;
}

function lastError() { return engine.UTF8ToString(engine._wasm_error()); }

function encode(text) {
    const count = withCString(text, pointer => engine._wasm_encode(pointer));
    if (count < 0) throw new Error("out of memory while tokenizing");
    const start = engine._wasm_encoded_ids() / 4;
    return Array.from(engine.HEAP32.subarray(start, start + count));
}

function tokenText(id) { return engine.UTF8ToString(engine._wasm_token_text(id)); }

function requireModel() {
    if (!modelInfo) throw new Error("load a model first");
}

// ------------------------------------------------------------------ requests

function loadModel({name, buffer}) {
    const status = withCString(name, namePointer =>
        engine._wasm_load_model(copyToHeap(buffer, name), buffer.byteLength, namePointer));
    if (status !== 0) {
        const message = lastError();
        if (modelInfo && !engine._wasm_model_loaded()) unloadModel();   // out of memory after the old one was freed
        throw new Error(message);
    }
    turns = [];
    modelInfo = JSON.parse(engine.UTF8ToString(engine._wasm_model_info()));
    post({type: "model-loaded", name, bytes: buffer.byteLength, info: modelInfo});
}

function unloadModel() {
    engine._wasm_unload_model();
    modelInfo = null;
    turns = [];
    post({type: "model-unloaded"});
}

function loadLora({name, buffer}) {
    requireModel();
    const status = withCString(name, namePointer =>
        engine._wasm_load_lora(copyToHeap(buffer, name), buffer.byteLength, namePointer));
    if (status !== 0) throw new Error(lastError());
    post({type: "lora-loaded", name, rank: engine._wasm_lora_rank(), alpha: engine._wasm_lora_alpha()});
}

function unloadLora() {
    engine._wasm_unload_lora();
    post({type: "lora-unloaded"});
}

// ------------------------------------------------------------------ prompts

// The prompt rule of every Nano front end: a continuation starts with <|bos|>, as pretraining documents do;
// an instruction is <|instruct_mark|>text<|response_mark|> after the turns of the conversation that fit.
function promptIds(mode, text) {
    return mode === "continue" ? [special.bos].concat(encode(text)) : conversationPrompt(text);
}

// Trimmed like infer.py's Conversation and main.c's conversation_ask: the oldest whole turns go when the
// prompt would leave less than the answer room (a quarter of the context) for the answer.
function conversationPrompt(text) {
    const limit = modelInfo.block_size - engine._wasm_answer_room();
    question = keepLastTokens([special.instruct].concat(encode(text), [special.response]), limit);
    const turnsLength = () => turns.reduce((sum, turn) => sum + turn.length, 0);
    while (turns.length && turnsLength() > limit - question.length) turns.shift();
    return turns.flat().concat(question);
}

// A question too long on its own keeps its first token (<|instruct_mark|>) and its most recent ones, and the
// page says so: a silently cut question reads as garbage.
function keepLastTokens(ids, limit) {
    if (ids.length <= limit) return ids;
    const kept = Math.max(limit - 1, 0);
    post({type: "warning", message: `question is ${ids.length} tokens, longer than the context of ${limit}: ` +
                                    `keeping its last ${kept}`});
    return ids.slice(0, 1).concat(ids.slice(ids.length - kept));
}

// Closes the asked turn with <|eos|> after the answer, also when it was cut short, as in the training template.
function addAnswer(answer) {
    turns.push(question.concat(answer, [special.eos]));
}

// ------------------------------------------------------------------ generation

async function generate({mode, text, settings}) {
    requireModel();
    if (!text) throw new Error("type a prompt first");
    const prompt = promptIds(mode, text);
    const generated = [];
    stopRequested = false;
    // tokens go to the page in batches, at most every TOKEN_BATCH_MS: a fast model would flood it
    let pendingText = "", pendingCount = 0, lastSent = performance.now();
    const sendPending = () => {
        if (pendingCount) post({type: "tokens", text: pendingText, count: pendingCount});
        pendingText = "";
        pendingCount = 0;
        lastSent = performance.now();
    };
    onToken = token => {
        generated.push(token);
        if (token === special.eos || token === special.pad) return;
        pendingText += tokenText(token);
        pendingCount++;
        if (performance.now() - lastSent >= TOKEN_BATCH_MS) sendPending();
    };
    const promptPointer = engine._malloc(4 * prompt.length);
    if (!promptPointer) throw new Error("out of memory for the prompt");
    engine.HEAP32.set(prompt, promptPointer / 4);
    let status;
    try {
        status = await engine.ccall("wasm_generate", "number",
            ["number", "number", "number", "number", "number", "number", "number", "number"],
            [promptPointer, prompt.length, settings.temperature, settings.topK, settings.topP,
             settings.repetitionPenalty, settings.maxNew, settings.seed >>> 0], {async: true});
    } finally {
        engine._free(promptPointer);
        onToken = null;
        sendPending();
    }
    if (status !== 0) throw new Error(lastError());
    if (mode === "instruct") addAnswer(generated.filter(id => id !== special.eos && id !== special.pad));
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

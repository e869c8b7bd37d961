// Nano page: the user interface. The engine lives in a Web Worker (built from the inlined
// #worker-source through a blob: URL, since file:// pages cannot load worker files), so the page
// stays responsive while it computes. document.body.dataset.state tells what the page is doing:
// starting | no-model | busy | ready | generating | failed (the tests wait on it).
// Served by serve.py (from "/"), the page answers through the server's API by default instead; opened
// from disk it never touches the network.
"use strict";

const $ = id => document.getElementById(id);
const ui = {
    modelFile: $("model-file"), unloadModel: $("unload-model"), modelName: $("model-name"),
    loraFile: $("lora-file"), unloadLora: $("unload-lora"), loraName: $("lora-name"),
    modelConfig: $("model-config"), mode: $("mode"),
    temperature: $("temperature"), topK: $("top-k"), topP: $("top-p"),
    repetitionPenalty: $("repetition-penalty"), maxNew: $("max-new"), think: $("think"),
    conversation: $("conversation"), form: $("prompt-form"), prompt: $("prompt"),
    send: $("send"), stop: $("stop"), newConversation: $("new-conversation"),
    status: $("status"), loadProgress: $("load-progress"), speed: $("speed"), warning: $("warning"), error: $("error"),
    about: $("about"), serverRow: $("server-row"), backend: $("backend"), serverModel: $("server-model"),
    apiKey: $("api-key"),
};

let worker = null;               // the Web Worker, or a ServerBackend that answers like one
let defaults = null;             // the engine's sampling defaults, the same as the C CLI's and infer.py's
let engineStarted = false;       // the engine has come up once: a later crash restarts it
let modelLoaded = false, loraLoaded = false;
let currentReply = null;         // the element receiving streamed tokens
let streamedTokens = 0, firstBatchTime = 0, firstBatchTokens = 0;

function setState(state, statusText) {
    document.body.dataset.state = state;
    if (statusText !== undefined) ui.status.textContent = statusText;
    const generating = state === "generating", idle = state === "ready" || state === "no-model";
    ui.send.disabled = state !== "ready";
    if (state !== "busy") ui.loadProgress.hidden = true;   // shown by the first "load-progress"
    ui.stop.disabled = !generating;
    ui.modelFile.disabled = !(idle || generating);
    ui.unloadModel.disabled = !modelLoaded || !(idle || generating);
    ui.loraFile.disabled = !modelLoaded || !(idle || generating);
    ui.unloadLora.disabled = !loraLoaded || !(idle || generating);
}

function idleState() { return modelLoaded ? "ready" : "no-model"; }

// A message box (ui.error, ui.warning) shows its text, or is hidden when the text is empty.
function showMessage(box, text) {
    box.textContent = text;
    box.hidden = text === "";
}

function showError(text) { showMessage(ui.error, text); }
function showWarning(text) { showMessage(ui.warning, text); }

// Settings the user has not filled in start at the engine's defaults; a restart keeps what the user typed.
function showDefaults() {
    const inputs = [[ui.temperature, defaults.temperature], [ui.topK, defaults.top_k], [ui.topP, defaults.top_p],
                    [ui.repetitionPenalty, defaults.repetition_penalty], [ui.maxNew, defaults.max_new_tokens]];
    for (const [input, value] of inputs) if (input.value === "") input.value = value;
}

function addMessage(kind, text) {
    const element = document.createElement("div");
    element.className = "message " + kind;
    element.textContent = text;
    ui.conversation.append(element);
    ui.conversation.scrollTop = ui.conversation.scrollHeight;
    return element;
}

function showModelConfig(info) {
    ui.modelConfig.replaceChildren(...Object.entries(info).map(([key, value]) => {
        const row = document.createElement("tr");
        const name = document.createElement("td"), shown = document.createElement("td");
        name.textContent = key;
        shown.textContent = String(value);
        row.append(name, shown);
        return row;
    }));
    ui.modelConfig.hidden = false;
}

// ------------------------------------------------------------------ worker

const workerHandlers = {
    "ready": message => {
        engineStarted = true;
        defaults = message.defaults;
        showDefaults();
        setState("no-model", "Engine ready. Choose a model file (.bin).");
    },
    "model-loaded": message => {
        modelLoaded = true;
        loraLoaded = false;
        ui.modelName.textContent = message.bytes === undefined ? message.name
            : `${message.name} (${(message.bytes / 1e6).toFixed(1)} MB)`;
        ui.loraName.textContent = "";
        showModelConfig(message.info);
        ui.think.disabled = message.info.architecture !== "Qwen3";   // only Qwen3's chat template has a thought
        ui.conversation.replaceChildren();
        setState("ready", "Model loaded. Type a prompt.");
    },
    "model-unloaded": () => {
        modelLoaded = loraLoaded = false;
        ui.modelName.textContent = ui.loraName.textContent = "";
        ui.modelConfig.hidden = true;
        setState("no-model", "Model unloaded.");
    },
    "load-progress": message => {
        ui.loadProgress.hidden = false;
        ui.loadProgress.max = message.total;
        ui.loadProgress.value = message.loaded;
        ui.status.textContent = `Loading ${message.name}… ${(message.loaded / 1e6).toFixed(1)} of ` +
            `${(message.total / 1e6).toFixed(1)} MB`;
    },
    "lora-loaded": message => {
        loraLoaded = true;
        ui.loraName.textContent = `${message.name} (rank ${message.rank}, alpha ${message.alpha})`;
        setState(idleState(), "LoRA adapter attached.");
    },
    "lora-unloaded": () => {
        loraLoaded = false;
        ui.loraName.textContent = "";
        setState(idleState(), "LoRA adapter detached.");
    },
    "tokens": message => {
        const now = performance.now();
        if (streamedTokens === 0) {   // the live rate counts the tokens that arrived after the first batch
            firstBatchTime = now;
            firstBatchTokens = message.count;
        }
        streamedTokens += message.count;
        if (now > firstBatchTime) {
            const rate = (streamedTokens - firstBatchTokens) / ((now - firstBatchTime) / 1000);
            ui.speed.textContent = `${rate.toFixed(1)} tokens/s`;
        }
        currentReply.append(message.text);
        ui.conversation.scrollTop = ui.conversation.scrollHeight;
    },
    "done": message => {
        currentReply.dataset.done = message.stopped ? "stopped" : "finished";
        ui.speed.textContent = `${message.decodeTokensPerSecond.toFixed(1)} tokens/s decode · ` +
            `${message.promptTokens} prompt + ${message.generatedTokens} generated tokens`;
        document.body.dataset.decodeTokensPerSecond = message.decodeTokensPerSecond;
        currentReply = null;
        setState("ready", message.stopped ? "Stopped." : "Done.");
    },
    "conversation-reset": () => {
        ui.conversation.replaceChildren();
        setState(idleState(), "New conversation.");
    },
    "warning": message => showWarning(message.message),
    // answers to the requests of the tests, which read them with listeners of their own
    "memory-limited": () => {},
    "logits": () => {},
    "error": message => {
        showError(`${message.context}: ${message.message}`);
        if (currentReply) {
            currentReply.dataset.done = "failed";
            currentReply = null;
        }
        setState(idleState(), "Error (see below).");
    },
    "fatal": message => {
        if (!engineStarted) {   // restarting an engine that cannot start would loop forever
            showError(`${message.message}.`);
            setState("failed", "The engine could not start.");
            return;
        }
        showError(`${message.message}. The engine was restarted: load the model again.`);
        startWorker();
    },
};

// Drops the engine in use (worker or server) and what the page shows of it.
function resetEngine(statusText) {
    if (worker) worker.terminate();
    modelLoaded = loraLoaded = false;
    currentReply = null;
    ui.modelName.textContent = ui.loraName.textContent = "";
    ui.modelConfig.hidden = true;
    setState("starting", statusText);
}

function startWorker() {
    resetEngine("Starting the engine…");
    const source = $("worker-source").textContent;
    const url = URL.createObjectURL(new Blob([source], {type: "text/javascript"}));
    worker = new Worker(url);
    URL.revokeObjectURL(url);   // the worker has its own reference once created
    worker.onmessage = event => workerHandlers[event.data.type](event.data);
    worker.onerror = event => {
        event.preventDefault();
        workerHandlers.fatal({message: "the engine failed: " + (event.message || "unknown error")});
    };
}

// ------------------------------------------------------------------ controls

function readNumber(input, fallback) {
    const value = Number(input.value);
    return input.value.trim() !== "" && Number.isFinite(value) ? value : fallback;
}

function settings() {
    return {
        temperature: Math.max(0, readNumber(ui.temperature, defaults.temperature)),
        topK: Math.max(0, Math.round(readNumber(ui.topK, defaults.top_k))),
        topP: Math.min(1, Math.max(0.01, readNumber(ui.topP, defaults.top_p))),
        repetitionPenalty: Math.max(0.01, readNumber(ui.repetitionPenalty, defaults.repetition_penalty)),
        maxNew: Math.max(0, Math.round(readNumber(ui.maxNew, defaults.max_new_tokens))),   // 0: fill the context
        thinking: ui.think.checked,
        seed: crypto.getRandomValues(new Uint32Array(1))[0],
    };
}

// Loading a file stops the generation in progress first; the worker runs requests in order. The worker gets
// the File itself (a handle, not the bytes) and streams it into the engine's memory.
function sendFile(input, type) {
    const file = input.files[0];
    if (!file) return;
    input.value = "";   // picking the same file again must fire "change" again
    showError("");
    worker.postMessage({type: "stop"});
    setState("busy", `Loading ${file.name}…`);
    worker.postMessage({type, file});
}

ui.modelFile.addEventListener("change", () => sendFile(ui.modelFile, "load-model"));
ui.loraFile.addEventListener("change", () => sendFile(ui.loraFile, "load-lora"));
ui.unloadModel.addEventListener("click", () => {
    worker.postMessage({type: "stop"});
    worker.postMessage({type: "unload-model"});
    setState("busy");
});
ui.unloadLora.addEventListener("click", () => {
    worker.postMessage({type: "stop"});
    worker.postMessage({type: "unload-lora"});
    setState("busy");
});
ui.stop.addEventListener("click", () => worker.postMessage({type: "stop"}));
ui.newConversation.addEventListener("click", () => {
    worker.postMessage({type: "stop"});
    worker.postMessage({type: "reset-conversation"});
});

ui.form.addEventListener("submit", event => {
    event.preventDefault();
    if (document.body.dataset.state !== "ready") return;
    const text = ui.prompt.value, mode = ui.mode.value;
    if (!text) return;
    showError("");
    showWarning("");
    ui.prompt.value = "";
    if (mode === "instruct") {
        addMessage("user", text);
        currentReply = addMessage("reply", "");
    } else {   // continuation: the prompt in grey, the model's text after it
        currentReply = addMessage("reply", "");
        const echo = document.createElement("span");
        echo.className = "prompt-echo";
        echo.textContent = text;
        currentReply.append(echo);
        currentReply = currentReply.appendChild(document.createElement("span"));
    }
    currentReply.classList.add("generated");
    streamedTokens = 0;
    ui.speed.textContent = "";
    setState("generating", "Generating…");
    worker.postMessage({type: "generate", mode, text, settings: settings()});
});

ui.prompt.addEventListener("keydown", event => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        ui.form.requestSubmit();
    }
});

// ------------------------------------------------------------------ server backend

// Takes the messages the page sends its worker and answers with the worker's replies, through serve.py's
// OpenAI API (streamed server-sent events), so that nothing else in the page knows which engine it uses.
// The conversation is kept here as chat messages; the server applies the template.
class ServerBackend {
    constructor() {
        this.messages = [];
        this.controller = null;
    }

    reply(message) { workerHandlers[message.type](message); }

    async call(path, body, signal) {
        const headers = {"Content-Type": "application/json"};
        if (ui.apiKey.value) headers.Authorization = `Bearer ${ui.apiKey.value}`;
        const options = body === undefined ? {headers} : {method: "POST", headers, body: JSON.stringify(body), signal};
        const response = await fetch(path, options);
        if (!response.ok) {
            const error = (await response.json().catch(() => ({}))).error || {};
            throw Object.assign(new Error(error.message || `HTTP ${response.status}`),
                                {code: error.code, status: response.status});
        }
        return response;
    }

    async connect() {
        try {
            const health = await (await this.call("/health")).json();
            const models = (await (await this.call("/v1/models")).json()).data.map(model => model.id);
            const chosen = ui.serverModel.value;
            ui.serverModel.replaceChildren(...models.map(id => new Option(id, id)));
            if (models.includes(chosen)) ui.serverModel.value = chosen;
            this.reply({type: "ready", defaults: health.defaults});
            this.reply({type: "model-loaded", name: ui.serverModel.value,
                        info: {server: location.origin, models: models.join(", "), context: health.context,
                               slots: health.slots}});
        } catch (error) {
            showError(error.status === 401 ? "The server wants an API key: type it in the API key field."
                                           : `The server does not answer: ${error.message}`);
            setState("failed", "No connection to the server.");
        }
    }

    postMessage(message) {
        if (message.type === "generate") this.generate(message);
        else if (message.type === "stop") this.stop();
        else if (message.type === "reset-conversation") {
            this.messages = [];
            this.reply({type: "conversation-reset"});
        }
    }

    stop() { if (this.controller) this.controller.abort(); }

    terminate() { this.stop(); }

    requestBody(mode, text, settings) {
        const body = {model: ui.serverModel.value, stream: true, stream_options: {include_usage: true},
                      temperature: settings.temperature, top_k: settings.topK, top_p: settings.topP,
                      repetition_penalty: settings.repetitionPenalty, seed: settings.seed};
        if (settings.maxNew > 0) body.max_tokens = settings.maxNew;
        if (mode === "instruct") body.messages = this.messages;
        else body.prompt = text;
        return body;
    }

    // The response to a request; a conversation too long for the context loses its oldest turns first.
    async open(chat, path, mode, text, settings) {
        for (;;) {
            try {
                return await this.call(path, this.requestBody(mode, text, settings), this.controller.signal);
            } catch (error) {
                if (!chat || error.code !== "context_length_exceeded" || this.messages.length < 3) throw error;
                this.messages.splice(0, 2);
                this.reply({type: "warning", message: "The conversation outgrew the context: its oldest turn was dropped."});
            }
        }
    }

    async generate({mode, text, settings}) {
        const chat = mode === "instruct", path = chat ? "/v1/chat/completions" : "/v1/completions";
        if (chat) this.messages.push({role: "user", content: text});
        this.controller = new AbortController();
        let answer = "", usage = null, firstTokenTime = 0, tokens = 0, stopped = false;
        try {
            const response = await this.open(chat, path, mode, text, settings);
            for await (const event of serverSentEvents(response)) {
                if (event.error) throw new Error(event.error.message);
                if (event.usage) usage = event.usage;
                const choice = event.choices && event.choices[0];
                const piece = choice && (chat ? choice.delta.content : choice.text);
                if (!piece) continue;
                if (!firstTokenTime) firstTokenTime = performance.now();
                answer += piece;
                tokens++;
                this.reply({type: "tokens", text: piece, count: 1});
            }
        } catch (error) {
            if (error.name !== "AbortError") {
                if (chat) this.messages.pop();
                this.reply({type: "error", context: "server", message: error.message});
                return;
            }
            stopped = true;   // Stop: the aborted request frees its slot on the server
        } finally {
            this.controller = null;
        }
        if (chat) this.messages.push({role: "assistant", content: answer});
        const seconds = (performance.now() - firstTokenTime) / 1000;
        this.reply({type: "done", stopped, promptTokens: usage ? usage.prompt_tokens : 0,
                    generatedTokens: usage ? usage.completion_tokens : tokens,
                    decodeTokensPerSecond: tokens > 1 && seconds > 0 ? (tokens - 1) / seconds : 0});
    }
}

// The JSON payloads of a text/event-stream response, until its [DONE].
async function* serverSentEvents(response) {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffered = "";
    for (;;) {
        const {value, done} = await reader.read();
        if (done) return;
        buffered += value;
        for (let end; (end = buffered.indexOf("\n\n")) >= 0;) {
            const data = buffered.slice(0, end).split("\n").filter(line => line.startsWith("data: "))
                .map(line => line.slice(6)).join("\n");
            buffered = buffered.slice(end + 2);
            if (data === "[DONE]") return;
            if (data) yield JSON.parse(data);
        }
    }
}

function startServer() {
    resetEngine("Connecting to the server…");
    worker = new ServerBackend();
    worker.connect();
}

function useBackend() {
    const server = ui.backend.value === "server";
    for (const row of document.querySelectorAll(".page-only")) row.hidden = server;
    for (const label of document.querySelectorAll(".server-only")) label.hidden = !server;
    ui.about.textContent = server ? `A small language model answering through the Nano server at ${location.origin}.`
                                  : "A small language model running in this page (WebAssembly).";
    ui.conversation.replaceChildren();
    if (server) startServer();
    else startWorker();
}

// serve.py's /health names the sampling defaults: that is how the page knows it is served by it.
async function servedByNano() {
    if (!location.protocol.startsWith("http")) return false;
    try {
        const response = await fetch("/health");
        return response.ok && "defaults" in await response.json();
    } catch (error) {
        return false;
    }
}

ui.backend.addEventListener("change", useBackend);
for (const input of [ui.serverModel, ui.apiKey]) input.addEventListener("change", startServer);

servedByNano().then(served => {
    ui.serverRow.hidden = !served;
    if (served) useBackend();
    else startWorker();
});

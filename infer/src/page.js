// Nano page: the user interface. The engine lives in a Web Worker (built from the inlined
// #worker-source through a blob: URL, since file:// pages cannot load worker files), so the page
// stays responsive while it computes. document.body.dataset.state tells what the page is doing:
// starting | no-model | busy | ready | generating | failed (the tests wait on it).
"use strict";

const $ = id => document.getElementById(id);
const ui = {
    modelFile: $("model-file"), unloadModel: $("unload-model"), modelName: $("model-name"),
    loraFile: $("lora-file"), unloadLora: $("unload-lora"), loraName: $("lora-name"),
    modelConfig: $("model-config"), mode: $("mode"),
    temperature: $("temperature"), topK: $("top-k"), topP: $("top-p"),
    repetitionPenalty: $("repetition-penalty"), maxNew: $("max-new"),
    conversation: $("conversation"), form: $("prompt-form"), prompt: $("prompt"),
    send: $("send"), stop: $("stop"), newConversation: $("new-conversation"),
    status: $("status"), speed: $("speed"), warning: $("warning"), error: $("error"),
};

let worker = null;
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
        ui.modelName.textContent = `${message.name} (${(message.bytes / 1e6).toFixed(1)} MB)`;
        ui.loraName.textContent = "";
        showModelConfig(message.info);
        ui.conversation.replaceChildren();
        setState("ready", "Model loaded. Type a prompt.");
    },
    "model-unloaded": () => {
        modelLoaded = loraLoaded = false;
        ui.modelName.textContent = ui.loraName.textContent = "";
        ui.modelConfig.hidden = true;
        setState("no-model", "Model unloaded.");
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

function startWorker() {
    if (worker) worker.terminate();
    modelLoaded = loraLoaded = false;
    currentReply = null;
    ui.modelName.textContent = ui.loraName.textContent = "";
    ui.modelConfig.hidden = true;
    setState("starting", "Starting the engine…");
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
        seed: crypto.getRandomValues(new Uint32Array(1))[0],
    };
}

// Loading a file stops the generation in progress first; the worker runs requests in order.
async function sendFile(input, type) {
    const file = input.files[0];
    if (!file) return;
    input.value = "";   // picking the same file again must fire "change" again
    showError("");
    worker.postMessage({type: "stop"});
    setState("busy", `Loading ${file.name}…`);
    try {
        const buffer = await file.arrayBuffer();
        worker.postMessage({type, name: file.name, buffer}, [buffer]);
    } catch (error) {
        showError(`${file.name}: cannot read the file: ${error.message}`);
        setState(idleState());
    }
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

startWorker();

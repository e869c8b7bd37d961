/*
 * Browser glue: the Nano core (infer_c/nano.c and bpe.c, compiled unchanged) behind a few flat functions that
 * the Web Worker calls. One model, one optional LoRA adapter, one generation at a time.
 *
 * Generation is nano_generate itself. Its token callback is an async JS function (Emscripten's
 * Asyncify): it posts the token to the page and yields to the worker's event loop, so a "stop"
 * message can arrive between two tokens. Only the functions on that call path are instrumented
 * (ASYNCIFY_ONLY in the Makefile), the forward pass runs at full speed.
 */
#include <emscripten.h>
#include <emscripten/heap.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../infer_c/nano.h"

static struct {
    void *model_bytes, *lora_bytes;   /* the files (from wasm_file_buffer), owned here: the core points into them */
    int file_block_size;              /* the model's own context; its config's block_size is the page's */
    NanoModel model;
    NanoState state;
    NanoLora lora;
    int model_loaded, lora_loaded;
    NanoStats stats;
    int *encoded;                     /* ids of the last wasm_encode, wasm_chat_prompt or wasm_chat_answer_end */
    NanoTextStream stream;            /* the generated text, whole characters at a time */
    char error[512];
    char text[NANO_STREAM_TEXT_CAP];  /* what one token adds to the text */
    char info[1024];
    char constants[256];              /* JSON of wasm_sampling_defaults or wasm_special_ids */
    size_t memory_limit;              /* bytes the files and state may take; 0 = what wasm32 allows */
} engine;

extern unsigned char __heap_base;     /* the linker's: where malloc's heap starts, after data and stack */

/* A file buffer starts 0..3 bytes into its allocation (wasm_file_buffer), which is at least 4-byte aligned. */
static void free_file(void *bytes) {
    if (bytes) free((unsigned char *)bytes - (uintptr_t)bytes % 4);
}

/* Receives every sampled token; returns nonzero when the page asked to stop. */
EM_ASYNC_JS(int, report_token, (int token), {
    return await Module.onToken(token);
});

static int on_token(void *user, int token, const float *logits, int vocab_size) {
    (void)user; (void)logits; (void)vocab_size;
    return report_token(token);
}

EMSCRIPTEN_KEEPALIVE const char *wasm_error(void) { return engine.error; }

EMSCRIPTEN_KEEPALIVE void wasm_unload_lora(void) {
    if (engine.model_loaded) nano_state_attach_lora(&engine.state, NULL);   /* detaching never fails */
    free_file(engine.lora_bytes);
    engine.lora_bytes = NULL;
    engine.lora_loaded = 0;
}

EMSCRIPTEN_KEEPALIVE void wasm_unload_model(void) {
    wasm_unload_lora();
    if (engine.model_loaded) {
        nano_state_free(&engine.state);
        nano_model_free(&engine.model);
    }
    free_file(engine.model_bytes);
    engine.model_bytes = NULL;
    engine.model_loaded = 0;
}

/* The most the files and state can take: the largest wasm32 memory (4 GB less a page, MAXIMUM_MEMORY in the
 * Makefile) less the engine's static data and stack. The page's test hook can set a smaller limit. */
EMSCRIPTEN_KEEPALIVE size_t wasm_memory_capacity(void) {
    return engine.memory_limit ? engine.memory_limit : emscripten_get_heap_max() - (size_t)&__heap_base;
}

EMSCRIPTEN_KEEPALIVE void wasm_limit_memory(size_t bytes) { engine.memory_limit = bytes; }

/* The message for a file the tab cannot hold; state_bytes is 0 while only the file's size is known. */
static void explain_no_room(const char *name, const char *what, double file_bytes, size_t state_bytes,
                            int allocation_failed) {
    double mb = 1e6, capacity = (double)wasm_memory_capacity() / mb;
    char needs[160], holds[160];
    if (state_bytes)
        snprintf(needs, sizeof needs, "%.1f MB (%.1f MB of file and %.1f MB of activations and KV cache)",
                 (file_bytes + (double)state_bytes) / mb, file_bytes / mb, (double)state_bytes / mb);
    else
        snprintf(needs, sizeof needs, "%.1f MB", file_bytes / mb);
    if (allocation_failed)
        snprintf(holds, sizeof holds, "more than the browser could give: a tab's WebAssembly memory holds at most "
                 "%.1f MB, less what is in use", capacity);
    else
        snprintf(holds, sizeof holds, "and a browser tab's WebAssembly memory holds at most %.1f MB", capacity);
    /* the state grows with the context, the file with the weights' precision */
    snprintf(engine.error, sizeof engine.error, "%s: this %s needs %s, %s: use a Q80/Q4K file (export.py --quant or "
             "--q4k)%s", name, what, needs, holds, (double)state_bytes > file_bytes ? " or a shorter block_size" : "");
}

/* Where a model file must start modulo 4 for its parameters to be aligned, from its first bytes. */
EMSCRIPTEN_KEEPALIVE size_t wasm_model_placement(const void *start, size_t n) { return nano_model_placement(start, n); }

/* A buffer for a file of size bytes, starting at an address that is placement modulo 4 (a model file's
 * wasm_model_placement, so that the loader need not copy it; 0 for an adapter). The worker fills it and hands it
 * to wasm_load_model or wasm_load_lora. NULL with wasm_error() when it cannot be had. size is a double: a picked
 * file may exceed what size_t holds. */
EMSCRIPTEN_KEEPALIVE void *wasm_file_buffer(const char *name, const char *what, double size, size_t placement) {
    int fits = size + 3 <= (double)wasm_memory_capacity();
    unsigned char *base = fits ? malloc((size_t)size + 3) : NULL;   /* malloc's blocks are 8-byte aligned */
    if (!base) explain_no_room(name, what, size, 0, fits);
    return base ? base + placement % 4 : NULL;
}

/* Takes ownership of bytes (from wasm_file_buffer) in every case. Returns 0, or -1 with wasm_error().
 * A file that does not load leaves the model already loaded (if any) in place; one whose state cannot be
 * allocated once the old model is freed leaves none. */
EMSCRIPTEN_KEEPALIVE int wasm_load_model(void *bytes, size_t size, const char *name) {
    NanoModel model;
    if (nano_model_load(&model, bytes, size, name, engine.error, sizeof engine.error)) {
        free_file(bytes);
        return -1;
    }
    /* the state and every bound of the forward pass follow block_size; the RoPE tables keep their longer rows */
    int file_block_size = model.config.block_size;
    nano_model_limit_context(&model, NANO_CONTEXT_LIMIT);
    size_t state_bytes = nano_state_bytes(&model);
    if ((double)size + (double)state_bytes > (double)wasm_memory_capacity()) {
        explain_no_room(name, "model", (double)size, state_bytes, 0);
        nano_model_free(&model);
        free_file(bytes);
        return -1;
    }
    wasm_unload_model();
    engine.model = model;
    engine.model_bytes = bytes;
    engine.file_block_size = file_block_size;
    if (nano_state_init(&engine.state, &engine.model)) {
        explain_no_room(name, "model", (double)size, state_bytes, 1);
        nano_model_free(&engine.model);
        free_file(bytes);
        engine.model_bytes = NULL;
        return -1;
    }
    engine.model_loaded = 1;
    return 0;
}

EMSCRIPTEN_KEEPALIVE int wasm_model_loaded(void) { return engine.model_loaded; }

/* Same ownership rule. A refused adapter leaves the one already attached (if any) in place. */
EMSCRIPTEN_KEEPALIVE int wasm_load_lora(void *bytes, size_t size, const char *name) {
    NanoLora lora;
    if (!engine.model_loaded) {
        snprintf(engine.error, sizeof engine.error, "%s: load a model before a LoRA adapter", name);
        free_file(bytes);
        return -1;
    }
    if (nano_lora_load(&lora, &engine.model, bytes, size, name, engine.error, sizeof engine.error)) {
        free_file(bytes);
        return -1;
    }
    /* attaching grows the state to the new rank; if that fails, nothing has changed */
    if (nano_state_attach_lora(&engine.state, &lora)) {
        snprintf(engine.error, sizeof engine.error, "%s: out of memory for the adapter's activations", name);
        free_file(bytes);
        return -1;
    }
    free_file(engine.lora_bytes);
    engine.lora = lora;
    engine.lora_bytes = bytes;
    engine.lora_loaded = 1;
    nano_state_attach_lora(&engine.state, &engine.lora);   /* the copy that outlives this call */
    return 0;
}

/* The model's config as JSON, for the page to show; context is the page's (at most NANO_CONTEXT_LIMIT), block_size the file's;
 * in_place tells that the core uses the file where the worker streamed it (no aligned copy). */
EMSCRIPTEN_KEEPALIVE const char *wasm_model_info(void) {
    const NanoConfig *c = &engine.model.config;
    const char *quant = c->quant_type == NANO_QUANT_Q80 ? "Q80" : c->quant_type == NANO_QUANT_Q4K ? "Q4K" : "float32";
    const char *architecture = c->model_type == NANO_TYPE_QWEN3 ? "Qwen3" : c->model_type == NANO_TYPE_QWEN2 ? "Qwen2"
                                                                                                              : "Nano";
    const char *tokenizer = engine.model.tokenizer.kind == NANO_TOKENIZER_BPE ? "bpe" : "trie";
    snprintf(engine.info, sizeof engine.info,
             "{\"architecture\":\"%s\",\"tokenizer\":\"%s\",\"block_size\":%d,\"context\":%d,\"vocab_size\":%d,"
             "\"n_layer\":%d,\"n_embd\":%d,\"n_head\":%d,\"n_kv_head\":%d,\"n_hidden\":%d,\"head_dim\":%d,"
             "\"is_shared_classifier\":%s,\"quantization\":\"%s\",\"group_size\":%d,\"state_bytes\":%zu,"
             "\"in_place\":%s}",
             architecture, tokenizer, engine.file_block_size, c->block_size, c->vocab_size, c->n_layer, c->n_embd,
             c->n_head, c->n_kv_head, c->n_hidden, c->head_dim, c->is_shared_classifier ? "true" : "false", quant,
             c->group_size, nano_state_bytes(&engine.model), engine.model.placed_copy ? "false" : "true");
    return engine.info;
}

/* The sampling defaults of every Nano front end (nano.h) as JSON: the page's settings start there. */
EMSCRIPTEN_KEEPALIVE const char *wasm_sampling_defaults(void) {
    snprintf(engine.constants, sizeof engine.constants,
             "{\"temperature\":%g,\"top_k\":%d,\"top_p\":%g,\"repetition_penalty\":%g,\"max_new_tokens\":%d}",
             (double)NANO_DEFAULT_TEMPERATURE, NANO_DEFAULT_TOP_K, (double)NANO_DEFAULT_TOP_P,
             (double)NANO_DEFAULT_REPETITION_PENALTY, NANO_DEFAULT_MAX_NEW);
    return engine.constants;
}

/* The special token ids (nano.h) as JSON: the worker builds prompts with them. */
EMSCRIPTEN_KEEPALIVE const char *wasm_special_ids(void) {
    snprintf(engine.constants, sizeof engine.constants,
             "{\"pad\":%d,\"unknown\":%d,\"bos\":%d,\"eos\":%d,\"instruct\":%d,\"response\":%d}",
             NANO_PAD, NANO_UNKNOWN, NANO_BOS, NANO_EOS, NANO_INSTRUCT, NANO_RESPONSE);
    return engine.constants;
}

/* Positions of the loaded model's context that a conversation keeps free for the answer. */
EMSCRIPTEN_KEEPALIVE int wasm_answer_room(void) { return nano_answer_room(engine.model.config.block_size); }

EMSCRIPTEN_KEEPALIVE int wasm_lora_rank(void) { return engine.lora_loaded ? engine.lora.rank : 0; }
EMSCRIPTEN_KEEPALIVE int wasm_lora_alpha(void) { return engine.lora_loaded ? engine.lora.alpha : 0; }

/* Keeps ids (malloc'ed by the core) for wasm_encoded_ids(); returns their count, or -1 with wasm_error(). */
static int keep_ids(int status, int *ids, int n) {
    free(engine.encoded);
    engine.encoded = status ? NULL : ids;
    if (status == NANO_NO_CHAT_TOKENS)
        snprintf(engine.error, sizeof engine.error, "the vocabulary has no <|im_start|> or <|im_end|>, so no chat: "
                 "continue text instead (mode: continuation)");
    else if (status)
        snprintf(engine.error, sizeof engine.error, "out of memory for the prompt");
    return status ? -1 : n;
}

/* Tokenizes UTF-8 text; returns the count (-1 with wasm_error()), the ids are at wasm_encoded_ids(). */
EMSCRIPTEN_KEEPALIVE int wasm_encode(const char *text) {
    int count = 0, *ids = nano_encode(&engine.model.tokenizer, text, &count);
    return keep_ids(ids ? 0 : -1, ids, count);
}

/* The model's chat turn for question (nano_chat_prompt: thinking matters to Qwen3 only), the same way. */
EMSCRIPTEN_KEEPALIVE int wasm_chat_prompt(const char *question, int thinking) {
    int count = 0, *ids = NULL, status = nano_chat_prompt(&engine.model, question, thinking, &ids, &count);
    return keep_ids(status, ids, count);
}

/* What closes an answer before the next turn (nano_chat_answer_end), the same way. */
EMSCRIPTEN_KEEPALIVE int wasm_chat_answer_end(void) {
    int count = 0, *ids = NULL, status = nano_chat_answer_end(&engine.model, &ids, &count);
    return keep_ids(status, ids, count);
}

EMSCRIPTEN_KEEPALIVE const int *wasm_encoded_ids(void) { return engine.encoded; }

EMSCRIPTEN_KEEPALIVE int wasm_stop_token(int id) { return nano_stop_token(&engine.model, id); }

/* The text that token id completes (UTF-8; a character it leaves unfinished waits for the next token). */
EMSCRIPTEN_KEEPALIVE const char *wasm_stream_token(int id) {
    nano_stream_token(&engine.stream, &engine.model.tokenizer, id, engine.text, sizeof engine.text);
    return engine.text;
}

/* The end of a generated text: what is left of an unfinished character. */
EMSCRIPTEN_KEEPALIVE const char *wasm_stream_flush(void) {
    nano_stream_flush(&engine.stream, engine.text, sizeof engine.text);
    return engine.text;
}

/* The logits after each of n tokens run from position 0, into out[n * vocab_size]: how the tests compare this
 * build's forward pass with the native engine's. Returns 0, or -1 with wasm_error(). */
EMSCRIPTEN_KEEPALIVE int wasm_logits(const int *ids, int n, float *out) {
    int vocab_size = engine.model.config.vocab_size;
    for (int t = 0; t < n; t++)
        if (ids[t] < 0 || ids[t] >= vocab_size) {
            snprintf(engine.error, sizeof engine.error, "token %d: id %d is not in the vocabulary (0..%d)", t, ids[t],
                     vocab_size - 1);
            return -1;
        }
    engine.state.pos = 0;
    if (nano_forward(&engine.state, ids, n, engine.model.config.is_causal)) {
        snprintf(engine.error, sizeof engine.error, "%d tokens do not fit the context of %d", n,
                 engine.model.config.block_size);
        return -1;
    }
    for (int t = 0; t < n; t++)
        memcpy(out + (size_t)t * vocab_size, nano_logits(&engine.state, t), sizeof(float) * vocab_size);
    return 0;
}

/* Generates from prompt ids, reporting each token through Module.onToken; max_new 0 fills the context.
 * Returns 0, or -1 with wasm_error(). */
EMSCRIPTEN_KEEPALIVE int wasm_generate(const int *prompt, int n_prompt, float temperature, int top_k, float top_p,
                                       float repetition_penalty, int max_new, unsigned seed) {
    int block = engine.model.config.block_size;
    if (n_prompt < 1 || n_prompt > block) {
        snprintf(engine.error, sizeof engine.error, "the prompt has %d tokens but the model's context (block_size) is %d",
                 n_prompt, block);
        return -1;
    }
    memset(&engine.stream, 0, sizeof engine.stream);   /* a stopped generation may have left a character unfinished */
    NanoSampler sampler;
    if (nano_sampler_init(&sampler, engine.model.config.vocab_size, temperature, top_k, top_p, repetition_penalty,
                          seed)) {
        snprintf(engine.error, sizeof engine.error, "out of memory for the sampler");
        return -1;
    }
    int status = nano_generate(&engine.state, &sampler, prompt, n_prompt, nano_max_new_tokens(max_new, n_prompt, block),
                               on_token, NULL, &engine.stats);
    nano_sampler_free(&sampler);
    if (status) snprintf(engine.error, sizeof engine.error, "generation failed (out of memory)");
    return status;
}

EMSCRIPTEN_KEEPALIVE double wasm_prefill_seconds(void) { return engine.stats.prefill_seconds; }
EMSCRIPTEN_KEEPALIVE double wasm_decode_seconds(void) { return engine.stats.decode_seconds; }
EMSCRIPTEN_KEEPALIVE int wasm_decode_steps(void) { return engine.stats.decode_steps; }

/* libFuzzer harness for the loaders. Any byte string must load cleanly or be refused with a message.
 * Inputs whose model_type word is 10 go to the LoRA loader (against a small built-in base model, with
 * one forward step when they load); the rest to the model loader (Nano and Qwen files; float32, Q80 and Q4K),
 * and a model that loads must dequantize every embedding row, build a chat prompt, run a forward step and
 * stream the prompt's text without touching memory outside its buffers. Without clang, fuzz_replay.c runs the same harness over files (make fuzz-replay). */
#include "nano.h"

#include <stdlib.h>
#include <string.h>

/* A valid float32 model with zero weights: block 4, vocab 7, 1 layer, n_embd 8, 2 heads, 1 KV head,
 * hidden 16 (LoRA seeds for the fuzzer are made for these dims). */
static uint32_t base_words[64 + 23 + 24 + 56 + 64 + 32 + 32 + 64 + 3 * 128 + 16];

static const NanoModel *base_model(void) {
    static NanoModel model;
    static int loaded;
    if (loaded) return &model;
    uint32_t header[] = {NANO_MAGIC0, NANO_MAGIC1, NANO_MODEL_MAJOR, NANO_MODEL_MINOR, NANO_TYPE_MODEL, 36,
                         4, 7, 1, 8, 2, 1, 16, 1, 4, NANO_QUANT_F32, 0};
    memcpy(base_words, header, sizeof header);
    uint32_t *tokenizer = base_words + 64;
    tokenizer[0] = 8 + 7 * 12;
    tokenizer[1] = 7;
    for (uint32_t id = 0; id < 7; id++) {
        tokenizer[2 + 3 * id] = 1;          /* length 1, not special, then two zero bytes */
        tokenizer[3 + 3 * id] = id;
        tokenizer[4 + 3 * id] = 'a' + id;
    }
    char err[256];
    loaded = nano_model_load(&model, base_words, sizeof base_words, "base", err, sizeof err) == 0;
    if (!loaded) abort();   /* the harness itself is wrong */
    return &model;
}

static void run_one_step(const NanoModel *model, const NanoLora *lora) {
    NanoState state;
    if (nano_state_bytes(model) > (64u << 20) || nano_state_init(&state, model)) return;
    int n, *ids;
    if (nano_state_attach_lora(&state, lora) == 0 &&
        nano_chat_prompt(model, "<|bos|>hello, 世界 \xF0\x9F\x98\x80\xFF<|im_end|>", 0, &ids, &n) == 0) {
        int steps = n < model->config.block_size ? n : model->config.block_size;
        if (steps > 0 && nano_forward(&state, ids, steps, model->config.is_causal) == 0) nano_logits(&state, steps - 1);
        char text[NANO_STREAM_TEXT_CAP];
        NanoTextStream stream = {0};
        for (int i = 0; i < n; i++) {
            nano_stream_token(&stream, &model->tokenizer, ids[i], text, sizeof text);
            nano_stop_token(model, ids[i]);
        }
        nano_stream_flush(&stream, text, sizeof text);
        free(ids);
    }
    nano_state_free(&state);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    void *copy = malloc(size ? size : 1);   /* the loaders want a 4-byte aligned buffer, as mmap gives */
    if (!copy) return 0;
    memcpy(copy, data, size);
    char err[512];
    if (size >= 20 && data[16] == NANO_TYPE_LORA && !data[17] && !data[18] && !data[19]) {
        const NanoModel *base = base_model();
        NanoLora lora;
        if (nano_lora_load(&lora, base, copy, size, "fuzz", err, sizeof err) == 0) run_one_step(base, &lora);
    } else {
        NanoModel model;
        if (nano_model_load(&model, copy, size, "fuzz", err, sizeof err) == 0) {
            float *row = malloc(sizeof(float) * model.config.n_embd);
            for (int r = 0; row && r < model.embedding.rows; r++) nano_matrix_row(&model, &model.embedding, r, row);
            free(row);
            run_one_step(&model, NULL);
            nano_model_free(&model);
        }
    }
    free(copy);
    return 0;
}

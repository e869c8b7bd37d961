/* libFuzzer harness: any byte string given to the model loader must load cleanly or be refused with a
 * message; a model that loads must tokenize and run a forward step without touching memory outside it. */
#include "nano.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    void *copy = malloc(size ? size : 1);   /* the loader wants a 4-byte aligned buffer, as mmap gives */
    if (!copy) return 0;
    memcpy(copy, data, size);
    NanoModel model;
    char err[512];
    if (nano_model_load(&model, copy, size, "fuzz", err, sizeof err) == 0) {
        int n;
        int *ids = nano_encode(&model.tokenizer, "<|bos|>hello, 世界 \xF0\x9F\x98\x80\xFF", &n);
        NanoState state;
        if (ids && nano_state_bytes(&model) < (64u << 20) && nano_state_init(&state, &model) == 0) {
            int steps = n < model.config.block_size ? n : model.config.block_size;
            nano_forward(&state, ids, steps, 1);
            nano_logits(&state, steps - 1);
            char text[1025];
            for (int i = 0; i < steps; i++) nano_token_utf8(&model.tokenizer, ids[i], text, sizeof text);
            nano_state_free(&state);
        }
        free(ids);
        nano_model_free(&model);
    }
    free(copy);
    return 0;
}

/*
 * Nano inference engine core. Sections: model file, tokenizer, matrix kernels, threads, forward pass,
 * sampler, generation. C99; OpenMP and SIMD are used when the compiler offers them.
 */
#define _DEFAULT_SOURCE   /* madvise */
#define _POSIX_C_SOURCE 200809L
#include "nano.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__wasm_simd128__)
#include <wasm_simd128.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#include <sched.h>
#endif

/* Dimension fields above this are refused, so that every size product fits in 64 bits. */
#define MAX_DIM (1u << 24)

/* ============================================================================ model file */

/* Header word indices (FORMAT.md). Words after a file kind's last field are 0. */
enum {
    WORD_MAGIC0, WORD_MAGIC1, WORD_MAJOR_VERSION, WORD_MINOR_VERSION, WORD_MODEL_TYPE, WORD_CONFIG_LENGTH,
    /* model file */
    WORD_BLOCK_SIZE = WORD_CONFIG_LENGTH + 1, WORD_VOCAB_SIZE, WORD_N_LAYER, WORD_N_EMBD, WORD_N_HEAD,
    WORD_N_KV_HEAD, WORD_N_HIDDEN, WORD_IS_SHARED_CLASSIFIER, WORD_HEAD_DIM, WORD_QUANT_TYPE, WORD_GROUP_SIZE,
    WORD_FLAGS, WORD_NORM_EPS, WORD_ROPE_THETA,   /* extension words: 0 = the original's behaviour */
    MODEL_HEADER_WORDS,
    /* LoRA adapter file */
    WORD_LORA_RANK = WORD_CONFIG_LENGTH + 1, WORD_LORA_ALPHA, WORD_LORA_N_LAYER, WORD_LORA_N_EMBD,
    WORD_LORA_N_HEAD, WORD_LORA_N_KV_HEAD, WORD_LORA_N_HIDDEN,
    LORA_HEADER_WORDS   /* the eighth config word is 0 */
};
#define MODEL_CONFIG_BYTES 36   /* config_length: the nine config words */
#define LORA_CONFIG_BYTES 32    /* config_length: the eight config words */

typedef struct {
    const uint8_t *base;
    size_t size, offset;
    const char *name;
    char *err;
    size_t err_cap;
} FileCursor;

static int fail(FileCursor *c, const char *fmt, ...) {
    int used = snprintf(c->err, c->err_cap, "%s: ", c->name);
    if (used < 0 || (size_t)used >= c->err_cap) return -1;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->err + used, c->err_cap - used, fmt, ap);
    va_end(ap);
    return -1;
}

static uint32_t read_u32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint32_t header_word(const FileCursor *c, int word) { return read_u32(c->base + 4 * (size_t)word); }

static float header_float(const FileCursor *c, int word) {
    uint32_t bits = header_word(c, word);
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

/* Claim count elements of elem_size bytes at the cursor; NULL (with a message) if the file ends first. */
static const void *take(FileCursor *c, uint64_t count, uint64_t elem_size, const char *field) {
    uint64_t bytes = count * elem_size;   /* count < 2^50 and elem_size <= 4 by the MAX_DIM checks */
    if (elem_size == 4 && (uintptr_t)(c->base + c->offset) % 4 != 0) {
        fail(c, "%s: float data at unaligned offset %zu (group_size not a multiple of 4)", field, c->offset);
        return NULL;
    }
    if (bytes > c->size - c->offset) {
        fail(c, "%s: needs %llu bytes at offset %zu but the file has %zu bytes (truncated or wrong dims)",
             field, (unsigned long long)bytes, c->offset, c->size);
        return NULL;
    }
    const void *p = c->base + c->offset;
    c->offset += (size_t)bytes;
    return p;
}

static int check_version(FileCursor *c, uint32_t major, uint32_t minor, uint32_t want_major, uint32_t want_minor) {
    if (major == want_major && minor == want_minor) return 0;
    static const uint32_t known_old[][2] = {{2024, 10}, {2025, 8}, {2025, 12}};
    for (size_t i = 0; i < sizeof known_old / sizeof known_old[0]; i++)
        if (major == known_old[i][0] && minor == known_old[i][1])
            return fail(c, "major_version/minor_version: version %u.%u is not supported (this engine reads %u.%u); "
                        "export the model again with export.py", major, minor, want_major, want_minor);
    return fail(c, "major_version/minor_version: unknown version %u.%u (expected %u.%u)",
                major, minor, want_major, want_minor);
}

static int is_model_type(uint32_t type) {
    return type == NANO_TYPE_MODEL || type == NANO_TYPE_QWEN2 || type == NANO_TYPE_QWEN3;
}

/* What every file kind shares: magic, model_type, version, config_length, and zeros after its fields. */
static int check_header(FileCursor *c, int want_lora) {
    if (c->size < NANO_HEADER_BYTES)
        return fail(c, "header: file has %zu bytes, a Nano file starts with a %d-byte header",
                    c->size, NANO_HEADER_BYTES);
    if (header_word(c, WORD_MAGIC0) != NANO_MAGIC0 || header_word(c, WORD_MAGIC1) != NANO_MAGIC1)
        return fail(c, "magic: %08x %08x is not a Nano file (expected %08x %08x)",
                    header_word(c, WORD_MAGIC0), header_word(c, WORD_MAGIC1), NANO_MAGIC0, NANO_MAGIC1);
    uint32_t type = header_word(c, WORD_MODEL_TYPE);
    if (want_lora && type != NANO_TYPE_LORA) {
        if (is_model_type(type)) return fail(c, "model_type: %u is a model, not a LoRA adapter", type);
        return fail(c, "model_type: %u is not supported (expected 10, a LoRA adapter)", type);
    }
    if (!want_lora && !is_model_type(type)) {
        if (type == NANO_TYPE_LORA) return fail(c, "model_type: 10 is a LoRA adapter, not a model (pass it with -l)");
        return fail(c, "model_type: %u is not supported (expected 0 Nano, 2 Qwen2 or 3 Qwen3)", type);
    }
    if (check_version(c, header_word(c, WORD_MAJOR_VERSION), header_word(c, WORD_MINOR_VERSION),
                      want_lora ? NANO_LORA_MAJOR : NANO_MODEL_MAJOR, want_lora ? NANO_LORA_MINOR : NANO_MODEL_MINOR))
        return -1;
    uint32_t config_length = header_word(c, WORD_CONFIG_LENGTH);
    uint32_t want_length = want_lora ? LORA_CONFIG_BYTES : MODEL_CONFIG_BYTES;
    if (config_length != want_length) return fail(c, "config_length: %u, expected %u", config_length, want_length);
    for (int w = want_lora ? LORA_HEADER_WORDS : MODEL_HEADER_WORDS; w < NANO_HEADER_BYTES / 4; w++)
        if (header_word(c, w)) return fail(c, "header word %d: %u, expected 0", w, header_word(c, w));
    return 0;
}

static int check_dim(FileCursor *c, const char *field, uint32_t value) {
    if (value == 0 || value > MAX_DIM) return fail(c, "%s: %u is out of range (1..%u)", field, value, MAX_DIM);
    return 0;
}

static int is_qwen(const NanoConfig *cfg) {
    return cfg->model_type == NANO_TYPE_QWEN2 || cfg->model_type == NANO_TYPE_QWEN3;
}

/* flags, norm_eps and rope_theta; 0 in any of them means the original's behaviour (its defaults for the
 * model type). */
static int read_extensions(FileCursor *c, NanoConfig *cfg) {
    uint32_t flags = header_word(c, WORD_FLAGS);
    if (flags & ~NANO_FLAG_NON_CAUSAL)
        return fail(c, "flags: 0x%x has unknown bits 0x%x (this engine knows bit 0, full attention)",
                    flags, flags & ~NANO_FLAG_NON_CAUSAL);
    cfg->is_causal = !(flags & NANO_FLAG_NON_CAUSAL);
    float eps = header_float(c, WORD_NORM_EPS), theta = header_float(c, WORD_ROPE_THETA);
    if (!isfinite(eps) || eps < 0.0f) return fail(c, "norm_eps: %g is not a positive number", eps);
    cfg->norm_eps = eps != 0.0f ? eps : is_qwen(cfg) ? NANO_QWEN_NORM_EPS : NANO_DEFAULT_NORM_EPS;
    if (is_qwen(cfg)) {   /* the engine computes a Qwen file's RoPE tables from theta when they are not stored */
        if (!isfinite(theta) || theta < 0.0f || (theta != 0.0f && theta <= 1.0f))
            return fail(c, "rope_theta: %g is not a RoPE base (a number above 1)", theta);
        cfg->rope_theta = theta != 0.0f ? theta : NANO_QWEN_ROPE_THETA;
        return 0;
    }
    /* model.py, and so export.py, knows only the default RoPE base: another one is refused, not half supported */
    if (theta != 0.0f && theta != NANO_DEFAULT_ROPE_THETA)
        return fail(c, "rope_theta: %g is not supported (this engine uses %g)", theta, NANO_DEFAULT_ROPE_THETA);
    cfg->rope_theta = NANO_DEFAULT_ROPE_THETA;
    return 0;
}

static int read_config(FileCursor *c, NanoConfig *cfg) {
    cfg->model_type = (int)header_word(c, WORD_MODEL_TYPE);
    struct { int word; const char *name; int *value; } dims[] = {
        {WORD_BLOCK_SIZE, "block_size", &cfg->block_size}, {WORD_VOCAB_SIZE, "vocab_size", &cfg->vocab_size},
        {WORD_N_LAYER, "n_layer", &cfg->n_layer}, {WORD_N_EMBD, "n_embd", &cfg->n_embd},
        {WORD_N_HEAD, "n_head", &cfg->n_head}, {WORD_N_KV_HEAD, "n_kv_head", &cfg->n_kv_head},
        {WORD_N_HIDDEN, "n_hidden", &cfg->n_hidden}};
    for (size_t i = 0; i < sizeof dims / sizeof dims[0]; i++) {
        uint32_t v = header_word(c, dims[i].word);
        if (check_dim(c, dims[i].name, v)) return -1;
        *dims[i].value = (int)v;
    }
    uint32_t shared = header_word(c, WORD_IS_SHARED_CLASSIFIER), head_dim = header_word(c, WORD_HEAD_DIM);
    uint32_t quant = header_word(c, WORD_QUANT_TYPE), group = header_word(c, WORD_GROUP_SIZE);
    if (shared > 1) return fail(c, "is_shared_classifier: %u, expected 0 or 1", shared);
    if (check_dim(c, "head_dim", head_dim)) return -1;
    if (head_dim % 2) return fail(c, "head_dim: %u must be even for RoPE", head_dim);
    if (cfg->n_head % cfg->n_kv_head) return fail(c, "n_kv_head: %d does not divide n_head %d", cfg->n_kv_head, cfg->n_head);
    if ((uint64_t)cfg->n_head * head_dim > MAX_DIM) return fail(c, "head_dim: n_head * head_dim is too large");
    if (!is_qwen(cfg) && cfg->vocab_size <= NANO_RESPONSE)
        return fail(c, "vocab_size: %d cannot hold the special tokens", cfg->vocab_size);
    cfg->is_shared_classifier = (int)shared;
    cfg->head_dim = (int)head_dim;
    cfg->quant_type = (int)quant;
    cfg->group_size = 0;
    if (quant != NANO_QUANT_F32 && quant != NANO_QUANT_Q80 && quant != NANO_QUANT_Q4K)
        return fail(c, "quant_type: unknown value 0x%x", quant);
    /* a Q4K file has no head whatever word 13 says (the original's converter writes 0 for an untied source) */
    if (quant == NANO_QUANT_Q4K) cfg->is_shared_classifier = 1;
    if (quant == NANO_QUANT_Q80) {
        if (group == 0 || group > MAX_DIM) return fail(c, "group_size: %u is out of range", group);
        uint32_t widths[] = {(uint32_t)cfg->n_embd, (uint32_t)cfg->n_head * head_dim, (uint32_t)cfg->n_hidden};
        for (int i = 0; i < 3; i++)
            if (widths[i] % group) return fail(c, "group_size: %u does not divide the matmul width %u", group, widths[i]);
        cfg->group_size = (int)group;
    }
    return read_extensions(c, cfg);
}

/* ---------------------------------------------------------------------------- tokenizer tables */

static uint32_t hash_chars(const uint32_t *chars, int n) {
    uint32_t h = 2166136261u;
    for (int i = 0; i < n; i++) h = (h ^ chars[i]) * 16777619u;
    return h ^ (h >> 15);
}

static uint32_t table_capacity(int n) {
    uint32_t cap = 16;
    while (cap < 2u * (uint32_t)n) cap <<= 1;
    return cap;
}

static int tokenizer_lookup(const NanoTokenizer *t, const uint32_t *chars, int n) {
    for (uint32_t slot = hash_chars(chars, n) & t->entry_mask;; slot = (slot + 1) & t->entry_mask) {
        int32_t id = t->entry_table[slot] - 1;
        if (id < 0) return -1;
        if (t->length[id] == n && memcmp(t->chars[id], chars, 4 * (size_t)n) == 0) return id;
    }
}

static int longest_from(const NanoTokenizer *t, uint32_t c) {
    for (uint32_t slot = hash_chars(&c, 1) & t->first_mask;; slot = (slot + 1) & t->first_mask) {
        if (t->first_longest[slot] == 0) return 1;
        if (t->first_char[slot] == c) return t->first_longest[slot];
    }
}

static void note_first_char(NanoTokenizer *t, uint32_t c, int length) {
    uint32_t slot = hash_chars(&c, 1) & t->first_mask;
    while (t->first_longest[slot] && t->first_char[slot] != c) slot = (slot + 1) & t->first_mask;
    t->first_char[slot] = c;
    if (t->first_longest[slot] < length) t->first_longest[slot] = (uint8_t)length;
}

static int read_tokenizer(FileCursor *c, NanoTokenizer *t, int vocab_size) {
    memset(t, 0, sizeof *t);
    const uint8_t *section = take(c, 8, 1, "tokenizer section");
    if (!section) return -1;
    uint32_t section_bytes = read_u32(section), count = read_u32(section + 4);
    if (section_bytes < 8 || section_bytes % 4 || section_bytes - 8 > c->size - c->offset)
        return fail(c, "tokenizer section length: %u does not fit the file", section_bytes);
    if (count != (uint32_t)vocab_size)
        return fail(c, "tokenizer vocab_size: %u but the header says %d", count, vocab_size);
    size_t end = c->offset + section_bytes - 8;
    t->vocab_size = vocab_size;
    t->chars = malloc(sizeof *t->chars * vocab_size);
    t->length = malloc(vocab_size);
    uint32_t entry_cap = table_capacity(vocab_size);
    t->entry_table = calloc(entry_cap, sizeof *t->entry_table);
    t->entry_mask = entry_cap - 1;
    t->first_char = calloc(entry_cap, sizeof *t->first_char);
    t->first_longest = calloc(entry_cap, 1);
    t->first_mask = entry_cap - 1;
    if (!t->chars || !t->length || !t->entry_table || !t->first_char || !t->first_longest)
        return fail(c, "tokenizer: out of memory for %d tokens", vocab_size);
    for (int id = 0; id < vocab_size; id++) {
        if (end - c->offset < 8) return fail(c, "tokenizer token %d: record runs past the section end", id);
        const uint8_t *rec = c->base + c->offset;
        int length = rec[0];
        if (length == 0) return fail(c, "tokenizer token %d: length 0", id);
        if (read_u32(rec + 4) != (uint32_t)id)
            return fail(c, "tokenizer token %d: token_id field is %u (records must be in id order)", id, read_u32(rec + 4));
        if (end - c->offset - 8 < 4 * (size_t)length)
            return fail(c, "tokenizer token %d: %d code points run past the section end", id, length);
        const uint32_t *chars = (const uint32_t *)(rec + 8);
        for (int i = 0; i < length; i++)
            if (chars[i] > 0x10FFFF) return fail(c, "tokenizer token %d: code point 0x%x is not Unicode", id, chars[i]);
        t->chars[id] = chars;
        t->length[id] = (uint8_t)length;
        c->offset += 8 + 4 * (size_t)length;
        int previous = tokenizer_lookup(t, chars, length);
        if (previous >= 0) return fail(c, "tokenizer token %d: duplicates token %d", id, previous);
        uint32_t slot = hash_chars(chars, length) & t->entry_mask;
        while (t->entry_table[slot]) slot = (slot + 1) & t->entry_mask;
        t->entry_table[slot] = id + 1;
        note_first_char(t, chars[0], length);
    }
    if (c->offset != end)
        return fail(c, "tokenizer section length: %u but the records end %zu bytes earlier", section_bytes, end - c->offset);
    return 0;
}

static void tokenizer_free(NanoTokenizer *t) {
    if (t->kind == NANO_TOKENIZER_BPE) nano_bpe_free(&t->bpe);
    free(t->chars); free(t->length);
    free(t->entry_table); free(t->first_char); free(t->first_longest);
    memset(t, 0, sizeof *t);
}

/* A Qwen file's tokenizer section: u32 T (its bytes), u32 max_token_bytes, then a score and the bytes of each
 * token (FORMAT.md "Qwen models"), which bpe.c reads. */
static int read_bpe_tokenizer(FileCursor *c, NanoTokenizer *t, int vocab_size) {
    memset(t, 0, sizeof *t);
    t->kind = NANO_TOKENIZER_BPE;
    t->vocab_size = vocab_size;
    const uint8_t *section = take(c, 8, 1, "tokenizer section");
    if (!section) return -1;
    uint32_t section_bytes = read_u32(section);
    if (section_bytes < 8 || section_bytes - 8 > c->size - c->offset)
        return fail(c, "tokenizer section length: %u does not fit the file", section_bytes);
    char message[256];
    if (nano_bpe_load(&t->bpe, c->base + c->offset, section_bytes - 8, vocab_size, message, sizeof message))
        return fail(c, "%s", message);   /* it names the record and the field */
    c->offset += section_bytes - 8;
    return 0;
}

/* ---------------------------------------------------------------------------- parameters */

/* Q4K block: u32 0x42, u32 n, u32 0, f32 d, f32 dmin, 12 bytes of 6-bit scales and mins, 128 code bytes. */
#define Q4K_FRAME_HEADER_BYTES 44   /* u64 frame_bytes, u32 0x42, u32 ndim, 6 x u32 shape, u32 nblocks */
#define Q4K_MAX_NDIM 6
#define Q4K_GROUPS 8                /* groups of 32 elements in a block, each with a scale and a min */
#define Q4K_SCALES_OFFSET 20
#define Q4K_CODES_OFFSET 32

static int q4k_blocks_per_row(int cols) { return (cols + NANO_Q4K_BLOCK - 1) / NANO_Q4K_BLOCK; }

/* Valid elements of block j of a row of width cols: 256, or what is left for the row's last block. */
static int q4k_block_length(int cols, int j) {
    int left = cols - j * NANO_Q4K_BLOCK;
    return left < NANO_Q4K_BLOCK ? left : NANO_Q4K_BLOCK;
}

static float read_f32(const uint8_t *p) {
    uint32_t bits = read_u32(p);
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

/* The blocks of one Q4K frame holding a tensor of ndim dims `shape` (rows of the last dim's width), after
 * checking its header against the tensor and every block's type, n and scales; NULL with a message if not. */
static const uint8_t *take_q4k_frame(FileCursor *c, int ndim, const uint32_t *shape, const char *field) {
    const uint8_t *h = take(c, Q4K_FRAME_HEADER_BYTES, 1, field);
    if (!h) return NULL;
    uint64_t frame_bytes = read_u32(h) | (uint64_t)read_u32(h + 4) << 32, rows = 1;
    uint32_t cols = shape[ndim - 1], nblocks = read_u32(h + 40);
    if (read_u32(h + 8) != NANO_QUANT_Q4K) { fail(c, "%s frame: type 0x%x, expected 0x42 (Q4K)", field, read_u32(h + 8)); return NULL; }
    if (read_u32(h + 12) != (uint32_t)ndim) {
        fail(c, "%s frame: ndim %u but the header's dims give %d", field, read_u32(h + 12), ndim);
        return NULL;
    }
    for (int i = 0; i < Q4K_MAX_NDIM; i++) {
        uint32_t got = read_u32(h + 16 + 4 * i), want = i < ndim ? shape[i] : 0;
        if (got != want) { fail(c, "%s frame: shape[%d] is %u but the header's dims give %u", field, i, got, want); return NULL; }
        if (i < ndim - 1) rows *= want;
    }
    int per_row = q4k_blocks_per_row((int)cols);
    if (nblocks != rows * per_row) {
        fail(c, "%s frame: %u blocks, but %llu rows of %u need %llu", field, nblocks, (unsigned long long)rows, cols,
             (unsigned long long)(rows * per_row));
        return NULL;
    }
    if (frame_bytes != Q4K_FRAME_HEADER_BYTES + (uint64_t)NANO_Q4K_BLOCK_BYTES * nblocks) {
        fail(c, "%s frame: frame_bytes %llu, but %u blocks make %llu", field, (unsigned long long)frame_bytes, nblocks,
             (unsigned long long)(Q4K_FRAME_HEADER_BYTES + (uint64_t)NANO_Q4K_BLOCK_BYTES * nblocks));
        return NULL;
    }
    const uint8_t *blocks = take(c, nblocks, NANO_Q4K_BLOCK_BYTES, field);
    if (!blocks) return NULL;
    for (uint32_t b = 0; b < nblocks; b++) {
        const uint8_t *block = blocks + (size_t)b * NANO_Q4K_BLOCK_BYTES;
        uint32_t n = read_u32(block + 4), want = (uint32_t)q4k_block_length((int)cols, (int)(b % per_row));
        float d = read_f32(block + 12), dmin = read_f32(block + 16);
        const char *problem = read_u32(block) != NANO_QUANT_Q4K ? "type is not 0x42"
                            : n > NANO_Q4K_BLOCK ? "n is more than 256"
                            : n != want ? "n does not match the row width"
                            : read_u32(block + 8) ? "reserved word is not 0"
                            : !isfinite(d) || !isfinite(dmin) ? "d or dmin is not finite" : NULL;
        if (problem) {
            fail(c, "%s block %u: %s (type 0x%x, n %u, expected n %u)", field, b, problem, read_u32(block), n, want);
            return NULL;
        }
    }
    return blocks;
}

static int take_matrix(FileCursor *c, NanoMatrix *w, int rows, int cols, const NanoConfig *cfg, const char *field) {
    w->rows = rows;
    w->cols = cols;
    w->f32 = NULL; w->q = NULL; w->scale = NULL; w->q4k = NULL; w->tiled = 0;
    uint64_t count = (uint64_t)rows * (uint64_t)cols;
    if (cfg->quant_type == NANO_QUANT_Q4K) {
        uint32_t shape[] = {(uint32_t)rows, (uint32_t)cols};
        return (w->q4k = take_q4k_frame(c, 2, shape, field)) ? 0 : -1;
    }
    if (cfg->quant_type == NANO_QUANT_F32)
        return (w->f32 = take(c, count, 4, field)) ? 0 : -1;
    if (!(w->q = take(c, count, 1, field))) return -1;
    return (w->scale = take(c, count / cfg->group_size, 4, field)) ? 0 : -1;
}

/* Per-layer tensors of one kind, layers 0..L-1, at a fixed offset inside NanoLayer; in a Q4K file they are
 * one frame [L, rows, cols]. */
static int take_layer_matrices(FileCursor *c, NanoModel *m, size_t member, int rows, int cols, const char *field) {
    if (m->config.quant_type == NANO_QUANT_Q4K) {
        uint32_t shape[] = {(uint32_t)m->config.n_layer, (uint32_t)rows, (uint32_t)cols};
        const uint8_t *blocks = take_q4k_frame(c, 3, shape, field);
        if (!blocks) return -1;
        size_t layer_bytes = (size_t)rows * q4k_blocks_per_row(cols) * NANO_Q4K_BLOCK_BYTES;
        for (int l = 0; l < m->config.n_layer; l++) {
            NanoMatrix *w = (NanoMatrix *)((char *)&m->layers[l] + member);
            *w = (NanoMatrix){.q4k = blocks + l * layer_bytes, .rows = rows, .cols = cols};
        }
        return 0;
    }
    for (int l = 0; l < m->config.n_layer; l++) {
        char name[64];
        snprintf(name, sizeof name, "layer %d %s", l, field);
        if (take_matrix(c, (NanoMatrix *)((char *)&m->layers[l] + member), rows, cols, &m->config, name)) return -1;
    }
    return 0;
}

/* Per-layer vectors of one kind (norm weights, biases), layers 0..L-1 of width n each, at a fixed offset inside
 * NanoLayer. */
static int take_layer_vectors(FileCursor *c, NanoModel *m, size_t member, int n, const char *field) {
    const float *all = take(c, (uint64_t)m->config.n_layer * n, 4, field);
    if (!all) return -1;
    for (int l = 0; l < m->config.n_layer; l++) *(const float **)((char *)&m->layers[l] + member) = all + (size_t)l * n;
    return 0;
}

/* What a Qwen file has after w3: Qwen2's q, k, v biases, or Qwen3's q and k norm weights. */
static int take_qwen_tensors(FileCursor *c, NanoModel *m) {
    if (m->config.model_type == NANO_TYPE_QWEN2)
        return take_layer_vectors(c, m, offsetof(NanoLayer, q_bias), m->q_dim, "q biases") ||
               take_layer_vectors(c, m, offsetof(NanoLayer, k_bias), m->kv_dim, "k biases") ||
               take_layer_vectors(c, m, offsetof(NanoLayer, v_bias), m->kv_dim, "v biases") ? -1 : 0;
    if (m->config.model_type == NANO_TYPE_QWEN3)
        return take_layer_vectors(c, m, offsetof(NanoLayer, q_norm), m->config.head_dim, "q_norm weights") ||
               take_layer_vectors(c, m, offsetof(NanoLayer, k_norm), m->config.head_dim, "k_norm weights") ? -1 : 0;
    return 0;
}

/* Bytes of a [rows, cols] weight matrix in the file. */
static uint64_t matrix_bytes(const NanoConfig *cfg, int rows, int cols) {
    uint64_t count = (uint64_t)rows * cols;
    if (cfg->quant_type == NANO_QUANT_Q4K)
        return Q4K_FRAME_HEADER_BYTES + (uint64_t)rows * q4k_blocks_per_row(cols) * NANO_Q4K_BLOCK_BYTES;
    if (cfg->quant_type == NANO_QUANT_Q80) return count + 4 * (count / cfg->group_size);
    return 4 * count;
}

/* RoPE tables [block_size, head_dim / 2] computed from theta, table[p, i] = cos/sin(p theta^(-2i/head_dim)),
 * for a Qwen file that stores none or the original converter's ones (see take_rope_tables). */
static int compute_rope_tables(FileCursor *c, NanoModel *m) {
    const NanoConfig *cfg = &m->config;
    int half = cfg->head_dim / 2;
    size_t count = (size_t)cfg->block_size * half;
    if (!(m->rope_computed = malloc(2 * sizeof(float) * count)))
        return fail(c, "RoPE tables: out of memory for block_size %d", cfg->block_size);
    for (int p = 0; p < cfg->block_size; p++)
        for (int i = 0; i < half; i++) {
            double angle = p * pow(cfg->rope_theta, -2.0 * i / cfg->head_dim);
            m->rope_computed[(size_t)p * half + i] = (float)cos(angle);
            m->rope_computed[count + (size_t)p * half + i] = (float)sin(angle);
        }
    m->rope_cos = m->rope_computed;
    m->rope_sin = m->rope_computed + count;
    return 0;
}

/* The RoPE cos and sin tables, [block_size, head_dim / 2] each. A Qwen3 Q4K file stores none; the original's
 * converter writes [block_size, (n_embd / n_head) / 2] ones over that width, which differ when head_dim does
 * not equal n_embd / n_head: the file's length tells which (FORMAT.md), and those are computed again. */
static int take_rope_tables(FileCursor *c, NanoModel *m) {
    const NanoConfig *cfg = &m->config;
    uint64_t count = (uint64_t)cfg->block_size * (cfg->head_dim / 2);
    if (is_qwen(cfg)) {
        if (cfg->model_type == NANO_TYPE_QWEN3 && cfg->quant_type == NANO_QUANT_Q4K) return compute_rope_tables(c, m);
        uint64_t head = cfg->is_shared_classifier ? 0 : matrix_bytes(cfg, cfg->vocab_size, cfg->n_embd);
        uint64_t original_count = (uint64_t)cfg->block_size * (cfg->n_embd / cfg->n_head / 2);
        if (original_count != count && c->size - c->offset == head + 8 * original_count)
            return !take(c, 2 * original_count, 4, "RoPE tables") ? -1 : compute_rope_tables(c, m);
    }
    if (!(m->rope_cos = take(c, count, 4, "RoPE cos table")) || !(m->rope_sin = take(c, count, 4, "RoPE sin table")))
        return -1;
    return 0;
}

/* Nano models end a text with <|eos|> (and never mean <|padding|>); Qwen models with <|endoftext|> or, in a
 * chat, <|im_end|>, wherever the vocabulary has them. */
static void find_stop_tokens(NanoModel *m) {
    if (m->tokenizer.kind == NANO_TOKENIZER_TRIE) {
        m->stop_tokens[0] = NANO_EOS;
        m->stop_tokens[1] = NANO_PAD;
        m->n_stop_tokens = 2;
        return;
    }
    static const char *ends[] = {"<|endoftext|>", "<|im_end|>"};
    for (int i = 0; i < 2; i++) {
        int id = nano_bpe_special_id(&m->tokenizer.bpe, ends[i]);
        if (id >= 0) m->stop_tokens[m->n_stop_tokens++] = id;
    }
}

int nano_stop_token(const NanoModel *m, int id) {
    for (int i = 0; i < m->n_stop_tokens; i++)
        if (id == m->stop_tokens[i]) return 1;
    return 0;
}

size_t nano_model_placement(const void *start, size_t n) {
    const uint8_t *bytes = start;
    return n < NANO_HEADER_BYTES + 4 ? 0 : (size_t)(0u - read_u32(bytes + NANO_HEADER_BYTES)) % 4;
}

/* Files are read into memory aligned to 2 MB and advised into 2 MB pages (Linux's transparent huge pages),
 * where a mapped file may have 4 KB pages, at each of which the hardware prefetcher stops and the TLB
 * misses: a decode step streams every weight. On Nano-56M at one thread that was 1.38x faster in float32
 * and 1.16x in Q80 and Q4K than a fresh file's mapping in one A/B, and 1.0-1.05x in later ones (the page
 * cache's own page sizes vary). A file larger than half the physical memory is mapped instead, to stay
 * pageable. */
#define HUGE_PAGE ((size_t)2 << 20)

int nano_file_read(NanoFile *f, const char *path, int is_model, char *err, size_t err_cap) {
    memset(f, 0, sizeof *f);
    int fd = open(path, O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
        snprintf(err, err_cap, "%s: cannot open: %s", path, strerror(errno));
        if (fd >= 0) close(fd);
        return -1;
    }
    f->size = (size_t)st.st_size;
    if (f->size == 0) {
        snprintf(err, err_cap, "%s: header: file is empty", path);
        close(fd);
        return -1;
    }
    uint8_t head[NANO_HEADER_BYTES + 4];
    ssize_t head_bytes = pread(fd, head, sizeof head, 0);
    size_t placement = is_model && head_bytes > 0 ? nano_model_placement(head, (size_t)head_bytes) : 0;
    long pages = sysconf(_SC_PHYS_PAGES), page_size = sysconf(_SC_PAGESIZE);
    if (pages > 0 && page_size > 0 && f->size > (size_t)pages / 2 * (size_t)page_size) {
        f->data = mmap(NULL, f->size, PROT_READ, MAP_PRIVATE, fd, 0);
        f->mapped = f->data != MAP_FAILED;
        if (!f->mapped) {
            snprintf(err, err_cap, "%s: cannot map: %s", path, strerror(errno));
            f->data = NULL;
        }
        close(fd);
        return f->mapped ? 0 : -1;
    }
    if (posix_memalign(&f->base, HUGE_PAGE, f->size + 4)) {
        snprintf(err, err_cap, "%s: out of memory for its %zu bytes", path, f->size);
        f->base = NULL;
        close(fd);
        return -1;
    }
#ifdef MADV_HUGEPAGE
    madvise(f->base, (f->size + 4 + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE, MADV_HUGEPAGE);   /* a hint: no check */
#endif
    f->data = (uint8_t *)f->base + placement;
    for (size_t done = 0; done < f->size;) {
        ssize_t got = pread(fd, (uint8_t *)f->data + done, f->size - done, (off_t)done);
        if (got <= 0) {
            snprintf(err, err_cap, "%s: read failed: %s", path, got < 0 ? strerror(errno) : "the file shrank");
            close(fd);
            nano_file_free(f);
            return -1;
        }
        done += (size_t)got;
    }
    close(fd);
    return 0;
}

void nano_file_free(NanoFile *f) {
    if (f->mapped) munmap(f->data, f->size);
    free(f->base);
    memset(f, 0, sizeof *f);
}

/* The file copied to where its parameters are 4-byte aligned, and loaded from there. */
static int load_placed_copy(NanoModel *m, const void *data, size_t size, const char *name, char *err, size_t err_cap) {
    uint8_t *copy = malloc(size + 3);
    if (!copy) {
        FileCursor c = {data, size, 0, name, err, err_cap};
        return fail(&c, "out of memory for an aligned copy of %zu bytes", size);
    }
    uint8_t *placed = copy + (nano_model_placement(data, size) - (uintptr_t)copy) % 4;
    memcpy(placed, data, size);
    if (nano_model_load(m, placed, size, name, err, err_cap)) { free(copy); return -1; }
    m->placed_copy = copy;
    return 0;
}

int nano_model_load(NanoModel *m, const void *data, size_t size, const char *name, char *err, size_t err_cap) {
    memset(m, 0, sizeof *m);
    FileCursor c = {data, size, 0, name, err, err_cap};
    if ((uintptr_t)data % 4 != nano_model_placement(data, size)) return load_placed_copy(m, data, size, name, err, err_cap);
    if (check_header(&c, 0) || read_config(&c, &m->config)) return -1;
    c.offset = NANO_HEADER_BYTES;
    NanoConfig *cfg = &m->config;
    int E = cfg->n_embd, L = cfg->n_layer, F = cfg->n_hidden;
    m->q_dim = cfg->n_head * cfg->head_dim;
    m->kv_dim = cfg->n_kv_head * cfg->head_dim;
    if ((is_qwen(cfg) ? read_bpe_tokenizer(&c, &m->tokenizer, cfg->vocab_size)
                      : read_tokenizer(&c, &m->tokenizer, cfg->vocab_size)))
        goto failed;
    if (!(m->layers = calloc(L, sizeof *m->layers))) { fail(&c, "n_layer: out of memory for %d layers", L); goto failed; }
    if (take_layer_vectors(&c, m, offsetof(NanoLayer, attn_norm), E, "attention norm weights") ||
        take_layer_vectors(&c, m, offsetof(NanoLayer, ffn_norm), E, "feed-forward norm weights") ||
        !(m->final_norm = take(&c, E, 4, "final norm weight")))
        goto failed;
    if (take_matrix(&c, &m->embedding, cfg->vocab_size, E, cfg, "token embedding")) goto failed;
    if (take_layer_matrices(&c, m, offsetof(NanoLayer, wq), m->q_dim, E, "wq") ||
        take_layer_matrices(&c, m, offsetof(NanoLayer, wk), m->kv_dim, E, "wk") ||
        take_layer_matrices(&c, m, offsetof(NanoLayer, wv), m->kv_dim, E, "wv") ||
        take_layer_matrices(&c, m, offsetof(NanoLayer, wo), E, m->q_dim, "wo") ||
        take_layer_matrices(&c, m, offsetof(NanoLayer, w1), F, E, "w1") ||
        take_layer_matrices(&c, m, offsetof(NanoLayer, w2), E, F, "w2") ||
        take_layer_matrices(&c, m, offsetof(NanoLayer, w3), F, E, "w3") ||
        take_qwen_tensors(&c, m) || take_rope_tables(&c, m))
        goto failed;
    if (cfg->is_shared_classifier) m->classifier = m->embedding;
    else if (take_matrix(&c, &m->classifier, cfg->vocab_size, E, cfg, "output head")) goto failed;
    if (c.offset != size) {
        fail(&c, "file length: %zu bytes but the header's dims account for %zu (extra data or wrong dims)", size, c.offset);
        goto failed;
    }
    find_stop_tokens(m);
    return 0;
failed:
    nano_model_free(m);
    return -1;
}

void nano_model_limit_context(NanoModel *m, int n) {
    if (n > 0 && n < m->config.block_size) m->config.block_size = n;
}

void nano_model_free(NanoModel *m) {
    free(m->layers);
    free(m->rope_computed);
    free(m->placed_copy);
    tokenizer_free(&m->tokenizer);
    memset(m, 0, sizeof *m);
}

int nano_lora_load(NanoLora *lora, const NanoModel *m, const void *data, size_t size, const char *name,
                   char *err, size_t err_cap) {
    memset(lora, 0, sizeof *lora);
    FileCursor c = {data, size, 0, name, err, err_cap};
    if ((uintptr_t)data % 4) return fail(&c, "buffer is not 4-byte aligned");
    if (check_header(&c, 1)) return -1;
    uint32_t rank = header_word(&c, WORD_LORA_RANK);
    if (rank == 0 || rank > 65536) return fail(&c, "lora_rank: %u is out of range (1..65536)", rank);
    const NanoConfig *cfg = &m->config;
    struct { int word; const char *name; int base; } dims[] = {
        {WORD_LORA_N_LAYER, "n_layer", cfg->n_layer}, {WORD_LORA_N_EMBD, "n_embd", cfg->n_embd},
        {WORD_LORA_N_HEAD, "n_head", cfg->n_head}, {WORD_LORA_N_KV_HEAD, "n_kv_head", cfg->n_kv_head},
        {WORD_LORA_N_HIDDEN, "n_hidden", cfg->n_hidden}};
    for (size_t i = 0; i < sizeof dims / sizeof dims[0]; i++) {
        uint32_t v = header_word(&c, dims[i].word);
        if (v != (uint32_t)dims[i].base)
            return fail(&c, "%s: %u but the model has %d (adapter made for another base model)", dims[i].name, v, dims[i].base);
    }
    lora->rank = (int)rank;
    lora->alpha = (int32_t)header_word(&c, WORD_LORA_ALPHA);
    lora->scaling = (float)lora->alpha / (float)rank;
    int in[] = {cfg->n_embd, cfg->n_embd, cfg->n_embd, m->q_dim};
    int out[] = {m->q_dim, m->kv_dim, m->kv_dim, cfg->n_embd};
    static const char *targets[] = {"wq", "wk", "wv", "wo"};
    c.offset = NANO_HEADER_BYTES;
    for (int k = 0; k < LORA_TARGETS; k++) {
        char field[32];
        lora->in_dim[k] = in[k];
        lora->out_dim[k] = out[k];
        snprintf(field, sizeof field, "%s.A", targets[k]);
        if (!(lora->a[k] = take(&c, (uint64_t)cfg->n_layer * rank * in[k], 4, field))) return -1;
        snprintf(field, sizeof field, "%s.B", targets[k]);
        if (!(lora->b[k] = take(&c, (uint64_t)cfg->n_layer * out[k] * rank, 4, field))) return -1;
    }
    if (c.offset != size)
        return fail(&c, "file length: %zu bytes but lora_rank %u and the dims account for %zu", size, rank, c.offset);
    return 0;
}

/* ============================================================================ tokenizer */

/* Decode UTF-8 into code points; malformed bytes become U+FFFD. Returns the count. */
static int utf8_to_code_points(const char *text, uint32_t *out) {
    const unsigned char *p = (const unsigned char *)text;
    int n = 0;
    while (*p) {
        uint32_t c = *p;
        int extra = c >= 0xF0 && c < 0xF8 ? 3 : c >= 0xE0 ? (c < 0xF0 ? 2 : -1) : c >= 0xC0 ? 1 : c >= 0x80 ? -1 : 0;
        if (extra < 0) { out[n++] = 0xFFFD; p++; continue; }
        c &= extra == 0 ? 0x7F : 0x3F >> extra;
        int i = 1;
        for (; i <= extra && (p[i] & 0xC0) == 0x80; i++) c = c << 6 | (p[i] & 0x3F);
        if (i <= extra) { out[n++] = 0xFFFD; p += i; continue; }
        out[n++] = c;
        p += extra + 1;
    }
    return n;
}

int *nano_encode(const NanoTokenizer *t, const char *text, int *n_ids) {
    if (t->kind == NANO_TOKENIZER_BPE) return nano_bpe_encode(&t->bpe, text, n_ids);
    size_t max_chars = strlen(text);
    uint32_t *chars = malloc(sizeof *chars * (max_chars + 1));
    int *ids = malloc(sizeof *ids * (max_chars + 1));
    if (!chars || !ids) { free(chars); free(ids); return NULL; }
    int n = utf8_to_code_points(text, chars), count = 0;
    for (int i = 0; i < n;) {
        int longest = longest_from(t, chars[i]), id = -1, length = longest < n - i ? longest : n - i;
        for (; length > 1; length--)
            if ((id = tokenizer_lookup(t, chars + i, length)) >= 0) break;
        if (id < 0) { length = 1; id = tokenizer_lookup(t, chars + i, 1); }
        ids[count++] = id < 0 ? NANO_UNKNOWN : id;
        i += length;
    }
    free(chars);
    *n_ids = count;
    return ids;
}

static int token_bytes(const NanoTokenizer *t, int id, char *buf, size_t cap) {
    const uint8_t *bytes = NULL;
    int length = nano_bpe_token_bytes(&t->bpe, id, &bytes);   /* -1 outside the vocabulary */
    size_t n = length > 0 ? (size_t)length : 0;
    if (n >= cap) n = cap ? cap - 1 : 0;
    if (n) memcpy(buf, bytes, n);
    if (cap) buf[n] = 0;
    return (int)n;
}

int nano_token_utf8(const NanoTokenizer *t, int id, char *buf, size_t cap) {
    if (t->kind == NANO_TOKENIZER_BPE) return token_bytes(t, id, buf, cap);
    size_t n = 0;
    if (id < 0 || id >= t->vocab_size) id = NANO_UNKNOWN;
    for (int i = 0; i < t->length[id]; i++) {
        uint32_t c = t->chars[id][i];
        unsigned char enc[4];
        int k = c < 0x80 ? 1 : c < 0x800 ? 2 : c < 0x10000 ? 3 : 4;
        if (k == 1) enc[0] = (unsigned char)c;
        else {
            for (int j = k - 1; j > 0; j--, c >>= 6) enc[j] = 0x80 | (c & 0x3F);
            enc[0] = (unsigned char)((0xF00u >> k) | c);
        }
        if (n + k >= cap) break;
        memcpy(buf + n, enc, k);
        n += k;
    }
    if (cap) buf[n] = 0;
    return (int)n;
}

/* The UTF-8 character at p, n bytes there: its length when valid (*valid = 1); the length of the longest
 * start of a character it has when invalid (*valid = 0, at least 1), what Python's decoder replaces by one
 * U+FFFD; 0 when the n bytes are the valid start of a character that goes on past them. */
static size_t utf8_character(const uint8_t *p, size_t n, int *valid) {
    uint8_t lead = p[0], low = 0x80, high = 0xBF;   /* the range of the next byte */
    size_t length = lead < 0x80 ? 1 : lead >= 0xC2 && lead <= 0xDF ? 2 : lead >= 0xE0 && lead <= 0xEF ? 3
                  : lead >= 0xF0 && lead <= 0xF4 ? 4 : 0;
    *valid = length > 0;
    if (length <= 1) return 1;
    if (lead == 0xE0) low = 0xA0;        /* no overlong forms */
    if (lead == 0xED) high = 0x9F;       /* no surrogates */
    if (lead == 0xF0) low = 0x90;
    if (lead == 0xF4) high = 0x8F;       /* nothing past U+10FFFF */
    for (size_t i = 1; i < length; i++, low = 0x80, high = 0xBF) {
        if (i == n) return 0;
        if (p[i] < low || p[i] > high) { *valid = 0; return i; }
    }
    return length;
}

int nano_stream_token(NanoTextStream *s, const NanoTokenizer *t, int id, char *buf, size_t cap) {
    static const char replacement[] = "\xEF\xBF\xBD";   /* U+FFFD */
    uint8_t bytes[sizeof s->held + NANO_TOKEN_TEXT_MAX + 1];
    memcpy(bytes, s->held, s->n_held);
    size_t n = s->n_held + nano_token_utf8(t, id, (char *)bytes + s->n_held, NANO_TOKEN_TEXT_MAX + 1), out = 0, at = 0;
    s->n_held = 0;
    while (at < n) {
        int valid;
        size_t length = utf8_character(bytes + at, n - at, &valid);
        if (length == 0) {   /* the start of a character the next token goes on with */
            s->n_held = (int)(n - at);
            memcpy(s->held, bytes + at, s->n_held);
            break;
        }
        const char *text = valid ? (const char *)bytes + at : replacement;
        size_t text_length = valid ? length : 3;
        if (out + text_length >= cap) break;
        memcpy(buf + out, text, text_length);
        out += text_length;
        at += length;
    }
    if (cap) buf[out] = 0;
    return (int)out;
}

int nano_stream_flush(NanoTextStream *s, char *buf, size_t cap) {
    size_t n = s->n_held && cap > 3 ? 3 : 0;
    memcpy(buf, "\xEF\xBF\xBD", n);
    if (cap) buf[n] = 0;
    s->n_held = 0;
    return (int)n;
}

/* ---------------------------------------------------------------------------- chat */

static int encode_into(const NanoModel *m, const char *text, int **ids, int *n) {
    return (*ids = nano_encode(&m->tokenizer, text, n)) ? 0 : -1;
}

static int has_chat_tokens(const NanoModel *m) {
    return nano_bpe_special_id(&m->tokenizer.bpe, "<|im_start|>") >= 0 &&
           nano_bpe_special_id(&m->tokenizer.bpe, "<|im_end|>") >= 0;
}

/* The instruct marks of SFT around the question's ids (the question encoded alone, as data.py does). */
static int instruct_prompt(const NanoModel *m, const char *question, int **ids, int *n) {
    int n_text, *text = nano_encode(&m->tokenizer, question, &n_text);
    if (!text || !(*ids = malloc(sizeof(int) * (n_text + 2)))) { free(text); return -1; }
    (*ids)[0] = NANO_INSTRUCT;
    memcpy(*ids + 1, text, sizeof(int) * n_text);
    (*ids)[n_text + 1] = NANO_RESPONSE;
    *n = n_text + 2;
    free(text);
    return 0;
}

int nano_chat_prompt(const NanoModel *m, const char *question, int thinking, int **ids, int *n) {
    if (m->tokenizer.kind == NANO_TOKENIZER_TRIE) return instruct_prompt(m, question, ids, n);
    if (!has_chat_tokens(m)) return NANO_NO_CHAT_TOKENS;
    /* the template as text, encoded whole, as the reference renders and tokenizes it */
    static const char before[] = "<|im_start|>user\n", after[] = "<|im_end|>\n<|im_start|>assistant\n";
    static const char no_thought[] = "<think>\n\n</think>\n\n";
    const char *thought = m->config.model_type == NANO_TYPE_QWEN3 && !thinking ? no_thought : "";
    size_t length = strlen(before) + strlen(question) + strlen(after) + strlen(thought);
    char *text = malloc(length + 1);
    if (!text) return -1;
    snprintf(text, length + 1, "%s%s%s%s", before, question, after, thought);
    int status = encode_into(m, text, ids, n);
    free(text);
    return status;
}

int nano_chat_answer_end(const NanoModel *m, int **ids, int *n) {
    if (m->tokenizer.kind == NANO_TOKENIZER_TRIE) {
        if (!(*ids = malloc(sizeof(int)))) return -1;
        (*ids)[0] = NANO_EOS;
        *n = 1;
        return 0;
    }
    return has_chat_tokens(m) ? encode_into(m, "<|im_end|>\n", ids, n) : NANO_NO_CHAT_TOKENS;
}

/* ============================================================================ matrix kernels */

#if defined(__AVX__)
static inline float sum_of_lanes_avx(__m256 sum) {
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    return _mm_cvtss_f32(_mm_add_ss(half, _mm_movehdup_ps(half)));
}

static inline float largest_of_lanes_avx(__m256 a) {
    __m128 half = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    half = _mm_max_ps(half, _mm_movehl_ps(half, half));
    return _mm_cvtss_f32(_mm_max_ss(half, _mm_movehdup_ps(half)));
}
#endif

/* A float vector and its operations, for each instruction set (one lane without one). power_of_two(p, n)
 * is p * 2^n for integral n in [-126, 127]; max(a, b) is b in a lane where either is NaN, as on x86. */
#if defined(__AVX512F__)
typedef __m512 FloatVector;
#define FLOAT_LANES 16
#define vector_zero _mm512_setzero_ps
#define vector_broadcast _mm512_set1_ps
#define vector_load _mm512_loadu_ps
#define vector_store _mm512_storeu_ps
#define vector_add _mm512_add_ps
#define vector_sub _mm512_sub_ps
#define vector_mul _mm512_mul_ps
#define vector_div _mm512_div_ps
#define vector_min _mm512_min_ps
#define vector_max _mm512_max_ps
#define vector_multiply_add(acc, a, b) _mm512_fmadd_ps(a, b, acc)
#define vector_round(a) _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define vector_power_of_two(p, n) _mm512_scalef_ps(p, n)
#define vector_sum _mm512_reduce_add_ps
#define vector_abs _mm512_abs_ps
#define vector_largest _mm512_reduce_max_ps
#elif defined(__AVX2__) && defined(__FMA__)
typedef __m256 FloatVector;
#define FLOAT_LANES 8
#define vector_zero _mm256_setzero_ps
#define vector_broadcast _mm256_set1_ps
#define vector_load _mm256_loadu_ps
#define vector_store _mm256_storeu_ps
#define vector_add _mm256_add_ps
#define vector_sub _mm256_sub_ps
#define vector_mul _mm256_mul_ps
#define vector_div _mm256_div_ps
#define vector_min _mm256_min_ps
#define vector_max _mm256_max_ps
#define vector_multiply_add(acc, a, b) _mm256_fmadd_ps(a, b, acc)
#define vector_round(a) _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define vector_power_of_two(p, n) \
    _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23)))
#define vector_sum sum_of_lanes_avx
#define vector_abs(a) _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a)
#define vector_largest largest_of_lanes_avx
#elif defined(__wasm_simd128__)
typedef v128_t FloatVector;
#define FLOAT_LANES 4
#define vector_zero() wasm_f32x4_splat(0.0f)
#define vector_broadcast wasm_f32x4_splat
#define vector_load wasm_v128_load
#define vector_store wasm_v128_store
#define vector_add wasm_f32x4_add
#define vector_sub wasm_f32x4_sub
#define vector_mul wasm_f32x4_mul
#define vector_div wasm_f32x4_div
#define vector_min wasm_f32x4_pmin
#define vector_max(a, b) wasm_f32x4_pmax(b, a)
#define vector_multiply_add(acc, a, b) wasm_f32x4_add(acc, wasm_f32x4_mul(a, b))
#define vector_round wasm_f32x4_nearest
#define vector_power_of_two(p, n) \
    wasm_f32x4_mul(p, wasm_i32x4_shl(wasm_i32x4_add(wasm_i32x4_trunc_sat_f32x4(n), wasm_i32x4_splat(127)), 23))
#define vector_sum(a) (wasm_f32x4_extract_lane(a, 0) + wasm_f32x4_extract_lane(a, 1) + \
                       wasm_f32x4_extract_lane(a, 2) + wasm_f32x4_extract_lane(a, 3))
#define vector_abs wasm_f32x4_abs
#define vector_largest(a) fmaxf(fmaxf(wasm_f32x4_extract_lane(a, 0), wasm_f32x4_extract_lane(a, 1)), \
                                fmaxf(wasm_f32x4_extract_lane(a, 2), wasm_f32x4_extract_lane(a, 3)))
#else
typedef float FloatVector;
#define FLOAT_LANES 1
#define vector_zero() 0.0f
#define vector_broadcast(a) (a)
#define vector_load(p) (*(p))
#define vector_store(p, a) (*(p) = (a))
#define vector_add(a, b) ((a) + (b))
#define vector_sub(a, b) ((a) - (b))
#define vector_mul(a, b) ((a) * (b))
#define vector_div(a, b) ((a) / (b))
#define vector_min(a, b) ((a) < (b) ? (a) : (b))
#define vector_max(a, b) ((a) > (b) ? (a) : (b))
#define vector_multiply_add(acc, a, b) ((acc) + (a) * (b))
#define vector_round rintf
#define vector_power_of_two(p, n) ldexpf(p, (int)(n))
#define vector_sum(a) (a)
#define vector_abs fabsf
#define vector_largest(a) (a)
#endif

/* e^x within 1 ulp of expf for x in [-87, 88] (x is clamped to [-87.3, 88.3]): x = n ln 2 + r with
 * |r| <= ln(2) / 2, e^r from Cephes' degree-5 polynomial for expf. */
static inline FloatVector vector_exp(FloatVector x) {
    x = vector_min(vector_max(x, vector_broadcast(-87.3f)), vector_broadcast(88.3f));
    FloatVector n = vector_round(vector_mul(x, vector_broadcast(1.44269504f)));
    FloatVector r = vector_multiply_add(x, n, vector_broadcast(-0.693359375f));   /* ln 2 in two parts */
    r = vector_multiply_add(r, n, vector_broadcast(2.12194440e-4f));
    FloatVector p = vector_broadcast(1.9875691500e-4f);
    p = vector_multiply_add(vector_broadcast(1.3981999507e-3f), p, r);
    p = vector_multiply_add(vector_broadcast(8.3334519073e-3f), p, r);
    p = vector_multiply_add(vector_broadcast(4.1665795894e-2f), p, r);
    p = vector_multiply_add(vector_broadcast(1.6666665459e-1f), p, r);
    p = vector_multiply_add(vector_broadcast(5.0000001201e-1f), p, r);
    p = vector_multiply_add(vector_add(r, vector_broadcast(1.0f)), p, vector_mul(r, r));
    return vector_power_of_two(p, n);
}

/* ---------------------------------------------------------------------------- float16 */

/* Quantized models keep their KV cache in IEEE half precision, which halves what attention streams from
 * memory (a fifth of a batched decoding step). Every build stores the same halves: round to nearest even,
 * saturating at +-65504 instead of overflowing to infinity; NaN stays NaN. Halves are read exactly. */
#define HALF_MAX 65504.0f

uint16_t nano_half_of(float f) {
    uint32_t bits, magnitude;
    memcpy(&bits, &f, 4);
    uint16_t sign = (uint16_t)(bits >> 16 & 0x8000);
    magnitude = bits & 0x7FFFFFFF;
    if (magnitude > 0x7F800000) return sign | 0x7E00;              /* NaN */
    if (magnitude >= 0x477FE000) return sign | 0x7BFF;             /* >= 65504: the largest half */
    if (magnitude >= 0x38800000) {                                 /* >= 2^-14: a normal half */
        magnitude += 0xFFF + (magnitude >> 13 & 1);                /* round the 13 dropped bits, ties to even */
        return sign | (uint16_t)((magnitude - (112u << 23)) >> 13);   /* rebias the exponent from 127 to 15 */
    }
    /* a subnormal half, a multiple of 2^-24: adding 0.5 leaves 2^-24 as the float's last bit, so the FPU
     * rounds (to nearest even) and the mantissa is the count; 2^-14 itself comes out as the smallest normal */
    float rounded = fabsf(f) + 0.5f;
    memcpy(&bits, &rounded, 4);
    return sign | (uint16_t)(bits - 0x3F000000);
}

float nano_float_of_half(uint16_t h) {
    uint32_t magnitude = h & 0x7FFF, bits = magnitude << 13;
    float f;
    memcpy(&f, &bits, 4);
    f *= 0x1p112f;   /* rebias the exponent; exact for normal and subnormal halves alike */
    if (magnitude >= 0x7C00) {   /* infinity or NaN */
        bits |= 0x7F800000;
        memcpy(&f, &bits, 4);
    }
    return h & 0x8000 ? -f : f;
}

/* FLOAT_LANES halves from p as floats, and a vector stored as halves */
#if defined(__AVX512F__)
static inline FloatVector vector_load_half(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
static inline void vector_store_half(uint16_t *p, FloatVector a) {
    a = _mm512_min_ps(_mm512_set1_ps(HALF_MAX), _mm512_max_ps(_mm512_set1_ps(-HALF_MAX), a));   /* NaN passes */
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#elif defined(__AVX2__) && defined(__F16C__)
static inline FloatVector vector_load_half(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
static inline void vector_store_half(uint16_t *p, FloatVector a) {
    a = _mm256_min_ps(_mm256_set1_ps(HALF_MAX), _mm256_max_ps(_mm256_set1_ps(-HALF_MAX), a));
    _mm_storeu_si128((__m128i *)p, _mm256_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#else
#if defined(__wasm_simd128__)
/* nano_float_of_half in four lanes, for the halves the cache holds: nano_half_of saturates, so none is
 * infinite, and a NaN one (read as a large finite value here) comes only from a NaN row, whose query is NaN
 * too. Leaving out the special case made Q80 decoding under node 1.1-1.15x faster (A/B of the builds). */
static inline FloatVector vector_load_half(const uint16_t *p) {
    v128_t h = wasm_u32x4_load16x4(p), magnitude = wasm_v128_and(h, wasm_i32x4_splat(0x7FFF));
    v128_t f = wasm_f32x4_mul(wasm_i32x4_shl(magnitude, 13), wasm_f32x4_splat(0x1p112f));
    return wasm_v128_or(f, wasm_i32x4_shl(wasm_v128_and(h, wasm_i32x4_splat(0x8000)), 16));
}
#else
static inline FloatVector vector_load_half(const uint16_t *p) {
    float f[FLOAT_LANES];
    for (int i = 0; i < FLOAT_LANES; i++) f[i] = nano_float_of_half(p[i]);
    return vector_load(f);
}
#endif
static inline void vector_store_half(uint16_t *p, FloatVector a) {
    float f[FLOAT_LANES];
    vector_store(f, a);
    for (int i = 0; i < FLOAT_LANES; i++) p[i] = nano_half_of(f[i]);
}
#endif

/* out = x as halves, n values */
static void halves_of(uint16_t *out, const float *x, int n) {
    int i = 0;
    for (; i + FLOAT_LANES <= n; i += FLOAT_LANES) vector_store_half(out + i, vector_load(x + i));
    for (; i < n; i++) out[i] = nano_half_of(x[i]);
}

/* Matmuls read a weight row once for a block of activation rows (a prefill's tokens, a server's
 * sequences): the row stays in registers and L1 while it meets each of them. Every kernel sums each row in
 * the order of its one-row case, so a batched pass gives bit for bit the logits of token after token.
 * Blocks are of TOKEN_BLOCK rows, or of WIDE_TOKEN_BLOCK where a kernel's sums fit 32 vector registers. */
#define TOKEN_BLOCK 4
#define WIDE_TOKEN_BLOCK 8
/* the block kernels are specialized for each row count they are called with (kept in registers) */
#define BLOCK_KERNEL static inline __attribute__((always_inline))

/* The weights stream from memory (or the last-level cache) once a pass, and the hardware prefetcher alone
 * leaves the kernels waiting for them: they ask for the line some bytes ahead of the one they read (A/B on
 * Nano-56M decoding, one / two threads: Q80 1.27x / 1.13x, Q4K 1.09x / 1.13x, float32 1.05x / 1.01x;
 * 1 KB ahead was slower). How far suits each kernel's pace (bench_ab.py on a Zen 4 EPYC against 8 KB for
 * all: float32 16 KB 1.02-1.05x / 1.00-1.02x, 24-32 KB 1.00x; Q80 4 or 16 KB 0.95x; Q4K tiles 3-4 KB
 * 1.05-1.06x / 1.02x, 2 or 6 KB 1.01-1.02x). Blocks of rows, whose work per weight byte is several times
 * larger, wait too on an Intel Xeon whose cache holds the weights: steps of 4 and 16 rows 1.2x faster in
 * Q80, 1.3-1.7x in Q4K, 1.1x in float32 with it. A no-op where the target has no prefetch (WebAssembly). */
#define F32_AHEAD 16384
#define Q80_AHEAD 8192
#define Q4K_AHEAD 4096
#define prefetch_weights(p, ahead) __builtin_prefetch((const char *)(p) + (ahead))

/* out[k] = w . x_k for the rows x_k = x + k * stride, k < rows (float32). */
BLOCK_KERNEL void dot_f32_rows(const float *w, const float *x, size_t stride, int n, int rows, float *out) {
    int i = 0;
    float sum[WIDE_TOKEN_BLOCK] = {0};
#if defined(__AVX512F__)
    /* one line a step and one sum a row: four lines a step in four sums decoded float32 1.15-1.2x slower
     * at one thread and 1.1x at two on a Zen 4 EPYC (bench_ab.py; 1.04-1.08x with the main job's model,
     * whose weights its cache holds), and two lines in two sums came between */
    __m512 acc[WIDE_TOKEN_BLOCK];
    for (int k = 0; k < rows; k++) acc[k] = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        prefetch_weights(w + i, F32_AHEAD);
        __m512 wv = _mm512_loadu_ps(w + i);
        for (int k = 0; k < rows; k++) acc[k] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + k * stride + i), acc[k]);
    }
    for (int k = 0; k < rows; k++) sum[k] = _mm512_reduce_add_ps(acc[k]);
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 acc[WIDE_TOKEN_BLOCK][2];
    for (int k = 0; k < rows; k++) acc[k][0] = acc[k][1] = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        prefetch_weights(w + i, F32_AHEAD);
        for (int a = 0; a < 2; a++) {
            __m256 wv = _mm256_loadu_ps(w + i + 8 * a);
            for (int k = 0; k < rows; k++) acc[k][a] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + k * stride + i + 8 * a), acc[k][a]);
        }
    }
    for (int k = 0; k < rows; k++) sum[k] = sum_of_lanes_avx(_mm256_add_ps(acc[k][0], acc[k][1]));
#elif defined(__wasm_simd128__)
    v128_t acc[WIDE_TOKEN_BLOCK];
    for (int k = 0; k < rows; k++) acc[k] = wasm_f32x4_splat(0.0f);
    for (; i + 4 <= n; i += 4) {
        v128_t wv = wasm_v128_load(w + i);
        for (int k = 0; k < rows; k++) acc[k] = wasm_f32x4_add(acc[k], wasm_f32x4_mul(wv, wasm_v128_load(x + k * stride + i)));
    }
    for (int k = 0; k < rows; k++)
        sum[k] = wasm_f32x4_extract_lane(acc[k], 0) + wasm_f32x4_extract_lane(acc[k], 1) +
                 wasm_f32x4_extract_lane(acc[k], 2) + wasm_f32x4_extract_lane(acc[k], 3);
#endif
    for (int k = 0; k < rows; k++) {
        for (int j = i; j < n; j++) sum[k] += w[j] * x[k * stride + j];
        out[k] = sum[k];
    }
}

static float dot_f32(const float *a, const float *b, int n) {
    float out;
    dot_f32_rows(a, b, 0, n, 1, &out);
    return out;
}

/* Q80 row dot: sum over groups of (int8 . int8) * w_scale * x_scale. Each variant needs group % width == 0. */
static float dot_q80_scalar(const int8_t *w, const float *ws, const NanoActivation *x, const float *xs, int n, int group) {
    float sum = 0.0f;
    for (int g = 0; g < n / group; g++) {
        int32_t acc = 0;
        for (int j = g * group; j < (g + 1) * group; j++) acc += (int32_t)w[j] * x[j];
        sum += (float)acc * ws[g] * xs[g];
    }
    return sum;
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
/* acc + the products of u8 x s8 pairs, summed four by four into int32 lanes */
static inline __m512i dot_u8s8_avx512(__m512i acc, __m512i u, __m512i s) {
#if defined(__AVX512VNNI__)
    return _mm512_dpbusd_epi32(acc, u, s);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
#endif
}

/* out[k] = the Q80 dot of w with activation row k (values x + k * stride, scales xs + k * stride / group).
 * u8 x s8 products need an unsigned operand: |w|, with w's sign moved onto x (x is never -128). */
BLOCK_KERNEL void dot_q80_avx512_rows(const int8_t *w, const float *ws, const int8_t *x, const float *xs, size_t stride,
                                int n, int group, int rows, float *out) {
    size_t scale_stride = stride / group;   /* hoisted: a division per row and group costs as much as its dots */
    __m512 sum[WIDE_TOKEN_BLOCK];
    for (int k = 0; k < rows; k++) sum[k] = _mm512_setzero_ps();
    for (int g = 0; g < n / group; g++) {
        __m512i acc[WIDE_TOKEN_BLOCK];
        for (int k = 0; k < rows; k++) acc[k] = _mm512_setzero_si512();
        for (int j = g * group; j < (g + 1) * group; j += 64) {
            prefetch_weights(w + j, Q80_AHEAD);
            __m512i wv = _mm512_loadu_si512(w + j), w_abs = _mm512_abs_epi8(wv);
            __mmask64 negative = _mm512_movepi8_mask(wv);
            for (int k = 0; k < rows; k++) {
                __m512i xv = _mm512_loadu_si512(x + k * stride + j);
                acc[k] = dot_u8s8_avx512(acc[k], w_abs, _mm512_mask_sub_epi8(xv, negative, _mm512_setzero_si512(), xv));
            }
        }
        for (int k = 0; k < rows; k++)
            sum[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[k]), _mm512_set1_ps(ws[g] * xs[k * scale_stride + g]), sum[k]);
    }
    for (int k = 0; k < rows; k++) out[k] = _mm512_reduce_add_ps(sum[k]);
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
/* Sums of the products of 32 int8 pairs in 8 int32 lanes: lanes 0-3 from bytes 0-15, lanes 4-7 from 16-31. */
static inline __m256i dot_i8_avx2(__m256i w, __m256i x) {
    __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w));
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

BLOCK_KERNEL void dot_q80_avx2_rows(const int8_t *w, const float *ws, const int8_t *x, const float *xs, size_t stride,
                              int n, int group, int rows, float *out) {
    size_t scale_stride = stride / group;
    __m256 sum[WIDE_TOKEN_BLOCK];
    for (int k = 0; k < rows; k++) sum[k] = _mm256_setzero_ps();
    for (int g = 0; g < n / group; g++) {
        __m256i acc[WIDE_TOKEN_BLOCK];
        for (int k = 0; k < rows; k++) acc[k] = _mm256_setzero_si256();
        for (int j = g * group; j < (g + 1) * group; j += 32) {
            prefetch_weights(w + j, Q80_AHEAD);
            __m256i wv = _mm256_loadu_si256((const __m256i *)(w + j)), w_abs = _mm256_abs_epi8(wv);
            for (int k = 0; k < rows; k++) {
                __m256i pairs = _mm256_maddubs_epi16(w_abs, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(x + k * stride + j)), wv));
                acc[k] = _mm256_add_epi32(acc[k], _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
            }
        }
        for (int k = 0; k < rows; k++)
            sum[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[k]), _mm256_set1_ps(ws[g] * xs[k * scale_stride + g]), sum[k]);
    }
    for (int k = 0; k < rows; k++) out[k] = sum_of_lanes_avx(sum[k]);
}

/* Groups of 16, the most a width such as 688 allows: each half of a vector is one group with its own
 * scale; an odd last group fills the low half alone. */
static float dot_q80_avx2_16(const int8_t *w, const float *ws, const int8_t *x, const float *xs, int n) {
    __m256 sum = _mm256_setzero_ps();
    int j = 0;
    for (; j + 32 <= n; j += 32) {
        prefetch_weights(w + j, Q80_AHEAD);
        int g = j / 16;
        __m256 scale = _mm256_setr_m128(_mm_set1_ps(ws[g] * xs[g]), _mm_set1_ps(ws[g + 1] * xs[g + 1]));
        __m256i dots = dot_i8_avx2(_mm256_loadu_si256((const __m256i *)(w + j)), _mm256_loadu_si256((const __m256i *)(x + j)));
        sum = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), scale, sum);
    }
    if (j < n) {
        __m256i dots = dot_i8_avx2(_mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)(w + j))),
                                   _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)(x + j))));
        sum = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), _mm256_set1_ps(ws[j / 16] * xs[j / 16]), sum);
    }
    return sum_of_lanes_avx(sum);
}
#endif

#if defined(__wasm_simd128__)
/* Activations come as int16 (NanoActivation): the weights alone are widened. A group's sums stay in vector
 * lanes, one float multiply-add a group and one reduction a row (1.5x the kernel that widened both and
 * reduced every group, timed alone). */
static float dot_q80_wasm(const int8_t *w, const float *ws, const int16_t *x, const float *xs, int n, int group) {
    v128_t sum = wasm_f32x4_splat(0.0f);
    for (int g = 0; g < n / group; g++, w += group, x += group) {
        v128_t acc = wasm_i32x4_splat(0);
#pragma clang loop unroll_count(4)
        for (int j = 0; j < group; j += 16) {
            v128_t wv = wasm_v128_load(w + j);
            acc = wasm_i32x4_add(acc, wasm_i32x4_dot_i16x8(wasm_i16x8_extend_low_i8x16(wv), wasm_v128_load(x + j)));
            acc = wasm_i32x4_add(acc, wasm_i32x4_dot_i16x8(wasm_i16x8_extend_high_i8x16(wv), wasm_v128_load(x + j + 8)));
        }
        sum = wasm_f32x4_add(sum, wasm_f32x4_mul(wasm_f32x4_convert_i32x4(acc), wasm_f32x4_splat(ws[g] * xs[g])));
    }
    return wasm_f32x4_extract_lane(sum, 0) + wasm_f32x4_extract_lane(sum, 1) + wasm_f32x4_extract_lane(sum, 2) +
           wasm_f32x4_extract_lane(sum, 3);
}
#endif

/* The Q80 dot of w with one activation row (values x, scales xs). */
static float dot_q80(const int8_t *w, const float *ws, const NanoActivation *x, const float *xs, int n, int group) {
    float out;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    if (group % 64 == 0) { dot_q80_avx512_rows(w, ws, x, xs, 0, n, group, 1, &out); return out; }
#endif
#if defined(__AVX2__) && defined(__FMA__)
    if (group % 32 == 0) { dot_q80_avx2_rows(w, ws, x, xs, 0, n, group, 1, &out); return out; }
    if (group == 16) return dot_q80_avx2_16(w, ws, x, xs, n);
#endif
#if defined(__wasm_simd128__)
    if (group % 16 == 0) return dot_q80_wasm(w, ws, x, xs, n, group);
#endif
    (void)out;
    return dot_q80_scalar(w, ws, x, xs, n, group);
}

/* The widest block of rows dot_q80_block takes for this group size. */
static int q80_token_block(int group) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
    if (group % 64 == 0) return WIDE_TOKEN_BLOCK;
#endif
    (void)group;
    return TOKEN_BLOCK;
}

/* out[k] = the Q80 dot of w with activation row k < rows (values x + k * stride, scales xs + k * stride /
 * group), rows <= q80_token_block(group): a block kernel where one exists, else row by row. */
BLOCK_KERNEL void dot_q80_block(const int8_t *w, const float *ws, const NanoActivation *x, const float *xs, size_t stride,
                                int n, int group, int rows, float *out) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
    if (group % 64 == 0) { dot_q80_avx512_rows(w, ws, x, xs, stride, n, group, rows, out); return; }
#endif
#if defined(__AVX2__) && defined(__FMA__)
    if (group % 32 == 0) { dot_q80_avx2_rows(w, ws, x, xs, stride, n, group, rows, out); return; }
#endif
    for (int k = 0; k < rows; k++) out[k] = dot_q80(w, ws, x + k * stride, xs + k * stride / group, n, group);
}

/* Q80 tiles (AVX-512 VNNI builds, after nano_model_tile): a matrix whose rows are a multiple of 16 is stored
 * as tiles of 16 rows. A tile holds, per group, for each 4 columns, the 4 bytes of each of its 16 rows
 * (64 bytes: one vector), the bytes biased to w + 128 so that they are dpbusd's unsigned operand; its scales
 * follow the same order, per group the 16 rows' scales. One dpbusd then multiplies 4 columns of 16 rows by
 * 4 broadcast activations, its 16 lanes are the 16 rows' sums, and a group ends with one conversion and one
 * multiply-add for 16 outputs, where a row-major kernel spends one per row (its cost bounded a batch's
 * matmuls). The bias comes off as 128 times the group's sum of activations, made while quantizing. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define TILES 1
#endif
#define TILE_ROWS 16

#ifdef TILES
/* out[16 k + i] = the Q80 dot of the tile's row i with activation row k < rows (values x + k * stride,
 * scales and sums of groups from xs and xsum + k * stride / group) */
BLOCK_KERNEL void dot_q80_tile(const uint8_t *tile, const float *scales, const int8_t *x, const float *xs,
                               const int32_t *xsum, size_t stride, int n, int group, int rows, float *out) {
    size_t group_stride = stride / group;
    __m512 sum[WIDE_TOKEN_BLOCK];
    for (int k = 0; k < rows; k++) sum[k] = _mm512_setzero_ps();
    for (int g = 0; g < n / group; g++, tile += (size_t)group * TILE_ROWS) {
        __m512i acc[WIDE_TOKEN_BLOCK];
        for (int k = 0; k < rows; k++) acc[k] = _mm512_setzero_si512();
        for (int c = 0; c < group / 4; c++) {
            prefetch_weights(tile + 64 * c, Q80_AHEAD);
            __m512i w = _mm512_loadu_si512(tile + 64 * c);
            for (int k = 0; k < rows; k++) {
                int32_t four;
                memcpy(&four, x + k * stride + (size_t)g * group + 4 * c, 4);
                acc[k] = _mm512_dpbusd_epi32(acc[k], w, _mm512_set1_epi32(four));
            }
        }
        __m512 row_scales = _mm512_loadu_ps(scales + (size_t)g * TILE_ROWS);
        for (int k = 0; k < rows; k++) {
            __m512i dots = _mm512_sub_epi32(acc[k], _mm512_set1_epi32(128 * xsum[k * group_stride + g]));
            __m512 step = _mm512_mul_ps(row_scales, _mm512_set1_ps(xs[k * group_stride + g]));
            sum[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots), step, sum[k]);
        }
    }
    for (int k = 0; k < rows; k++) _mm512_storeu_ps(out + TILE_ROWS * k, sum[k]);
}
#endif

/* Where row `row`, column `col` of a tiled matrix is, in its values and in its scales */
static size_t tile_value_at(int row, int col, int cols, int group) {
    return (size_t)(row / TILE_ROWS) * TILE_ROWS * cols + (size_t)(col / group) * group * TILE_ROWS +
           (size_t)(col % group / 4) * 4 * TILE_ROWS + (size_t)(row % TILE_ROWS) * 4 + col % 4;
}

static size_t tile_scale_at(int row, int group_index, int groups) {
    return (size_t)(row / TILE_ROWS) * TILE_ROWS * groups + (size_t)group_index * TILE_ROWS + row % TILE_ROWS;
}

#ifdef TILES
/* Rearrange one Q80 matrix into tiles, through a copy of it (left as it is when there is no memory for one). */
static int tile_matrix(NanoMatrix *w, int group) {
    size_t count = (size_t)w->rows * w->cols;
    int groups = w->cols / group;
    int8_t *values = malloc(count);
    float *scales = malloc(count / group * sizeof(float));
    if (values && scales) {
        memcpy(values, w->q, count);
        memcpy(scales, w->scale, count / group * sizeof(float));
        uint8_t *tiles = (uint8_t *)w->q;   /* the caller's buffer, writable by nano_model_tile's contract */
        float *tile_scales = (float *)w->scale;
        for (int first = 0; first < w->rows; first += TILE_ROWS)   /* in tile order: see tile_value_at */
            for (int g = 0; g < groups; g++) {
                for (int col = g * group; col < (g + 1) * group; col += 4)
                    for (int r = first; r < first + TILE_ROWS; r++)
                        for (int b = 0; b < 4; b++) *tiles++ = (uint8_t)(values[(size_t)r * w->cols + col + b] + 128);
                for (int r = first; r < first + TILE_ROWS; r++) *tile_scales++ = scales[(size_t)r * groups + g];
            }
        w->tiled = 1;
    }
    free(values);
    free(scales);
    return w->tiled;
}
#endif

/* Q4K row dot, 4-bit weights x 8-bit activations: per block, sum over groups of sc * (codes . x) and
 * m * (sum of the group's x), all in integers, then w = q (sc d) - m dmin gives
 * x_scale * (d * that - dmin * this). The activations of a block are stored in the order the kernel reads
 * the code bytes, so that a vector of codes meets its activations in plain loads: a lane of the vector
 * holds Q4K_LANE_NIBBLES elements (code byte k the elements 2k and 2k + 1, in its low and high nibble), and
 * per chunk of Q4K_ACT_CHUNK lanes, nibble j of every lane comes before nibble j + 1 of any. The lanes are
 * bytes and the chunk the widest kernel's vector, but in WebAssembly, whose kernel unpacks 16-bit lanes. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define Q4K_ACT_CHUNK 64
#elif defined(__AVX2__) && defined(__FMA__)
#define Q4K_ACT_CHUNK 32
#elif defined(__wasm_simd128__)
#define Q4K_ACT_CHUNK 8
#else
#define Q4K_ACT_CHUNK 16
#endif
#define Q4K_LANE_NIBBLES (Q4K_ACT_CHUNK == 8 ? 4 : 2)

typedef struct { float d, dmin; uint8_t scales[2 * Q4K_GROUPS]; /* the 8 scales sc, then the 8 mins m */ } Q4KScales;

/* The 6-bit scales and mins of a block (ggml's K-quant packing, FORMAT.md) as four little-endian words of
 * bytes: sc[0..3], sc[4..7], m[0..3], m[4..7]. Per byte j < 4: sc[j] = b[j] & 63, m[j] = b[j+4] & 63,
 * sc[j+4] = (b[j+8] & 15) | (b[j] >> 6) << 4, m[j+4] = (b[j+8] >> 4) | (b[j+4] >> 6) << 4, done four bytes
 * at a time (a block is unpacked for every row of every matmul; little-endian, as the file's floats). */
static inline void q4k_scale_words(const uint8_t *block, uint32_t words[4]) {
    uint32_t b[3];
    memcpy(b, block + Q4K_SCALES_OFFSET, 12);
    words[0] = b[0] & 0x3F3F3F3Fu;
    words[1] = (b[2] & 0x0F0F0F0Fu) | (b[0] >> 6 & 0x03030303u) << 4;
    words[2] = b[1] & 0x3F3F3F3Fu;
    words[3] = (b[2] >> 4 & 0x0F0F0F0Fu) | (b[1] >> 6 & 0x03030303u) << 4;
}

static inline Q4KScales q4k_scales(const uint8_t *block) {
    Q4KScales s;
    uint32_t words[4];
    memcpy(&s.d, block + 12, 4);
    memcpy(&s.dmin, block + 16, 4);
    q4k_scale_words(block, words);
    memcpy(s.scales, words, sizeof words);
    return s;
}

#if Q4K_ACT_CHUNK != 64 && !defined(__wasm_simd128__)   /* the AVX-512 and wasm kernels compute it in vector lanes */
/* The min term of a block: sum over groups of m * (sum of the group's quantized activations). */
static int32_t q4k_min_sum(const Q4KScales *s, const int32_t *group_sum) {
    int32_t total = 0;
    for (int g = 0; g < Q4K_GROUPS; g++) total += s->scales[Q4K_GROUPS + g] * group_sum[g];
    return total;
}
#endif

/* the portable path, for builds without a vector kernel (`make portable` on x86) */
#if Q4K_ACT_CHUNK == 16
static float dot_q4k_scalar(const uint8_t *w, const int8_t *x, const float *xs, const int32_t *xsum, int nblocks) {
    float sum = 0.0f;
    for (int b = 0; b < nblocks; b++, w += NANO_Q4K_BLOCK_BYTES, x += NANO_Q4K_BLOCK) {
        Q4KScales s = q4k_scales(w);
        const uint8_t *codes = w + Q4K_CODES_OFFSET;
        int32_t total = 0;
        for (int g = 0; g < Q4K_GROUPS; g++) {
            int32_t acc = 0;
            for (int k = 16 * g; k < 16 * g + 16; k++) {
                const int8_t *chunk = x + k / Q4K_ACT_CHUNK * 2 * Q4K_ACT_CHUNK;
                acc += (codes[k] & 15) * chunk[k % Q4K_ACT_CHUNK] + (codes[k] >> 4) * chunk[Q4K_ACT_CHUNK + k % Q4K_ACT_CHUNK];
            }
            total += acc * s.scales[g];
        }
        sum += xs[b] * (s.d * (float)total - s.dmin * (float)q4k_min_sum(&s, xsum + Q4K_GROUPS * b));
    }
    return sum;
}
#endif

#if Q4K_ACT_CHUNK == 64
/* q4k_scale_words in one vector register, computed in its four lanes at once (the scalar version's moves
 * between registers cost as much as the block's dot products). */
static inline __m128i q4k_scale_vector(const uint8_t *block) {
    __m128i b = _mm_loadu_si128((const __m128i *)(block + Q4K_SCALES_OFFSET));   /* b0 b1 b2, then 4 code bytes */
    __m128i low = _mm_srlv_epi32(_mm_shuffle_epi32(b, _MM_SHUFFLE(2, 1, 2, 0)), _mm_setr_epi32(0, 0, 0, 4));
    low = _mm_and_si128(low, _mm_setr_epi32(0x3F3F3F3F, 0x0F0F0F0F, 0x3F3F3F3F, 0x0F0F0F0F));
    __m128i high = _mm_slli_epi32(_mm_and_si128(_mm_srli_epi32(_mm_shuffle_epi32(b, _MM_SHUFFLE(1, 1, 0, 0)), 6),
                                                _mm_set1_epi32(0x03030303)), 4);
    return _mm_or_si128(low, _mm_and_si128(high, _mm_setr_epi32(0, -1, 0, -1)));
}

static float dot_q4k_avx512(const uint8_t *w, const int8_t *x, const float *xs, const int32_t *xsum, int nblocks) {
    const __m512i nibble = _mm512_set1_epi8(15);
    /* the scale of each 32-bit lane: a lane sums 4 code bytes, a group is 16 bytes, a vector 4 groups */
    const __m512i lane_group[2] = {_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                                   _mm512_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7)};
    /* the scale terms and the min terms, in two sums (two chains of multiply-adds) reduced once at the end */
    __m512 scale_sum = _mm512_setzero_ps(), min_sum = _mm512_setzero_ps();
    for (int b = 0; b < nblocks; b++, w += NANO_Q4K_BLOCK_BYTES, x += NANO_Q4K_BLOCK) {
        for (int line = 0; line < NANO_Q4K_BLOCK_BYTES; line += 64) prefetch_weights(w + line, Q4K_AHEAD);
        __m512i scales_mins = _mm512_cvtepu8_epi32(q4k_scale_vector(w));   /* 8 sc, then 8 m */
        float d, dmin;
        memcpy(&d, w + 12, 4);
        memcpy(&dmin, w + 16, 4);
        __m512i acc = _mm512_setzero_si512();
        for (int h = 0; h < 2; h++) {
            __m512i v = _mm512_loadu_si512(w + Q4K_CODES_OFFSET + 64 * h);
            __m512i low = _mm512_and_si512(v, nibble), high = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
            __m512i dots = _mm512_dpbusd_epi32(_mm512_setzero_si512(), low, _mm512_loadu_si512(x + 128 * h));
            dots = _mm512_dpbusd_epi32(dots, high, _mm512_loadu_si512(x + 128 * h + 64));
            acc = _mm512_add_epi32(acc, _mm512_mullo_epi32(dots, _mm512_permutexvar_epi32(lane_group[h], scales_mins)));
        }
        /* lanes 8-15 hold the mins: m * (group sum of x) there, 0 in lanes 0-7 */
        __m512i mins = _mm512_mullo_epi32(scales_mins, _mm512_inserti32x8(_mm512_setzero_si512(),
                                          _mm256_loadu_si256((const __m256i *)(xsum + Q4K_GROUPS * b)), 1));
        scale_sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(d * xs[b]), scale_sum);
        min_sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(mins), _mm512_set1_ps(dmin * xs[b]), min_sum);
    }
    return _mm512_reduce_add_ps(_mm512_sub_ps(scale_sum, min_sum));
}
#endif

#if Q4K_ACT_CHUNK == 32
static float dot_q4k_avx2(const uint8_t *w, const int8_t *x, const float *xs, const int32_t *xsum, int nblocks) {
    const __m256i nibble = _mm256_set1_epi8(15);
    __m256 sum = _mm256_setzero_ps();
    float min_sum = 0.0f;
    for (int b = 0; b < nblocks; b++, w += NANO_Q4K_BLOCK_BYTES, x += NANO_Q4K_BLOCK) {
        for (int line = 0; line < NANO_Q4K_BLOCK_BYTES; line += 64) prefetch_weights(w + line, Q4K_AHEAD);
        Q4KScales s = q4k_scales(w);
        __m256i acc = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {   /* 32 code bytes: groups 2c (lanes 0-3 of acc) and 2c+1 (lanes 4-7) */
            __m256i v = _mm256_loadu_si256((const __m256i *)(w + Q4K_CODES_OFFSET + 32 * c));
            __m256i low = _mm256_and_si256(v, nibble), high = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
            __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(low, _mm256_loadu_si256((const __m256i *)(x + 64 * c))),
                                             _mm256_maddubs_epi16(high, _mm256_loadu_si256((const __m256i *)(x + 64 * c + 32))));
            __m256i scales = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_set1_epi16(s.scales[2 * c])),
                                                     _mm_set1_epi16(s.scales[2 * c + 1]), 1);
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, scales));
        }
        sum = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_set1_ps(s.d * xs[b]), sum);
        min_sum += s.dmin * xs[b] * (float)q4k_min_sum(&s, xsum + Q4K_GROUPS * b);
    }
    return sum_of_lanes_avx(sum) - min_sum;
}
#endif

#if defined(__wasm_simd128__)
/* WebAssembly SIMD has no 8-bit dot product, and widening bytes costs more than multiplying, so here the
 * activations come widened to 16 bits (NanoActivation) and the codes are unpacked in 16-bit lanes: a lane
 * of code bytes holds 4 nibbles, and a group's activations are in the order that puts each nibble's 8
 * lanes apart (Q4K_ACT_CHUNK). A group's four products (each |.| <= 15 * 127) add up in 16 bits,
 * one dot with its scale widens them, and a block's 8 mins meet their group sums (|.| <= 32 * 127) in one
 * more. The group loop stays rolled: unrolled, the compiler loads a block's 40 vectors up front and V8
 * spills most of them (1.3x slower). 1.25x the widening kernel it replaced, timed alone. */
static float dot_q4k_wasm(const uint8_t *w, const int16_t *x, const float *xs, const int32_t *xsum, int nblocks) {
    const v128_t nibble = wasm_i16x8_splat(15);
    v128_t sum = wasm_f32x4_splat(0.0f), min_sum = wasm_f32x4_splat(0.0f);
    for (int b = 0; b < nblocks; b++, w += NANO_Q4K_BLOCK_BYTES, x += NANO_Q4K_BLOCK, xsum += Q4K_GROUPS) {
        Q4KScales s = q4k_scales(w);
        v128_t acc = wasm_i32x4_splat(0);
#pragma clang loop unroll(disable)
        for (int g = 0; g < Q4K_GROUPS; g++) {   /* a group's 16 code bytes, its 32 activations */
            v128_t v = wasm_v128_load(w + Q4K_CODES_OFFSET + 16 * g);
            const int16_t *a = x + 32 * g;
            v128_t products = wasm_i16x8_add(
                wasm_i16x8_add(wasm_i16x8_mul(wasm_v128_and(v, nibble), wasm_v128_load(a)),
                               wasm_i16x8_mul(wasm_v128_and(wasm_u16x8_shr(v, 4), nibble), wasm_v128_load(a + 8))),
                wasm_i16x8_add(wasm_i16x8_mul(wasm_v128_and(wasm_u16x8_shr(v, 8), nibble), wasm_v128_load(a + 16)),
                               wasm_i16x8_mul(wasm_u16x8_shr(v, 12), wasm_v128_load(a + 24))));
            acc = wasm_i32x4_add(acc, wasm_i32x4_dot_i16x8(products, wasm_i16x8_splat(s.scales[g])));
        }
        v128_t mins = wasm_i32x4_dot_i16x8(wasm_u16x8_load8x8(s.scales + Q4K_GROUPS),
                                           wasm_i16x8_narrow_i32x4(wasm_v128_load(xsum), wasm_v128_load(xsum + 4)));
        sum = wasm_f32x4_add(sum, wasm_f32x4_mul(wasm_f32x4_convert_i32x4(acc), wasm_f32x4_splat(s.d * xs[b])));
        min_sum = wasm_f32x4_add(min_sum, wasm_f32x4_mul(wasm_f32x4_convert_i32x4(mins), wasm_f32x4_splat(s.dmin * xs[b])));
    }
    sum = wasm_f32x4_sub(sum, min_sum);
    return wasm_f32x4_extract_lane(sum, 0) + wasm_f32x4_extract_lane(sum, 1) + wasm_f32x4_extract_lane(sum, 2) +
           wasm_f32x4_extract_lane(sum, 3);
}
#endif

static float dot_q4k(const uint8_t *w, const NanoActivation *x, const float *xs, const int32_t *xsum, int nblocks) {
#if Q4K_ACT_CHUNK == 64
    return dot_q4k_avx512(w, x, xs, xsum, nblocks);
#elif Q4K_ACT_CHUNK == 32
    return dot_q4k_avx2(w, x, xs, xsum, nblocks);
#elif defined(__wasm_simd128__)
    return dot_q4k_wasm(w, x, xs, xsum, nblocks);
#else
    return dot_q4k_scalar(w, x, xs, xsum, nblocks);
#endif
}

/* Q4K tiles (AVX-512 VNNI builds, after nano_model_tile): 16 rows of a Q4K matrix side by side, block by
 * block. A block's tile holds its code bytes, for each 4 of them the 4 of each of the 16 rows (one vector:
 * its low nibbles meet 4 activations, its high nibbles the 4 the activation order puts 64 bytes on, see
 * Q4K_ACT_CHUNK), then the 16 rows' scales of each group, their mins by pairs of groups (the int16 pairs
 * dpwssd takes), their d and their dmin. A group's 16 sums then take one multiply by its scales, the mins
 * four multiply-adds a block, and the block one conversion and two float multiply-adds for 16 outputs,
 * where the row kernel unpacks every row's scales and reduces its sums (half its time, timed alone). The
 * tile is 2,432 bytes where the 16 rows' blocks were 2,560 (their type, count and zero words go). */
#define Q4K_TILE_SCALES (TILE_ROWS * NANO_Q4K_BLOCK / 2)          /* after the 2,048 code bytes */
#define Q4K_TILE_MINS (Q4K_TILE_SCALES + Q4K_GROUPS * TILE_ROWS)
#define Q4K_TILE_D (Q4K_TILE_MINS + Q4K_GROUPS * TILE_ROWS)        /* 16 d, then 16 dmin */
#define Q4K_TILE_BLOCK_BYTES (Q4K_TILE_D + 2 * TILE_ROWS * (int)sizeof(float))

/* Where in a block's tile row r's code bytes 4v..4v+3 are, its scale and its min of group g, its d and its
 * dmin: the one layout tile_matrix_q4k writes and q4k_block_at reads. */
static size_t q4k_tile_codes_at(int r, int v) { return 64 * (size_t)v + 4 * r; }
static size_t q4k_tile_scale_at(int r, int g) { return Q4K_TILE_SCALES + TILE_ROWS * g + r; }
static size_t q4k_tile_min_at(int r, int g) { return Q4K_TILE_MINS + 2 * TILE_ROWS * (g / 2) + 2 * r + g % 2; }
static size_t q4k_tile_d_at(int r) { return Q4K_TILE_D + 4 * r; }
static size_t q4k_tile_dmin_at(int r) { return Q4K_TILE_D + 4 * (TILE_ROWS + r); }

#ifdef TILES
/* out[16 k + i] = the Q4K dot of the tile's row i (nblocks block tiles) with activation row k < rows <=
 * TOKEN_BLOCK, whose blocks start stride blocks apart in x, xs and xsum (its two chains of sums per row
 * would not leave 8 rows their registers). */
BLOCK_KERNEL void dot_q4k_tile(const uint8_t *tile, const int8_t *x, const float *xs, const int32_t *xsum,
                               size_t stride, int nblocks, int rows, float *out) {
    const __m512i nibble = _mm512_set1_epi8(15);
    __m512 sum[WIDE_TOKEN_BLOCK];   /* sized for every row count store_tile_dots is specialized with */
    for (int k = 0; k < rows; k++) sum[k] = _mm512_setzero_ps();
    for (int b = 0; b < nblocks; b++, tile += Q4K_TILE_BLOCK_BYTES) {
        __m512i scaled[WIDE_TOKEN_BLOCK];   /* sum over groups of sc * (codes . x), per row of the tile */
        for (int k = 0; k < rows; k++) scaled[k] = _mm512_setzero_si512();
        for (int g = 0; g < Q4K_GROUPS; g++) {
            __m512i even[WIDE_TOKEN_BLOCK], odd[WIDE_TOKEN_BLOCK];   /* two chains of sums, the low and the high nibbles */
            for (int k = 0; k < rows; k++) even[k] = odd[k] = _mm512_setzero_si512();
            /* the activations of the group's low nibbles, 16 bytes, and of its high ones 64 bytes on */
            size_t evens = 128 * (g / 4) + 16 * (g % 4);
            for (int v = 0; v < 4; v++) {
                const uint8_t *vector = tile + 256 * g + 64 * v;
                prefetch_weights(vector, Q4K_AHEAD);
                __m512i codes = _mm512_loadu_si512(vector);
                __m512i low = _mm512_and_si512(codes, nibble), high = _mm512_and_si512(_mm512_srli_epi16(codes, 4), nibble);
                for (int k = 0; k < rows; k++) {
                    const int8_t *block = x + ((size_t)k * stride + b) * NANO_Q4K_BLOCK + evens + 4 * v;
                    int32_t four_even, four_odd;
                    memcpy(&four_even, block, 4);
                    memcpy(&four_odd, block + 64, 4);
                    even[k] = _mm512_dpbusd_epi32(even[k], low, _mm512_set1_epi32(four_even));
                    odd[k] = _mm512_dpbusd_epi32(odd[k], high, _mm512_set1_epi32(four_odd));
                }
            }
            __m512i scales = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(tile + Q4K_TILE_SCALES + TILE_ROWS * g)));
            for (int k = 0; k < rows; k++)
                scaled[k] = _mm512_add_epi32(scaled[k], _mm512_mullo_epi32(_mm512_add_epi32(even[k], odd[k]), scales));
        }
        __m512 d = _mm512_loadu_ps(tile + Q4K_TILE_D), dmin = _mm512_loadu_ps(tile + Q4K_TILE_D + 4 * TILE_ROWS);
        for (int k = 0; k < rows; k++) {
            size_t at = (size_t)k * stride + b;
            __m512i mins = _mm512_setzero_si512();   /* sum over groups of m * (group sum of x) */
            for (int p = 0; p < Q4K_GROUPS / 2; p++) {
                __m512i pairs = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(tile + Q4K_TILE_MINS + 2 * TILE_ROWS * p)));
                const int32_t *sums = xsum + at * Q4K_GROUPS + 2 * p;   /* |sum| <= 32 * 127: an int16 each */
                mins = _mm512_dpwssd_epi32(mins, pairs, _mm512_set1_epi32((int32_t)((uint16_t)sums[0] | (uint32_t)sums[1] << 16)));
            }
            __m512 scale = _mm512_set1_ps(xs[at]);
            sum[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(scaled[k]), _mm512_mul_ps(d, scale), sum[k]);
            sum[k] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(mins), _mm512_mul_ps(dmin, scale), sum[k]);
        }
    }
    for (int k = 0; k < rows; k++) _mm512_storeu_ps(out + TILE_ROWS * k, sum[k]);
}

/* Rearrange one Q4K matrix into tiles, through a copy of it (left as it is when there is no memory for one). */
static int tile_matrix_q4k(NanoMatrix *w) {
    int blocks = q4k_blocks_per_row(w->cols);
    size_t row_bytes = (size_t)blocks * NANO_Q4K_BLOCK_BYTES;
    uint8_t *rows = malloc(row_bytes * w->rows);
    if (!rows) return 0;
    memcpy(rows, w->q4k, row_bytes * w->rows);
    uint8_t *tile = (uint8_t *)w->q4k;   /* the caller's buffer, writable by nano_model_tile's contract */
    for (int first = 0; first < w->rows; first += TILE_ROWS)
        for (int b = 0; b < blocks; b++, tile += Q4K_TILE_BLOCK_BYTES)
            for (int r = 0; r < TILE_ROWS; r++) {
                const uint8_t *block = rows + (size_t)(first + r) * row_bytes + (size_t)b * NANO_Q4K_BLOCK_BYTES;
                Q4KScales s = q4k_scales(block);
                for (int v = 0; v < NANO_Q4K_BLOCK / 8; v++) memcpy(tile + q4k_tile_codes_at(r, v), block + Q4K_CODES_OFFSET + 4 * v, 4);
                for (int g = 0; g < Q4K_GROUPS; g++) {
                    tile[q4k_tile_scale_at(r, g)] = s.scales[g];
                    tile[q4k_tile_min_at(r, g)] = s.scales[Q4K_GROUPS + g];
                }
                memcpy(tile + q4k_tile_d_at(r), &s.d, 4);
                memcpy(tile + q4k_tile_dmin_at(r), &s.dmin, 4);
            }
    free(rows);
    return w->tiled = 1;
}
#endif

/* Block b of a Q4K matrix's row, in the file's layout or in tiles: its scales, mins and code bytes. */
static Q4KScales q4k_block_at(const NanoMatrix *w, int row, int b, uint8_t codes[NANO_Q4K_BLOCK / 2]) {
    int blocks = q4k_blocks_per_row(w->cols);
    if (!w->tiled) {
        const uint8_t *block = w->q4k + ((size_t)row * blocks + b) * NANO_Q4K_BLOCK_BYTES;
        memcpy(codes, block + Q4K_CODES_OFFSET, NANO_Q4K_BLOCK / 2);
        return q4k_scales(block);
    }
    const uint8_t *tile = w->q4k + ((size_t)(row / TILE_ROWS) * blocks + b) * Q4K_TILE_BLOCK_BYTES;
    int r = row % TILE_ROWS;
    Q4KScales s;
    for (int v = 0; v < NANO_Q4K_BLOCK / 8; v++) memcpy(codes + 4 * v, tile + q4k_tile_codes_at(r, v), 4);
    for (int g = 0; g < Q4K_GROUPS; g++) {
        s.scales[g] = tile[q4k_tile_scale_at(r, g)];
        s.scales[Q4K_GROUPS + g] = tile[q4k_tile_min_at(r, g)];
    }
    memcpy(&s.d, tile + q4k_tile_d_at(r), 4);
    memcpy(&s.dmin, tile + q4k_tile_dmin_at(r), 4);
    return s;
}

#ifdef TILES
/* Tile W when its rows are a multiple of 16: 1 if done. */
static int tile_any(NanoMatrix *w, const NanoConfig *c) {
    if (w->rows % TILE_ROWS) return 0;
    return c->quant_type == NANO_QUANT_Q4K ? tile_matrix_q4k(w) : tile_matrix(w, c->group_size);
}
#endif

int nano_model_tile(NanoModel *m) {
    int tiled = 0;
#ifdef TILES
    const NanoConfig *c = &m->config;
    if (c->quant_type != NANO_QUANT_Q4K && (c->quant_type != NANO_QUANT_Q80 || c->group_size % 4)) return 0;
    for (int l = 0; l < c->n_layer; l++) {
        NanoLayer *layer = &m->layers[l];
        NanoMatrix *matrices[] = {&layer->wq, &layer->wk, &layer->wv, &layer->wo, &layer->w1, &layer->w2, &layer->w3};
        for (size_t i = 0; i < sizeof matrices / sizeof *matrices; i++) tiled += tile_any(matrices[i], c);
    }
    tiled += tile_any(&m->classifier, c);
    /* a shared classifier is the embedding: the same bytes, now tiled for both */
    if (c->is_shared_classifier) m->embedding.tiled = m->classifier.tiled;
#else
    (void)m;
#endif
    return tiled;
}

/* The largest of n >= 1 values, or of their magnitudes; and x rounded to the nearest integer, ties to even, as
 * lrintf does for |x| <= 127; all inline, where the C99 library calls cost as much as a small matmul. */
static inline float largest_of(const float *x, int n, int magnitudes) {
    FloatVector largest = vector_broadcast(magnitudes ? 0.0f : -INFINITY);
    int i = 0;
    for (; i + FLOAT_LANES <= n; i += FLOAT_LANES) {
        FloatVector v = vector_load(x + i);
        largest = vector_max(largest, magnitudes ? vector_abs(v) : v);
    }
    float max = vector_largest(largest);
    for (; i < n; i++) {
        float v = magnitudes ? fabsf(x[i]) : x[i];
        max = v > max ? v : max;
    }
    return max;
}

static inline int8_t round_to_int8(float x) {
    const float shift = 12582912.0f;   /* 1.5 * 2^23: adding it leaves no fraction bits, so the FPU rounds */
    return (int8_t)(int)((x + shift) - shift);
}

/* Quantize one group of activations like the weights: scale = max|x| / 127; and the sum of its values,
 * which Q80 tiles take off their biased products. */
static void quantize_group(NanoActivation *q, float *scale, int32_t *sum, const float *x, int group) {
    float max_abs = largest_of(x, group, 1);
    *scale = max_abs / 127.0f;
    float inverse = max_abs > 0.0f ? 127.0f / max_abs : 0.0f;   /* all-zero group: q = 0, scale = 0 */
    int32_t total = 0;
    for (int j = 0; j < group; j++) total += q[j] = round_to_int8(x[j] * inverse);
    *sum = total;
}

/* Quantize the n activations of one Q4K block (zeros past n): scale = max|x| / 127, the sum of each group,
 * values in the kernels' order (see Q4K_ACT_CHUNK): chunk by chunk, its lanes' nibbles transposed. */
static void quantize_block_q4k(NanoActivation *q, float *scale, int32_t *group_sum, const float *x, int n) {
    float max_abs = largest_of(x, n, 1);
    *scale = max_abs / 127.0f;
    float inverse = max_abs > 0.0f ? 127.0f / max_abs : 0.0f;
    int8_t v[NANO_Q4K_BLOCK] = {0};   /* in element order first: three loops a compiler can vectorize */
    for (int i = 0; i < n; i++) v[i] = round_to_int8(x[i] * inverse);
    for (int g = 0; g < Q4K_GROUPS; g++) {
        int32_t sum = 0;
        for (int i = 32 * g; i < 32 * g + 32; i++) sum += v[i];
        group_sum[g] = sum;
    }
    for (int c = 0; c < NANO_Q4K_BLOCK; c += Q4K_LANE_NIBBLES * Q4K_ACT_CHUNK)
        for (int j = 0; j < Q4K_LANE_NIBBLES; j++)
            for (int lane = 0; lane < Q4K_ACT_CHUNK; lane++)
                q[c + j * Q4K_ACT_CHUNK + lane] = v[c + Q4K_LANE_NIBBLES * lane + j];
}

/* Row `row` (of width cols) of the quantized activations from x: Q80 groups or Q4K blocks; nothing for float32. */
static void quantize_row(NanoState *s, size_t row, const float *x, int cols) {
    const NanoConfig *c = &s->model->config;
    if (c->quant_type == NANO_QUANT_Q80) {
        int group = c->group_size;
        for (int g = 0; g < cols / group; g++) {
            size_t at = row * cols + (size_t)g * group;
            quantize_group(s->act_q + at, s->act_scale + at / group, s->act_group_sum + at / group, x + (size_t)g * group,
                           group);
        }
    } else if (c->quant_type == NANO_QUANT_Q4K) {
        int blocks = q4k_blocks_per_row(cols);
        for (int b = 0; b < blocks; b++) {
            size_t at = row * blocks + b;
            quantize_block_q4k(s->act_q + at * NANO_Q4K_BLOCK, s->act_scale + at, s->act_group_sum + at * Q4K_GROUPS,
                               x + (size_t)b * NANO_Q4K_BLOCK, q4k_block_length(cols, b));
        }
    }
}

/* ============================================================================ threads */

/* A forward pass is one OpenMP parallel region: its threads share the rows of every step and meet at a
 * barrier between steps, some ten times a layer. OpenMP's own barrier sleeps at once under
 * OMP_WAIT_POLICY=passive (tens of microseconds to wake up), and under the default policy spins long
 * before it sleeps, holding a core that on a busy machine the thread it waits for may need. This one spins
 * briefly, then yields the core, so a pass runs alike under either policy. Without OpenMP there is one
 * thread and nothing to wait for. The team's threads also share out the units of its matmul steps (below). */
typedef struct { uint64_t word; char line[56]; } UnitShare;   /* a cache line each, apart from the others' */

typedef struct {
    unsigned arrived, generation;
    UnitShare *shares;   /* one per thread, up to share_count */
    int share_count;
} Team;

#define BARRIER_SPINS 1000   /* reads of the generation, about a microsecond, before a waiter yields */

static void barrier_wait(Team *b) {
#ifdef _OPENMP
    unsigned threads = (unsigned)omp_get_num_threads(), generation, arrived;
    if (threads == 1) return;
#pragma omp atomic read seq_cst
    generation = b->generation;
#pragma omp atomic capture seq_cst
    arrived = ++b->arrived;
    if (arrived == threads) {   /* the last one in resets the count for the next barrier, then lets all go */
#pragma omp atomic write seq_cst
        b->arrived = 0;
#pragma omp atomic write seq_cst
        b->generation = generation + 1;
        return;
    }
    for (int spins = 0;;) {
        unsigned now;
#pragma omp atomic read seq_cst
        now = b->generation;
        if (now != generation) return;
        if (spins < BARRIER_SPINS) spins++;
        else sched_yield();
    }
#else
    (void)b;
#endif
}

/* The most threads a region opened now can have: the shares a team needs. */
static int team_size_limit(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/* A team for a region, its shares (team_size_limit() of them, the caller's) cleared. */
static Team team_of(UnitShare *shares, int count) {
    memset(shares, 0, sizeof(UnitShare) * count);
    Team team = {0, 0, shares, count};
    return team;
}

/* This thread's share [first, end) of n iterations: contiguous, the first n % threads shares one longer. */
static void thread_share(int n, int *first, int *end) {
#ifdef _OPENMP
    int threads = omp_get_num_threads(), thread = omp_get_thread_num();
#else
    int threads = 1, thread = 0;
#endif
    int share = n / threads, longer = n % threads;
    *first = thread * share + (thread < longer ? thread : longer);
    *end = *first + share + (thread < longer);
}

/* A parallel region repays its barriers only when a layer's matmuls, or the classifier, have at least this
 * many multiply-adds; a smaller model runs on one thread. */
#define PARALLEL_MIN_WORK (1 << 18)

/* From here on, the steps of a pass run on every thread of its region: each shares out its rows (an
 * `omp for` with a static schedule, the matmuls' units as below), each row done whole by one thread with
 * the same code whatever the thread count, so that the results do not depend on it; no step has a barrier
 * of its own: the caller waits at one before a step that reads what another thread wrote. */

/* The quantized activations of n rows of x of width cols, a row per iteration (quantized weights only). */
static void quantize_input(NanoState *s, const float *x, int n, int cols) {
#pragma omp for schedule(static) nowait
    for (int t = 0; t < n; t++) quantize_row(s, t, x + (size_t)t * cols, cols);
}

typedef struct {
    const NanoMatrix *w;
    float *out;   /* [n, w->rows] */
} MatmulJob;

/* Output `row` of W for input row t: float32 weights read x, quantized ones its activations in act_q & co. */
static float row_dot(const NanoState *s, const NanoMatrix *w, int row, int t, const float *x) {
    int cols = w->cols;
    if (w->q4k) {
        int blocks = q4k_blocks_per_row(cols);
        size_t at = (size_t)t * blocks;
        return dot_q4k(w->q4k + (size_t)row * blocks * NANO_Q4K_BLOCK_BYTES, s->act_q + at * NANO_Q4K_BLOCK,
                       s->act_scale + at, s->act_group_sum + at * Q4K_GROUPS, blocks);
    }
    size_t offset = (size_t)row * cols;
    if (w->q) {
        int group = s->model->config.group_size;
        return dot_q80(w->q + offset, w->scale + offset / group, s->act_q + (size_t)t * cols,
                       s->act_scale + (size_t)t * cols / group, cols, group);
    }
    return dot_f32(w->f32 + offset, x + (size_t)t * cols, cols);
}

/* The widest block of input rows row_dots takes for W. */
static int token_block(const NanoState *s, const NanoMatrix *w) {
    return w->q ? q80_token_block(s->model->config.group_size) : TOKEN_BLOCK;
}

/* out[k] = output `row` of W for the input rows t + k, k < rows <= token_block(s, w): the weight row read
 * once for all. */
BLOCK_KERNEL void row_dots(const NanoState *s, const NanoMatrix *w, int row, int t, const float *x, int rows, float *out) {
    int cols = w->cols;
    size_t offset = (size_t)row * cols;
    if (w->q) {
        int group = s->model->config.group_size;
        dot_q80_block(w->q + offset, w->scale + offset / group, s->act_q + (size_t)t * cols,
                      s->act_scale + (size_t)t * cols / group, cols, cols, group, rows, out);
    } else if (w->f32) {
        dot_f32_rows(w->f32 + offset, x + (size_t)t * cols, cols, cols, rows, out);
    } else {
        for (int k = 0; k < rows; k++) out[k] = row_dot(s, w, row, t + k, x);
    }
}

/* out[t + k * w->rows + row] for the input rows t + k, k < rows: one block of row_dots. */
BLOCK_KERNEL void store_row_dots(const NanoState *s, const NanoMatrix *w, int row, int t, const float *x, int rows,
                                 float *out) {
    float dots[WIDE_TOKEN_BLOCK];
    row_dots(s, w, row, t, x, rows, dots);
    for (int k = 0; k < rows; k++) out[(size_t)(t + k) * w->rows + row] = dots[k];
}

/* out = W x for all n input rows at output `row` of W: in blocks as wide as its kernel takes, then of
 * TOKEN_BLOCK, then one by one. */
static void row_matmul(NanoState *s, const NanoMatrix *w, int row, const float *x, int n, float *out) {
    int t = 0;
    if (token_block(s, w) == WIDE_TOKEN_BLOCK)
        for (; t + WIDE_TOKEN_BLOCK <= n; t += WIDE_TOKEN_BLOCK) store_row_dots(s, w, row, t, x, WIDE_TOKEN_BLOCK, out);
    for (; t + TOKEN_BLOCK <= n; t += TOKEN_BLOCK) store_row_dots(s, w, row, t, x, TOKEN_BLOCK, out);
    for (; t < n; t++) out[(size_t)t * w->rows + row] = row_dot(s, w, row, t, x);
}

#ifdef TILES
/* out[t + k, 16 tile + i] for the input rows t + k, k < rows: tile `tile` of W against a block of them. */
BLOCK_KERNEL void store_tile_dots(const NanoState *s, const NanoMatrix *w, int tile, int t, int rows, float *out) {
    int cols = w->cols;
    float dots[WIDE_TOKEN_BLOCK * TILE_ROWS];
    if (w->q4k) {
        int blocks = q4k_blocks_per_row(cols);
        size_t at = (size_t)t * blocks;
        dot_q4k_tile(w->q4k + (size_t)tile * blocks * Q4K_TILE_BLOCK_BYTES, s->act_q + at * NANO_Q4K_BLOCK,
                     s->act_scale + at, s->act_group_sum + at * Q4K_GROUPS, blocks, blocks, rows, dots);
    } else {
        int group = s->model->config.group_size;
        dot_q80_tile((const uint8_t *)w->q + (size_t)tile * TILE_ROWS * cols, w->scale + (size_t)tile * TILE_ROWS * (cols / group),
                     s->act_q + (size_t)t * cols, s->act_scale + (size_t)t * cols / group,
                     s->act_group_sum + (size_t)t * cols / group, cols, cols, group, rows, dots);
    }
    for (int k = 0; k < rows; k++)
        memcpy(out + (size_t)(t + k) * w->rows + (size_t)tile * TILE_ROWS, dots + TILE_ROWS * k, sizeof(float) * TILE_ROWS);
}

/* out = W x for all n input rows at the 16 outputs of a tile, in blocks of WIDE_TOKEN_BLOCK (Q80), TOKEN_BLOCK, one. */
static void tile_matmul(NanoState *s, const NanoMatrix *w, int tile, int n, float *out) {
    int t = 0;
    if (!w->q4k)
        for (; t + WIDE_TOKEN_BLOCK <= n; t += WIDE_TOKEN_BLOCK) store_tile_dots(s, w, tile, t, WIDE_TOKEN_BLOCK, out);
    for (; t + TOKEN_BLOCK <= n; t += TOKEN_BLOCK) store_tile_dots(s, w, tile, t, TOKEN_BLOCK, out);
    for (; t < n; t++) store_tile_dots(s, w, tile, t, 1, out);
}
#endif

/* The units of W's work that a thread takes whole: its tiles, else its rows. */
static int matmul_units(const NanoMatrix *w) {
    return w->tiled ? w->rows / TILE_ROWS : w->rows;
}

/* The units of several matrices' work, one after the other. */
static int jobs_units(const MatmulJob *jobs, int n_jobs) {
    int total = 0;
    for (int j = 0; j < n_jobs; j++) total += matmul_units(jobs[j].w);
    return total;
}

/* The job that unit *u of several matrices' units falls in; *u becomes the unit's number within it. */
static int job_of_unit(const MatmulJob *jobs, int *u) {
    int j = 0;
    while (*u >= matmul_units(jobs[j].w)) *u -= matmul_units(jobs[j++].w);
    return j;
}

/* Units [first, first + count) of W into out. A decode step's float32 rows are one dot each, in a loop with
 * nothing else in it: through row_matmul and row_dot, two calls and their checks of the kind of weights a
 * row (2 KB of Nano-56M's), decoding ran 1.23-1.29x slower at one thread and 1.09-1.12x at two (bench_ab.py,
 * Zen 4 EPYC; the logits the same to the bit). */
static void job_units(NanoState *s, const float *x, int n, const NanoMatrix *w, int first, int count, float *out) {
#ifdef TILES
    if (w->tiled) {
        for (int u = first; u < first + count; u++) tile_matmul(s, w, u, n, out);
        return;
    }
#endif
    if (n == 1 && w->f32) {
        for (int row = first; row < first + count; row++) out[row] = dot_f32(w->f32 + (size_t)row * w->cols, x, w->cols);
        return;
    }
    for (int row = first; row < first + count; row++) row_matmul(s, w, row, x, n, out);
}

/* Units [u, u + count) of several matrices' units one after the other. */
static void matmul_units_run(NanoState *s, const float *x, int n, const MatmulJob *jobs, int u, int count) {
    for (int j = job_of_unit(jobs, &u); count > 0; j++, u = 0) {
        int here = matmul_units(jobs[j].w) - u < count ? matmul_units(jobs[j].w) - u : count;
        job_units(s, x, n, jobs[j].w, u, here, jobs[j].out);
        count -= here;
    }
}

/* A matmul step's units go out as contiguous shares, one a thread, and a thread done with its own takes the
 * last units of another's: the halves of a step seldom take the same time (the cache holds more of one, a
 * core serves an interrupt, a laptop has slower cores), and fixed shares wait for the slower one. A share
 * is one word, the step it belongs to (a barrier's generation: the same on every thread between two
 * barriers), its next unit and its end, so that the owner's claims from its front and a thief's from its
 * back are each one compare-and-swap; an owner claims SHARE_CHUNK units at a time, a thief one. */
#ifdef _OPENMP
#define SHARE_CHUNK 4

static uint64_t share_word(unsigned step, unsigned next, unsigned end) {
    return (uint64_t)(step & 0xffff) << 48 | (uint64_t)next << 24 | end;
}

/* Up to `count` units of a share in `step` from its front (else its back): how many, the first in *first. */
static unsigned claim_units(uint64_t *share, unsigned step, unsigned count, int from_front, unsigned *first) {
    uint64_t old = __atomic_load_n(share, __ATOMIC_ACQUIRE), claimed;
    unsigned take;
    do {
        unsigned next = old >> 24 & 0xffffff, end = old & 0xffffff;
        if ((old >> 48) != (step & 0xffff) || next >= end) return 0;
        take = end - next < count ? end - next : count;
        *first = from_front ? next : end - take;
        claimed = from_front ? share_word(step, next + take, end) : share_word(step, next, end - take);
    } while (!__atomic_compare_exchange_n(share, &old, claimed, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE));
    return take;
}
#endif

/* out = W x for n input rows of width cols, for several matrices sharing the same input, in one space of all
 * their units. Quantized weights read x as quantized beforehand into act_q & co. */
static void matmuls(NanoState *s, const float *x, int n, const MatmulJob *jobs, int n_jobs, Team *team) {
    int total = jobs_units(jobs, n_jobs), first, end;
    thread_share(total, &first, &end);
#ifdef _OPENMP
    int threads = omp_get_num_threads(), thread = omp_get_thread_num();
    if (threads > 1 && threads <= team->share_count && total < (1 << 24)) {
        unsigned step, u, got;
#pragma omp atomic read seq_cst
        step = team->generation;
        uint64_t *own = &team->shares[thread].word;
        __atomic_store_n(own, share_word(step, (unsigned)first, (unsigned)end), __ATOMIC_RELEASE);
        while ((got = claim_units(own, step, SHARE_CHUNK, 1, &u))) matmul_units_run(s, x, n, jobs, (int)u, (int)got);
        for (int other = 1; other < threads; other++)
            while (claim_units(&team->shares[(thread + other) % threads].word, step, 1, 0, &u))
                matmul_units_run(s, x, n, jobs, (int)u, 1);
        return;
    }
#else
    (void)team;
#endif
    if (first < end) matmul_units_run(s, x, n, jobs, first, end - first);
}

static void matmul(NanoState *s, float *out, const float *x, int n, const NanoMatrix *w, Team *team) {
    MatmulJob job = {w, out};
    matmuls(s, x, n, &job, 1, team);
}

/* The weights of unit u of W, and their bytes to its end (a quantized matrix's scales apart). */
static const uint8_t *unit_weights(const NanoMatrix *w, int u, size_t *bytes) {
    const uint8_t *data = w->f32 ? (const uint8_t *)w->f32 : w->q ? (const uint8_t *)w->q : w->q4k;
    size_t blocks = (size_t)q4k_blocks_per_row(w->cols);
    size_t row = w->f32 ? 4 * (size_t)w->cols : w->q ? (size_t)w->cols : blocks * NANO_Q4K_BLOCK_BYTES;
    size_t unit = !w->tiled ? row : w->q4k ? blocks * Q4K_TILE_BLOCK_BYTES : TILE_ROWS * row;
    *bytes = unit * (size_t)(matmul_units(w) - u);
    return data + unit * (size_t)u;
}

/* Asks for the first bytes of this thread's share of a matmul step into L2, a step ahead of it: as many as
 * the kernels ask for ahead of the lines they read (F32_AHEAD & co.), so a share's first lines would come
 * on demand, once per matrix and thread (bench_ab.py, three runs: decoding 1.00-1.02x at one thread and
 * 0.99-1.01x at two, float32, Q80 and Q4K alike; into L1, 0.99-1.00x). */
static void prefetch_share(const MatmulJob *jobs, int n_jobs) {
    int first, end;
    thread_share(jobs_units(jobs, n_jobs), &first, &end);
    if (first >= end) return;
    const NanoMatrix *w = jobs[job_of_unit(jobs, &first)].w;
    size_t bytes, ahead = w->f32 ? F32_AHEAD : w->q4k ? Q4K_AHEAD : Q80_AHEAD;
    const uint8_t *p = unit_weights(w, first, &bytes);
    if (bytes > ahead) bytes = ahead;
    for (size_t line = 0; line < bytes; line += 64) __builtin_prefetch(p + line, 0, 2);
}

/* ============================================================================ forward pass */

/* A row of a forward pass: a token of state's sequence at position pos, seeing its first `visible` positions. */
typedef struct {
    NanoState *state;
    int pos, visible;
} PassRow;

static void rmsnorm(float *out, const float *x, const float *weight, int n, float eps) {
    float sum_squares = 0.0f;
    for (int i = 0; i < n; i++) sum_squares += x[i] * x[i];
    float inverse = 1.0f / sqrtf(sum_squares / n + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * inverse * weight[i];
}

/* x = softmax(scale x), scale > 0 */
static void softmax(float *x, int n, float scale) {
    float max = largest_of(x, n, 0);
    FloatVector sums = vector_zero(), scales = vector_broadcast(scale), maxes = vector_broadcast(max);
    int i = 0;
    for (; i + FLOAT_LANES <= n; i += FLOAT_LANES) {
        FloatVector e = vector_exp(vector_mul(scales, vector_sub(vector_load(x + i), maxes)));
        vector_store(x + i, e);
        sums = vector_add(sums, e);
    }
    float sum = vector_sum(sums);
    for (; i < n; i++) sum += (x[i] = expf(scale * (x[i] - max)));
    float inverse = 1.0f / sum;
    for (i = 0; i < n; i++) x[i] *= inverse;
}

/* Rows of x, a row per iteration: x += xb (the previous branch) when asked, then out = rmsnorm(x); out = xb
 * is the next matmuls' input, and is quantized for quantized weights too (each row is read before it is written). */
static void residual_norm(NanoState *s, int n, int add_branch, const float *weight, float *out) {
    const NanoConfig *c = &s->model->config;
    int E = c->n_embd;
#pragma omp for schedule(static) nowait
    for (int t = 0; t < n; t++) {
        float *x = s->x + (size_t)t * E, *row = out + (size_t)t * E;
        if (add_branch)
            for (int i = 0; i < E; i++) x[i] += s->xb[(size_t)t * E + i];
        rmsnorm(row, x, weight, E, c->norm_eps);
        if (out == s->xb) quantize_row(s, t, row, E);
    }
}

/* RoPE on one head at a position: rotate its pairs by the angles of cos_row/sin_row, interleaved pairs
 * (2j, 2j+1) in a Nano model, pairs (j, j + head_dim/2) ("rotate half") in a Qwen one. */
static void rotate_head(float *v, const float *cos_row, const float *sin_row, int hd, int rotate_half) {
    int half = hd / 2;
    for (int j = 0; j < half; j++) {
        int a = rotate_half ? j : 2 * j, b = rotate_half ? j + half : 2 * j + 1;
        float x = v[a], y = v[b];
        v[a] = x * cos_row[j] - y * sin_row[j];
        v[b] = x * sin_row[j] + y * cos_row[j];
    }
}

static void add_vector(float *x, const float *bias, int n) {
    for (int i = 0; i < n; i++) x[i] += bias[i];
}

/* out[t] += scaling * B (A x[t]) for one adapter target of one layer: the rank-wide hidden rows (in the
 * hidden buffer of the adapter's sequence), then the output rows. Ends at a barrier, since the next target
 * reuses that buffer. */
static void lora_branch(const NanoLora *lora, float *hidden, Team *team, int target, int layer,
                        const float *x, float *out, int n) {
    int r = lora->rank, in = lora->in_dim[target], out_dim = lora->out_dim[target];
    const float *a = lora->a[target] + (size_t)layer * r * in, *b = lora->b[target] + (size_t)layer * out_dim * r;
#pragma omp for schedule(static) nowait
    for (size_t i = 0; i < (size_t)n * r; i++)
        hidden[i] = lora->scaling * dot_f32(a + i % r * in, x + i / r * in, in);
    barrier_wait(team);
#pragma omp for schedule(static) nowait
    for (int i = 0; i < out_dim; i++)
        for (int t = 0; t < n; t++) out[(size_t)t * out_dim + i] += dot_f32(b + (size_t)i * r, hidden + (size_t)t * r, r);
    barrier_wait(team);
}

/* lora_branch over the rows of a pass, a run of consecutive rows whose sequences share an adapter at a time
 * (every thread walks the same runs). Rows without an adapter are left alone. */
static void lora_branches(const PassRow *rows, int n, Team *team, int target, int layer, const float *x,
                          float *out) {
    for (int first = 0, end; first < n; first = end) {
        const NanoState *owner = rows[first].state;
        for (end = first + 1; end < n && rows[end].state->lora == owner->lora;) end++;
        if (!owner->lora) continue;
        int in = owner->lora->in_dim[target], out_dim = owner->lora->out_dim[target];
        lora_branch(owner->lora, owner->lora_hidden, team, target, layer, x + (size_t)first * in,
                    out + (size_t)first * out_dim, end - first);
    }
}

/* Each sequence's caches hold, per layer and KV head, the values as rows, [context][head_dim], and the keys
 * in tiles of CACHE_TILE positions, each tile [head_dim][CACHE_TILE] (a dimension's values for the tile's
 * positions side by side); context is block_size rounded up to a whole tile. A query then meets a vector of
 * keys with one multiply-add per dimension and no sums across lanes, and a head's keys, like its values,
 * stream from memory in one run. */
#define CACHE_TILE 16   /* positions: a multiple of every float vector's lanes */

static size_t cache_context(const NanoConfig *c) {
    return ((size_t)c->block_size + CACHE_TILE - 1) / CACHE_TILE * CACHE_TILE;
}

/* Quantized models cache keys and values as halves (see float16), float32 ones as floats: their logits
 * agree with PyTorch's to 1e-4, closer than halves allow. */
static int cache_in_halves(const NanoConfig *c) {
    return c->quant_type != NANO_QUANT_F32;
}

static size_t cache_element(const NanoConfig *c) {
    return cache_in_halves(c) ? sizeof(uint16_t) : sizeof(float);
}

/* The start of a layer's KV head in a cache (the same offset in both), in elements. */
static size_t cache_head(const NanoModel *m, int layer, int kv_head) {
    return ((size_t)layer * m->config.n_kv_head + kv_head) * m->config.head_dim * cache_context(&m->config);
}

#define KEY_CHUNK 64   /* a key's dimensions converted to halves at a time, in vectors, before they are spread */

/* A row's key of KV head kv_head into its sequence's cache at its position: a dimension every CACHE_TILE
 * elements, as a key tile holds it. */
static void store_key(const NanoModel *m, const PassRow *row, int layer, int kv_head, const float *k) {
    int hd = m->config.head_dim, pos = row->pos;
    size_t at = cache_head(m, layer, kv_head) + (size_t)(pos - pos % CACHE_TILE) * hd + pos % CACHE_TILE;
    if (cache_in_halves(&m->config)) {
        uint16_t *keys = (uint16_t *)row->state->key_cache + at;
        for (int d = 0; d < hd; d += KEY_CHUNK) {
            uint16_t halves[KEY_CHUNK];
            int length = hd - d < KEY_CHUNK ? hd - d : KEY_CHUNK;
            halves_of(halves, k + d, length);
            for (int j = 0; j < length; j++) keys[(size_t)(d + j) * CACHE_TILE] = halves[j];
        }
    } else {
        float *keys = (float *)row->state->key_cache + at;
        for (int d = 0; d < hd; d++) keys[(size_t)d * CACHE_TILE] = k[d];
    }
}

/* A row's value of KV head kv_head into its sequence's cache at its position, a row of the values. */
static void store_value(const NanoModel *m, const PassRow *row, int layer, int kv_head, const float *v) {
    int hd = m->config.head_dim;
    size_t at = cache_head(m, layer, kv_head) + (size_t)row->pos * hd;
    if (cache_in_halves(&m->config)) halves_of((uint16_t *)row->state->value_cache + at, v, hd);
    else memcpy((float *)row->state->value_cache + at, v, sizeof(float) * hd);
}

/* The heads of q, k and v made ready for attention, a head of a row per iteration: Qwen2's biases added, q
 * and k normalized per head with Qwen3's norm weights and rotated by RoPE, k and v stored into the row's
 * sequence's cache (layer l) at its position. */
static void prepare_heads(NanoState *s, const NanoLayer *layer, int l, const PassRow *rows, int n) {
    const NanoModel *m = s->model;
    const NanoConfig *c = &m->config;
    int hd = c->head_dim, rotate_half = is_qwen(c);
    int rotated = c->n_head + c->n_kv_head, heads = rotated + c->n_kv_head;
    /* heads dealt out one by one: the k and v heads, whose stores into the cache cost most, go to every thread */
#pragma omp for schedule(static, 1) nowait
    for (size_t i = 0; i < (size_t)n * heads; i++) {
        size_t t = i / heads;
        int h = (int)(i % heads), is_q = h < c->n_head, kv_head = is_q ? 0 : (h - c->n_head) % c->n_kv_head;
        float *v = is_q ? s->q + t * m->q_dim + (size_t)h * hd
                 : h < rotated ? s->k + t * m->kv_dim + (size_t)kv_head * hd : s->v + t * m->kv_dim + (size_t)kv_head * hd;
        const float *bias = is_q ? layer->q_bias : h < rotated ? layer->k_bias : layer->v_bias;
        if (bias) add_vector(v, bias + (size_t)(is_q ? h : kv_head) * hd, hd);
        if (h >= rotated) {   /* a v head */
            store_value(m, &rows[t], l, kv_head, v);
            continue;
        }
        const float *norm = is_q ? layer->q_norm : layer->k_norm;
        if (norm) rmsnorm(v, v, norm, hd, c->norm_eps);
        size_t rope_row = (size_t)rows[t].pos * (hd / 2);
        rotate_head(v, m->rope_cos + rope_row, m->rope_sin + rope_row, hd, rotate_half);
        if (!is_q) store_key(m, &rows[t], l, kv_head, v);
    }
}

/* FLOAT_LANES cache elements from element i, halves or floats (half is a constant where it is inlined) */
static inline __attribute__((always_inline)) FloatVector cache_vector(const void *cache, size_t i, int half) {
    return half ? vector_load_half((const uint16_t *)cache + i) : vector_load((const float *)cache + i);
}

static inline __attribute__((always_inline)) float cache_value(const void *cache, size_t i, int half) {
    return half ? nano_float_of_half(((const uint16_t *)cache)[i]) : ((const float *)cache)[i];
}

#define TILE_VECTORS (CACHE_TILE / FLOAT_LANES)
#define SCORE_TILES 4   /* tiles in flight: independent sums, to hide the multiply-add latency */

/* scores[p .. p + nt tiles) = q . key_p, over the key tiles from the one holding position p. */
BLOCK_KERNEL void score_tiles(float *scores, const float *q, const void *keys, int p, int hd, int nt, int half) {
    FloatVector acc[SCORE_TILES][TILE_VECTORS];
    size_t tile = (size_t)p * hd;
    for (int j = 0; j < nt; j++)
        for (int v = 0; v < TILE_VECTORS; v++) acc[j][v] = vector_zero();
    for (int d = 0; d < hd; d++) {
        FloatVector qd = vector_broadcast(q[d]);
        for (int j = 0; j < nt; j++)
            for (int v = 0; v < TILE_VECTORS; v++)
                acc[j][v] = vector_multiply_add(acc[j][v], qd, cache_vector(keys, tile + (size_t)j * hd * CACHE_TILE + d * CACHE_TILE + FLOAT_LANES * v, half));
    }
    for (int j = 0; j < nt; j++)
        for (int v = 0; v < TILE_VECTORS; v++) vector_store(scores + p + CACHE_TILE * j + FLOAT_LANES * v, acc[j][v]);
}

/* scores[p] = q . key_p for p < n, and for the rest of the last tile (scores of unused positions, never read). */
BLOCK_KERNEL void attention_scores(float *scores, const float *q, const void *keys, int n, int hd, int half) {
    int p = 0;
    for (; p + CACHE_TILE * SCORE_TILES <= n; p += CACHE_TILE * SCORE_TILES) score_tiles(scores, q, keys, p, hd, SCORE_TILES, half);
    for (; p < n; p += CACHE_TILE) score_tiles(scores, q, keys, p, hd, 1, half);
}

#define SUM_VECTORS 4   /* vectors of a head's width in registers */

/* out[c .. c + nv vectors) = sum over p < n of a[p] value_p[c ..], the value rows of width hd. Even and odd
 * positions go to two sums, added at the end, so that two multiply-adds of a vector run at once. */
BLOCK_KERNEL void weighted_sum_vectors(float *out, const float *a, const void *values, int c, int n, int hd, int nv,
                                       int half) {
    FloatVector even[SUM_VECTORS], odd[SUM_VECTORS];
    for (int j = 0; j < nv; j++) even[j] = odd[j] = vector_zero();
    int p = 0;
    for (; p + 2 <= n; p += 2) {
        FloatVector a0 = vector_broadcast(a[p]), a1 = vector_broadcast(a[p + 1]);
        size_t v0 = (size_t)p * hd + c, v1 = v0 + hd;
        for (int j = 0; j < nv; j++) {
            even[j] = vector_multiply_add(even[j], a0, cache_vector(values, v0 + FLOAT_LANES * j, half));
            odd[j] = vector_multiply_add(odd[j], a1, cache_vector(values, v1 + FLOAT_LANES * j, half));
        }
    }
    if (p < n) {
        FloatVector a0 = vector_broadcast(a[p]);
        for (int j = 0; j < nv; j++)
            even[j] = vector_multiply_add(even[j], a0, cache_vector(values, (size_t)p * hd + c + FLOAT_LANES * j, half));
    }
    for (int j = 0; j < nv; j++) vector_store(out + c + FLOAT_LANES * j, vector_add(even[j], odd[j]));
}

/* out = sum over p < n of a[p] value_p, for value rows of width hd: in passes over the positions for as many
 * vectors of the width as fit (a 32-wide head in one pass under AVX-512: its attention alone 1.2x faster). */
BLOCK_KERNEL void weighted_sum(float *out, const float *a, const void *values, int n, int hd, int half) {
    int c = 0;
    for (; c + FLOAT_LANES * SUM_VECTORS <= hd; c += FLOAT_LANES * SUM_VECTORS)
        weighted_sum_vectors(out, a, values, c, n, hd, SUM_VECTORS, half);
    for (; c + 2 * FLOAT_LANES <= hd; c += 2 * FLOAT_LANES) weighted_sum_vectors(out, a, values, c, n, hd, 2, half);
    for (; c + FLOAT_LANES <= hd; c += FLOAT_LANES) weighted_sum_vectors(out, a, values, c, n, hd, 1, half);
    for (; c < hd; c++) {   /* a width that is not a multiple of the vector */
        float sum = 0.0f;
        for (int p = 0; p < n; p++) sum += a[p] * cache_value(values, (size_t)p * hd + c, half);
        out[c] = sum;
    }
}

/* One head of one row: the softmax of its scores over the visible positions, scale q . key_p, weighting the
 * values into out. */
BLOCK_KERNEL void attend(float *out, float *scores, const float *q, const void *keys, const void *values, int visible,
                         int hd, float scale, int half) {
    attention_scores(scores, q, keys, visible, hd, half);
    softmax(scores, visible, scale);
    weighted_sum(out, scores, values, visible, hd, half);
}

/* Asks for the first `bytes` of a KV head's keys and of its values in a sequence's cache (from byte `head`).
 * A batch's rows read caches that lie apart, each for a short while: a row asks for the next row's while it
 * reads its own (16-row steps at positions 120-300 1.06-1.15x faster, A/B). */
static void prefetch_head_cache(const NanoState *state, size_t head, size_t bytes) {
    const char *keys = (const char *)state->key_cache + head, *values = (const char *)state->value_cache + head;
    for (size_t line = 0; line < bytes; line += 64) {
        __builtin_prefetch(keys + line);
        __builtin_prefetch(values + line);
    }
}

/* Asks, into the level-2 cache, for the keys and values of layer l that this thread's heads of attention
 * will read, when the rows are of one sequence (a batch's rows ask for each other's as they go): issued
 * before the layer's qkv matmuls, they arrive while the weights stream. */
static void prefetch_attention(const NanoState *s, const PassRow *rows, int layer, int n) {
    const NanoModel *m = s->model;
    const NanoConfig *c = &m->config;
    int group = c->n_head / c->n_kv_head, first, end;
    thread_share(c->n_head, &first, &end);
    if (first == end || rows[0].state != rows[n - 1].state) return;
    size_t element = cache_element(c), bytes = (size_t)(rows[n - 1].visible - 1) * c->head_dim * element;
    const char *keys = (const char *)rows[0].state->key_cache, *values = (const char *)rows[0].state->value_cache;
    for (int kv = first / group; kv <= (end - 1) / group; kv++) {
        size_t head = cache_head(m, layer, kv) * element;
        for (size_t line = 0; line < bytes; line += 64) {
            __builtin_prefetch(keys + head + line, 0, 2);
            __builtin_prefetch(values + head + line, 0, 2);
        }
    }
}

/* Multihead attention of each row over the visible positions of its sequence's cache into xb2, a head per
 * iteration. */
static void attention(NanoState *s, const PassRow *rows, int layer, int n) {
    const NanoModel *m = s->model;
    const NanoConfig *c = &m->config;
    int hd = c->head_dim, group = c->n_head / c->n_kv_head, half = cache_in_halves(c), first, end;
    size_t context = cache_context(c), element = cache_element(c);
    float scale = 1.0f / sqrtf((float)hd);
    thread_share(c->n_head, &first, &end);   /* the heads prefetch_attention asked for */
    for (int h = first; h < end; h++) {
        float *scores = s->att + (size_t)h * context;
        size_t head = cache_head(m, layer, h / group) * element;
        for (int t = 0; t < n; t++) {
            const float *q = s->q + (size_t)t * m->q_dim + (size_t)h * hd;
            float *out = s->xb2 + (size_t)t * m->q_dim + (size_t)h * hd;
            const char *keys = (const char *)rows[t].state->key_cache + head, *values = (const char *)rows[t].state->value_cache + head;
            if (t + 1 < n && rows[t + 1].state != rows[t].state)   /* the next sequence's, while this one's is read */
                prefetch_head_cache(rows[t + 1].state, head, (size_t)rows[t + 1].visible * hd * element);
            if (half) attend(out, scores, q, keys, values, rows[t].visible, hd, scale, 1);
            else attend(out, scores, q, keys, values, rows[t].visible, hd, scale, 0);
        }
    }
}

/* SwiGLU, hb = silu(hb) * hb2, a Q80 group per iteration (else a row), quantized as it is made. */
static void swiglu(NanoState *s, int n) {
    int F = s->model->config.n_hidden, group = s->model->config.group_size, chunk = group ? group : F;
#pragma omp for schedule(static) nowait
    for (size_t k = 0; k < (size_t)n * F / chunk; k++) {
        float *gate = s->hb + k * chunk, *up = s->hb2 + k * chunk;
        int i = 0;
        for (; i + FLOAT_LANES <= chunk; i += FLOAT_LANES) {
            FloatVector g = vector_load(gate + i);
            FloatVector e = vector_exp(vector_sub(vector_zero(), g));
            vector_store(gate + i, vector_mul(vector_div(g, vector_add(vector_broadcast(1.0f), e)), vector_load(up + i)));
        }
        for (; i < chunk; i++) gate[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
        quantize_row(s, k, gate, chunk);
    }
}

/* Row `row` of a Q4K matrix as float32: w = q (sc d) - m dmin, each product rounded to float32 as export.py does. */
static void dequantize_row_q4k(const NanoMatrix *w, int row, float *out) {
    for (int b = 0; b < q4k_blocks_per_row(w->cols); b++) {
        uint8_t codes[NANO_Q4K_BLOCK / 2];
        Q4KScales s = q4k_block_at(w, row, b, codes);
        for (int i = 0; i < q4k_block_length(w->cols, b); i++) {
            float step = (float)s.scales[i / 32] * s.d, offset = (float)s.scales[Q4K_GROUPS + i / 32] * s.dmin;
            float scaled = (float)(codes[i / 2] >> 4 * (i & 1) & 15) * step;
            out[b * NANO_Q4K_BLOCK + i] = scaled - offset;
        }
    }
}

void nano_matrix_row(const NanoModel *m, const NanoMatrix *w, int row, float *out) {
    size_t offset = (size_t)row * w->cols;
    if (w->f32) memcpy(out, w->f32 + offset, sizeof(float) * w->cols);
    else if (w->q && w->tiled) {
        int group = m->config.group_size;
        for (int i = 0; i < w->cols; i++)
            out[i] = (((const uint8_t *)w->q)[tile_value_at(row, i, w->cols, group)] - 128) *
                     w->scale[tile_scale_at(row, i / group, w->cols / group)];
    } else if (w->q)
        for (int i = 0; i < w->cols; i++) out[i] = w->q[offset + i] * w->scale[(offset + i) / m->config.group_size];
    else dequantize_row_q4k(w, row, out);
}

/* out[t] = classifier x[first + t] for n rows of s->x, on the threads of the region it runs in. */
static void classifier(NanoState *s, int first, int n, float *out, Team *team) {
    const NanoMatrix *w = &s->model->classifier;
    const float *x = s->x + (size_t)first * s->model->config.n_embd;
    if (w->q || w->q4k) {
        quantize_input(s, x, n, w->cols);
        barrier_wait(team);
    }
    matmul(s, out, x, n, w, team);
}

#ifdef _OPENMP   /* read by parallel pragmas alone */
/* A region's threads when the classifier of n rows has PARALLEL_MIN_WORK multiply-adds. */
static int classifier_parallel(const NanoModel *m, int n) {
    return (size_t)n * m->classifier.rows * m->classifier.cols >= PARALLEL_MIN_WORK;
}
#endif

/* The forward pass of n rows, row t being tokens[t] as rows[t] describes, in the activation buffers of s (so
 * n <= block_size). nano_forward runs a sequence's tokens as rows, nano_forward_batch the tokens of several
 * sequences: the weights are read once for all the rows, which is what batching buys. When logits is not
 * NULL, the pass ends with the classifier of the rows logit_rows[0 .. n_logits) (ascending) into logits: in
 * the same region, since under OMP_WAIT_POLICY=passive each region costs a wake-up of its threads. */
static void forward_rows(NanoState *s, const int *tokens, const PassRow *rows, int n, const int *logit_rows,
                         int n_logits, float *logits) {
    const NanoModel *m = s->model;
    const NanoConfig *c = &m->config;
    int E = c->n_embd, quantized = c->quant_type != NANO_QUANT_F32;
    /* copy the token embeddings into x */
    for (int t = 0; t < n; t++)
        nano_matrix_row(m, &m->embedding, tokens[t] >= 0 && tokens[t] < c->vocab_size ? tokens[t] : NANO_UNKNOWN, s->x + (size_t)t * E);
    int share_count = team_size_limit();
    UnitShare shares[share_count];
    Team team = team_of(shares, share_count);
    /* one team for the whole pass, not one per step: waking a team costs more than a step of a small
     * model; threads only when a layer's matmuls (these multiply-adds), or the classifier, reach
     * PARALLEL_MIN_WORK */
#pragma omp parallel if((size_t)n * E * (2 * m->q_dim + 2 * m->kv_dim + 3 * c->n_hidden) >= PARALLEL_MIN_WORK || \
                       (logits && classifier_parallel(m, n_logits)))
    {
        for (int l = 0; l < c->n_layer; l++) {
            const NanoLayer *layer = &m->layers[l];

            /* the layer's matmul steps, each asked for a step ahead (prefetch_share) */
            MatmulJob qkv[] = {{&layer->wq, s->q}, {&layer->wk, s->k}, {&layer->wv, s->v}},
                      gate_up[] = {{&layer->w1, s->hb}, {&layer->w3, s->hb2}}, wo = {&layer->wo, s->xb},
                      w2 = {&layer->w2, s->xb};
            /* the previous layer's residual connection, then the attention rmsnorm */
            prefetch_share(qkv, 3);
            residual_norm(s, n, l > 0, layer->attn_norm, s->xb);
            barrier_wait(&team);
            /* qkv matmuls, plus the adapter's side branches */
            prefetch_attention(s, rows, l, n);
            matmuls(s, s->xb, n, qkv, 3, &team);
            barrier_wait(&team);
            lora_branches(rows, n, &team, LORA_WQ, l, s->xb, s->q);
            lora_branches(rows, n, &team, LORA_WK, l, s->xb, s->k);
            lora_branches(rows, n, &team, LORA_WV, l, s->xb, s->v);
            prepare_heads(s, layer, l, rows, n);
            barrier_wait(&team);
            prefetch_share(&wo, 1);
            attention(s, rows, l, n);
            barrier_wait(&team);
            /* output projection of the attention */
            if (quantized) {
                quantize_input(s, s->xb2, n, m->q_dim);
                barrier_wait(&team);
            }
            matmuls(s, s->xb2, n, &wo, 1, &team);
            barrier_wait(&team);
            lora_branches(rows, n, &team, LORA_WO, l, s->xb2, s->xb);

            /* residual connection back into x, then the ffn rmsnorm */
            prefetch_share(gate_up, 2);
            residual_norm(s, n, 1, layer->ffn_norm, s->xb);
            barrier_wait(&team);
            /* the ffn is w2(silu(w1 x) * w3 x): gate and up matmuls first */
            matmuls(s, s->xb, n, gate_up, 2, &team);
            barrier_wait(&team);
            prefetch_share(&w2, 1);
            swiglu(s, n);
            barrier_wait(&team);
            /* down matmul */
            matmuls(s, s->hb, n, &w2, 1, &team);
            barrier_wait(&team);
        }
        /* last residual connection and the final rmsnorm, then the classifier of the rows asked for (else
         * nano_logits runs it later), each moved up to row i of x first (never below itself, so in order) */
        residual_norm(s, n, 1, m->final_norm, s->x);
        if (logits) {
            barrier_wait(&team);
#pragma omp master
            for (int i = 0; i < n_logits; i++)
                memmove(s->x + (size_t)i * E, s->x + (size_t)logit_rows[i] * E, sizeof(float) * E);
            barrier_wait(&team);
            classifier(s, 0, n_logits, logits, &team);
        }
    }
}

/* n tokens of one sequence from its position, then, when logits is not NULL, the logits of the last. */
static int forward_sequence(NanoState *s, const int *tokens, int n, int causal, float *logits) {
    int start = s->pos, last = n - 1;
    if (n < 1 || n > s->model->config.block_size - start) return -1;
    PassRow *rows = malloc(sizeof(PassRow) * n);
    if (!rows) return -1;
    for (int t = 0; t < n; t++) rows[t] = (PassRow){s, start + t, causal ? start + t + 1 : start + n};
    forward_rows(s, tokens, rows, n, &last, 1, logits);
    free(rows);
    s->pos = start + n;
    return 0;
}

int nano_forward(NanoState *s, const int *tokens, int n, int causal) {
    return forward_sequence(s, tokens, n, causal, NULL);
}

static void classify(NanoState *s, int first, int n, float *out) {
    int share_count = team_size_limit();
    UnitShare shares[share_count];
    Team team = team_of(shares, share_count);
#pragma omp parallel if(classifier_parallel(s->model, n))
    classifier(s, first, n, out, &team);
}

float *nano_logits(NanoState *s, int t) {
    classify(s, t, 1, s->logits);
    return s->logits;
}

int nano_forward_batch(NanoState **states, const int *tokens, const int *counts, int n, float *logits) {
    const NanoModel *m = states[0]->model;
    int total = 0;
    if (n < 1) return -1;
    for (int i = 0; i < n; i++) {
        if (states[i]->model != m || counts[i] < 1 || counts[i] > m->config.block_size - states[i]->pos) return -1;
        total += counts[i];
    }
    if (total > m->config.block_size) return -1;
    PassRow *rows = malloc(sizeof(PassRow) * total);
    int *last_rows = malloc(sizeof(int) * n);   /* each sequence's last row: the one with logits */
    if (!rows || !last_rows) {
        free(rows);
        free(last_rows);
        return -1;
    }
    for (int i = 0, r = 0; i < n; i++) {
        for (int t = 0; t < counts[i]; t++, r++) rows[r] = (PassRow){states[i], states[i]->pos + t, states[i]->pos + t + 1};
        last_rows[i] = r - 1;
    }
    forward_rows(states[0], tokens, rows, total, last_rows, n, logits);
    free(rows);
    free(last_rows);
    for (int i = 0; i < n; i++) states[i]->pos += counts[i];
    return 0;
}


/* ---------------------------------------------------------------------------- state */

/* For callers that allocate the structs without this header (serve.py, through ctypes). */
const size_t nano_model_size = sizeof(NanoModel), nano_lora_size = sizeof(NanoLora), nano_state_size = sizeof(NanoState),
             nano_sampler_size = sizeof(NanoSampler);

/* Buffer sizes in elements; nano_state_bytes and nano_state_init share them. */
typedef struct { size_t x, xb, q, kv, hidden, att, logits, cache, act_q, act_scale, act_group_sum; } StateSizes;

static StateSizes state_sizes(const NanoModel *m) {
    const NanoConfig *c = &m->config;
    size_t B = c->block_size, widest = c->n_embd;
    if ((size_t)m->q_dim > widest) widest = m->q_dim;
    if ((size_t)c->n_hidden > widest) widest = c->n_hidden;
    size_t q4k_blocks = c->quant_type == NANO_QUANT_Q4K ? B * q4k_blocks_per_row((int)widest) : 0;
    StateSizes z = {B * c->n_embd, B * widest, B * m->q_dim, B * m->kv_dim, B * c->n_hidden,
                    c->n_head * cache_context(c), c->vocab_size, c->n_layer * cache_context(c) * m->kv_dim, 0, 0,
                    q4k_blocks * Q4K_GROUPS};
    if (c->quant_type == NANO_QUANT_Q80)
        z.act_q = B * widest, z.act_scale = z.act_group_sum = B * widest / c->group_size;
    if (q4k_blocks) { z.act_q = q4k_blocks * NANO_Q4K_BLOCK; z.act_scale = q4k_blocks; }
    return z;
}

size_t nano_state_bytes(const NanoModel *m) {
    StateSizes z = state_sizes(m);
    return 4 * (z.x + 2 * z.xb + z.q + 2 * z.kv + 2 * z.hidden + z.att + z.logits + z.act_scale + z.act_group_sum) +
           2 * z.cache * cache_element(&m->config) + z.act_q * sizeof(NanoActivation);
}

/* count elements of size bytes on a 64-byte boundary (NULL for none): vector loads of activations that
 * straddle cache lines cost the Q80 and Q4K matmuls of a decode step 7 % of their time. Not cleared: a
 * large block comes as fresh pages that stay uncommitted until written (most of a KV cache for 4096
 * positions may never be), and every buffer is written before it is read, but for the padding of the last
 * key tile, whose scores attention_scores computes and never reads. */
static void *cache_aligned(size_t count, size_t size) {
    void *p;
    if (count == 0 || count > SIZE_MAX / size || posix_memalign(&p, 64, count * size)) return NULL;
    return p;
}

int nano_state_init(NanoState *s, const NanoModel *m) {
    memset(s, 0, sizeof *s);
    s->model = m;
    StateSizes z = state_sizes(m);
    s->x = cache_aligned(z.x, sizeof(float));
    s->xb = cache_aligned(z.xb, sizeof(float));
    s->xb2 = cache_aligned(z.xb, sizeof(float));
    s->q = cache_aligned(z.q, sizeof(float));
    s->k = cache_aligned(z.kv, sizeof(float));
    s->v = cache_aligned(z.kv, sizeof(float));
    s->hb = cache_aligned(z.hidden, sizeof(float));
    s->hb2 = cache_aligned(z.hidden, sizeof(float));
    s->att = cache_aligned(z.att, sizeof(float));
    s->logits = cache_aligned(z.logits, sizeof(float));
    s->key_cache = cache_aligned(z.cache, cache_element(&m->config));
    s->value_cache = cache_aligned(z.cache, cache_element(&m->config));
    s->act_q = cache_aligned(z.act_q, sizeof(NanoActivation));
    s->act_scale = cache_aligned(z.act_scale, sizeof(float));
    s->act_group_sum = cache_aligned(z.act_group_sum, sizeof(int32_t));
    if (!s->x || !s->xb || !s->xb2 || !s->q || !s->k || !s->v || !s->hb || !s->hb2 || !s->att || !s->logits ||
        !s->key_cache || !s->value_cache || (z.act_q && (!s->act_q || !s->act_scale)) ||
        (z.act_group_sum && !s->act_group_sum)) {
        nano_state_free(s);
        return -1;
    }
    return 0;
}

void nano_state_free(NanoState *s) {
    free(s->x); free(s->xb); free(s->xb2); free(s->q); free(s->k); free(s->v); free(s->hb); free(s->hb2); free(s->att);
    free(s->logits); free(s->key_cache); free(s->value_cache); free(s->act_q); free(s->act_scale); free(s->act_group_sum);
    free(s->lora_hidden);
    memset(s, 0, sizeof *s);
}

int nano_state_attach_lora(NanoState *s, const NanoLora *lora) {
    if (lora && lora->rank > s->lora_capacity) {
        float *hidden = realloc(s->lora_hidden, sizeof(float) * (size_t)s->model->config.block_size * lora->rank);
        if (!hidden) return -1;
        s->lora_hidden = hidden;
        s->lora_capacity = lora->rank;
    }
    s->lora = lora;
    return 0;
}

/* ============================================================================ sampler */

int nano_sampler_init(NanoSampler *s, int vocab_size, float temperature, int top_k, float top_p,
                      float repetition_penalty, uint64_t seed) {
    s->temperature = temperature;
    s->top_k = top_k;
    s->top_p = top_p;
    s->repetition_penalty = repetition_penalty;
    s->rng = seed ? seed : 0x9E3779B97F4A7C15ull;
    s->vocab_size = vocab_size;
    s->seen = calloc(vocab_size, 1);
    s->candidates = malloc(sizeof(int) * vocab_size);
    s->probs = malloc(sizeof(float) * vocab_size);
    s->ranked = malloc(sizeof *s->ranked * vocab_size);
    if (!s->seen || !s->candidates || !s->probs || !s->ranked) { nano_sampler_free(s); return -1; }
    return 0;
}

void nano_sampler_free(NanoSampler *s) {
    free(s->seen); free(s->candidates); free(s->probs); free(s->ranked);
    s->seen = NULL; s->candidates = NULL; s->probs = NULL; s->ranked = NULL;
}

void nano_sampler_see(NanoSampler *s, int token) {
    if (token >= 0 && token < s->vocab_size) s->seen[token] = 1;
}

static float random_unit(NanoSampler *s) {   /* xorshift64*, uniform in [0, 1) */
    s->rng ^= s->rng >> 12;
    s->rng ^= s->rng << 25;
    s->rng ^= s->rng >> 27;
    return (float)((s->rng * 0x2545F4914F6CDD1Dull) >> 40) / 16777216.0f;
}

/* Whether token a comes before token b in the draw's order: likelier first, the lower id first among equals. */
static int more_likely(const float *p, int a, int b) { return !(p[a] < p[b]) && (p[a] > p[b] || a < b); }

static void sift_down(const float *p, int *heap, int n, int i) {   /* heap[0] the least likely */
    for (int child; (child = 2 * i + 1) < n; i = child) {
        if (child + 1 < n && more_likely(p, heap[child], heap[child + 1])) child++;
        if (!more_likely(p, heap[i], heap[child])) break;
        int t = heap[i]; heap[i] = heap[child]; heap[child] = t;
    }
}

static int by_draw_order(const void *a, const void *b) {
    const struct NanoRanked *x = a, *y = b;
    return x->p < y->p ? 1 : x->p > y->p ? -1 : x->id - y->id;
}

/* ids[0 .. n) in the draw's order: sorted with their probabilities beside them, so that the comparison needs
 * no global (samplers may draw on several threads at once) and reads no scattered memory. */
static void sort_likeliest_first(NanoSampler *s, const float *p, int *ids, int n) {
    for (int i = 0; i < n; i++) s->ranked[i] = (struct NanoRanked){p[ids[i]], ids[i]};
    qsort(s->ranked, n, sizeof *s->ranked, by_draw_order);
    for (int i = 0; i < n; i++) ids[i] = s->ranked[i].id;
}

/* The k most likely tokens of p[0 .. V) into out, most likely first: a heap of the k best so far, then their
 * sort (a token's rank costs one comparison with the heap's least likely, not a sort of the vocabulary). */
static void most_likely(NanoSampler *s, const float *p, int k, int *out) {
    for (int i = 0; i < k; i++) out[i] = i;
    for (int i = k / 2 - 1; i >= 0; i--) sift_down(p, out, k, i);
    for (int i = k; i < s->vocab_size; i++)
        if (more_likely(p, i, out[0])) { out[0] = i; sift_down(p, out, k, 0); }
    sort_likeliest_first(s, p, out, k);
}

/* The tokens at least `floor` likely, most likely first; returns their count. */
static int likely_at_least(NanoSampler *s, const float *p, float floor, int *out) {
    int n = 0;
    for (int i = 0; i < s->vocab_size; i++) if (p[i] >= floor) out[n++] = i;
    sort_likeliest_first(s, p, out, n);
    return n;
}

/* How many of the candidates, most likely first, the draw keeps: the top_k, then as many as first reach
 * top_p of the mass (into *mass); 0 when they never reach it. */
static int nucleus(const NanoSampler *s, const float *p, int n, float *mass) {
    *mass = 0.0f;
    for (int i = 0; i < n; i++) {
        *mass += p[s->candidates[i]];
        if (s->top_p < 1.0f && *mass >= s->top_p) return i + 1;
    }
    return s->top_p < 1.0f ? 0 : n;
}

/* The draw's candidates into s->candidates, most likely first, as many as it can need; returns how many it keeps
 * (their mass into *mass). The top_k when top_k cuts. Else, when top_p does, the tokens at least
 * (1 - top_p) / (V - 1) likely: a less likely one is never in the nucleus (every token after it in the order
 * is no likelier, and with it they hold less than 1 - top_p), unless rounding says otherwise, and then all of
 * them are sorted, as without the cut. */
static int candidates(NanoSampler *s, const float *p, float *mass) {
    int V = s->vocab_size, kept;
    if (s->top_k > 0 && s->top_k < V) {
        most_likely(s, p, s->top_k, s->candidates);
        return (kept = nucleus(s, p, s->top_k, mass)) ? kept : s->top_k;
    }
    if (s->top_p < 1.0f && V > 1) {
        int n = likely_at_least(s, p, (1.0f - s->top_p) / (V - 1), s->candidates);
        if ((kept = nucleus(s, p, n, mass))) return kept;
    }
    for (int i = 0; i < V; i++) s->candidates[i] = i;
    sort_likeliest_first(s, p, s->candidates, V);
    return (kept = nucleus(s, p, V, mass)) ? kept : V;
}

/* The index of the largest of p[0 .. n), the first of equal ones, as `if (p[i] > p[best]) best = i` finds
 * it (NaNs never win, and a NaN p[0] does): the largest value in vectors, then its first place. */
static int argmax(const float *p, int n) {
    if (p[0] != p[0]) return 0;
    FloatVector largest = vector_broadcast(p[0]);
    int i = 0;
    for (; i + FLOAT_LANES <= n; i += FLOAT_LANES) largest = vector_max(vector_load(p + i), largest);
    float best = vector_largest(largest);
    for (; i < n; i++) if (p[i] > best) best = p[i];
    for (i = 0; p[i] != best; i++) {}
    return i;
}

/* Picks the next token from raw logits (left unchanged; the work happens in s->probs). */
int nano_sample(NanoSampler *s, const float *logits) {
    int V = s->vocab_size;
    if (s->temperature <= 0.0f && s->repetition_penalty == 1.0f) return argmax(logits, V);   /* nothing to change */
    float *p = s->probs;
    memcpy(p, logits, sizeof(float) * V);
    if (s->repetition_penalty != 1.0f)   /* sign-aware: a seen token always becomes less likely */
        for (int i = 0; i < V; i++)
            if (s->seen[i]) p[i] = p[i] > 0 ? p[i] / s->repetition_penalty : p[i] * s->repetition_penalty;
    if (s->temperature <= 0.0f) return argmax(p, V);
    for (int i = 0; i < V; i++) p[i] /= s->temperature;
    softmax(p, V, 1.0f);
    float mass;
    int kept = candidates(s, p, &mass);
    float r = random_unit(s) * mass, cumulative = 0.0f;
    for (int i = 0; i < kept; i++) {
        cumulative += p[s->candidates[i]];
        if (r < cumulative) return s->candidates[i];
    }
    return s->candidates[kept - 1];
}

void nano_sample_batch(NanoSampler **samplers, const float *logits, int n, int *next) {
    /* a draw with top-k or top-p takes tens of microseconds at a vocabulary of 16k: worth the other threads */
#pragma omp parallel for schedule(dynamic) if(n > 1)
    for (int i = 0; i < n; i++) {
        next[i] = nano_sample(samplers[i], logits + (size_t)i * samplers[i]->vocab_size);
        nano_sampler_see(samplers[i], next[i]);
    }
}

int nano_decode_batch(NanoState **states, NanoSampler **samplers, int *tokens, int n, int steps, float *logits) {
    if (n < 1 || steps < 1) return -1;
    for (int i = 0; i < n; i++)
        if (states[i]->pos > states[i]->model->config.block_size - steps) return -1;
    int *ones = malloc(sizeof(int) * n);
    if (!ones) return -1;
    for (int i = 0; i < n; i++) ones[i] = 1;
    int err = 0;
    for (int step = 0; step < steps && !err; step++) {
        err = nano_forward_batch(states, tokens + (size_t)step * n, ones, n, logits);
        if (!err) nano_sample_batch(samplers, logits, n, tokens + (size_t)(step + 1) * n);
    }
    free(ones);
    return err;
}

/* ============================================================================ generation */

double nano_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int nano_generate(NanoState *s, NanoSampler *sampler, const int *prompt, int n_prompt, int max_new,
                  NanoTokenCallback callback, void *user, NanoStats *stats) {
    int block = s->model->config.block_size, V = s->model->config.vocab_size, causal = s->model->config.is_causal;
    memset(stats, 0, sizeof *stats);
    if (n_prompt < 1 || n_prompt > block) return -1;
    int *history = malloc(sizeof(int) * ((size_t)n_prompt + (max_new > 0 ? max_new : 0)));
    if (!history) return -1;
    memcpy(history, prompt, sizeof(int) * n_prompt);
    for (int i = 0; i < n_prompt; i++) nano_sampler_see(sampler, prompt[i]);
    stats->prompt_tokens = n_prompt;

    double start = nano_seconds();
    s->pos = 0;
    forward_sequence(s, prompt, n_prompt, causal, s->logits);
    const float *logits = s->logits;
    stats->prefill_seconds = nano_seconds() - start;
    int length = n_prompt;
    for (int step = 0; step < max_new; step++) {
        double sample_start = nano_seconds();
        int token = nano_sample(sampler, logits);
        if (step == 0) stats->first_token_seconds = nano_seconds() - start;
        else stats->decode_seconds += nano_seconds() - sample_start;   /* a decoded token's time is its pass and its draw */
        stats->generated_tokens++;
        int stop = nano_stop_token(s->model, token);
        if ((callback && callback(user, token, logits, V)) || stop || step + 1 == max_new) break;
        history[length++] = token;
        nano_sampler_see(sampler, token);
        double step_start = nano_seconds();
        if (causal && s->pos < block) {
            forward_sequence(s, &token, 1, 1, s->logits);
        } else {   /* from position 0 again, like model.generate: a causal model whose window is full keeps its
                    * last half, a non-causal one runs its last block_size tokens */
            int keep = causal ? (block / 2 > 0 ? block / 2 : 1) : (length < block ? length : block);
            s->pos = 0;
            forward_sequence(s, history + length - keep, keep, causal, s->logits);
        }
        stats->decode_seconds += nano_seconds() - step_start;
        stats->decode_steps++;
    }
    free(history);
    return 0;
}

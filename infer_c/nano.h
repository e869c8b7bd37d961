/*
 * Nano inference engine core: model file, forward pass, tokenizer, sampler, generation.
 *
 * The same sources build the native CLI (main.c, weights read by nano_file_read) and the browser page
 * (Emscripten): every loader takes a buffer in memory, so the caller decides how the bytes arrive.
 * The layout of the files is described in FORMAT.md at the repository root.
 */
#ifndef NANO_H
#define NANO_H

#include <stddef.h>
#include <stdint.h>

#include "bpe.h"

#define NANO_MAGIC0 0x42443453u
#define NANO_MAGIC1 0x55524C4Du
#define NANO_HEADER_BYTES 256
#define NANO_MODEL_MAJOR 2026
#define NANO_MODEL_MINOR 1
#define NANO_LORA_MAJOR 2024
#define NANO_LORA_MINOR 10
#define NANO_TYPE_MODEL 0
#define NANO_TYPE_QWEN2 2                /* Qwen2 / Qwen2.5: q, k, v biases */
#define NANO_TYPE_QWEN3 3                /* Qwen3: q and k RMSNorm per head */
#define NANO_TYPE_LORA 10
#define NANO_QUANT_F32 0x00
#define NANO_QUANT_Q80 0x80
#define NANO_QUANT_Q4K 0x42
#define NANO_FLAG_NON_CAUSAL 0x1u        /* header flags word: full attention (seq2seq) */
#define NANO_DEFAULT_NORM_EPS 1e-5f      /* what 0 in the norm_eps word means */
#define NANO_DEFAULT_ROPE_THETA 10000.0f /* what 0 in the rope_theta word means */
#define NANO_QWEN_NORM_EPS 1e-6f         /* the same for a Qwen file */
#define NANO_QWEN_ROPE_THETA 1e6f

enum { NANO_PAD = 0, NANO_UNKNOWN = 1, NANO_BOS = 2, NANO_EOS = 3, NANO_INSTRUCT = 4, NANO_RESPONSE = 5 };

typedef struct {
    int block_size, vocab_size, n_layer, n_embd, n_head, n_kv_head, n_hidden;
    int is_shared_classifier, head_dim, quant_type, group_size;
    int is_causal;            /* 0 when the flags word asks for full attention */
    float norm_eps;           /* RMSNorm eps, the file's or the default */
    float rope_theta;         /* RoPE base, the file's or the default */
    int model_type;           /* NANO_TYPE_MODEL, NANO_TYPE_QWEN2 or NANO_TYPE_QWEN3 */
} NanoConfig;

#define NANO_Q4K_BLOCK 256         /* elements of a Q4K block; a row is ceil(cols / 256) blocks */
#define NANO_Q4K_BLOCK_BYTES 160

/* A weight matrix [rows, cols]: float32 data, Q80 int8 values with one scale per group, or Q4K blocks. */
typedef struct {
    const float *f32;
    const int8_t *q;
    const float *scale;
    const uint8_t *q4k;
    int rows, cols;
    int tiled;   /* Q80 or Q4K rearranged into tiles of 16 rows by nano_model_tile */
} NanoMatrix;

typedef struct {
    const float *attn_norm, *ffn_norm;
    NanoMatrix wq, wk, wv, wo, w1, w2, w3;
    const float *q_bias, *k_bias, *v_bias;   /* Qwen2, else NULL */
    const float *q_norm, *k_norm;            /* Qwen3: RMSNorm weights [head_dim] of every q and k head, else NULL */
} NanoLayer;

/* A Nano file's vocabulary is matched greedily (the trie tokenizer of tokenizer.py), a Qwen file's is a
 * byte-level BPE (bpe.h). */
enum { NANO_TOKENIZER_TRIE, NANO_TOKENIZER_BPE };

typedef struct {
    int kind;
    int vocab_size;
    NanoBPE bpe;              /* NANO_TOKENIZER_BPE; the rest is the trie's */
    const uint32_t **chars;   /* code points of each token (pointers into the model buffer) */
    uint8_t *length;          /* code points per token */
    int32_t *entry_table;     /* open-addressing hash: token id + 1, 0 = empty */
    uint32_t entry_mask;
    uint32_t *first_char;     /* hash of first code point -> longest entry starting with it */
    uint8_t *first_longest;   /* 0 = empty slot */
    uint32_t first_mask;
} NanoTokenizer;

typedef struct {
    NanoConfig config;
    int q_dim, kv_dim;        /* n_head * head_dim, n_kv_head * head_dim */
    NanoLayer *layers;
    const float *final_norm;
    NanoMatrix embedding, classifier;
    const float *rope_cos, *rope_sin;   /* [block_size, head_dim / 2] */
    float *rope_computed;     /* the tables when the file's do not serve (a Qwen file's), else NULL */
    void *placed_copy;        /* the file, when the caller's buffer left its parameters unaligned, else NULL */
    NanoTokenizer tokenizer;
    int stop_tokens[2];       /* generation ends at these: <|eos|> and <|padding|>, Qwen's <|endoftext|> and <|im_end|> */
    int n_stop_tokens;
} NanoModel;

/* Side branches y += scaling * B (A x) on wq, wk, wv, wo; matrices stay in the adapter buffer. */
enum { LORA_WQ, LORA_WK, LORA_WV, LORA_WO, LORA_TARGETS };
typedef struct {
    int rank, alpha;
    float scaling;
    int in_dim[LORA_TARGETS], out_dim[LORA_TARGETS];
    const float *a[LORA_TARGETS];   /* per target: n_layer x [rank, in] */
    const float *b[LORA_TARGETS];   /* per target: n_layer x [out, rank] */
} NanoLora;

/* Quantized activations: int8, but int16 in WebAssembly, whose SIMD has no 8-bit dot product: widened once
 * as they are quantized, not in the dot of every weight row. */
#if defined(__wasm_simd128__)
typedef int16_t NanoActivation;
#else
typedef int8_t NanoActivation;
#endif

/* Activations and KV cache for one sequence of up to block_size positions. */
typedef struct {
    const NanoModel *model;
    const NanoLora *lora;
    int pos;                  /* positions held in the KV cache */
    float *x, *xb, *xb2, *q, *hb, *hb2, *att, *logits;
    float *k, *v;             /* a pass's keys and values, before they go to the caches of their sequences */
    NanoActivation *act_q;    /* activations quantized for Q80 and Q4K matmuls */
    float *act_scale;
    int32_t *act_group_sum;   /* Q4K: the sum of each group of 32 quantized activations */
    void *key_cache, *value_cache;    /* per layer and KV head: keys [head_dim, context], values [context, head_dim];
                                         float16 for quantized models, else float32 */
    float *lora_hidden;       /* [block_size, rank] */
    int lora_capacity;
} NanoState;

typedef struct {
    float temperature;        /* 0 = greedy */
    int top_k;                /* 0 = off */
    float top_p;              /* 1 = off */
    float repetition_penalty; /* 1 = off */
    uint64_t rng;
    int vocab_size;
    uint8_t *seen;            /* tokens already in the context */
    int *candidates;
    float *probs;
    struct NanoRanked { float p; int id; } *ranked;   /* room to sort candidates by probability */
} NanoSampler;

/* Called with each sampled token (the last may be the stop token) and the raw logits it came from.
 * Return 0 to go on, nonzero to stop. */
typedef int (*NanoTokenCallback)(void *user, int token, const float *logits, int vocab_size);

/* decode_seconds: the passes of the decode_steps and the draws of the tokens they made (the callback's time
 * apart) */
typedef struct {
    int prompt_tokens, generated_tokens, decode_steps;
    double prefill_seconds, first_token_seconds, decode_seconds;
} NanoStats;

/* Loaders validate everything and return 0, or -1 with a message naming the file and field in err.
 * The buffer must stay alive while the model or adapter is in use, and an adapter's be 4-byte aligned. A model
 * file's parameters must be 4-byte aligned in memory: a Nano file's when the buffer is, a Qwen file's (its
 * tokenizer section has any length) when the buffer's address is nano_model_placement(file) modulo 4, which
 * nano_file_read arranges (a memory map cannot); otherwise the loader works on a copy. */
size_t nano_model_placement(const void *start, size_t n);   /* from the file's first 260 bytes; 0..3 */

/* A file read whole into memory (a model file at its placement, so that nano_model_load need not copy it),
 * in 2 MB pages where the system grants them; a file larger than half the physical memory is mapped. */
typedef struct {
    void *data;
    size_t size;
    void *base;               /* the allocation, or NULL when mapped */
    int mapped;
} NanoFile;
int nano_file_read(NanoFile *f, const char *path, int is_model, char *err, size_t err_cap);   /* 0, or -1 with err */
void nano_file_free(NanoFile *f);
int nano_model_load(NanoModel *m, const void *data, size_t size, const char *name, char *err, size_t err_cap);
void nano_model_free(NanoModel *m);
/* Run the model with a context of at most n positions (from now on: states made later hold n positions of
 * KV cache); the file's RoPE tables keep their longer rows. */
void nano_model_limit_context(NanoModel *m, int n);
/* Rearrange the model's Q80 or Q4K matrices in place, in the buffer it was loaded from (which must be writable and
 * the model's alone: not a mapped file), into tiles of 16 rows that the AVX-512 VNNI kernels multiply
 * several times faster in batches; every other build leaves them as they are. Results are unchanged but for
 * float rounding. Returns how many matrices it tiled (those with rows a multiple of 16, when there is memory
 * for a copy of each in turn). */
int nano_model_tile(NanoModel *m);
int nano_lora_load(NanoLora *lora, const NanoModel *m, const void *data, size_t size, const char *name,
                   char *err, size_t err_cap);

extern const size_t nano_model_size, nano_lora_size, nano_state_size, nano_sampler_size;   /* sizeof each */
size_t nano_state_bytes(const NanoModel *m);
int nano_state_init(NanoState *s, const NanoModel *m);
void nano_state_free(NanoState *s);
int nano_state_attach_lora(NanoState *s, const NanoLora *lora);   /* NULL detaches */

/* float32 to IEEE half (round to nearest even, saturating at +-65504, NaN kept) and back (exact): the KV
 * cache's element type for quantized models, stored alike by every build. */
uint16_t nano_half_of(float f);
float nano_float_of_half(uint16_t h);

/* Run tokens at positions s->pos .. s->pos+n-1, each seeing the positions before it (causal) or all
 * of them (non-causal, from pos 0); afterwards nano_logits(s, t) gives the logits of the t-th token.
 * Pass s->model->config.is_causal unless the caller knows better (old files do not record it).
 * Returns -1 (and does nothing) when the tokens do not fit in block_size. */
int nano_forward(NanoState *s, const int *tokens, int n, int causal);
float *nano_logits(NanoState *s, int t);

/* One causal forward pass of n sequences at once (a server's concurrent requests): counts[i] tokens of states[i]
 * (a prompt, or the one token of a decoding step) at its positions states[i]->pos.., tokens holding them one
 * sequence after another; each with its own KV cache and adapter. logits[i * vocab_size ...] receives the
 * logits after its last token. The weights are read once for all the tokens. The states are distinct and share
 * one model, every sequence fits its context and the counts sum to at most block_size; otherwise returns -1
 * and does nothing. */
int nano_forward_batch(NanoState **states, const int *tokens, const int *counts, int n, float *logits);

/* Row `row` of a weight matrix as float32 (dequantized as the matmuls see it) into out[cols]. */
void nano_matrix_row(const NanoModel *m, const NanoMatrix *w, int row, float *out);

int *nano_encode(const NanoTokenizer *t, const char *text, int *n_ids);   /* malloc'ed, NULL on OOM */
/* The text of a token into buf (NUL-terminated, cut at cap); returns its length. A BPE token's bytes may end
 * inside a character: text shown as it is generated goes through a NanoTextStream. */
int nano_token_utf8(const NanoTokenizer *t, int id, char *buf, size_t cap);

/* Generated text as whole UTF-8 characters: the bytes of a character that a token leaves unfinished wait for
 * the next token, bytes that cannot be UTF-8 become U+FFFD (as Python's decoder with errors="replace"). */
typedef struct {
    char held[3];
    int n_held;
} NanoTextStream;

#define NANO_TOKEN_TEXT_MAX 1024   /* bytes of a token's text a stream shows (the rest is cut) */
#define NANO_STREAM_TEXT_CAP (3 * (3 + NANO_TOKEN_TEXT_MAX) + 1)   /* a buffer that always holds what a token gives */

/* The text a token completes, into buf (NUL-terminated, cut at cap); returns its length. A stream starts zeroed. */
int nano_stream_token(NanoTextStream *s, const NanoTokenizer *t, int id, char *buf, size_t cap);
/* The end of the text: a character still unfinished becomes U+FFFD (cap at least 4); the stream starts again. */
int nano_stream_flush(NanoTextStream *s, char *buf, size_t cap);

int nano_stop_token(const NanoModel *m, int id);

/* A chat turn's prompt for question into *ids (malloc'ed), *n ids: a Nano model's
 * <|instruct_mark|>question<|response_mark|>; a Qwen model's
 * <|im_start|>user\nquestion<|im_end|>\n<|im_start|>assistant\n, for Qwen3 with an empty thought after it
 * (<think>\n\n</think>\n\n) unless thinking. Returns 0, -1 out of memory, or NANO_NO_CHAT_TOKENS when the
 * vocabulary has no <|im_start|> or <|im_end|>. */
#define NANO_NO_CHAT_TOKENS (-2)
int nano_chat_prompt(const NanoModel *m, const char *question, int thinking, int **ids, int *n);
/* What closes an answer before the next turn of a conversation: <|eos|>, or Qwen's <|im_end|>\n. Same returns. */
int nano_chat_answer_end(const NanoModel *m, int **ids, int *n);

int nano_sampler_init(NanoSampler *s, int vocab_size, float temperature, int top_k, float top_p,
                      float repetition_penalty, uint64_t seed);
void nano_sampler_free(NanoSampler *s);
void nano_sampler_see(NanoSampler *s, int token);
int nano_sample(NanoSampler *s, const float *logits);   /* logits are left unchanged */
/* next[i] = nano_sample(samplers[i], logits + i * vocab_size) for the n rows of a batch's logits, in one call;
 * each sampler then sees its token, as nano_generate's does (the next draw's history holds it) */
void nano_sample_batch(NanoSampler **samplers, const float *logits, int n, int *next);
/* steps decoding steps of n sequences, each step's draws the next one's inputs: tokens[0 .. n) are the first
 * inputs, and step s's draws go to tokens[(s + 1) n .. (s + 2) n), so tokens holds (steps + 1) n. One call for
 * what would otherwise be a caller's round trip per step (serve.py's, between passes of a few milliseconds).
 * Returns -1, having run nothing, when a sequence has no room left for steps more positions. */
int nano_decode_batch(NanoState **states, NanoSampler **samplers, int *tokens, int n, int steps, float *logits);

/* Prefill the prompt, then sample up to max_new tokens, stopping at a stop token (nano_stop_token). When the
 * cache is full, the last block_size/2 tokens are prefilled again from position 0. A non-causal model
 * has no usable cache (every position sees the new token): each step runs its last block_size tokens. */
int nano_generate(NanoState *s, NanoSampler *sampler, const int *prompt, int n_prompt, int max_new,
                  NanoTokenCallback callback, void *user, NanoStats *stats);

double nano_seconds(void);

/* What every Nano front end does when not told otherwise: the CLI (main.c), the browser page (wasm_api.c
 * hands these to it) and infer.py (SAMPLING_DEFAULTS and answer_room there). tests/test_frontends.py
 * checks that all three generate the same text with them. */
#define NANO_DEFAULT_TEMPERATURE 0.8f          /* 0 = greedy */
#define NANO_DEFAULT_TOP_K 20                  /* 0 = off */
#define NANO_DEFAULT_TOP_P 0.95f               /* 1 = off */
#define NANO_DEFAULT_REPETITION_PENALTY 1.1f   /* 1 = off */
#define NANO_DEFAULT_MAX_NEW 0                 /* 0 = until the context is full */
/* The most positions a front end gives a model unless told otherwise (infer.py's CONTEXT_LIMIT): a Qwen
 * model's own 32768-40960 would need gigabytes of KV cache per sequence. */
#define NANO_CONTEXT_LIMIT 4096

/* New tokens to generate after a prompt of n_prompt: the number asked for, or (asked 0) as many as the
 * context has room for, like infer.py, whose -s (prompt + answer) defaults to the context. */
static inline int nano_max_new_tokens(int asked, int n_prompt, int block_size) {
    return asked > 0 ? asked : block_size - n_prompt;
}

/* Positions of the context a conversation keeps free for the next answer: a quarter. */
static inline int nano_answer_room(int block_size) {
    return block_size / 4 > 0 ? block_size / 4 : 1;
}

#endif

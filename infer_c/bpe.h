/*
 * Byte-level BPE tokenizer of Qwen2 / Qwen3 model files (model_type 2 and 3; FORMAT.md, "Qwen models"),
 * the same algorithm as tokenizer.py's BPETokenizer: added tokens matched in the text first, Qwen2's
 * pre-tokenizer split (a hand-written scanner of its regex), then BPE inside each piece with the merges
 * rebuilt from the scores. Text is UTF-8; a byte that is not part of valid UTF-8 is a character of its
 * own (of no letter, number or space class). Not done, as in tokenizer.py: the reference tokenizer's NFC
 * normalization, so text that is not in NFC can get other ids than the reference's.
 */
#ifndef NANO_BPE_H
#define NANO_BPE_H

#include <stddef.h>
#include <stdint.h>

#define NANO_BPE_MAX_TOKEN_BYTES 65536   /* a longer record is corrupt (tokens have a few hundred bytes at most) */

typedef struct {
    int left, right, rank, merged;   /* left = -1: empty slot */
} NanoBPEMerge;

typedef struct {
    int vocab_size;
    const uint8_t **bytes;    /* raw bytes of each token (into the records buffer) */
    int *length;              /* bytes per token, 0 for an unused id */
    int byte_id[256];         /* id of the one-byte token of each byte value */
    NanoBPEMerge *merges;     /* open-addressing hash of (left, right) -> (rank, merged) */
    uint32_t merge_mask;
    int n_merges;
    int *special;             /* ids of the added tokens, longest first */
    int n_special;
} NanoBPE;

extern const size_t nano_bpe_size;   /* sizeof(NanoBPE), for callers through ctypes */

/* records: the tokenizer section after its two u32 words (vocab_size records of f32 score, u32 n, n bytes).
 * Validates them and rebuilds the merges; returns 0, or -1 with a message in err. The records buffer must
 * stay alive while the tokenizer is in use. */
int nano_bpe_load(NanoBPE *t, const uint8_t *records, size_t size, int vocab_size, char *err, size_t err_cap);
void nano_bpe_free(NanoBPE *t);

/* The ids of a NUL-terminated UTF-8 text, malloc'ed (the caller frees them); NULL when out of memory. */
int *nano_bpe_encode(const NanoBPE *t, const char *text, int *n_ids);

/* Token id's bytes (into the records buffer) and their number; -1 for an id outside the vocabulary. */
int nano_bpe_token_bytes(const NanoBPE *t, int id, const uint8_t **bytes);

/* The id of the added token whose text is exactly text (e.g. "<|im_end|>"), -1 if there is none. */
int nano_bpe_special_id(const NanoBPE *t, const char *text);

/* The length of the longest prefix of buf that does not end inside an unfinished UTF-8 character: what a
 * stream of token bytes can print now, holding back the start of a character the next token completes.
 * A byte sequence that no continuation can make valid is not held back. */
size_t nano_utf8_complete(const uint8_t *buf, size_t n);

#endif

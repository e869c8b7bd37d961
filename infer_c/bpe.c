/*
 * Byte-level BPE of Qwen2 / Qwen3 model files: see bpe.h. Sections: UTF-8, character classes, the
 * pre-tokenizer split, BPE inside a piece, loading (merges rebuilt from the scores), encoding.
 */
#include "bpe.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "unicode_classes.h"

const size_t nano_bpe_size = sizeof(NanoBPE);

/* ------------------------------------------------------------------ UTF-8 */

/* The length of the UTF-8 sequence a lead byte starts (0 if it starts none) and the range its second byte
 * must lie in (narrower after E0, ED, F0, F4: no overlong forms, surrogates or code points past U+10FFFF). */
static int utf8_lead(uint8_t lead, uint8_t *second_lo, uint8_t *second_hi) {
    *second_lo = 0x80;
    *second_hi = 0xBF;
    if (lead < 0x80) return 1;
    if (lead < 0xC2) return 0;
    if (lead < 0xE0) return 2;
    if (lead < 0xF0) {
        if (lead == 0xE0) *second_lo = 0xA0;
        if (lead == 0xED) *second_hi = 0x9F;
        return 3;
    }
    if (lead < 0xF5) {
        if (lead == 0xF0) *second_lo = 0x90;
        if (lead == 0xF4) *second_hi = 0x8F;
        return 4;
    }
    return 0;
}

/* The length of the valid UTF-8 character at s[0..n) and its code point; 0 if none starts there. */
static int utf8_char(const uint8_t *s, size_t n, uint32_t *cp) {
    uint8_t lo, hi;
    int len = utf8_lead(s[0], &lo, &hi);
    if (len == 0 || (size_t)len > n) return 0;
    if (len > 1 && (s[1] < lo || s[1] > hi)) return 0;
    uint32_t c = len == 1 ? s[0] : s[0] & (0x7Fu >> len);
    for (int k = 1; k < len; k++) {
        if ((s[k] & 0xC0) != 0x80) return 0;
        c = c << 6 | (s[k] & 0x3Fu);
    }
    *cp = c;
    return len;
}

static int is_utf8(const uint8_t *s, size_t n) {
    uint32_t cp;
    for (size_t i = 0; i < n;) {
        int len = utf8_char(s + i, n - i, &cp);
        if (len == 0) return 0;
        i += (size_t)len;
    }
    return 1;
}

size_t nano_utf8_complete(const uint8_t *buf, size_t n) {
    /* the last character's lead byte is at most 3 bytes back, behind continuation bytes */
    for (size_t back = 1; back <= 3 && back <= n; back++) {
        size_t start = n - back;
        if ((buf[start] & 0xC0) == 0x80) continue;
        uint8_t lo, hi;
        int len = utf8_lead(buf[start], &lo, &hi);
        if (len <= (int)back) return n;                                       /* complete, or never valid */
        if (back >= 2 && (buf[start + 1] < lo || buf[start + 1] > hi)) return n;   /* can never become valid */
        return start;
    }
    return n;
}

/* ------------------------------------------------------------------ character classes */

enum { LETTER, NUMBER, SPACE, OTHER };
#define NOT_A_CHAR 0x110000u   /* the code point given to a byte that is not valid UTF-8 */

static int in_ranges(const uint32_t (*ranges)[2], size_t n, uint32_t cp) {
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (cp < ranges[mid][0]) hi = mid;
        else if (cp > ranges[mid][1]) lo = mid + 1;
        else return 1;
    }
    return 0;
}

#define IN_CLASS(table, cp) in_ranges(table, sizeof(table) / sizeof(table[0]), cp)

/* \p{L}, \p{N}, \s or anything else, as the split's regex sees the character (tokenizer.char_class) */
static int char_class(uint32_t cp) {
    if (IN_CLASS(nano_space_ranges, cp)) return SPACE;
    if (IN_CLASS(nano_letter_ranges, cp)) return LETTER;
    if (IN_CLASS(nano_number_ranges, cp)) return NUMBER;
    return OTHER;
}

/* ------------------------------------------------------------------ pre-tokenizer split */

/* A text decoded once: code point, class and byte offset of each character (offset[n] = byte length). */
typedef struct {
    const uint8_t *bytes;
    uint32_t *cp;
    uint8_t *cls;
    size_t *offset;
    int n;
} Chars;

static int is_newline(uint32_t cp) { return cp == '\r' || cp == '\n'; }

/* case folding for (?i:...): only ASCII letters and U+017F (long s, which folds to s) matter here */
static uint32_t fold(uint32_t cp) {
    if (cp >= 'A' && cp <= 'Z') return cp + ('a' - 'A');
    return cp == 0x17F ? 's' : cp;
}

/* Length of the match of (?i:'s|'t|'re|'ve|'m|'ll|'d) at character i, 0 if none. */
static int contraction_length(const Chars *x, int i, int end) {
    static const char *const suffixes[] = {"re", "ve", "ll", "s", "t", "m", "d"};
    if (x->cp[i] != '\'') return 0;
    for (size_t s = 0; s < sizeof(suffixes) / sizeof(suffixes[0]); s++) {
        int len = (int)strlen(suffixes[s]), k = 0;
        while (k < len && i + 1 + k < end && fold(x->cp[i + 1 + k]) == (uint32_t)suffixes[s][k]) k++;
        if (k == len) return 1 + len;
    }
    return 0;
}

static int run_end(const Chars *x, int i, int end, int cls) {
    while (i < end && x->cls[i] == cls) i++;
    return i;
}

/* Where the piece that starts at character i ends (end: the end of the text between added tokens): the
 * match of the first alternative of Qwen2's split regex that matches there, with the regex engine's greedy
 * matching and backtracking spelled out (tokenizer.piece_end). */
static int piece_end(const Chars *x, int i, int end) {
    int k = contraction_length(x, i, end);                            /* (?i:'s|'t|'re|'ve|'m|'ll|'d) */
    if (k) return i + k;
    uint32_t c = x->cp[i];
    int cls = x->cls[i], following = i + 1 < end ? x->cls[i + 1] : -1;
    if (cls == LETTER) return run_end(x, i, end, LETTER);           /* [^\r\n\p{L}\p{N}]?\p{L}+ */
    if (cls != NUMBER && !is_newline(c) && following == LETTER) return run_end(x, i + 1, end, LETTER);
    if (cls == NUMBER) return i + 1;                                  /* \p{N} */
    int start = c == ' ' && following == OTHER ? i + 1 : i;           /* ' ?[^\s\p{L}\p{N}]+[\r\n]*' */
    if (x->cls[start] == OTHER) {
        int e = run_end(x, start, end, OTHER);
        while (e < end && is_newline(x->cp[e])) e++;
        return e;
    }
    int e = run_end(x, i, end, SPACE);                                /* here character i is white space */
    for (int last = e - 1; last >= i; last--)
        if (is_newline(x->cp[last])) return last + 1;                 /* \s*[\r\n]+ */
    if (e == end || e - i == 1) return e;                             /* \s+(?!\S) at the end, or \s+ */
    return e - 1;                                                     /* \s+(?!\S): one before \S */
}

/* ------------------------------------------------------------------ BPE inside a piece */

static uint32_t pair_hash(int left, int right, uint32_t mask) {
    uint64_t key = (uint64_t)(uint32_t)left << 32 | (uint32_t)right;
    return (uint32_t)((key * 0x9E3779B97F4A7C15ull) >> 32) & mask;
}

/* The rank of the merge of (left, right) and the token it makes; -1 if no merge joins them. */
static int merge_rank(const NanoBPE *t, int left, int right, int *merged) {
    for (uint32_t h = pair_hash(left, right, t->merge_mask);; h = (h + 1) & t->merge_mask) {
        const NanoBPEMerge *m = &t->merges[h];
        if (m->left < 0) return -1;
        if (m->left == left && m->right == right) {
            *merged = m->merged;
            return m->rank;
        }
    }
}

static void add_merge(NanoBPE *t, int left, int right, int merged) {
    uint32_t h = pair_hash(left, right, t->merge_mask);
    while (t->merges[h].left >= 0) h = (h + 1) & t->merge_mask;
    t->merges[h] = (NanoBPEMerge){left, right, t->n_merges++, merged};
}

/* A candidate merge: the pair whose left symbol is at pos, when it held the tokens left and right, and
 * the token the merge makes. */
typedef struct { int rank, pos, left, right, merged; } Candidate;

/* Working memory of bpe_piece. */
typedef struct {
    int *id, *next, *prev;   /* the piece's symbols as a linked list over byte positions; id -1 = merged away */
    Candidate *heap;         /* at most 3 per byte: the first pairs, then 2 per merge */
} Scratch;

/* for pieces of up to capacity bytes */
static int scratch_init(Scratch *s, int capacity) {
    s->id = malloc(sizeof(int) * (size_t)capacity * 3);
    s->heap = malloc(sizeof(Candidate) * (size_t)capacity * 3);
    s->next = s->id ? s->id + capacity : NULL;
    s->prev = s->id ? s->id + 2 * (size_t)capacity : NULL;
    return s->id && s->heap ? 0 : -1;
}

static void scratch_free(Scratch *s) {
    free(s->id);
    free(s->heap);
}

static int candidate_before(const Candidate *a, const Candidate *b) {
    return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

static void heap_push(Candidate *heap, int *n, Candidate c) {
    int k = (*n)++;
    while (k > 0 && candidate_before(&c, &heap[(k - 1) / 2])) {
        heap[k] = heap[(k - 1) / 2];
        k = (k - 1) / 2;
    }
    heap[k] = c;
}

static Candidate heap_pop(Candidate *heap, int *n) {
    Candidate top = heap[0], last = heap[--(*n)];
    int k = 0;
    for (;;) {
        int child = 2 * k + 1;
        if (child >= *n) break;
        if (child + 1 < *n && candidate_before(&heap[child + 1], &heap[child])) child++;
        if (!candidate_before(&heap[child], &last)) break;
        heap[k] = heap[child];
        k = child;
    }
    heap[k] = last;
    return top;
}

static void push_pair(const NanoBPE *t, Scratch *s, int *n_heap, int pos, int len) {
    if (pos < 0 || s->next[pos] >= len) return;
    int right = s->next[pos], merged;
    int rank = merge_rank(t, s->id[pos], s->id[right], &merged);
    if (rank >= 0) heap_push(s->heap, n_heap, (Candidate){rank, pos, s->id[pos], s->id[right], merged});
}

/* The ids of one piece's bytes into out: merge the adjacent pair of the lowest rank, leftmost first, until
 * no pair has a merge (a heap of candidate pairs; a candidate whose symbols have changed is stale).
 * Returns the number of ids. */
static int bpe_piece(const NanoBPE *t, const uint8_t *bytes, int len, Scratch *s, int *out) {
    int n_heap = 0;
    for (int k = 0; k < len; k++) {
        s->id[k] = t->byte_id[bytes[k]];
        s->next[k] = k + 1;
        s->prev[k] = k - 1;
    }
    for (int k = 0; k + 1 < len; k++) push_pair(t, s, &n_heap, k, len);
    while (n_heap > 0) {
        Candidate c = heap_pop(s->heap, &n_heap);
        int right = s->next[c.pos];
        if (s->id[c.pos] != c.left || right >= len || s->id[right] != c.right) continue;
        s->id[c.pos] = c.merged;
        s->id[right] = -1;
        s->next[c.pos] = s->next[right];
        if (s->next[right] < len) s->prev[s->next[right]] = c.pos;
        push_pair(t, s, &n_heap, s->prev[c.pos], len);
        push_pair(t, s, &n_heap, c.pos, len);
    }
    int n = 0;
    for (int k = 0; k < len; k = s->next[k]) out[n++] = s->id[k];
    return n;
}

/* ------------------------------------------------------------------ loading */

typedef struct { float key; int id; } Keyed;

/* larger key first, then smaller id */
static int key_descending(const void *a, const void *b) {
    const Keyed *x = a, *y = b;
    if (x->key != y->key) return x->key > y->key ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

/* The original's writer stores the NUL byte's token as 0x07 (a bug; this toolkit writes 0x00). Its byte
 * tokens come in the byte-level BPE's order (NUL is U+0100, before 0x07's U+0107), so when two records hold
 * 0x07 and none 0x00, the first one is NUL. */
static void undo_nul_substitution(NanoBPE *t) {
    static const uint8_t nul = 0;
    int first_bell = -1;
    for (int i = 0; i < t->vocab_size; i++)
        if (t->length[i] == 1 && t->bytes[i][0] == 0) return;
    for (int i = 0; i < t->vocab_size; i++) {
        if (t->length[i] != 1 || t->bytes[i][0] != 7) continue;
        if (first_bell >= 0) {
            t->bytes[first_bell] = &nul;
            return;
        }
        first_bell = i;
    }
}

/* Rebuild the merges from the ranks (tokenizer.py's merges_from_scores): the merge that made token t of rank
 * r joined the two tokens that BPE with the merges of rank < r leaves of t's own bytes; t gets no merge when
 * more remain. */
static int rebuild_merges(NanoBPE *t, const float *scores, int max_length) {
    int n_made = 0, ok = 0;
    Keyed *made = malloc(sizeof(Keyed) * (size_t)t->vocab_size);   /* key: the score, -(1 + rank) */
    int *parts = malloc(sizeof(int) * (size_t)max_length);
    Scratch s = {0};
    if (made && parts && scratch_init(&s, max_length) == 0) {
        for (int i = 0; i < t->vocab_size; i++)
            if (scores[i] < 0 && t->length[i] > 1) made[n_made++] = (Keyed){scores[i], i};
        qsort(made, (size_t)n_made, sizeof(Keyed), key_descending);
        uint32_t capacity = 16;
        while (capacity < 2u * (uint32_t)n_made) capacity *= 2;
        t->merges = malloc(sizeof(NanoBPEMerge) * capacity);
        if (t->merges) {
            t->merge_mask = capacity - 1;
            for (uint32_t h = 0; h < capacity; h++) t->merges[h].left = -1;
            for (int k = 0; k < n_made; k++) {
                int id = made[k].id;
                if (bpe_piece(t, t->bytes[id], t->length[id], &s, parts) == 2) add_merge(t, parts[0], parts[1], id);
            }
            ok = 1;
        }
    }
    scratch_free(&s);
    free(made);
    free(parts);
    return ok ? 0 : -1;
}

/* The added tokens (score 0, more than one byte: no merge makes them) into t->special, longest first. */
static int find_special(NanoBPE *t, const float *scores, char *err, size_t err_cap) {
    Keyed *found = malloc(sizeof(Keyed) * (size_t)t->vocab_size);   /* key: the length */
    t->special = malloc(sizeof(int) * (size_t)t->vocab_size);
    if (!found || !t->special) {
        free(found);
        snprintf(err, err_cap, "tokenizer: out of memory for %d tokens", t->vocab_size);
        return -1;
    }
    for (int i = 0; i < t->vocab_size; i++) {
        if (scores[i] != 0 || t->length[i] < 2) continue;
        if (!is_utf8(t->bytes[i], (size_t)t->length[i])) {
            free(found);
            snprintf(err, err_cap, "tokenizer record %d: an added token (score 0, %d bytes) that is not UTF-8 text",
                     i, t->length[i]);
            return -1;
        }
        found[t->n_special++] = (Keyed){(float)t->length[i], i};
    }
    qsort(found, (size_t)t->n_special, sizeof(Keyed), key_descending);
    for (int k = 0; k < t->n_special; k++) t->special[k] = found[k].id;
    free(found);
    return 0;
}

/* Each record's bytes, length and score; the longest length, or -1 with a message in err. */
static int read_records(NanoBPE *t, const uint8_t *records, size_t size, float *scores, char *err, size_t err_cap) {
    size_t offset = 0;
    int max_length = 1;
    for (int i = 0; i < t->vocab_size; i++) {
        uint32_t n;
        if (size - offset < 8) {
            snprintf(err, err_cap, "tokenizer record %d of %d runs past the section's end (%zu bytes of records)",
                     i, t->vocab_size, size);
            return -1;
        }
        memcpy(&scores[i], records + offset, 4);
        memcpy(&n, records + offset + 4, 4);
        if (n > size - offset - 8 || n > NANO_BPE_MAX_TOKEN_BYTES) {
            snprintf(err, err_cap, "tokenizer record %d: length %u %s", i, n,
                     n > NANO_BPE_MAX_TOKEN_BYTES ? "is more than any token's (at most 65536 bytes)"
                                                  : "runs past the section's end");
            return -1;
        }
        if (!(isfinite(scores[i]) && scores[i] <= 0)) {
            snprintf(err, err_cap, "tokenizer record %d: score %g is not 0 or negative", i, scores[i]);
            return -1;
        }
        t->bytes[i] = records + offset + 8;
        t->length[i] = (int)n;
        if ((int)n > max_length) max_length = (int)n;
        offset += 8 + (size_t)n;
    }
    return max_length;
}

/* byte value -> id of its one-byte token; a byte-level BPE has all 256 */
static int find_byte_tokens(NanoBPE *t, char *err, size_t err_cap) {
    for (int b = 0; b < 256; b++) t->byte_id[b] = -1;
    for (int i = 0; i < t->vocab_size; i++)
        if (t->length[i] == 1 && t->byte_id[t->bytes[i][0]] < 0) t->byte_id[t->bytes[i][0]] = i;
    for (int b = 0; b < 256; b++)
        if (t->byte_id[b] < 0) {
            snprintf(err, err_cap, "tokenizer: no token for byte 0x%02x: not a byte-level BPE vocabulary", b);
            return -1;
        }
    return 0;
}

int nano_bpe_load(NanoBPE *t, const uint8_t *records, size_t size, int vocab_size, char *err, size_t err_cap) {
    memset(t, 0, sizeof *t);
    if (vocab_size <= 0) {
        snprintf(err, err_cap, "tokenizer: vocab_size %d is not positive", vocab_size);
        return -1;
    }
    t->vocab_size = vocab_size;
    t->bytes = malloc(sizeof(uint8_t *) * (size_t)vocab_size);
    t->length = malloc(sizeof(int) * (size_t)vocab_size);
    float *scores = malloc(sizeof(float) * (size_t)vocab_size);
    int max_length = -1, ok = 0;
    if (!t->bytes || !t->length || !scores)
        snprintf(err, err_cap, "tokenizer: out of memory for %d tokens", vocab_size);
    else if ((max_length = read_records(t, records, size, scores, err, err_cap)) > 0) {
        undo_nul_substitution(t);
        ok = find_byte_tokens(t, err, err_cap) == 0 && find_special(t, scores, err, err_cap) == 0;
        if (ok && rebuild_merges(t, scores, max_length) != 0) {
            snprintf(err, err_cap, "tokenizer: out of memory rebuilding the merges of %d tokens", vocab_size);
            ok = 0;
        }
    }
    free(scores);
    if (!ok) nano_bpe_free(t);
    return ok ? 0 : -1;
}

void nano_bpe_free(NanoBPE *t) {
    free(t->bytes);
    free(t->length);
    free(t->merges);
    free(t->special);
    memset(t, 0, sizeof *t);
}

/* ------------------------------------------------------------------ encoding */

int nano_bpe_token_bytes(const NanoBPE *t, int id, const uint8_t **bytes) {
    if (id < 0 || id >= t->vocab_size) return -1;
    *bytes = t->bytes[id];
    return t->length[id];
}

int nano_bpe_special_id(const NanoBPE *t, const char *text) {
    size_t n = strlen(text);
    for (int k = 0; k < t->n_special; k++) {
        int id = t->special[k];
        if ((size_t)t->length[id] == n && memcmp(t->bytes[id], text, n) == 0) return id;
    }
    return -1;
}

/* The added token that starts at byte p of the text (the longest one), -1 if none. */
static int special_at(const NanoBPE *t, const uint8_t *text, size_t n, size_t p) {
    for (int k = 0; k < t->n_special; k++) {
        int id = t->special[k];
        size_t len = (size_t)t->length[id];
        if (len <= n - p && t->bytes[id][0] == text[p] && memcmp(t->bytes[id], text + p, len) == 0) return id;
    }
    return -1;
}

static int decode_chars(Chars *x, const uint8_t *bytes, size_t n) {
    x->bytes = bytes;
    x->cp = malloc(sizeof(uint32_t) * (n + 1));
    x->cls = malloc(n + 1);
    x->offset = malloc(sizeof(size_t) * (n + 1));
    if (!x->cp || !x->cls || !x->offset) return -1;
    x->n = 0;
    for (size_t p = 0; p < n;) {
        uint32_t cp;
        int len = utf8_char(bytes + p, n - p, &cp);
        if (len == 0) {   /* not UTF-8: the byte is a character of its own, of no class */
            cp = NOT_A_CHAR;
            len = 1;
        }
        x->cp[x->n] = cp;
        x->cls[x->n] = cp == NOT_A_CHAR ? OTHER : (uint8_t)char_class(cp);
        x->offset[x->n++] = p;
        p += (size_t)len;
    }
    x->offset[x->n] = n;
    return 0;
}

static void free_chars(Chars *x) {
    free(x->cp);
    free(x->cls);
    free(x->offset);
}

/* Split the characters [begin, end) (text between added tokens) into pieces and BPE each into out. */
static int encode_span(const NanoBPE *t, const Chars *x, int begin, int end, Scratch *s, int *out) {
    int n = 0;
    for (int i = begin; i < end;) {
        int e = piece_end(x, i, end);
        n += bpe_piece(t, x->bytes + x->offset[i], (int)(x->offset[e] - x->offset[i]), s, out + n);
        i = e;
    }
    return n;
}

int *nano_bpe_encode(const NanoBPE *t, const char *text, int *n_ids) {
    size_t n = strlen(text);
    Chars x = {0};
    Scratch s = {0};
    int *ids = malloc(sizeof(int) * (n + 1));   /* never more ids than bytes */
    *n_ids = 0;
    if (!ids || n > (size_t)(INT32_MAX / 3) || decode_chars(&x, (const uint8_t *)text, n) != 0 ||
        scratch_init(&s, (int)n + 1) != 0) {
        free(ids);
        free_chars(&x);
        scratch_free(&s);
        return NULL;
    }
    int count = 0, begin = 0;
    for (int i = 0; i < x.n;) {
        int special = special_at(t, x.bytes, n, x.offset[i]);
        if (special < 0) {
            i++;
            continue;
        }
        count += encode_span(t, &x, begin, i, &s, ids + count);
        ids[count++] = special;
        size_t after = x.offset[i] + (size_t)t->length[special];
        while (i < x.n && x.offset[i] < after) i++;
        begin = i;
    }
    count += encode_span(t, &x, begin, x.n, &s, ids + count);
    free_chars(&x);
    scratch_free(&s);
    *n_ids = count;
    return ids;
}

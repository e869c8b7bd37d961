/*
 * ./infer: command-line front end of the Nano engine. Reads the model (and adapter) files into memory,
 * then generates from an instruct prompt, a raw prompt, or interactively from stdin.
 */
#define _POSIX_C_SOURCE 200809L
#include "nano.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static void usage(void) {
    fprintf(stderr,
        "usage: ./infer model.bin [options]\n"
        "  -l FILE      LoRA adapter (.bin) to attach\n"
        "  -i TEXT      instruct prompt: <|instruct_mark|>TEXT<|response_mark|>, or a Qwen model's chat template\n"
        "               (<|im_start|>user\\nTEXT<|im_end|>\\n<|im_start|>assistant\\n)\n"
        "  -g TEXT      raw prompt to continue, after <|bos|> in a Nano model (special tokens may be typed inside\n"
        "               the text)\n"
        "  -f FILE      raw prompt read from a file\n"
        "               with neither -i, -g nor -f: an interactive chat, prompts end with an empty line\n"
        "  -t FLOAT     temperature, 0 = greedy (default %g)\n"
        "  -k INT       top-k, 0 = off (default %d)\n"
        "  -p FLOAT     top-p, 1 = off (default %g)\n"
        "  -r FLOAT     repetition penalty, 1 = off (default %g)\n"
        "  -n INT       max new tokens, 0 = until the context is full (default %d)\n"
        "  -s INT       random seed (default: time)\n"
        "  -c INT       context in positions (default: the model's, at most %d)\n"
        "  --raw        interactive mode continues raw text instead of holding an instruct conversation\n"
        "  --think      Qwen3: let the model think before it answers (default: an empty thought in the prompt)\n"
        "  --seq2seq    non-causal model: one pass over the -g input as typed, print the argmax at each position\n"
        "  --profile    print time to first token, prefill and decode tokens/s to stderr\n"
        "  --print-ids  print token ids instead of text\n"
        "  --encode     print the prompt's token ids and exit\n"
        "  --logits F   append the float32 logits of every step to file F\n"
        "  --dump-scales F  write every Q80 weight scale (file order) as float32 to F and exit\n"
        "  --dump-weights F write every weight matrix as the engine dequantizes it (file order) as float32 to F and exit\n"
        "threads: OMP_NUM_THREADS (default: one per core; a pass opens one parallel region, so the wait\n"
        "policy does not matter)\n",
        (double)NANO_DEFAULT_TEMPERATURE, NANO_DEFAULT_TOP_K, (double)NANO_DEFAULT_TOP_P,
        (double)NANO_DEFAULT_REPETITION_PENALTY, NANO_DEFAULT_MAX_NEW, NANO_CONTEXT_LIMIT);
}

/* ---------------------------------------------------------------------------- files */

static int read_file(NanoFile *f, const char *path, int is_model) {
    char err[512];
    if (nano_file_read(f, path, is_model, err, sizeof err)) {
        fprintf(stderr, "error: %s\n", err);
        return -1;
    }
    return 0;
}

/* ---------------------------------------------------------------------------- output */

/* A growable array of ints: token ids, or the lengths of a conversation's turns. */
typedef struct {
    int *items;
    int n, cap;
} IntList;

static int list_append(IntList *list, const int *items, int n) {
    if (n == 0) return 0;   /* an empty list may have no array yet */
    if (list->n + n > list->cap) {
        int cap = list->cap ? list->cap : 256;
        while (cap < list->n + n) cap *= 2;
        int *grown = realloc(list->items, sizeof(int) * cap);
        if (!grown) { fprintf(stderr, "error: out of memory\n"); return -1; }
        list->items = grown;
        list->cap = cap;
    }
    memcpy(list->items + list->n, items, sizeof(int) * n);
    list->n += n;
    return 0;
}

typedef struct {
    const NanoModel *model;
    FILE *logits_file;
    int print_ids;
    int printed;
    NanoTextStream text;   /* a character that a token leaves unfinished waits here for the next one */
    IntList *answer;       /* when set, receives every printed token (a conversation keeps its answers) */
} Output;

static void print_token(Output *o, int token) {
    if (o->print_ids) {
        printf(o->printed++ ? " %d" : "%d", token);
    } else {
        char text[NANO_STREAM_TEXT_CAP];
        nano_stream_token(&o->text, &o->model->tokenizer, token, text, sizeof text);
        fputs(text, stdout);
    }
    fflush(stdout);
}

/* The end of an answer: what is left of an unfinished character, then the newline. */
static void end_output(Output *o) {
    char rest[8];
    nano_stream_flush(&o->text, rest, sizeof rest);
    printf("%s\n", rest);
    fflush(stdout);
}

static int dump_logits(Output *o, const float *logits, int vocab_size) {
    if (o->logits_file && fwrite(logits, sizeof(float), vocab_size, o->logits_file) != (size_t)vocab_size) {
        fprintf(stderr, "error: cannot write logits file\n");
        return -1;
    }
    return 0;
}

static int on_token(void *user, int token, const float *logits, int vocab_size) {
    Output *o = user;
    if (dump_logits(o, logits, vocab_size)) return 1;
    if (nano_stop_token(o->model, token)) return 0;
    print_token(o, token);
    return o->answer && list_append(o->answer, &token, 1);   /* out of memory ends the answer */
}

/* The weight matrices in file order: the embedding, each kind over the layers, the untied head. */
static int file_order_matrices(const NanoModel *m, const NanoMatrix **out) {
    size_t kinds[] = {offsetof(NanoLayer, wq), offsetof(NanoLayer, wk), offsetof(NanoLayer, wv), offsetof(NanoLayer, wo),
                      offsetof(NanoLayer, w1), offsetof(NanoLayer, w2), offsetof(NanoLayer, w3)};
    int count = 0;
    out[count++] = &m->embedding;
    for (int k = 0; k < 7; k++)
        for (int l = 0; l < m->config.n_layer; l++) out[count++] = (const NanoMatrix *)((const char *)&m->layers[l] + kinds[k]);
    if (!m->config.is_shared_classifier) out[count++] = &m->classifier;
    return count;
}

/* Every Q80 scale (scales_only) or every weight as the engine dequantizes it, in file order, as float32, so a
 * test can compare them with the writer's. */
static int dump_weights(const NanoModel *m, const char *path, int scales_only) {
    if (scales_only && m->config.quant_type != NANO_QUANT_Q80) {
        fprintf(stderr, "error: --dump-scales: the model is not Q80\n");
        return -1;
    }
    const NanoMatrix **matrices = malloc(sizeof *matrices * (2 + 7 * (size_t)m->config.n_layer));
    int widest = m->config.n_embd > m->q_dim ? m->config.n_embd : m->q_dim;
    if (m->config.n_hidden > widest) widest = m->config.n_hidden;
    float *row = malloc(sizeof(float) * widest);
    FILE *f = matrices && row ? fopen(path, "wb") : NULL;
    int ok = f != NULL;
    if (!f) fprintf(stderr, "error: %s: cannot open for writing\n", path);
    for (int i = 0, count = f ? file_order_matrices(m, matrices) : 0; ok && i < count; i++) {
        const NanoMatrix *w = matrices[i];
        size_t scales = (size_t)w->rows * w->cols / (scales_only ? m->config.group_size : 1);
        if (scales_only) { ok &= fwrite(w->scale, 4, scales, f) == scales; continue; }
        for (int r = 0; ok && r < w->rows; r++) {
            nano_matrix_row(m, w, r, row);
            ok &= fwrite(row, 4, w->cols, f) == (size_t)w->cols;
        }
    }
    if (f && fclose(f) != 0) ok = 0;
    if (f && !ok) fprintf(stderr, "error: %s: write failed\n", path);
    free(matrices);
    free(row);
    return ok ? 0 : -1;
}

/* ---------------------------------------------------------------------------- prompts */

/* How a text becomes a prompt, the same in every Nano front end: a continuation of a Nano model starts with
 * <|bos|>, as pretraining documents do (a Qwen model has none); an instruction is the model's chat turn
 * (nano_chat_prompt). A seq2seq input is taken as typed. */
typedef enum { PROMPT_AS_TYPED, PROMPT_CONTINUATION, PROMPT_INSTRUCT } PromptKind;

/* The status of nano_chat_prompt or nano_chat_answer_end, said on stderr when it is a failure. */
static int report_chat_failure(int status) {
    if (status == NANO_NO_CHAT_TOKENS)
        fprintf(stderr, "error: the vocabulary has no <|im_start|> or <|im_end|>, so no chat: continue text with -g\n");
    else if (status) fprintf(stderr, "error: out of memory\n");
    return status;
}

/* Token ids of a prompt of that kind; NULL (with a message) on failure. */
static int *prompt_tokens(const NanoModel *m, const char *text, PromptKind kind, int thinking, int *n) {
    int *ids = NULL;
    if (kind == PROMPT_INSTRUCT) return report_chat_failure(nano_chat_prompt(m, text, thinking, &ids, n)) ? NULL : ids;
    int bos = kind == PROMPT_CONTINUATION && m->tokenizer.kind == NANO_TOKENIZER_TRIE, n_text;
    int *text_ids = nano_encode(&m->tokenizer, text, &n_text);
    if (text_ids) ids = malloc(sizeof(int) * (n_text + 1));
    if (!ids) { free(text_ids); fprintf(stderr, "error: out of memory\n"); return NULL; }
    if (bos) ids[0] = NANO_BOS;
    memcpy(ids + bos, text_ids, sizeof(int) * n_text);
    *n = n_text + bos;
    free(text_ids);
    return ids;
}

static int check_prompt_length(const NanoModel *m, int n) {
    if (n == 0) { fprintf(stderr, "error: the prompt is empty\n"); return -1; }
    if (n > m->config.block_size) {
        fprintf(stderr, "error: the prompt has %d tokens but the model's context (block_size) is %d\n",
                n, m->config.block_size);
        return -1;
    }
    return 0;
}

/* The whole file as a NUL-terminated string. */
static char *read_text_file(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) { fprintf(stderr, "error: %s: cannot open: %s\n", path, strerror(errno)); return NULL; }
    size_t cap = 4096, len = 0, got;
    char *text = malloc(cap);
    while (text && (got = fread(text + len, 1, cap - len - 1, f)) > 0) {
        len += got;
        if (len + 1 == cap) {
            char *grown = realloc(text, cap *= 2);
            if (!grown) free(text);
            text = grown;
        }
    }
    fclose(f);
    if (!text) { fprintf(stderr, "error: %s: out of memory\n", path); return NULL; }
    text[len] = 0;
    return text;
}

static void print_profile(const NanoStats *st) {
    fprintf(stderr, "\n[profile] prompt %d tokens, generated %d | time to first token %.1f ms | prefill %.1f tok/s | "
            "decode %.1f tok/s\n", st->prompt_tokens, st->generated_tokens, 1e3 * st->first_token_seconds,
            st->prefill_seconds > 0 ? st->prompt_tokens / st->prefill_seconds : 0.0,
            st->decode_seconds > 0 ? st->decode_steps / st->decode_seconds : 0.0);
}

static int generate(NanoState *state, NanoSampler *sampler, Output *out, const int *ids, int n, int max_new, int profile) {
    NanoStats stats;
    memset(sampler->seen, 0, sampler->vocab_size);
    out->printed = 0;
    max_new = nano_max_new_tokens(max_new, n, state->model->config.block_size);
    if (nano_generate(state, sampler, ids, n, max_new, on_token, out, &stats)) {
        fprintf(stderr, "error: generation failed (out of memory)\n");
        return -1;
    }
    end_output(out);
    if (profile) print_profile(&stats);
    return 0;
}

/* One non-causal pass over the whole input; the answer is the argmax at every position. */
static int run_seq2seq(NanoState *state, Output *out, const int *ids, int n) {
    state->pos = 0;
    if (nano_forward(state, ids, n, 0)) return -1;   /* cannot happen: the prompt length was checked */
    for (int t = 0; t < n; t++) {
        const float *logits = nano_logits(state, t);
        int best = 0;
        for (int i = 1; i < state->model->config.vocab_size; i++) if (logits[i] > logits[best]) best = i;
        if (dump_logits(out, logits, state->model->config.vocab_size)) return -1;
        print_token(out, best);
    }
    end_output(out);
    return 0;
}

/* Reads a prompt of one or more lines ending with an empty line; NULL at end of input. */
static char *read_prompt(void) {
    size_t cap = 256, len = 0;
    char *text = malloc(cap), line[4096];
    if (!text) return NULL;
    text[0] = 0;
    while (fgets(line, sizeof line, stdin)) {
        if (len > 0 && (strcmp(line, "\n") == 0 || strcmp(line, "\r\n") == 0)) break;
        if (len == 0 && (strcmp(line, "\n") == 0 || strcmp(line, "\r\n") == 0)) continue;
        size_t n = strlen(line);
        if (len + n + 1 > cap) {
            while (len + n + 1 > cap) cap *= 2;
            char *grown = realloc(text, cap);
            if (!grown) { free(text); return NULL; }
            text = grown;
        }
        memcpy(text + len, line, n + 1);
        len += n;
    }
    if (len == 0) { free(text); return NULL; }
    if (text[len - 1] == '\n') text[--len] = 0;   /* the final newline ends the prompt, it is not part of it */
    return text;
}

/* ---------------------------------------------------------------------------- conversation */

/* A multi-turn instruct chat: whole turns, oldest first, then the question being answered; a turn is the
 * question's prompt (nano_chat_prompt), the answer and what closes it (nano_chat_answer_end: <|eos|>, or
 * Qwen's <|im_end|>\n). Trimmed by the rule of every Nano front end (infer.py's Conversation, the
 * page's worker.js): the oldest turns go when the prompt would leave less than nano_answer_room(). */
typedef struct {
    IntList ids;            /* the kept turns, then the question */
    IntList turn_lengths;   /* of each kept turn */
    int question_length;
} Conversation;

/* Fits a question into limit tokens by keeping its first (<|instruct_mark|>, <|im_start|>) and most recent
 * ones, and says so: a silently cut question reads as garbage. */
static void keep_last_tokens(int *ids, int *n, int limit) {
    if (*n <= limit) return;
    int kept = limit > 1 ? limit - 1 : 0;
    fprintf(stderr, "[warning] question is %d tokens, longer than the context of %d: keeping its last %d\n",
            *n, limit, kept);
    memmove(ids + 1, ids + *n - kept, sizeof(int) * kept);
    *n = 1 + kept;
}

/* Appends the question to the turns that still fit before it; the prompt is then c->ids. */
static int conversation_ask(Conversation *c, int *question, int n_question, int block_size) {
    int limit = block_size - nano_answer_room(block_size);
    keep_last_tokens(question, &n_question, limit);
    int kept_length = c->ids.n, dropped = 0;
    while (dropped < c->turn_lengths.n && kept_length > limit - n_question)
        kept_length -= c->turn_lengths.items[dropped++];
    if (dropped) {
        memmove(c->ids.items, c->ids.items + c->ids.n - kept_length, sizeof(int) * kept_length);
        c->ids.n = kept_length;
        memmove(c->turn_lengths.items, c->turn_lengths.items + dropped, sizeof(int) * (c->turn_lengths.n - dropped));
        c->turn_lengths.n -= dropped;
    }
    c->question_length = n_question;
    return list_append(&c->ids, question, n_question);
}

/* Closes the asked turn after the answer, also when the answer was cut short (as in training). */
static int conversation_add_answer(Conversation *c, const NanoModel *m, const IntList *answer) {
    int *end, n_end;
    if (report_chat_failure(nano_chat_answer_end(m, &end, &n_end))) return -1;
    int length = c->question_length + answer->n + n_end;
    c->question_length = 0;
    int status = list_append(&c->ids, answer->items, answer->n) || list_append(&c->ids, end, n_end) ||
                 list_append(&c->turn_lengths, &length, 1);
    free(end);
    return status ? -1 : 0;
}

static void conversation_reset(Conversation *c) {
    c->ids.n = c->turn_lengths.n = c->question_length = 0;
}

/* ---------------------------------------------------------------------------- interactive */

typedef struct {
    NanoState *state;
    NanoSampler *sampler;
    Output *out;
    const NanoLora *lora;
    int max_new, profile, thinking;
    Conversation conversation;
    IntList answer;
} Session;

static void toggle_lora(Session *s, int on) {
    if (on && !s->lora) { fprintf(stderr, "no adapter given (-l)\n"); return; }
    nano_state_attach_lora(s->state, on ? s->lora : NULL);
    fprintf(stderr, "adapter %s\n", on ? "attached" : "detached");
}

/* A raw prompt continued on its own; one too long for the context is refused, the session goes on. */
static int continue_text(Session *s, const char *text) {
    int n, *ids = prompt_tokens(s->state->model, text, PROMPT_CONTINUATION, 0, &n);
    if (!ids) return -1;
    int status = check_prompt_length(s->state->model, n) ? 0 : generate(s->state, s->sampler, s->out, ids, n,
                                                                       s->max_new, s->profile);
    free(ids);
    return status;
}

/* The next turn of the conversation: the question after the turns that fit, the answer kept for the next. */
static int answer_question(Session *s, const char *text) {
    int n, *question = prompt_tokens(s->state->model, text, PROMPT_INSTRUCT, s->thinking, &n);
    if (!question) return -1;
    int status = conversation_ask(&s->conversation, question, n, s->state->model->config.block_size);
    free(question);
    if (status) return -1;
    s->answer.n = 0;
    s->out->answer = &s->answer;
    status = generate(s->state, s->sampler, s->out, s->conversation.ids.items, s->conversation.ids.n, s->max_new,
                      s->profile);
    s->out->answer = NULL;
    return status ? -1 : conversation_add_answer(&s->conversation, s->state->model, &s->answer);
}

static int interactive(Session *s, int raw) {
    fprintf(stderr, "Nano interactive: type a prompt, end it with an empty line; /reset starts a new conversation, "
            "/lora on|off toggles the adapter; Ctrl-D quits.\n");
    int status = 0;
    while (status == 0) {
        fprintf(stderr, "> ");
        char *text = read_prompt();
        if (!text) break;
        if (strcmp(text, "/reset") == 0) {
            conversation_reset(&s->conversation);
            fprintf(stderr, "[conversation reset]\n");
        } else if (strcmp(text, "/lora off") == 0 || strcmp(text, "/lora on") == 0) {
            toggle_lora(s, text[6] == 'n');
        } else {
            status = raw ? continue_text(s, text) : answer_question(s, text);
        }
        free(text);
    }
    free(s->conversation.ids.items);
    free(s->conversation.turn_lengths.items);
    free(s->answer.items);
    return status;
}

/* ---------------------------------------------------------------------------- main */

typedef struct {
    const char *model_path, *lora_path, *prompt, *prompt_file, *logits_path, *scales_path, *weights_path;
    int instruct, top_k, max_new, context, raw, seq2seq, profile, print_ids, encode_only, thinking;
    float temperature, top_p, penalty;
    unsigned long long seed;
} Options;

static int parse_options(Options *o, int argc, char **argv) {
    memset(o, 0, sizeof *o);
    o->temperature = NANO_DEFAULT_TEMPERATURE; o->top_k = NANO_DEFAULT_TOP_K; o->top_p = NANO_DEFAULT_TOP_P;
    o->penalty = NANO_DEFAULT_REPETITION_PENALTY; o->max_new = NANO_DEFAULT_MAX_NEW; o->context = NANO_CONTEXT_LIMIT;
    o->seed = (unsigned long long)time(NULL);
    if (argc < 2 || argv[1][0] == '-') return -1;
    o->model_path = argv[1];
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--raw")) o->raw = 1;
        else if (!strcmp(a, "--seq2seq")) o->seq2seq = 1;
        else if (!strcmp(a, "--profile")) o->profile = 1;
        else if (!strcmp(a, "--print-ids")) o->print_ids = 1;
        else if (!strcmp(a, "--encode")) o->encode_only = 1;
        else if (!strcmp(a, "--think")) o->thinking = 1;
        else if (i + 1 >= argc) { fprintf(stderr, "error: option %s needs a value\n", a); return -1; }
        else {
            const char *v = argv[++i];
            char *end;
            errno = 0;
            if (!strcmp(a, "-l")) o->lora_path = v;
            else if (!strcmp(a, "-i") || !strcmp(a, "-g")) { o->prompt = v; o->instruct = a[1] == 'i'; }
            else if (!strcmp(a, "-f")) o->prompt_file = v;
            else if (!strcmp(a, "--logits")) o->logits_path = v;
            else if (!strcmp(a, "--dump-scales")) o->scales_path = v;
            else if (!strcmp(a, "--dump-weights")) o->weights_path = v;
            else if (!strcmp(a, "-t")) o->temperature = strtof(v, &end);
            else if (!strcmp(a, "-p")) o->top_p = strtof(v, &end);
            else if (!strcmp(a, "-r")) o->penalty = strtof(v, &end);
            else if (!strcmp(a, "-k")) o->top_k = (int)strtol(v, &end, 10);
            else if (!strcmp(a, "-n")) o->max_new = (int)strtol(v, &end, 10);
            else if (!strcmp(a, "-c")) o->context = (int)strtol(v, &end, 10);
            else if (!strcmp(a, "-s")) o->seed = strtoull(v, &end, 10);
            else { fprintf(stderr, "error: unknown option %s\n", a); return -1; }
            if (a[1] != '-' && strchr("tprknsc", a[1]) && (errno || *end || end == v)) {
                fprintf(stderr, "error: option %s: '%s' is not a number\n", a, v);
                return -1;
            }
        }
    }
    if (o->temperature < 0 || o->top_p <= 0 || o->top_p > 1 || o->penalty <= 0 || o->top_k < 0 || o->max_new < 0 ||
        o->context < 1) {
        fprintf(stderr, "error: need -t >= 0, 0 < -p <= 1, -r > 0, -k >= 0, -n >= 0, -c >= 1\n");
        return -1;
    }
    if (o->prompt && o->prompt_file) { fprintf(stderr, "error: give either a prompt or -f, not both\n"); return -1; }
    if (o->seq2seq && (!(o->prompt || o->prompt_file) || o->instruct)) { fprintf(stderr, "error: --seq2seq needs a -g or -f input\n"); return -1; }
    return 0;
}

int main(int argc, char **argv) {
    Options opt;
    if (parse_options(&opt, argc, argv)) { usage(); return 2; }
    NanoFile model_file = {0}, lora_file = {0};
    NanoModel model;
    NanoLora lora;
    NanoState state;
    NanoSampler sampler;
    char err[512];
    int status = 1, *ids = NULL, n = 0;
    Output out = {.model = &model, .print_ids = opt.print_ids};

    if (read_file(&model_file, opt.model_path, 1)) return 1;
    if (nano_model_load(&model, model_file.data, model_file.size, opt.model_path, err, sizeof err)) {
        fprintf(stderr, "error: %s\n", err);
        nano_file_free(&model_file);
        return 1;
    }
    int dumping = opt.scales_path || opt.weights_path;   /* they write the file's order */
    if (!model_file.mapped && !dumping) nano_model_tile(&model);   /* a mapped file is read-only */
    nano_model_limit_context(&model, opt.context);
    if (opt.lora_path) {
        if (read_file(&lora_file, opt.lora_path, 0)) goto done_model;
        if (nano_lora_load(&lora, &model, lora_file.data, lora_file.size, opt.lora_path, err, sizeof err)) {
            fprintf(stderr, "error: %s\n", err);
            goto done_model;
        }
    }
    if (dumping) {
        status = dump_weights(&model, opt.scales_path ? opt.scales_path : opt.weights_path, opt.scales_path != NULL) ? 1 : 0;
        goto done_model;
    }
    if (opt.thinking && model.config.model_type != NANO_TYPE_QWEN3)
        fprintf(stderr, "[warning] --think: only a Qwen3 model thinks; this one answers as it would without it\n");
    int seq2seq = opt.seq2seq || !model.config.is_causal;
    PromptKind kind = seq2seq ? PROMPT_AS_TYPED : opt.instruct ? PROMPT_INSTRUCT : PROMPT_CONTINUATION;
    if (opt.prompt_file) {
        char *text = read_text_file(opt.prompt_file);
        if (!text) goto done_model;
        ids = prompt_tokens(&model, text, kind, opt.thinking, &n);
        free(text);
        if (!ids) goto done_model;
    } else if (opt.prompt && !(ids = prompt_tokens(&model, opt.prompt, kind, opt.thinking, &n))) {
        goto done_model;
    }
    if (opt.encode_only) {
        if (!ids) { fprintf(stderr, "error: --encode needs -i, -g or -f\n"); goto done_model; }
        for (int i = 0; i < n; i++) printf(i ? " %d" : "%d", ids[i]);
        printf("\n");
        status = 0;
        goto done_model;
    }
    if (ids && check_prompt_length(&model, n)) goto done_model;
    if (nano_state_init(&state, &model)) {
        fprintf(stderr, "error: out of memory for the activations and KV cache (%zu bytes)\n", nano_state_bytes(&model));
        goto done_model;
    }
    if (opt.lora_path && nano_state_attach_lora(&state, &lora)) { fprintf(stderr, "error: out of memory\n"); goto done_state; }
    if (nano_sampler_init(&sampler, model.config.vocab_size, opt.temperature, opt.top_k, opt.top_p, opt.penalty, opt.seed)) {
        fprintf(stderr, "error: out of memory\n");
        goto done_state;
    }
    if (opt.logits_path && !(out.logits_file = fopen(opt.logits_path, "wb"))) {
        fprintf(stderr, "error: %s: cannot open for writing\n", opt.logits_path);
        goto done_sampler;
    }
    Session session = {.state = &state, .sampler = &sampler, .out = &out, .lora = opt.lora_path ? &lora : NULL,
                       .max_new = opt.max_new, .profile = opt.profile, .thinking = opt.thinking};
    if (ids && seq2seq) status = run_seq2seq(&state, &out, ids, n) ? 1 : 0;
    else if (ids) status = generate(&state, &sampler, &out, ids, n, opt.max_new, opt.profile) ? 1 : 0;
    else status = interactive(&session, opt.raw) ? 1 : 0;
    if (out.logits_file && fclose(out.logits_file) != 0) { fprintf(stderr, "error: %s: write failed\n", opt.logits_path); status = 1; }
done_sampler:
    nano_sampler_free(&sampler);
done_state:
    nano_state_free(&state);
done_model:
    free(ids);
    nano_model_free(&model);
    nano_file_free(&lora_file);
    nano_file_free(&model_file);
    return status;
}

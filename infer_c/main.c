/*
 * ./infer: command-line front end of the Nano engine. Maps the model (and adapter) files into memory,
 * then generates from an instruct prompt, a raw prompt, or interactively from stdin.
 */
#define _POSIX_C_SOURCE 200809L
#include "nano.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static void usage(void) {
    fprintf(stderr,
        "usage: ./infer model.bin [options]\n"
        "  -l FILE      LoRA adapter (.bin) to attach\n"
        "  -i TEXT      instruct prompt: <|instruct_mark|>TEXT<|response_mark|>\n"
        "  -g TEXT      raw prompt to continue (special tokens may be typed inside the text)\n"
        "  -f FILE      raw prompt read from a file\n"
        "               with neither -i, -g nor -f: interactive, prompts end with an empty line\n"
        "  -t FLOAT     temperature, 0 = greedy (default 1.0)\n"
        "  -k INT       top-k, 0 = off (default 0)\n"
        "  -p FLOAT     top-p, 1 = off (default 0.9)\n"
        "  -r FLOAT     repetition penalty, 1 = off (default 1.0)\n"
        "  -n INT       max new tokens (default 256)\n"
        "  -s INT       random seed (default: time)\n"
        "  --raw        interactive mode continues raw text instead of the instruct template\n"
        "  --seq2seq    non-causal model: one pass over the -g input, print the argmax at each position\n"
        "  --profile    print time to first token, prefill and decode tokens/s to stderr\n"
        "  --print-ids  print token ids instead of text\n"
        "  --encode     print the prompt's token ids and exit\n"
        "  --logits F   append the float32 logits of every step to file F\n"
        "  --dump-scales F  write every Q80 weight scale (file order) as float32 to F and exit\n"
        "threads: OMP_NUM_THREADS (on a busy shared machine, OMP_WAIT_POLICY=passive avoids stalls)\n");
}

/* ---------------------------------------------------------------------------- files */

typedef struct {
    void *data;
    size_t size;
} MappedFile;

static int map_file(MappedFile *f, const char *path) {
    int fd = open(path, O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
        fprintf(stderr, "error: %s: cannot open: %s\n", path, strerror(errno));
        if (fd >= 0) close(fd);
        return -1;
    }
    f->size = (size_t)st.st_size;
    f->data = NULL;
    if (f->size == 0) {
        fprintf(stderr, "error: %s: header: file is empty\n", path);
        close(fd);
        return -1;
    }
    f->data = mmap(NULL, f->size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (f->data == MAP_FAILED) {
        fprintf(stderr, "error: %s: cannot map: %s\n", path, strerror(errno));
        f->data = NULL;
        return -1;
    }
    return 0;
}

static void unmap_file(MappedFile *f) {
    if (f->data) munmap(f->data, f->size);
    f->data = NULL;
}

/* ---------------------------------------------------------------------------- output */

typedef struct {
    const NanoModel *model;
    FILE *logits_file;
    int print_ids;
    int printed;
} Output;

static void print_token(Output *o, int token) {
    if (o->print_ids) {
        printf(o->printed++ ? " %d" : "%d", token);
    } else {
        char text[4 * 256 + 1];
        nano_token_utf8(&o->model->tokenizer, token, text, sizeof text);
        fputs(text, stdout);
    }
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
    if (token != NANO_EOS && token != NANO_PAD) print_token(o, token);
    return 0;
}

/* Every Q80 scale in file order, so a test can compare them with the writer's. */
static int dump_scales(const NanoModel *m, const char *path) {
    if (m->config.quant_type != NANO_QUANT_Q80) {
        fprintf(stderr, "error: --dump-scales: the model is not Q80\n");
        return -1;
    }
    FILE *f = fopen(path, "wb");
    if (!f) { fprintf(stderr, "error: %s: cannot open for writing\n", path); return -1; }
    size_t kinds[] = {offsetof(NanoLayer, wq), offsetof(NanoLayer, wk), offsetof(NanoLayer, wv), offsetof(NanoLayer, wo),
                      offsetof(NanoLayer, w1), offsetof(NanoLayer, w2), offsetof(NanoLayer, w3)};
    int group = m->config.group_size, ok = 1;
    const NanoMatrix *e = &m->embedding;
    ok &= fwrite(e->scale, 4, (size_t)e->rows * e->cols / group, f) == (size_t)e->rows * e->cols / group;
    for (int k = 0; k < 7; k++)
        for (int l = 0; l < m->config.n_layer; l++) {
            const NanoMatrix *w = (const NanoMatrix *)((const char *)&m->layers[l] + kinds[k]);
            ok &= fwrite(w->scale, 4, (size_t)w->rows * w->cols / group, f) == (size_t)w->rows * w->cols / group;
        }
    if (!m->config.shared_classifier) {
        const NanoMatrix *c = &m->classifier;
        ok &= fwrite(c->scale, 4, (size_t)c->rows * c->cols / group, f) == (size_t)c->rows * c->cols / group;
    }
    ok &= fclose(f) == 0;
    if (!ok) fprintf(stderr, "error: %s: write failed\n", path);
    return ok ? 0 : -1;
}

/* ---------------------------------------------------------------------------- prompts */

/* Token ids of a prompt, wrapped in the instruct template when asked; NULL (with a message) on failure. */
static int *prompt_tokens(const NanoModel *m, const char *text, int instruct, int *n) {
    int n_text;
    int *text_ids = nano_encode(&m->tokenizer, text, &n_text);
    int *ids = text_ids ? malloc(sizeof(int) * (n_text + 2)) : NULL;
    if (!ids) { free(text_ids); fprintf(stderr, "error: out of memory\n"); return NULL; }
    *n = 0;
    if (instruct) ids[(*n)++] = NANO_INSTRUCT;
    memcpy(ids + *n, text_ids, sizeof(int) * n_text);
    *n += n_text;
    if (instruct) ids[(*n)++] = NANO_RESPONSE;
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
    if (nano_generate(state, sampler, ids, n, max_new, on_token, out, &stats)) {
        fprintf(stderr, "error: generation failed (out of memory)\n");
        return -1;
    }
    printf("\n");
    fflush(stdout);
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
    printf("\n");
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

static int interactive(NanoState *state, NanoSampler *sampler, Output *out, const NanoLora *lora, int raw,
                       int max_new, int profile) {
    fprintf(stderr, "Nano interactive: type a prompt, end it with an empty line; /lora on|off toggles the adapter; "
            "Ctrl-D quits.\n");
    for (;;) {
        fprintf(stderr, "> ");
        char *text = read_prompt();
        if (!text) return 0;
        if (strcmp(text, "/lora off") == 0 || strcmp(text, "/lora on") == 0) {
            int on = text[6] == 'n';
            if (on && !lora) fprintf(stderr, "no adapter given (-l)\n");
            else { nano_state_attach_lora(state, on ? lora : NULL); fprintf(stderr, "adapter %s\n", on ? "attached" : "detached"); }
            free(text);
            continue;
        }
        int n, *ids = prompt_tokens(state->model, text, !raw, &n);
        free(text);
        if (!ids) return -1;
        if (check_prompt_length(state->model, n)) { free(ids); continue; }
        int status = generate(state, sampler, out, ids, n, max_new, profile);
        free(ids);
        if (status) return -1;
    }
}

/* ---------------------------------------------------------------------------- main */

typedef struct {
    const char *model_path, *lora_path, *prompt, *prompt_file, *logits_path, *scales_path;
    int instruct, top_k, max_new, raw, seq2seq, profile, print_ids, encode_only;
    float temperature, top_p, penalty;
    unsigned long long seed;
} Options;

static int parse_options(Options *o, int argc, char **argv) {
    memset(o, 0, sizeof *o);
    o->temperature = 1.0f; o->top_p = 0.9f; o->penalty = 1.0f; o->max_new = 256;
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
            else if (!strcmp(a, "-t")) o->temperature = strtof(v, &end);
            else if (!strcmp(a, "-p")) o->top_p = strtof(v, &end);
            else if (!strcmp(a, "-r")) o->penalty = strtof(v, &end);
            else if (!strcmp(a, "-k")) o->top_k = (int)strtol(v, &end, 10);
            else if (!strcmp(a, "-n")) o->max_new = (int)strtol(v, &end, 10);
            else if (!strcmp(a, "-s")) o->seed = strtoull(v, &end, 10);
            else { fprintf(stderr, "error: unknown option %s\n", a); return -1; }
            if (a[1] != '-' && strchr("tprkns", a[1]) && (errno || *end || end == v)) {
                fprintf(stderr, "error: option %s: '%s' is not a number\n", a, v);
                return -1;
            }
        }
    }
    if (o->temperature < 0 || o->top_p <= 0 || o->top_p > 1 || o->penalty <= 0 || o->top_k < 0 || o->max_new < 0) {
        fprintf(stderr, "error: need -t >= 0, 0 < -p <= 1, -r > 0, -k >= 0, -n >= 0\n");
        return -1;
    }
    if (o->prompt && o->prompt_file) { fprintf(stderr, "error: give either a prompt or -f, not both\n"); return -1; }
    if (o->seq2seq && (!(o->prompt || o->prompt_file) || o->instruct)) { fprintf(stderr, "error: --seq2seq needs a -g or -f input\n"); return -1; }
    return 0;
}

int main(int argc, char **argv) {
    Options opt;
    if (parse_options(&opt, argc, argv)) { usage(); return 2; }
    MappedFile model_file = {0}, lora_file = {0};
    NanoModel model;
    NanoLora lora;
    NanoState state;
    NanoSampler sampler;
    char err[512];
    int status = 1, *ids = NULL, n = 0;
    Output out = {&model, NULL, opt.print_ids, 0};

    if (map_file(&model_file, opt.model_path)) return 1;
    if (nano_model_load(&model, model_file.data, model_file.size, opt.model_path, err, sizeof err)) {
        fprintf(stderr, "error: %s\n", err);
        unmap_file(&model_file);
        return 1;
    }
    if (opt.lora_path) {
        if (map_file(&lora_file, opt.lora_path)) goto done_model;
        if (nano_lora_load(&lora, &model, lora_file.data, lora_file.size, opt.lora_path, err, sizeof err)) {
            fprintf(stderr, "error: %s\n", err);
            goto done_model;
        }
    }
    if (opt.scales_path) { status = dump_scales(&model, opt.scales_path) ? 1 : 0; goto done_model; }
    if (opt.prompt_file) {
        char *text = read_text_file(opt.prompt_file);
        if (!text) goto done_model;
        ids = prompt_tokens(&model, text, 0, &n);
        free(text);
        if (!ids) goto done_model;
    } else if (opt.prompt && !(ids = prompt_tokens(&model, opt.prompt, opt.instruct, &n))) {
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
    if (opt.seq2seq) status = run_seq2seq(&state, &out, ids, n) ? 1 : 0;
    else if (ids) status = generate(&state, &sampler, &out, ids, n, opt.max_new, opt.profile) ? 1 : 0;
    else status = interactive(&state, &sampler, &out, opt.lora_path ? &lora : NULL, opt.raw, opt.max_new, opt.profile) ? 1 : 0;
    if (out.logits_file && fclose(out.logits_file) != 0) { fprintf(stderr, "error: %s: write failed\n", opt.logits_path); status = 1; }
done_sampler:
    nano_sampler_free(&sampler);
done_state:
    nano_state_free(&state);
done_model:
    free(ids);
    nano_model_free(&model);
    unmap_file(&lora_file);
    unmap_file(&model_file);
    return status;
}

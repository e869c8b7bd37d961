"""
Run a Nano model from Python: continue a prompt, answer an instruction, or chat.

    python infer.py -m checkpoint/run/best.pt --prompt "今天"            # continue a text
    python infer.py -m checkpoint/sft/best.pt -i --prompt "质量很好"     # one instruction
    python infer.py -m checkpoint/sft/best.pt -i                        # interactive chat
    python infer.py -m model.bin -l lora.bin -i                         # exported files
    python infer.py -m qwen3-0.6b.bin -i [--think]                      # a Qwen file (export.py --hf): ChatML

Checkpoints are the .pt files of train.py (full model, or a LoRA run that names its base) or the
.bin files of export.py. Generation streams tokens as they come, uses the model's KV cache, and in
interactive mode Ctrl-C stops the current answer, not the program. Non-causal models (is_causal
false) run as seq2seq: every position in one pass, the argmax at each position printed.

The C CLI (infer_c/infer) and the browser page (infer/index.html) follow the same rules: the sampling
defaults below, a continuation prompt after <|bos|>, an instruction as <|instruct_mark|>q<|response_mark|>,
and the same trimming of a conversation (tests/test_frontends.py runs all three on one model).

Qwen files (Qwen2 / Qwen2.5 / Qwen3, export.py --hf) use their ChatML template instead:
`<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n`, for Qwen3 followed by an empty think block
`<think>\n\n</think>\n\n` unless --think; an answer ends at <|endoftext|> or <|im_end|> and is closed with
`<|im_end|>\n` before the next turn; a continuation prompt is the text alone (Qwen has no BOS).
"""

import argparse
import signal
import sys
import time

import torch

import checkpoint
from tokenizer import PAD_ID, UNK_ID, BOS_ID, EOS_ID, INSTRUCT_ID, RESPONSE_ID, BPETokenizer

STOP_IDS = (PAD_ID, EOS_ID)
CONTEXT_LIMIT = 4096   # default context of a front end: Qwen's 32768-40960 positions would need gigabytes of KV cache

# Every Nano front end samples with these unless told otherwise (the C engine's are in
# infer_c/nano.h). Answers run until the context is full: -s defaults to the model's context.
SAMPLING_DEFAULTS = {"temperature": 0.8, "top_k": 20, "top_p": 0.95, "repetition_penalty": 1.1}


def warn(message):
    print(f"[warning] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- sampling

def apply_repetition_penalty(logits, history, penalty):
    """Make tokens already in the context less likely. Sign-aware, so that both kinds move down:
    a positive logit is divided by the penalty, a negative one multiplied by it."""
    if penalty == 1.0 or not history:
        return logits
    seen = torch.tensor(sorted(set(history)), device=logits.device)
    penalised = logits.clone()
    values = logits[seen]
    penalised[seen] = torch.where(values > 0, values / penalty, values * penalty)
    return penalised


def top_k_filter(logits, k):
    """Keep the k largest logits (ties with the k-th kept too); k <= 0 keeps all."""
    if k <= 0 or k >= logits.numel():
        return logits
    kth_largest = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits, p):
    """Nucleus: keep the smallest set of most likely tokens whose probabilities sum to at least p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # the most likely token always has 0 before it
    sorted_logits = sorted_logits.masked_fill(mass_before >= p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)


def make_sampler(temperature=SAMPLING_DEFAULTS["temperature"], top_k=SAMPLING_DEFAULTS["top_k"],
                 top_p=SAMPLING_DEFAULTS["top_p"], repetition_penalty=SAMPLING_DEFAULTS["repetition_penalty"],
                 seed=None):
    """The `sample(logits, history) -> id` callable that model.generate takes.
    Order: repetition penalty, then greedy if temperature is 0, else temperature, top-k, top-p, draw."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition penalty must be > 0, got {repetition_penalty}")
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)

    def sample(logits, history):
        logits = apply_repetition_penalty(logits.float(), history, repetition_penalty)
        if temperature == 0:
            return int(torch.argmax(logits))
        logits = top_p_filter(top_k_filter(logits / temperature, top_k), top_p)
        probs = torch.softmax(logits, dim=-1).cpu()
        return int(torch.multinomial(probs, 1, generator=generator))

    return sample


# ---------------------------------------------------------------- prompts

def encode_text(tokenizer, text):
    """Token ids of text; characters outside the vocabulary become <|unknown|>, with a warning."""
    ids = tokenizer.encode(text)
    if UNK_ID in ids:
        unknown = sorted({c for c in text if c not in tokenizer.stoi})
        warn(f"{ids.count(UNK_ID)} character(s) not in the vocabulary became <|unknown|>: "
             f"{' '.join(map(repr, unknown))}")
    return ids


def keep_last_tokens(ids, limit, what="prompt"):
    """Fit ids into limit tokens by keeping the first one (its <|bos|> or <|instruct_mark|>) and
    the most recent ones, and say so: a silently cut prompt reads as garbage."""
    if len(ids) <= limit:
        return ids
    warn(f"{what} is {len(ids)} tokens, longer than the context of {limit}: keeping its last {limit - 1}")
    return ids[:1] + ids[len(ids) - (limit - 1):]


def continuation_prompt(tokenizer, text):
    """Text to continue starts with <|bos|>, as every pretraining document does."""
    return [BOS_ID] + encode_text(tokenizer, text)


def instruct_prompt(tokenizer, text):
    """A question in the SFT template (data.py): the answer follows <|response_mark|>."""
    return [INSTRUCT_ID] + encode_text(tokenizer, text) + [RESPONSE_ID]


class NanoTemplate:
    """Nano's prompts: a continuation after <|bos|>, a question as <|instruct_mark|>q<|response_mark|>, an answer
    closed with <|eos|>; documents (eval.py) are <|bos|>text<|eos|>."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.stop_ids = STOP_IDS
        self.answer_end = [EOS_ID]
        self.document_start, self.document_end = [BOS_ID], [EOS_ID]

    def continuation(self, text):
        return continuation_prompt(self.tokenizer, text)

    def question(self, text):
        return instruct_prompt(self.tokenizer, text)

    def wrap_question(self, text, ids):
        """A question already encoded as ids, in the instruct template."""
        return [INSTRUCT_ID] + ids + [RESPONSE_ID]

    def conversation(self, messages):
        """The prompt after (role, content) messages that end with the user's (serve.py's chats): system and
        user messages in a row make one question, an assistant message is its answer."""
        ids, question = [], []
        for role, content in messages:
            if role == "assistant":
                ids += self.question("\n".join(question)) + encode_text(self.tokenizer, content) + self.answer_end
                question = []
            else:
                question.append(content)
        return ids + self.question("\n".join(question))


class ChatMLTemplate:
    """Qwen's ChatML (see the module's docstring). Stops at the ids of <|endoftext|> and <|im_end|>; documents
    are separated by <|endoftext|>, as in Qwen's pretraining."""

    def __init__(self, tokenizer, empty_think_block):
        self.tokenizer = tokenizer
        end_of_text, self.im_end = tokenizer.id_of("<|endoftext|>"), tokenizer.id_of("<|im_end|>")
        if end_of_text is None or self.im_end is None:
            raise ValueError("the tokenizer has no <|endoftext|> or <|im_end|> token: not a Qwen chat vocabulary")
        self.stop_ids = (end_of_text, self.im_end)
        self.answer_end = [self.im_end] + tokenizer.encode("\n")
        self.document_start, self.document_end = [end_of_text], [end_of_text]
        self.assistant_opening = "<|im_start|>assistant\n" + ("<think>\n\n</think>\n\n" if empty_think_block else "")

    def continuation(self, text):
        return self.tokenizer.encode(text)

    def question(self, text):
        return self.tokenizer.encode(f"<|im_start|>user\n{text}<|im_end|>\n{self.assistant_opening}")

    def wrap_question(self, text, ids):
        return self.question(text)

    def conversation(self, messages):
        """The prompt after (role, content) messages that end with the user's: each one as
        <|im_start|>role\ncontent<|im_end|>\n, then the assistant's opening."""
        turns = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages)
        return self.tokenizer.encode(turns + self.assistant_opening)


def prompt_template(config, tokenizer, think=False):
    """The prompts of a model: ChatML for a Qwen file (with Qwen3's empty think block unless think), else Nano's."""
    if isinstance(tokenizer, BPETokenizer):
        return ChatMLTemplate(tokenizer, empty_think_block=config.qk_norm and not think)
    return NanoTemplate(tokenizer)


def context_of(config):
    """The context a front end uses by default: the model's, at most CONTEXT_LIMIT tokens."""
    return min(config.block_size, CONTEXT_LIMIT)


def answer_room(context_length):
    """Tokens of the context that a conversation keeps free for the next answer: a quarter."""
    return max(1, context_length // 4)


class Conversation:
    """A multi-turn instruct chat as token ids: <|instruct_mark|>q<|response_mark|>a<|eos|> per turn (or the
    template's own, ChatML for Qwen). The oldest turns are dropped when the next prompt would leave less than
    answer_room tokens of the context for the answer (the C CLI and the browser page trim the same way)."""

    def __init__(self, tokenizer, context_length, answer_room, template=None):
        self.template = template or NanoTemplate(tokenizer)
        self.context_length = context_length
        self.answer_room = answer_room
        self.turns = []
        self.question = []

    def reset(self):
        self.turns = []

    def ask(self, question):
        """The prompt for the next answer: the kept turns, then this question."""
        self.question = keep_last_tokens(self.template.question(question),
                                         self.context_length - self.answer_room, "question")
        budget = self.context_length - self.answer_room - len(self.question)
        while self.turns and sum(map(len, self.turns)) > budget:
            self.turns.pop(0)
        return [token for turn in self.turns for token in turn] + self.question

    def add_answer(self, answer_ids):
        """Close the asked turn; an interrupted answer is closed like a finished one (<|eos|>, <|im_end|>\n)."""
        answer = [t for t in answer_ids if t not in self.template.stop_ids]
        self.turns.append(self.question + answer + self.template.answer_end)


# ---------------------------------------------------------------- generation

def stream_answer(model, tokenizer, prompt_ids, max_new_tokens, sample, out=None, stop_ids=STOP_IDS):
    """Generate after prompt_ids, writing each token's text to out (stdout) as it comes (a BPE token may end
    inside a character: its bytes wait for the rest). Ctrl-C stops the answer. Returns (new ids, timings) with
    timings for --profile."""
    out = out or sys.stdout
    new_ids = []
    start = time.perf_counter()
    first_token_at = None
    decoder = tokenizer.stream_decoder()
    try:
        for token in model.generate(prompt_ids, max_new_tokens, sample=sample, stop_ids=stop_ids):
            if first_token_at is None:
                first_token_at = time.perf_counter()
            new_ids.append(token)
            if token not in stop_ids:
                out.write(decoder.push(token))
                out.flush()
    except KeyboardInterrupt:
        out.write(decoder.flush() + " [stopped]")
    else:
        out.write(decoder.flush())
    out.write("\n")
    out.flush()
    timings = {"prompt_tokens": min(len(prompt_ids), model.config.block_size), "new_tokens": len(new_ids),
               "start": start, "first_token": first_token_at, "end": time.perf_counter()}
    return new_ids, timings


def profile_report(timings):
    """Time to first token, prefill tokens/s (the prompt pass until the first token) and decode
    tokens/s (every token after the first)."""
    if timings["first_token"] is None:
        return "[profile] no token generated"
    ttft = timings["first_token"] - timings["start"]
    decode_time = timings["end"] - timings["first_token"]
    decoded = timings["new_tokens"] - 1
    decode_rate = f"{decoded / decode_time:.1f} tokens/s" if decoded > 0 and decode_time > 0 else "n/a"
    return (f"[profile] time to first token {ttft * 1000:.1f} ms | "
            f"prefill {timings['prompt_tokens']} tokens at {timings['prompt_tokens'] / ttft:.1f} tokens/s | "
            f"decode {decoded} tokens at {decode_rate}")


def answer(model, tokenizer, prompt_ids, args, sample, stop_ids=STOP_IDS):
    """Generate and print one answer within --max_seq_length; returns the new ids."""
    if not prompt_ids:   # an empty continuation of a model without <|bos|> (Qwen)
        warn("the prompt is empty: there is nothing to continue")
        return []
    prompt_ids = keep_last_tokens(prompt_ids, context_of(model.config))
    max_new_tokens = args.max_seq_length - len(prompt_ids)
    if max_new_tokens <= 0:
        warn(f"the prompt of {len(prompt_ids)} tokens leaves no room under --max_seq_length "
             f"{args.max_seq_length}")
        return []
    new_ids, timings = stream_answer(model, tokenizer, prompt_ids, max_new_tokens, sample, stop_ids=stop_ids)
    if args.profile:
        print(profile_report(timings), file=sys.stderr, flush=True)
    return new_ids


@torch.no_grad()
def seq2seq(model, tokenizer, text):
    """A non-causal model reads the whole input at once and predicts every position."""
    ids = keep_last_tokens(encode_text(tokenizer, text), model.config.block_size, "input")
    device = model.tok_embeddings.weight.device
    logits, _ = model(torch.tensor([ids], device=device))
    return tokenizer.decode(logits[0].argmax(dim=-1).tolist())


def interactive(model, tokenizer, args, sample, template):
    """Read a line, answer it, repeat. /reset clears the conversation, /quit or EOF leaves."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if the parent ignored Ctrl-C
    context = context_of(model.config)
    conversation = Conversation(tokenizer, context, answer_room(context), template)
    print("Nano: Ctrl-C stops an answer, /reset starts a new conversation, /quit or Ctrl-D leaves.", flush=True)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()
            continue
        command = line.strip()
        if command == "/quit":
            return
        if command == "/reset":
            conversation.reset()
            print("[conversation reset]", flush=True)
            continue
        if not command:
            continue
        if not model.config.is_causal:
            print(seq2seq(model, tokenizer, line), flush=True)
        elif args.instruct:
            prompt = conversation.ask(line)
            conversation.add_answer(answer(model, tokenizer, prompt, args, sample, template.stop_ids))
        else:
            answer(model, tokenizer, template.continuation(line), args, sample, template.stop_ids)


def build_parser():
    parser = argparse.ArgumentParser(
        description="Generate text with a Nano model (.pt checkpoint or exported .bin).",
        epilog="Repetition penalty (-r): every token already in the context (prompt and answer so "
               "far) has its logit moved down before sampling: a positive logit is divided by the "
               "penalty, a negative one multiplied by it (dividing a negative logit would raise it). "
               "1.0 turns it off. Sampling order: penalty, temperature, top-k, top-p.")
    parser.add_argument("-m", "--model", required=True, help="checkpoint .pt or exported model .bin")
    parser.add_argument("-l", "--lora", help="LoRA adapter: a LoRA run's .pt or an exported .bin")
    parser.add_argument("-i", "--instruct", action="store_true",
                        help="wrap input as <|instruct_mark|>…<|response_mark|>, or a Qwen model's ChatML "
                             "(multi-turn when interactive)")
    parser.add_argument("--think", action="store_true",
                        help="Qwen3: let the model think (by default the prompt closes an empty think block)")
    parser.add_argument("-s", "--max_seq_length", type=int, default=None,
                        help="maximum length of prompt + answer in tokens (default: the model's context, at "
                             f"most {CONTEXT_LIMIT}, so the answer runs until the context is full; longer answers "
                             "slide the window)")
    parser.add_argument("-t", "--temperature", type=float, help="0 means greedy (argmax); default %(default)s")
    parser.add_argument("-k", "--top_k", type=int, help="sample among the k most likely (0: all); default %(default)s")
    parser.add_argument("--top_p", type=float, help="nucleus sampling mass (1.0: off); default %(default)s")
    parser.add_argument("-r", "--repetition_penalty", type=float, help="see below (1.0: off); default %(default)s")
    parser.set_defaults(**SAMPLING_DEFAULTS)
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampler (default: random)")
    parser.add_argument("-p", "--profile", action="store_true",
                        help="print time to first token, prefill and decode tokens/s to stderr")
    parser.add_argument("--prompt", help="continue this text (after <|bos|>; a Qwen model: the text alone), "
                                         "or with -i answer it, and exit "
                                         "(default: interactive session)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def main():
    args = build_parser().parse_args()
    try:
        model, tokenizer = checkpoint.load_model(args.model, args.device)
        if args.lora:
            checkpoint.attach_lora(model, args.lora)
    except (OSError, ValueError, KeyError) as error:  # a missing or foreign file: say which, no traceback
        sys.exit(f"infer.py: {error}")
    args.max_seq_length = args.max_seq_length or context_of(model.config)
    sample = make_sampler(args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.seed)
    template = prompt_template(model.config, tokenizer, args.think)
    if args.think and not model.config.qk_norm:
        warn("--think: only a Qwen3 model thinks; this one answers as it would without it")
    if args.prompt is None:
        interactive(model, tokenizer, args, sample, template)
    elif not model.config.is_causal:
        print(seq2seq(model, tokenizer, args.prompt))
    else:
        prompt = template.question(args.prompt) if args.instruct else template.continuation(args.prompt)
        answer(model, tokenizer, prompt, args, sample, template.stop_ids)


if __name__ == "__main__":
    main()

"""
serve.py under load: streaming completions from 1, 4 and 16 concurrent clients on the CPU, greedy, against
Q80 files with random weights of two shapes, Nano-56M's and the main job's (config/nano-small.json; their
stop tokens never win, so every answer has its full length), and on any model files given with --model.
For each: the aggregate tokens/s of all streams, one stream's decode tokens/s, time to first token p50/p99, and the C
CLI's decode tokens/s on the same file, for the ratios the server aims at: one stream >= 0.9 x the CLI
(the CLI's runs alternate with the one-stream requests), 16 streams >= 3 x one stream.

    python bench/bench_serve.py [--model checkpoint/sft/model.bin] [--threads 2] [--tokens 128]
                                [--requests 2] [--pairs 6] [--rounds 2] [--tiny]

--tiny runs a small random model instead of those two (to try the benchmark, not to quote it). Prints a
markdown table and writes bench/results/bench_serve.json with the machine's description.
"""

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.bench_infer import NANO_56M, c_decode, make_model  # noqa: E402
from bench.common import machine_info, write_results  # noqa: E402

TINY = dict(block_size=512, vocab_size=4096, n_layer=4, n_embd=128, n_head=4, n_kv_head=2, n_hidden=352)
CONCURRENCY = (1, 4, 16)
PROMPTS = ["今天天气很好", "我们的模型", "这个产品质量", "人民日报报道", "中国经济发展", "一个小故事", "学习语言",
           "北京的秋天"]


def main_job_shape():
    """The dimensions of the main job's model (config/nano-small.json, 5.0 M parameters), for a random model
    of that shape: its speed is the trained model's, and it never stops before its tokens."""
    with open(os.path.join(ROOT, "config", "nano-small.json")) as f:
        config = json.load(f)
    return {key: config[key] for key in NANO_56M}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(path, threads):
    port = free_port()
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), "-m", path, "--port", str(port),
                                "--parallel", str(max(CONCURRENCY))], cwd=ROOT,
                               env=dict(os.environ, OMP_NUM_THREADS=str(threads)), stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"serve.py -m {path} exited with {process.returncode}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return process, port
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"serve.py -m {path} did not start")


def stream_completion(port, prompt, tokens):
    """(time to first token, decode tokens/s after it, tokens) of one greedy streamed completion. The server sends
    a stream's text in pieces of several tokens (--stream-interval), the first token alone: the tokens are
    counted by the usage of the last event, and decoding runs from the first piece to the last."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    connection.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]}")
    first = last = None
    count = 0
    for line in response:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        if event["choices"][0]["text"]:
            last = time.perf_counter()
            first = first or last
        if event.get("usage"):
            count = event["usage"]["completion_tokens"]
    connection.close()
    decode = (count - 1) / (last - first) if count > 1 and last > first else 0.0
    return first - start, decode, count


def load_phase(port, streams, requests, tokens):
    """streams clients, each sending requests completions one after another: aggregate tokens/s, and every
    request's (ttft, decode rate, tokens)."""
    results, failures = [], []

    def client(index):
        try:
            for r in range(requests):
                results.append(stream_completion(port, PROMPTS[(index + r) % len(PROMPTS)], tokens))
        except Exception as error:  # noqa: BLE001  (raised below)
            failures.append(error)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    return sum(r[2] for r in results) / (time.perf_counter() - start), results


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def bench_file(name, path, args, infer):
    samples = {"cli": [], **{n: {"aggregate": [], "results": []} for n in CONCURRENCY}}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    process, port = start_server(path, args.threads)
    try:
        stream_completion(port, PROMPTS[0], 8)   # warm up
        for round_index in range(args.rounds):
            # one stream alternates with the CLI, request by request: this machine's speed drifts within minutes
            for _ in range(args.pairs):
                samples["cli"].append(c_decode(infer, path, PROMPTS[0], env, args.tokens, until_the_end=False))
                aggregate, results = load_phase(port, 1, 1, args.tokens)
                samples[1]["aggregate"].append(aggregate)
                samples[1]["results"] += results
            for streams in CONCURRENCY[1:]:
                aggregate, results = load_phase(port, streams, args.requests, args.tokens)
                samples[streams]["aggregate"].append(aggregate)
                samples[streams]["results"] += results
            phases = ", ".join(f"{n} streams {samples[n]['aggregate'][-1]:.1f} tok/s" for n in CONCURRENCY)
            print(f"{name} round {round_index + 1}: cli {samples['cli'][-1]:.1f} tok/s, {phases}", file=sys.stderr)
    finally:
        process.terminate()
        process.wait()
    cli = statistics.median(samples["cli"])
    rows = []
    for streams in CONCURRENCY:
        results = samples[streams]["results"]
        ttfts = [r[0] for r in results]
        rows.append({"model": name, "streams": streams,
                     "aggregate_tok_s": statistics.median(samples[streams]["aggregate"]),
                     "per_stream_decode_tok_s": statistics.median(r[1] for r in results),
                     "ttft_p50_ms": 1000 * percentile(ttfts, 0.5), "ttft_p99_ms": 1000 * percentile(ttfts, 0.99),
                     "cli_decode_tok_s": cli, "requests": len(results)})
    one = rows[0]["aggregate_tok_s"]
    for row in rows:
        row["of_one_stream"] = row["aggregate_tok_s"] / one
    rows[0]["one_stream_of_cli"] = rows[0]["per_stream_decode_tok_s"] / cli
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", default=[], help="a .bin model file to serve too (repeatable)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per request")
    parser.add_argument("--requests", type=int, default=2, help="requests per client in each phase of several streams")
    parser.add_argument("--pairs", type=int, default=6, help="CLI runs and one-stream requests alternated per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="a small random model instead of the Nano-56M and main-job shapes")
    args = parser.parse_args()
    for path in args.model:
        if not path.endswith(".bin") or not os.path.exists(path):
            sys.exit(f"bench_serve.py: --model {path}: expected an existing .bin file (export.py makes one)")

    subprocess.run(["make", "-C", os.path.join(ROOT, "infer_c")], check=True, capture_output=True)
    infer = os.path.join(ROOT, "infer_c", "infer")
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        shapes = {"random tiny Q80": TINY} if args.tiny else {"random Nano-56M Q80": NANO_56M,
                                                             "random, the main job's shape, Q80": main_job_shape()}
        for i, (name, config) in enumerate(shapes.items()):
            folder = os.path.join(workdir, str(i))
            os.mkdir(folder)
            _, _, paths = make_model(folder, config, kinds=("q80",))
            rows += bench_file(name, paths["q80"], args, infer)
        for path in args.model:
            rows += bench_file(os.path.basename(path), path, args, infer)

    print(f"\n{machine_info()['cpu']}, {args.threads} OpenMP thread(s), load average after the run "
          f"{os.getloadavg()[0]:.1f}")
    print(f"\nserve.py, streamed greedy completions of {args.tokens} tokens; per round {args.pairs} one-stream requests, "
          f"each after a CLI run, and {args.requests} request(s) per client of 4 and 16 streams; medians of "
          f"{args.rounds} rounds\n")
    print("| model | streams | aggregate tok/s | × one stream | per-stream decode tok/s | TTFT p50 ms | TTFT p99 ms | "
          "C CLI decode tok/s | one stream / CLI |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['one_stream_of_cli']:.2f}" if "one_stream_of_cli" in r else ""
        print(f"| {r['model']} | {r['streams']} | {r['aggregate_tok_s']:.1f} | {r['of_one_stream']:.2f} | "
              f"{r['per_stream_decode_tok_s']:.1f} | {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | "
              f"{r['cli_decode_tok_s']:.1f} | {ratio} |")
    write_results("bench_serve", {"benchmark": "bench_serve", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                                  "machine": machine_info(threads=args.threads), "tokens": args.tokens,
                                  "requests": args.requests, "pairs": args.pairs, "rounds": args.rounds,
                                  "results": rows})


if __name__ == "__main__":
    main()

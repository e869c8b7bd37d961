"""
Two builds of the C engine's library side by side in one process: which decodes faster, step by step.

    make -C infer_c libnano.so && cp infer_c/libnano.so /tmp/baseline.so    # before a change
    make -C infer_c libnano.so                                               # after it
    python bench/bench_ab.py /tmp/baseline.so infer_c/libnano.so [--kinds f32 q80 q4k] [--threads 1 2]
                             [--position 64] [--steps 300] [--model M.bin]

Whole runs of a CLI, seconds apart, differ on a shared machine by more than the few per cent a change to
a kernel buys, so here both libraries load the same model in one process and take decode steps in turn
(one token at a fixed position: the state is rewound after each, so that every step does the same work),
and the figure is each one's median step time. A library loaded second ran up to 7 % faster than the same
file loaded first, so every measurement runs twice, in a process of its own per load order, and the
speed-up is the geometric mean of the two orders' ratios. The builds' logits are compared too (their
largest difference): a faster build must still compute the same thing. Without --model, a random
Nano-56M-sized model is written in each kind (bench_infer.py's). Prints a markdown table and writes
bench/results/bench_ab.json with the machine's description.
"""

import argparse
import ctypes
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import machine_info, write_results  # noqa: E402
from export import read_bin  # noqa: E402
from serve import NanoLibrary  # noqa: E402


class Engine:
    """One library's model and state, prefilled up to a position, taking one token there again and again."""

    def __init__(self, library_path, model_path, vocab_size, prompt):
        self.library = NanoLibrary(library_path)
        lib = self.library.lib
        self.file = self.library.read(model_path, is_model=True)
        self.model = self.library.load("model", self.file.data, self.file.size, model_path)
        if not self.file.mapped:   # as the CLI and serve.py do
            lib.nano_model_tile(self.model)
        self.state = self.library.struct("state")
        if lib.nano_state_init(self.state, self.model):
            raise MemoryError(f"{library_path}: no memory for a state")
        self.states = (ctypes.c_void_p * 1)(ctypes.addressof(self.state))
        self.logits = np.zeros(vocab_size, dtype=np.float32)
        self.forward(prompt)
        self.position = len(prompt)

    def forward(self, tokens):
        """The tokens from the state's position, the logits of the last into self.logits."""
        ids, counts = (ctypes.c_int * len(tokens))(*tokens), (ctypes.c_int * 1)(len(tokens))
        if self.library.lib.nano_forward_batch(self.states, ids, counts, 1, self.logits.ctypes.data):
            raise ValueError("the prompt does not fit the model's context")

    def step(self, token):
        """One decode step at the fixed position; its seconds."""
        NanoLibrary.StateHead.from_buffer(self.state).pos = self.position
        start = time.perf_counter()
        self.forward([token])
        return time.perf_counter() - start


def measure(libraries, model_path, position, steps):
    """Median step seconds of each library (in the order given, which is the load order), taking turns
    step by step, and the largest difference of their logits from the first's."""
    vocab_size = read_bin(model_path)[0].vocab_size
    prompt = [3 + (7 + 31 * i) % (vocab_size - 3) for i in range(position)]   # past the special tokens
    engines = [Engine(path, model_path, vocab_size, prompt) for path in libraries]
    times = [[] for _ in engines]
    for _ in range(steps):
        for engine, runs in zip(engines, times):
            runs.append(engine.step(prompt[-1]))
    differences = [float(np.abs(engine.logits - engines[0].logits).max()) for engine in engines]
    return {"step_seconds": [statistics.median(runs) for runs in times], "logit_difference": differences}


def measure_in_process(libraries, model_path, threads, position, steps):
    """measure() in a process of its own, with its OpenMP thread count (read when a library loads)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    result = subprocess.run([sys.executable, __file__, "--worker", model_path, str(position), str(steps), *libraries],
                            capture_output=True, text=True, env=env)
    if result.returncode:
        raise SystemExit(f"the measurement failed: {result.stderr.strip()}")
    return json.loads(result.stdout)


def compare(baseline, candidate, model_path, threads, position, steps):
    """Both load orders; the candidate's speed over the baseline's in each, and their geometric mean."""
    first = measure_in_process([baseline, candidate], model_path, threads, position, steps)
    second = measure_in_process([candidate, baseline], model_path, threads, position, steps)
    speedups = [first["step_seconds"][0] / first["step_seconds"][1], second["step_seconds"][1] / second["step_seconds"][0]]
    return {"baseline_ms": 1e3 * statistics.mean([first["step_seconds"][0], second["step_seconds"][1]]),
            "candidate_ms": 1e3 * statistics.mean([first["step_seconds"][1], second["step_seconds"][0]]),
            "speedup_each_order": speedups, "speedup": math.sqrt(speedups[0] * speedups[1]),
            "logit_difference": max(first["logit_difference"][1], second["logit_difference"][0])}


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        model_path, position, steps, *libraries = sys.argv[2:]
        try:
            print(json.dumps(measure(libraries, model_path, int(position), int(steps))))
        except (OSError, ValueError, MemoryError) as error:   # a bad file, a prompt past the context
            raise SystemExit(str(error))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("baseline", help="the library before the change (a copy of infer_c/libnano.so)")
    parser.add_argument("candidate", help="the library after it")
    parser.add_argument("--model", help="a .bin model (default: random Nano-56M-sized ones, one per kind)")
    parser.add_argument("--kinds", nargs="+", choices=("f32", "q80", "q4k"), default=["f32", "q80", "q4k"],
                        help="weight kinds of the random model (without --model)")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--position", type=int, default=64, help="prompt tokens before the measured step")
    parser.add_argument("--steps", type=int, default=300, help="steps of each library per measurement")
    args = parser.parse_args()
    for path in (args.baseline, args.candidate):
        if not os.path.exists(path):
            raise SystemExit(f"{path} does not exist: build it with `make -C infer_c libnano.so`")
    if args.position < 1 or args.steps < 1:
        raise SystemExit("--position and --steps must be at least 1")

    rows = []
    with tempfile.TemporaryDirectory() as directory:
        if args.model:
            models = {os.path.basename(args.model): args.model}
        else:
            from bench.bench_infer import make_model
            models = make_model(directory, kinds=tuple(args.kinds))[2]
        for name, path in models.items():
            for threads in args.threads:
                row = {"model": name, "threads": threads,
                       **compare(args.baseline, args.candidate, path, threads, args.position, args.steps)}
                rows.append(row)
                print(f"{name}, {threads} thread(s): {row['speedup']:.3f}x", file=sys.stderr)

    print(f"\n{os.path.basename(args.candidate)} against {os.path.basename(args.baseline)}: decode steps at position "
          f"{args.position}, {args.steps} a library in turn, median step times, both load orders\n")
    print("| model | threads | baseline ms | candidate ms | speed-up (each order) | speed-up | largest logit difference |")
    print("|---|---:|---:|---:|---|---:|---:|")
    for row in rows:
        orders = " / ".join(f"{s:.3f}" for s in row["speedup_each_order"])
        print(f"| {row['model']} | {row['threads']} | {row['baseline_ms']:.3f} | {row['candidate_ms']:.3f} | {orders} | "
              f"{row['speedup']:.3f} | {row['logit_difference']:.2g} |")
    write_results("bench_ab", {"machine": machine_info(), "baseline": args.baseline, "candidate": args.candidate,
                               "position": args.position, "steps": args.steps, "results": rows})


if __name__ == "__main__":
    main()

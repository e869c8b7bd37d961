"""What every benchmark records beside its figures: the machine it ran on; and how pairs of runs compare."""

import json
import os
import platform
import statistics

import torch


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(**extra):
    """CPU model, usable cores, versions and the load at the start (these machines are shared)."""
    return {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "platform": platform.platform(), "load_average": os.getloadavg(), **extra}


def write_results(name, payload):
    """bench/results/<name>.json, next to this file (git-ignored)."""
    out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(payload, f, indent=2, ensure_ascii=False)


def median_ratio(values, references):
    """The median of a round's value over its reference: each pair ran side by side, seconds apart, where the
    machine's speed drifts by more than the ratio asked for between rounds (a ratio of medians would mix them)."""
    return statistics.median(v / r for v, r in zip(values, references))

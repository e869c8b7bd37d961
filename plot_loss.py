"""
Plot the training and validation loss of a run against the step.

    python plot_loss.py -n checkpoint/pretrain/train_pretrain.log            # writes ..._loss.png beside it
    python plot_loss.py -n checkpoint/pretrain/train_pretrain.log -o loss.png --live

The log is train.py's: one JSON object per line, "kind" "train" (step, loss, ...) or "val" (step, val_loss).
A resumed run appends to the log and may repeat steps that the killed run had already logged; the
latest line for a step wins, as it belongs to the run whose checkpoints survived.
"""

import argparse
import json
import os
import time

import matplotlib
matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt


def read_losses(log_path):
    """{step: loss} for training and for validation lines."""
    train, val = {}, {}
    with open(log_path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if f.read(1) == "":  # a line still being written by a live run
                    break
                raise ValueError(f"{log_path}:{line_number}: not a JSON line") from None
            if record.get("kind") == "train":
                train[record["step"]] = record["loss"]
            elif record.get("kind") == "val":
                val[record["step"]] = record["val_loss"]
    return train, val


def plot(log_path, png_path):
    train, val = read_losses(log_path)
    figure, axes = plt.subplots(figsize=(8, 5))
    for losses, label, style in ((train, "train", "-"), (val, "validation", "o-")):
        if losses:
            steps = sorted(losses)
            axes.plot(steps, [losses[s] for s in steps], style, label=label, markersize=4)
    axes.set_xlabel("step")
    axes.set_ylabel("loss (log scale)")
    axes.set_yscale("log")  # the first steps' loss dwarfs the rest, SFT's most of all
    axes.set_title(os.path.basename(log_path))
    axes.grid(alpha=0.3)
    if train or val:
        axes.legend()
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    plt.close(figure)
    return len(train), len(val)


def main():
    parser = argparse.ArgumentParser(description="Plot training and validation loss from a train.py log.")
    parser.add_argument("-n", "--log", required=True, help="train_<run>.log written by train.py")
    parser.add_argument("-o", "--out", help="PNG to write (default: the log's name with _loss.png)")
    parser.add_argument("--live", action="store_true", help="redraw every --interval seconds until Ctrl-C")
    parser.add_argument("--interval", type=float, default=10.0)
    args = parser.parse_args()
    if not os.path.exists(args.log):
        parser.error(f"{args.log}: no such log")
    png_path = args.out or os.path.splitext(args.log)[0] + "_loss.png"
    while True:
        n_train, n_val = plot(args.log, png_path)
        print(f"{png_path}: {n_train} training and {n_val} validation points")
        if not args.live:
            break
        try:
            time.sleep(args.interval)
        except KeyboardInterrupt:
            break


if __name__ == "__main__":
    main()

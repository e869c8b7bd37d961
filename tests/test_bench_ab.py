"""bench/bench_ab.py: two builds of the engine's library step in turn in one process, in both load orders;
a library against itself computes the same logits, and against a build whose sums run in another order it
shows their difference."""

import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_export import ROOT, tiny_model, tiny_tokenizer  # noqa: E402

import export  # noqa: E402
from bench import bench_ab  # noqa: E402

ENGINE_DIR = os.path.join(ROOT, "infer_c")


@pytest.fixture(scope="module")
def libraries(tmp_path_factory):
    """The engine's library as `make` builds it, and one built without -march=native (other kernels)."""
    directory = tmp_path_factory.mktemp("libraries")
    subprocess.run(["make", "-C", ENGINE_DIR, "libnano.so"], check=True, capture_output=True)
    portable = str(directory / "libnano-portable.so")
    subprocess.run(["cc", "-std=c99", "-O3", "-fopenmp", "-fPIC", "-shared", "-o", portable, "nano.c", "bpe.c", "-lm"],
                   cwd=ENGINE_DIR, check=True, capture_output=True)
    return os.path.join(ENGINE_DIR, "libnano.so"), portable


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("model") / "tiny.bin")
    tokenizer = tiny_tokenizer()
    export.write_model(path, tiny_model(tokenizer), tokenizer, progress=False)
    return path


def test_a_library_against_itself(libraries, model_path):
    native, _ = libraries
    row = bench_ab.compare(native, native, model_path, threads=1, position=5, steps=20)
    assert row["logit_difference"] == 0.0
    assert len(row["speedup_each_order"]) == 2
    assert 0.5 < row["speedup"] < 2.0
    assert row["baseline_ms"] > 0 and row["candidate_ms"] > 0


def test_another_build_shows_its_logit_difference(libraries, model_path):
    native, portable = libraries
    result = bench_ab.measure([native, portable], model_path, position=5, steps=3)
    assert len(result["step_seconds"]) == 2 and min(result["step_seconds"]) > 0
    assert result["logit_difference"][0] == 0.0
    assert 0.0 < result["logit_difference"][1] < 1e-4   # the same model, summed in another order


def test_command_line_prints_the_table(libraries, model_path):
    native, _ = libraries
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_ab.py"), native, native, "--model", model_path,
                        "--threads", "1", "--position", "4", "--steps", "10"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "| tiny.bin | 1 |" in r.stdout
    missing = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_ab.py"), native, "/nonexistent.so"],
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "does not exist" in missing.stderr


def test_a_truncated_model_gives_one_clear_line(libraries, model_path, tmp_path):
    native, _ = libraries
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(open(model_path, "rb").read()[:-1000])
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_ab.py"), native, native, "--model",
                        str(truncated), "--threads", "1", "--steps", "2"], capture_output=True, text=True)
    assert r.returncode != 0
    assert "truncated" in r.stderr and "Traceback" not in r.stderr

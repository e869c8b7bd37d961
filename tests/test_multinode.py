"""Multi-node DDP on loopback: two torchrun agents, one process each, meet through c10d rendezvous on
127.0.0.1 as two machines would over the network, and train as one 2-process job."""

import os
import socket
import subprocess
import sys
import time

from test_train import MODEL, data, read_log, write_train_config  # noqa: F401 (data is a fixture)

TIMEOUT = 300  # the first DeepSpeed start compiles its shared-memory op (about 80 s on 2 cores)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(train_args, nodes, log_dir):
    """train.py on 2 processes: one torchrun with 2 processes, or 2 torchrun "nodes" with 1 each."""
    if nodes == 1:
        launchers = [["--standalone", "--nproc_per_node", "2"]]
    else:
        endpoint = f"127.0.0.1:{free_port()}"
        launchers = [["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                      "--rdzv_endpoint", endpoint, "--node_rank", str(node)] for node in range(2)]
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}  # a crashing process prints its Python stacks
    processes = []
    for node, launcher in enumerate(launchers):
        output = open(os.path.join(log_dir, f"node{node}.txt"), "w")
        command = [sys.executable, "-m", "torch.distributed.run", *launcher, "train.py", *train_args]
        processes.append(subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env))
        output.close()
    deadline = time.time() + TIMEOUT
    while any(p.poll() is None for p in processes) and time.time() < deadline:
        if any(p.returncode for p in processes):  # a failed node leaves the others waiting: stop them
            break
        time.sleep(0.2)
    for node, process in enumerate(processes):
        if process.poll() is None:
            process.kill()
            process.wait()
        assert process.returncode == 0, open(os.path.join(log_dir, f"node{node}.txt")).read()[-3000:]


def test_two_nodes_on_loopback_end_with_identical_parameters(data, tmp_path):  # noqa: F811
    out = str(tmp_path / "nodes")
    config = write_train_config(tmp_path / "pretrain.json", dataset_path=[str(data / "pretrain")],
                                save_checkpoint_to=out, max_iters=4, eval_interval=2, save_interval=2)
    launch(["-m", MODEL, "-t", config], nodes=2, log_dir=str(tmp_path))
    assert read_log(out, "start")[0]["world_size"] == 2
    (ddp,) = read_log(out, "ddp")
    first, second = ddp["parameter_checksums"]
    assert first == second

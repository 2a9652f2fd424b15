"""Expert parallelism end to end: local, simulated (flat and hierarchical) and msrun_cpu (W = 4 as
2 nodes x 2 devices, 4 processes) give the same losses and gradients; the launcher leaves no process
behind, also when a worker fails or is killed; sharded checkpoints join into a one-process model and reshard."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from pangu_moe.config import ConfigError
from pangu_moe.train import checkpoint, convert
from pangu_moe.train.metrics import read
from pangu_moe.train.restore import STATE_KEYS
from pangu_moe.train.trainer import Trainer
from tests.conftest import TINY, tiny_config
from tests.train.ep_worker import first_gradients
from tests.train.test_convert import same_tensors

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCHER = os.path.join(REPO, "run_scripts", "run_msrun_cpu.sh")
EP = ("parallel.nodes=2", "parallel.devices_per_node=2", "train.steps=5", "train.eval_every=5",
      "train.checkpoint_every=5")


# Each node reads its own domain, whose experts start on the other node for expert 0 and 2 (ranks 2 and 0); the
# placement after step 1 swaps them (crossing nodes), and none moves after it.
PLACED = ("moe.aux_scope=global", "data.mixture=by_node", "parallel.placement=[2, 1, 0, 3]",
          "parallel.placement_every=1", "parallel.placement_hysteresis=0")


def _run(run_dir, *overrides):
    """Train 5 steps; returns (losses, step-0 gradients by name, summary, placement events, layer records)."""
    trainer = Trainer(tiny_config(*EP, *overrides), str(run_dir), log=lambda line: None)
    grads = first_gradients(trainer)
    summary = trainer.train()
    return ([r["loss"] for r in read(run_dir / "metrics.jsonl")], grads, summary, _placements(run_dir),
            _layers(run_dir))


def _layers(run_dir):
    """(capacity bucket, layer records) of each logged step."""
    return [(r["capacity_bucket"], r["layers"]) for r in read(run_dir / "metrics.jsonl") if "layers" in r]


def _same_bytes_but_hierarchical_intra(layers, reference, hierarchical):
    """The layer records of a run against those of a run with the same routing. With K = 1 each token crosses to at
    most one other node, so the hierarchical exchange's counted stage-1 rows equal the crossing choices, and both
    runs' inter-node bytes are the flat exchange's (docs/outputs.md: H = 32 fp32 values a row both ways, plus the
    occupancy of the W * (W - D) remote blocks of S = E_loc * bucket slots); inside the nodes the hierarchical one
    also forwards rows, so only the flat run's intra-node bytes are the flat definition's."""
    assert len(layers) == len(reference)
    crossing = 0
    for (bucket, step), (_, reference_step) in zip(layers, reference):
        for got, want in zip(step, reference_step):
            assert got["kept_per_rank"] == want["kept_per_rank"] and got["tokens_inter"] == want["tokens_inter"]
            assert got["bytes_inter"] == (2 * got["tokens_inter"] * 32 + 4 * 2 * bucket) * 4 == want["bytes_inter"]
            flat_intra = (2 * got["tokens_intra"] * 32 + 4 * 1 * bucket) * 4
            assert (got["bytes_intra"] != flat_intra) == hierarchical
            crossing += got["tokens_inter"]
    assert crossing > 0


def _placements(run_dir):
    return [event for r in read(run_dir / "metrics.jsonl") for event in r.get("placements", ())]


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("local"))


@pytest.mark.parametrize("exchange,layout", [("flat", "ragged"), ("hierarchical", "ragged"), ("flat", "padded")])
def test_simulated_equals_local(local_run, tmp_path, exchange, layout):
    losses, grads, summary, _, layers = _run(tmp_path, "parallel.dispatch=simulated", f"parallel.exchange={exchange}",
                                             f"parallel.exchange_layout={layout}")
    _same_bytes_but_hierarchical_intra(layers, local_run[4], exchange == "hierarchical")
    np.testing.assert_allclose(losses, local_run[0], rtol=1e-5)
    assert grads.keys() == local_run[1].keys()
    for name, g in grads.items():
        np.testing.assert_allclose(g, local_run[1][name], rtol=1e-5, atol=1e-8, err_msg=name)
    assert summary["val_loss"] == pytest.approx(local_run[2]["val_loss"], rel=1e-5)


@pytest.fixture(scope="module")
def local_global_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("local_global"), "moe.aux_scope=global")


def test_global_aux_scope_simulated_equals_local_and_differs_from_per_rank(local_run, local_global_run, tmp_path):
    # aux loss over all ranks' tokens: the same on both in-process backends, in graph mode, losses and gradients
    local = local_global_run
    simulated = _run(tmp_path / "simulated", "moe.aux_scope=global", "parallel.dispatch=simulated")
    np.testing.assert_allclose(simulated[0], local[0], rtol=1e-5)
    for name, g in simulated[1].items():
        np.testing.assert_allclose(g, local[1][name], rtol=1e-5, atol=1e-8, err_msg=name)
    assert local[0][0] != local_run[0][0]  # the same first step under the per-rank aux loss


def _ours(pattern):
    """PIDs of live processes whose command line contains `pattern`."""
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out if int(p) != os.getpid()]


def _launch(tmp_path, *args, timeout=600):
    cmd = ["bash", LAUNCHER, "--workers", "4", "--python", sys.executable, "--log-dir", str(tmp_path / "logs"),
           "--timeout", "400", *args]
    began = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(tmp_path))
    return done, time.monotonic() - began


@pytest.fixture(scope="module")
def simulated_placed_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("simulated_placed"), *PLACED, "parallel.dispatch=simulated")


@pytest.mark.msrun
@pytest.mark.parametrize("exchange,kernels,bucket_mb,placed", [("flat", "custom", 25.0, ()),
                                                               ("hierarchical", "reference", 0.01, PLACED)])
def test_msrun_cpu_equals_one_process_and_leaves_no_process(request, tmp_path, exchange, kernels, bucket_mb, placed):
    """Four msrun processes against one process (reference kernels). The flat case runs the custom CPU kernels in
    every worker (built once, shared through the cache), against the `local` run. The hierarchical case all-reduces
    the shared gradients in 10 KB buckets (several collectives a step, `data_parallel.buckets`), takes the aux loss
    over all ranks' tokens (`moe.aux_scope=global`: the choice counts all-reduced, `SumOverRanks`) and moves experts
    between the processes (`PLACED`, `train.placement.moved_rows`), against the simulated run that moves them in one."""
    reference = request.getfixturevalue("simulated_placed_run" if placed else "local_run")
    config = tmp_path / "tiny.yaml"
    with open(config, "w") as fh:
        yaml.safe_dump(TINY, fh)
    run_dir = tmp_path / "run"
    sets = [a for o in EP + ("parallel.dispatch=msrun_cpu", f"parallel.exchange={exchange}",
                             f"runtime.kernels={kernels}", f"parallel.grad_bucket_mb={bucket_mb}") + placed
            for a in ("--set", o)]
    done, _ = _launch(tmp_path, "--script", os.path.join(REPO, "tests", "train", "ep_worker.py"), "--", str(config),
                      str(run_dir), *sets)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"logs in {tmp_path / 'logs'}" in done.stderr.splitlines()[0]  # named first
    assert "step     5/5" in done.stderr and "[WARNING]" not in done.stderr  # rank 0's progress, streamed
    assert not _ours(str(run_dir)), "workers outlived the launcher"
    losses = [r["loss"] for r in read(run_dir / "metrics.jsonl")]
    np.testing.assert_allclose(losses, reference[0], rtol=1e-5)
    assert _placements(run_dir) == reference[3]  # the same maps, moves and move bytes
    # the stage-1 rows each process counted, gathered over ranks (`train.steps.make_gradient`)
    _same_bytes_but_hierarchical_intra(_layers(run_dir), reference[4], exchange == "hierarchical")
    assert sum(sum(event["moved"]) for event in reference[3]) == (4 if placed else 0)
    reference_grads = reference[1]
    for rank in range(4):
        grads = dict(np.load(run_dir / f"grads_rank{rank}.npz"))
        assert grads.keys() == reference_grads.keys()
        for name, g in grads.items():
            want = reference_grads[name]
            if ".experts." in name:  # rank r holds slot r of E = 4 (the one-process run's rows are in slot order)
                want = want[rank:rank + 1]
            np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-8, err_msg=f"rank {rank} {name}")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["val_loss"] == pytest.approx(reference[2]["val_loss"], rel=1e-5)
    assert summary["params_total"] == reference[2]["params_total"]

    # The sharded checkpoint joins into a one-process model with the same validation loss.
    (step, folder), = checkpoint.list_checkpoints(str(run_dir))
    manifest = json.loads(open(os.path.join(folder, checkpoint.MANIFEST)).read())
    assert step == 5 and [s["experts"] for s in manifest["shards"]] == [[0], [1], [2], [3]]
    joined = Trainer(tiny_config(*EP, "parallel.dispatch=simulated", *placed), str(tmp_path / "eval"),
                     log=lambda line: None)
    assert checkpoint.load(folder, [joined.model, joined.optimizer], STATE_KEYS)["step"] == 5
    assert joined.evaluator.evaluate()["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-5)

    # The 4 rank shards reshard to 2 and back, and to one file and back, bit for bit (a placement's window of counts
    # per source rank is [W, E]: it restarts on another world size, and is empty after the step-5 placement).
    two = convert.reshard(folder, str(tmp_path / "ep2"), 2)
    consolidated = convert.reshard(folder, str(tmp_path / "one"), consolidate=True)
    for path in (two, consolidated):
        assert same_tensors(folder, path, skip=("placement_window",)), path
    for path in (convert.reshard(two, str(tmp_path / "ep4"), 4),
                 convert.reshard(consolidated, str(tmp_path / "one_ep4"), 4)):
        assert same_tensors(folder, path), path


FAILING_WORKER = """
import sys
from mindspore.communication import get_rank, init
from mindspore import Tensor, ops
init()
if get_rank() == 1:
    raise RuntimeError("worker 1 fails on purpose")
ops.AllReduce()(Tensor(1.0)).asnumpy()  # the others block here, waiting for rank 1
"""


@pytest.mark.msrun
def test_a_failed_worker_stops_the_whole_job(tmp_path):
    script = tmp_path / "failing_worker_marker.py"
    script.write_text(FAILING_WORKER)
    done, seconds = _launch(tmp_path, "--script", str(script), "--", "x")
    assert done.returncode == 1
    assert "worker failed" in done.stderr and "worker 1 fails on purpose" in done.stderr
    assert seconds < 120
    assert not _ours("failing_worker_marker")


LOOPING_WORKER = """
import os, time
from mindspore.communication import get_rank, init
from mindspore import Tensor, ops
init()
print("pid", os.getpid(), flush=True)
for _ in range(3000):
    ops.AllReduce()(Tensor(1.0)).asnumpy()
    time.sleep(0.1)
"""


@pytest.mark.msrun
def test_a_killed_worker_ends_the_job_within_a_minute_naming_its_rank(tmp_path):
    script = tmp_path / "looping_worker_marker.py"
    script.write_text(LOOPING_WORKER)
    logs = tmp_path / "logs"
    cmd = ["bash", LAUNCHER, "--workers", "4", "--python", sys.executable, "--log-dir", str(logs), "--timeout", "400",
           "--script", str(script), "--", "x"]
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(tmp_path))
    victim = None
    for _ in range(240):  # the workers start and print their pids
        time.sleep(0.5)
        found = [line.split()[1] for line in (logs / "worker_1.log").read_text().splitlines()
                 if line.startswith("pid ")] if (logs / "worker_1.log").exists() else []
        if found:
            victim = int(found[0])
            break
    assert victim, "worker 1 did not start"
    time.sleep(2)
    os.kill(victim, 9)  # SIGKILL: no traceback, no clean exit
    killed = time.monotonic()
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 1 and time.monotonic() - killed < 60
    assert f"ended before the job did, earliest first: rank 1 (pid {victim}" in err
    assert not _ours("looping_worker_marker")


@pytest.mark.parametrize("script", ["run_msrun_cpu.sh", "run_cpu_sim.sh", "run_ascend_cluster.sh"])
def test_launcher_help_is_a_clean_usage_text(script):
    done = subprocess.run(["bash", os.path.join(REPO, "run_scripts", script), "--help"], capture_output=True, text=True)
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and "Usage:" in lines and len(lines) > 5
    assert not any(line.startswith(("#", "set ", ". ")) for line in lines)


ASCEND = os.path.join(REPO, "run_scripts", "run_ascend_cluster.sh")
GOLDEN_2X8 = ("ASCEND_RT_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 ASCEND_PROCESS_LOG_PATH=logs/ep16/plog HCCL_CONNECT_TIMEOUT=600 "
              "HCCL_EXEC_TIMEOUT=1800 HCCL_BUFFSIZE=200 msrun --worker_num=16 --local_worker_num=8 "
              "--master_addr=10.0.0.1 --master_port=8118 --node_rank=1 --log_dir=logs/ep16 --join=True "
              "--cluster_time_out=600 PACKAGE/cli.py train --config configs/demo_cpu.yaml --out runs/my\\ run "
              "--set parallel.dispatch=hccl --set runtime.device=Ascend --set parallel.exchange=hierarchical "
              "--set parallel.nodes=2 --set parallel.devices_per_node=8")


def _ascend(*args):
    """run_ascend_cluster.sh with a PATH without msrun, so the printed line names plain `msrun`."""
    return subprocess.run(["bash", ASCEND, "--python", "/opt/py/bin/python", *args], capture_output=True, text=True,
                          env={**os.environ, "PATH": "/usr/bin:/bin"})


def test_ascend_cluster_dry_run_prints_the_golden_msrun_line(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# node 0 first\n10.0.0.1 slots=8\n\n  10.0.0.2\n")
    train = ["--", "train", "--config", "configs/demo_cpu.yaml", "--out", "runs/my run"]
    for where in (["--master-addr", "10.0.0.1"], ["--hostfile", str(hosts)]):
        done = _ascend("--nodes", "2", "--devices-per-node", "8", "--node-rank", "1", *where, "--log-dir",
                       "logs/ep16", "--exchange", "hierarchical", "--dry-run", *train)
        assert done.returncode == 0, done.stderr
        assert done.stdout == GOLDEN_2X8.replace("PACKAGE", os.path.join(REPO, "pangu_moe")) + "\n"
    table = tmp_path / "rank_table.json"
    table.write_text("{}")
    done = _ascend("--nodes", "2", "--devices-per-node", "2", "--node-rank", "0", "--master-addr", "h0", "--devices",
                   "4,5", "--rank-table", str(table), "--dry-run", "--", "train")
    assert done.stdout.startswith("ASCEND_RT_VISIBLE_DEVICES=4,5 ") and f"RANK_TABLE_FILE={table} msrun" in done.stdout
    assert f"--rank_table_file={table} " in done.stdout and not (tmp_path / "logs").exists()


@pytest.mark.parametrize("args,message", [
    (["--nodes", "2", "--devices-per-node", "8", "--node-rank", "2", "--master-addr", "a"],
     "--node-rank = 2: must be in [0, 2)"),
    (["--nodes", "3", "--devices-per-node", "8", "--node-rank", "0", "--hostfile", "HOSTS"],
     "2 hosts; must list --nodes = 3, node 0 first"),
    (["--nodes", "2", "--devices-per-node", "8", "--node-rank", "0", "--hostfile", "HOSTS", "--master-addr", "b"],
     "--master-addr = b: differs from the hostfile's node 0 (a)"),
    (["--nodes", "2", "--devices-per-node", "8", "--node-rank", "0", "--master-addr", "a", "--devices", "0,1"],
     "--devices = 0,1: 2 ids; must name --devices-per-node = 8"),
    (["--nodes", "2", "--devices-per-node", "8", "--node-rank", "0"], "--master-addr: required"),
    (["--nodes", "2", "--devices-per-node", "8", "--node-rank", "0", "--master-addr", "a", "--rank-table", "none"],
     "--rank-table = none: no such file"),
    (["--nodes", "2", "--devices-per-node", "2", "--node-rank", "0", "--master-addr", "a", "--devices", "3,3"],
     "--devices = 3,3: an id appears twice"),
])
def test_ascend_cluster_rejects_bad_arguments(args, message, tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("a\nb\n")
    done = _ascend(*[str(hosts) if a == "HOSTS" else a for a in args], "--dry-run", "--", "train")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr


def test_launcher_rejects_bad_arguments(tmp_path):
    done = subprocess.run(["bash", LAUNCHER, "--workers", "0", "--", "train"], capture_output=True, text=True)
    assert done.returncode == 2 and "--workers = 0: must be a positive integer" in done.stderr
    done = subprocess.run(["bash", LAUNCHER, "--python", sys.executable, "--script", str(tmp_path / "none.py")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "none.py: no such file" in done.stderr


@pytest.mark.parametrize("overrides,message", [
    (("parallel.exchange=hierarchical",),
     "parallel.exchange = 'hierarchical': must be flat with parallel.dispatch=local"),
    (("parallel.dispatch=simulated", "parallel.devices_per_node=8", "train.batch_size=8"),
     "parallel.dispatch = 'simulated': must be local when W = 8 ranks does not divide moe.num_experts=4"),
    (("parallel.dispatch=msrun_cpu", "moe.router=locmoe", "moe.capacity_mode=locmoe_bound"),
     "moe.capacity_mode = 'locmoe_bound': must be factor with parallel.dispatch=msrun_cpu"),
    (("parallel.dispatch=hccl",), "runtime.device = 'CPU': must be Ascend for parallel.dispatch=hccl"),
])
def test_parallel_config_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_config(*overrides)

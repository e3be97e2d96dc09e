"""DDP on CPU (gloo, loopback): `speclora fit --trainer.strategy=ddp` in subprocesses, checked rank by rank.

Lightning's ``ddp`` strategy relaunches the command line for the other ranks, so every distributed run is a
``python -m speclora ...`` subprocess (its own session, killed whole on timeout). Each rank writes what it saw
and holds through the test-only callback :class:`tests.distributed.dump.DumpState`. One DDP run of SpecLoRA
(module fixture, 2 processes, 6 steps over 2 epochs of 4 global batches, validation every 2 steps, checkpoints
at steps 3 and 6) serves several tests; the per-method runs are marked ``slow``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.distributed.dump import TASK_STRIDE

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 240  # seconds per subprocess run; a hung collective must fail the test, not the session
BATCH, WORLD, SAMPLES_PER_EPOCH = 8, 2, 64  # 4 global batches of 16 per epoch
STEPS = 6
DUMP = "tests.distributed.dump.DumpState"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(data_root: Path, port: int, **extra: str) -> dict[str, str]:
    """The parent's environment without any launcher's variables (SLURM, torchrun), on loopback."""
    launcher = ("SLURM_", "TORCHELASTIC_", "PL_")
    dropped = {"LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
               "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in dropped and not k.startswith(launcher)}
    env.update(SPECLORA_DATA=str(data_root), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONWARNINGS="ignore")
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"
    env.update(extra)
    return env


def _args(tiny_backbone: str, data_root: Path, cache: Path, root: Path, dump: Path, *extra: str,
          hold_at_step: int | None = None) -> list[str]:
    """The small suite on the tiny encoder and ``extra``, then a DumpState writing under ``dump``."""
    return [
        "--config", str(REPO / "configs" / "default.yaml"),
        "--config", str(REPO / "configs" / "suites" / "small.yaml"),
        "--model.backbone", tiny_backbone,
        "--data.data_dir", str(data_root),
        "--data.cache_dir", str(cache),
        "--data.max_length", "48",
        "--data.batch_size", str(BATCH),
        "--data.samples_per_epoch", str(SAMPLES_PER_EPOCH),
        "--trainer.default_root_dir", str(root),
        "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.num_sanity_val_steps", "0",
        *extra,
        f"--trainer.callbacks+={DUMP}", f"--trainer.callbacks.out_dir={dump}",
        *([f"--trainer.callbacks.hold_at_step={hold_at_step}"] if hold_at_step is not None else []),
    ]


def _ckpt_every(n: int) -> list[str]:
    return ["--trainer.callbacks+=ModelCheckpoint", f"--trainer.callbacks.every_n_train_steps={n}",
            "--trainer.callbacks.save_top_k=-1", "--trainer.callbacks.filename={step}"]


def _start(args: list[str], env: dict[str, str], log: Path, torchrun: int | None = None) -> subprocess.Popen:
    """``python -m speclora ARGS`` in its own session; ``torchrun=N`` starts it as N ranks through torchrun
    (all at once, Lightning then relaunches nothing) instead of Lightning's own ``ddp`` launcher."""
    launcher = [] if torchrun is None else [
        "-m", "torch.distributed.run", "--nnodes", "1", f"--nproc_per_node={torchrun}",
        "--master_addr", env["MASTER_ADDR"], "--master_port", env["MASTER_PORT"]]
    out = open(log, "w")  # noqa: SIM115 - closed by _finish
    proc = subprocess.Popen([sys.executable, *launcher, "-m", "speclora", *args], cwd=REPO, env=env, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)
    proc.log_file = out
    return proc


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc): torchrun starts its ranks in sessions of their own."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the run: its session (the launcher and the ranks Lightning started) and every descendant."""
    tree = _descendants(proc.pid)  # before the kill: orphans are re-parented and could no longer be found
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    proc.log_file.close()


def _finish(proc: subprocess.Popen, log: Path, deadline: float) -> None:
    try:
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        _kill(proc)
        pytest.fail(f"run timed out after {TIMEOUT} s; log tail:\n{log.read_text()[-3000:]}")
    proc.log_file.close()
    assert proc.returncode == 0, f"run failed (rc {proc.returncode}); log tail:\n{log.read_text()[-3000:]}"


def _run(args: list[str], env: dict[str, str], log: Path, torchrun: int | None = None) -> None:
    _finish(_start(args, env, log, torchrun), log, time.monotonic() + TIMEOUT)


def _dumps(folder: Path, stage: str = "fit", world: int = WORLD) -> list[dict]:
    return [torch.load(folder / f"{stage}_rank{r}.pt", weights_only=False) for r in range(world)]


def _equal(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _assert_params_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    differ = [n for n in a if not torch.equal(a[n], b[n])]
    assert not differ, f"{what}: {len(differ)} trainable tensors differ, e.g. {differ[:3]}"


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "token_cache"


@pytest.fixture(scope="module")
def global_stream(tiny_backbone, data_root, cache) -> dict[int, list[int]]:
    """The single-process view: global step -> the global batch (BATCH * WORLD examples) of the mixture stream,
    as ``task * TASK_STRIDE + uid``; built in this process (it also fills the token cache for the runs)."""
    import yaml

    from speclora.data.datamodule import MultiTaskDataModule
    from speclora.data.mixture import MixtureBatchSampler

    data = {}  # the data settings of the runs: the default job, the small suite, then _args's overrides
    for config in (REPO / "configs" / "default.yaml", REPO / "configs" / "suites" / "small.yaml"):
        data.update(yaml.safe_load(config.read_text())["data"])
    data.update(data_dir=str(data_root), tokenizer=tiny_backbone, max_length=48, batch_size=BATCH,
                cache_dir=str(cache), samples_per_epoch=SAMPLES_PER_EPOCH, seed=0)
    dm = MultiTaskDataModule(**data)
    dm.setup("fit")
    parts = [p for _, p in dm._parts["train"]]
    sampler = MixtureBatchSampler(dm.train_sizes, BATCH * WORLD, strategy=dm.mixing, temperature=dm.temperature,
                                  samples_per_epoch=SAMPLES_PER_EPOCH, seed=0)
    stream: dict[int, list[int]] = {}
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for batch in sampler:
            stream[len(stream)] = [t * TASK_STRIDE + int(parts[t].rows[r]) for t, r in batch]
    return stream


@pytest.fixture(scope="module")
def ddp_run(tiny_backbone, data_root, cache, global_stream, tmp_path_factory) -> dict[str, Path]:
    """SpecLoRA, ``--trainer.strategy=ddp --trainer.devices=2``, 6 steps; each rank's dump under ``dump``."""
    root = tmp_path_factory.mktemp("ddp_run")
    spec = ["--config", str(REPO / "tests" / "distributed" / "speclora_tiny.yaml")]
    train = [*spec, "--trainer.strategy", "ddp", "--trainer.devices", str(WORLD), "--trainer.max_steps", str(STEPS),
             "--trainer.val_check_interval", "2", *_ckpt_every(3)]
    _run(["fit", *_args(tiny_backbone, data_root, cache, root / "runs", root / "dump", *train)],
         _env(data_root, _free_port()), root / "fit.log")
    ckpts = list((root / "runs").rglob("step=3.ckpt"))
    assert len(ckpts) == 1, f"expected one step=3.ckpt (written by rank 0 only), found {ckpts}"
    return {"dump": root / "dump", "ckpt_dir": ckpts[0].parent, "train": train, "spec": spec}


# ---------------------------------------------------------------------------------------------- two processes
def test_ranks_take_disjoint_halves_of_the_single_process_stream(ddp_run, global_stream):
    ranks = _dumps(ddp_run["dump"])
    assert [d["world_size"] for d in ranks] == [WORLD] * WORLD
    for step in range(STEPS):  # steps 0-3 are epoch 0, steps 4-5 epoch 1
        seen = [d["batches"][step] for d in ranks]
        assert all(len(b) == BATCH for b in seen)
        # rank r takes the r-th slice of the global batch: no overlap, no loss, the single-process order
        assert seen[0] + seen[1] == global_stream[step], f"step {step}: ranks do not split the global batch"


def test_ranks_hold_identical_spectral_state_and_parameters(ddp_run):
    ranks = _dumps(ddp_run["dump"])
    spectral = [d["spectral"] for d in ranks]
    assert sorted(spectral[0]) == list(range(STEPS)) == sorted(spectral[1])
    assert spectral[0][STEPS - 1]["counters"]["refreshes"] == 3  # refreshed at steps 0, 2, 4 (refresh_every=2)
    for step in range(STEPS):
        a, b = spectral[0][step], spectral[1][step]
        for key in ("corr", "values", "vectors", "h_learned", "delta_prev", "theta0", "counters"):
            assert _equal(a[key], b[key]), f"step {step}: spectral {key} differs between ranks"
    assert ranks[0]["spectral"][STEPS - 1]["h_learned"][0] is not None
    _assert_params_equal(ranks[0]["params"], ranks[1]["params"], "rank 0 vs rank 1 after training")


def test_ddp_validation_equals_a_single_process_validation(ddp_run, tiny_backbone, data_root, cache, tmp_path):
    from speclora.cli import main

    ranks = _dumps(ddp_run["dump"])
    assert sorted(ranks[0]["metrics"]) == [2, 4, STEPS]
    assert ranks[0]["metrics"] == ranks[1]["metrics"], "ranks logged different (unsynchronised) metrics"
    ddp = ranks[0]["metrics"][STEPS]
    assert {"val/average", "val/rte/accuracy", "val/stsb/pearson", "val/copa/score"} <= ddp.keys()
    args = _args(tiny_backbone, data_root, cache, tmp_path / "runs", tmp_path / "dump", *ddp_run["spec"],
                 "--trainer.devices", "1", "--ckpt_path", str(ddp_run["ckpt_dir"] / f"step={STEPS}.ckpt"))
    main(["validate", *args])
    (single,) = torch.load(tmp_path / "dump" / "validate_rank0.pt", weights_only=False)["metrics"].values()
    assert single.keys() == ddp.keys()
    for key, value in single.items():
        # the same examples and predictions; only the float order of the synced reductions differs
        assert ddp[key] == pytest.approx(value, rel=1e-5, abs=1e-5), f"{key}: DDP {ddp[key]} vs one process {value}"


def test_killed_ddp_run_resumes_where_it_stopped(ddp_run, tiny_backbone, data_root, cache, tmp_path):
    """Kill a DDP run held after its step-3 checkpoint; resumed, it sees the batches and ends with the weights,
    spectral state and dropout streams of the uninterrupted run (ddp_run). Both runs start through torchrun (the
    uninterrupted one through Lightning's launcher): the checkpoint does not depend on the launcher."""
    killed, resumed = tmp_path / "killed", tmp_path / "resumed"
    args = _args(tiny_backbone, data_root, cache, killed / "runs", killed / "dump", *ddp_run["train"],
                 hold_at_step=3)
    proc = _start(["fit", *args], _env(data_root, _free_port()), tmp_path / "killed.log", torchrun=WORLD)
    deadline = time.monotonic() + TIMEOUT
    while not all((killed / "dump" / f"holding_rank{r}").exists() for r in range(WORLD)):
        if proc.poll() is not None or time.monotonic() > deadline:
            _kill(proc)
            pytest.fail(f"the run to kill ended or hung before step 3:\n{(tmp_path / 'killed.log').read_text()[-3000:]}")
        time.sleep(0.5)
    _kill(proc)
    assert proc.returncode == -signal.SIGKILL
    (ckpt,) = (killed / "runs").rglob("step=3.ckpt")
    assert not list((killed / "runs").rglob("step=6.ckpt"))

    args = _args(tiny_backbone, data_root, cache, resumed / "runs", resumed / "dump", *ddp_run["train"],
                 "--ckpt_path", str(ckpt))
    _run(["fit", *args], _env(data_root, _free_port()), tmp_path / "resumed.log", torchrun=WORLD)
    full, again = _dumps(ddp_run["dump"]), _dumps(resumed / "dump")
    for r in range(WORLD):
        assert sorted(again[r]["batches"]) == [3, 4, 5], "the resumed run did not continue from step 3"
        for step in (3, 4, 5):  # step 3 ends epoch 0 mid-way resumed, steps 4-5 open epoch 1
            assert again[r]["batches"][step] == full[r]["batches"][step], f"rank {r} step {step}: another batch"
        assert _equal(again[r]["spectral"][STEPS - 1], full[r]["spectral"][STEPS - 1]), "spectral state differs"
        _assert_params_equal(again[r]["params"], full[r]["params"], f"rank {r}, resumed vs uninterrupted")


def test_ddp_checkpoint_resumes_in_one_process(ddp_run, global_stream, tiny_backbone, data_root, cache, tmp_path):
    """World size 2 -> 1: the 3 * 2 consumed batches of 8 are 6 batches of 8 for one process, which then takes
    the rest of epoch 0 (the two halves of global batch 3) and epoch 1 from its start."""
    from speclora.cli import main

    args = _args(tiny_backbone, data_root, cache, tmp_path / "runs", tmp_path / "dump", *ddp_run["spec"],
                 "--trainer.devices", "1", "--trainer.max_steps", str(STEPS), "--trainer.limit_val_batches", "0",
                 "--ckpt_path", str(ddp_run["ckpt_dir"] / "step=3.ckpt"))
    main(["fit", *args])
    (single,) = _dumps(tmp_path / "dump", world=1)
    g3, g4 = global_stream[3], global_stream[4]
    assert single["batches"] == {3: g3[:BATCH], 4: g3[BATCH:], 5: g4[:BATCH]}


# ---------------------------------------------------------------------------------------------- two nodes
def test_two_simulated_nodes_on_loopback(tiny_backbone, data_root, cache, global_stream, tmp_path):
    """num_nodes=2, devices=1: two processes started by hand with NODE_RANK 0/1 and one MASTER_ADDR:PORT, as on
    two machines; Ortho-LoRA, whose per-task gradients are averaged over the ranks before projection."""
    port = _free_port()
    train = ["--config", str(REPO / "configs" / "methods" / "ortho.yaml"), "--trainer.strategy", "ddp",
             "--trainer.devices", "1", "--trainer.num_nodes", "2", "--trainer.max_steps", "3",
             "--trainer.val_check_interval", "3"]
    args = _args(tiny_backbone, data_root, cache, tmp_path / "runs", tmp_path / "dump", *train)
    procs = [_start(["fit", *args], _env(data_root, port, NODE_RANK=str(n)), tmp_path / f"node{n}.log")
             for n in range(2)]
    deadline = time.monotonic() + TIMEOUT
    try:
        for n, proc in enumerate(procs):
            _finish(proc, tmp_path / f"node{n}.log", deadline)
    finally:
        for proc in procs:
            if proc.returncode is None:  # a node failed: do not leave the other waiting in a collective
                _kill(proc)
    ranks = _dumps(tmp_path / "dump")
    assert [d["world_size"] for d in ranks] == [2, 2]
    for step in range(3):
        assert ranks[0]["batches"][step] + ranks[1]["batches"][step] == global_stream[step]
    _assert_params_equal(ranks[0]["params"], ranks[1]["params"], "node 0 vs node 1 after training")
    assert ranks[0]["metrics"] == ranks[1]["metrics"] and "val/average" in ranks[0]["metrics"][3]
    assert len(list((tmp_path / "runs").rglob("last.ckpt"))) == 1
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in (tmp_path / "node1.log").read_text()


# ---------------------------------------------------------------------------------------------- every method
@pytest.mark.slow
@pytest.mark.parametrize("method", ["independent", "shared", "single", "unolora_star", "hyperformer", "adalora",
                                    "mtlora", "full_ft", "famo", "cagrad",
                                    "nash_mtl", "mtl_lora"])
def test_every_method_trains_under_ddp(method, tiny_backbone, data_root, cache, tmp_path):
    config = REPO / "configs" / "methods" / f"{method}.yaml"
    extra = ["--data.tasks", "[rte]"] if method == "single" else []
    train = ["--config", str(config), *extra, "--trainer.strategy", "ddp", "--trainer.devices", str(WORLD),
             "--trainer.max_steps", "3", "--trainer.val_check_interval", "3"]
    args = _args(tiny_backbone, data_root, cache, tmp_path / "runs", tmp_path / "dump", *train)
    _run(["fit", *args], _env(data_root, _free_port()), tmp_path / "fit.log")
    ranks = _dumps(tmp_path / "dump")
    _assert_params_equal(ranks[0]["params"], ranks[1]["params"], f"{method}: rank 0 vs rank 1")
    assert ranks[0]["metrics"] == ranks[1]["metrics"]


@pytest.mark.slow
def test_ddp_test_stage_equals_a_single_process_test(ddp_run, tiny_backbone, data_root, cache, tmp_path):
    from speclora.cli import main

    ckpt = str(ddp_run["ckpt_dir"] / f"step={STEPS}.ckpt")
    args = _args(tiny_backbone, data_root, cache, tmp_path / "ddp", tmp_path / "ddp_dump", *ddp_run["spec"],
                 "--trainer.strategy", "ddp", "--trainer.devices", str(WORLD), "--ckpt_path", ckpt)
    _run(["test", *args], _env(data_root, _free_port()), tmp_path / "test.log")
    ddp = _dumps(tmp_path / "ddp_dump", "test")
    assert ddp[0]["metrics"] == ddp[1]["metrics"]
    args = _args(tiny_backbone, data_root, cache, tmp_path / "one", tmp_path / "one_dump", *ddp_run["spec"],
                 "--trainer.devices", "1", "--ckpt_path", ckpt)
    main(["test", *args])
    (single,) = _dumps(tmp_path / "one_dump", "test", world=1)
    (got,), (want,) = ddp[0]["metrics"].values(), single["metrics"].values()
    assert got.keys() == want.keys() and "test/average" in got
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-5), key

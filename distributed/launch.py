"""Start a recipe on several processes with torchrun, and join the process group inside them.

``slimtune run RECIPE --nproc 2`` (or a recipe with ``distributed.nproc: 2``)
checks everything it can first (recipe, model, data, how many processes
this machine can run, the rendezvous endpoint), then runs
``python -m torch.distributed.run ... -m slimtune run <run_dir>/recipe.yaml``
and waits. torchrun owns the worker processes: it restarts them
(``--max-restarts``) when one dies and kills the rest when one fails, so
nothing is left behind. Inside a worker, :func:`init_process_group` joins
(gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import gc
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from slimtune.errors import LaunchError, RunFailed, SlimTuneError

DEFAULT_PORT = 29400
ERROR_FILE = "SLIMTUNE_ERROR_FILE"  # where a launched rank reports a user error to the launching process


def in_torchrun() -> bool:
    """True inside a process started by torchrun (or another launcher setting the env:// variables)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def restart_count() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def cpu_cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_device(device: torch.device) -> torch.device:
    """This worker's device: ``cuda:LOCAL_RANK`` on GPUs, the CPU otherwise."""
    if device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def init_process_group(device: torch.device) -> bool:
    """Join the default process group from torchrun's env; False if one was already up."""
    if dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun's agent hosts the store
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=rank == 0 and not agent_store,
                          timeout=timedelta(minutes=5))
    # A restarted job meets in the same store: keep each attempt's keys apart
    # so no rank reads an address a dead attempt left behind.
    store = dist.PrefixStore(f"slimtune/attempt-{restart_count()}", store)
    # Long timeout: ranks wait at a barrier while rank 0 measures or exports.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank, world_size=world,
                            timeout=timedelta(minutes=60))
    return True


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def decided_by_main(decision: bool) -> bool:
    """Rank 0's ``decision``, on every rank (the value itself when not distributed).

    Decisions read from the file system (is a stage finished and intact?) must
    be taken once: a rank that looks later can see what rank 0 wrote meanwhile,
    take the other branch and leave its peers waiting in a collective.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return decision
    box = [decision]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def close_process_group(completed: bool) -> None:
    """Leave the default process group so that this rank's process exits cleanly.

    After a completed run every rank first meets at a barrier, so no
    collective is pending anywhere, and cyclic garbage is collected: FSDP2's
    state is full of reference cycles that keep the sharded module, its device
    mesh, the gloo group and that group's last work objects alive. Left to
    interpreter shutdown, that group is torn down while its worker threads
    still hold work whose tensors need the (finalizing) interpreter, and the
    process dies in ``std::terminate`` ("terminate called without an active
    exception", SIGABRT) although every stage finished.

    After a failure (``completed=False``) a peer may be waiting in a collective
    this rank will never join: no barrier, and the failure is recorded for
    torchrun, which prints it in its summary and stops the other ranks.
    """
    if not dist.is_initialized():
        return
    if completed:
        dist.barrier()
    gc.collect()
    dist.destroy_process_group()


@contextmanager
def process_group(device: torch.device, join: bool = True) -> Iterator[None]:
    """Join the default process group (when ``join`` and none is up) for the ``with`` body, and leave it
    as :func:`close_process_group` says: deliberately, after a barrier when the body completed, with the
    error recorded for torchrun when it raised."""
    own = join and init_process_group(device)
    try:
        yield
    except BaseException as err:
        if own:
            record_failure(err)
            close_process_group(completed=False)
        raise
    if own:
        close_process_group(completed=True)


def record_failure(err: BaseException) -> None:
    """Hand an unexpected error of this rank to torchrun's error file (its summary names the root cause)."""
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    if in_torchrun() and isinstance(err, Exception) and not isinstance(err, SlimTuneError):  # user errors: report_user_error
        ErrorHandler().record_exception(err)


def check_launch(nproc: int, nnodes: int, device: torch.device, node_rank: int = 0, rdzv_endpoint: str | None = None) -> None:
    """Refuse launches this machine cannot run, before any process starts."""
    if device.type == "cuda":
        available, what = torch.cuda.device_count(), "GPUs"
    else:
        available, what = cpu_cores(), "CPU cores"
    if nproc > available:
        raise LaunchError(f"nproc {nproc} is more processes than this machine has {what} ({available})",
                          f"use --nproc {available} or fewer per machine, and --nnodes/--node-rank/--rdzv-endpoint to add machines")
    if not 0 <= node_rank < nnodes:
        raise LaunchError(f"node rank {node_rank} is outside 0..{nnodes - 1} for --nnodes {nnodes}", "number the machines 0, 1, ... nnodes-1")
    if nnodes > 1:
        if not rdzv_endpoint:
            raise LaunchError(f"--nnodes {nnodes} needs a rendezvous endpoint", "pass --rdzv-endpoint HOST:PORT: a free port on machine 0 that every machine can reach")
        host, port = split_endpoint(rdzv_endpoint)
        if not (node_rank == 0 and is_local(host)):  # machine 0 hosts the rendezvous; the others must reach it
            try:
                socket.create_connection((host, port), timeout=10).close()
            except OSError as err:
                raise LaunchError(f"rendezvous endpoint {host}:{port} is unreachable ({err.strerror or err})",
                                  "start machine 0 (--node-rank 0) first, and check the host, the port and the firewall") from None


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":") if ":" in endpoint else (endpoint, "", str(DEFAULT_PORT))
    try:
        number = int(port)
        if not 0 < number < 65536:
            raise ValueError
    except ValueError:
        raise LaunchError(f"rendezvous endpoint {endpoint!r} has no valid port", "write it as HOST:PORT, e.g. 10.0.0.1:29400") from None
    try:
        socket.getaddrinfo(host, number)
    except OSError:
        raise LaunchError(f"rendezvous host {host!r} does not resolve", "use an IP address or a host name every machine can resolve") from None
    return host, number


def is_local(host: str) -> bool:
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    if any(ipaddress.ip_address(a).is_loopback for a in addresses):
        return True
    try:
        mine = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        mine = set()
    return bool(addresses & mine)


def torchrun_command(args: list[str], nproc: int, nnodes: int = 1, node_rank: int = 0, rdzv_endpoint: str | None = None,
                     max_restarts: int = 0, run_id: str = "slimtune") -> list[str]:
    """The torchrun command line that runs ``python -m slimtune ARGS`` on every rank."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}"]
    if nnodes == 1:
        cmd.append("--standalone")
    else:
        cmd += [f"--nnodes={nnodes}", f"--node-rank={node_rank}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}",
                f"--rdzv-id={run_id}"]
    return cmd + ["-m", "slimtune", *args]


def launch(args: list[str], nproc: int, nnodes: int = 1, node_rank: int = 0, rdzv_endpoint: str | None = None,
           max_restarts: int = 0, run_id: str = "slimtune") -> None:
    """Run ``slimtune ARGS`` under torchrun and wait; raise RunFailed if it fails."""
    cmd = torchrun_command(args, nproc, nnodes, node_rank, rdzv_endpoint, max_restarts, run_id)
    error_file = Path(tempfile.mkdtemp(prefix="slimtune-launch-")) / "error.json"
    try:
        code = _run_torchrun(cmd, error_file, nproc)
        if code != 0 and error_file.is_file():
            raise user_error_from(error_file)
    finally:
        shutil.rmtree(error_file.parent, ignore_errors=True)
    if code != 0:
        raise RunFailed(f"the distributed run failed (torchrun exit code {code}); the ranks' errors are printed above",
                        "finished stages are kept; fix the cause and re-run to resume")


def _run_torchrun(cmd: list[str], error_file: Path, nproc: int) -> int:
    env = dict(os.environ)
    env[ERROR_FILE] = str(error_file)
    env.setdefault("OMP_NUM_THREADS", str(max(1, cpu_cores() // nproc)))  # torchrun would force 1 and warn
    env["SLIMTUNE_LAUNCHED"] = "1"  # the launching process reports
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait()
    except BaseException:  # Ctrl-C or a kill: torchrun stops its workers on SIGTERM
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        raise


def report_user_error(err: SlimTuneError) -> bool:
    """In a launched rank: hand a user error to the launching process (the first rank to fail wins).

    Returns True when it was handed over (the launcher prints it and exits with its code).
    """
    path = os.environ.get(ERROR_FILE)
    if not path or not in_torchrun():
        return False
    payload = json.dumps({"message": err.message, "hint": err.hint, "exit_code": getattr(err, "exit_code", 2)})
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        return True
    with os.fdopen(fd, "w") as f:
        f.write(payload)
    return True


def user_error_from(path: Path) -> SlimTuneError:
    """The user error a rank reported, with its exit code (2 for bad input found once the model was loaded)."""
    data = json.loads(path.read_text())
    err = SlimTuneError(data["message"], data.get("hint"))
    err.exit_code = data.get("exit_code", 2)
    return err

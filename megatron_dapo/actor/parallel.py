"""Process-group setup for the Megatron actor (gloo on CPU, NCCL on GPU)."""
from __future__ import annotations

import os
import socket
from typing import Optional

import torch
import torch.distributed as dist

from ..backend import has_cuda
from ..cpu_shims import apply_cpu_shims
from ..launch.dist_env import resolve_dist_env
from ..sync.collective import set_collective_timeout


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_env():
    """(rank, world_size, local_rank, master_addr, master_port) from torchrun, Slurm or defaults."""
    try:
        env = resolve_dist_env()
        return env.rank, env.world_size, env.local_rank, env.master_addr, int(env.master_port)
    except ImportError:
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
        local = int(os.environ.get("LOCAL_RANK", 0))
        return rank, world, local, os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", 0))


def init_parallel(tp: int = 1, pp: int = 1, vpp: Optional[int] = None, cp: int = 1, seed: int = 1234,
                  timeout_s: float = 1800.0, ep: int = 1, etp: Optional[int] = None) -> None:
    """Initialise ``torch.distributed`` (if needed) and megatron-core's model-parallel groups.

    Reads rank / world size / master address from torchrun or Slurm (``launch.dist_env``); a single
    process without any of them gets a private free port.

    Args:
        ep: expert-parallel size (MoE: each EP rank holds ``num_experts / ep`` routed experts).
        etp: expert-tensor-parallel size (``None``: TP, megatron-core's default).
        timeout_s: timeout of every collective (seconds; ``trainer.collective_timeout_min`` x 60): the
            default process group, megatron-core's groups and, through
            :func:`~megatron_dapo.sync.collective.collective_timeout`, the
            groups the trainer creates later. A collective that waits longer (a dead or stuck rank) raises
            instead of hanging (NCCL: with ``TORCH_NCCL_ASYNC_ERROR_HANDLING=1``, set by slurm/common.sh,
            the watchdog aborts the process). A default group that already exists keeps its own timeout.

    Raises:
        ValueError: TP × PP × CP or ETP × EP × PP does not divide the world size, or timeout_s <= 0.
    """
    apply_cpu_shims()
    # heavy: megatron-core, imported once a model is built (after the CPU shims)
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    timeout = set_collective_timeout(timeout_s)
    if not dist.is_initialized():
        rank, world, local, addr, port = _dist_env()
        if world == 1 and not port:
            port = free_port()
        backend = "nccl" if has_cuda() else "gloo"
        if has_cuda():
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend, init_method=f"tcp://{addr}:{port}", rank=rank,
                                world_size=world, timeout=timeout)
    world = dist.get_world_size()
    if world % (tp * pp * cp):
        raise ValueError(f"TP({tp}) x PP({pp}) x CP({cp}) must divide the world size {world}")
    etp_size = tp if etp is None else etp
    if world % (etp_size * ep * pp):
        raise ValueError(f"expert_tensor_parallel_size({etp_size}) x expert_model_parallel_size({ep}) x PP({pp}) "
                         f"must divide the world size {world}")
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 virtual_pipeline_model_parallel_size=vpp, context_parallel_size=cp,
                                 expert_model_parallel_size=ep, expert_tensor_parallel_size=etp,
                                 distributed_timeout_minutes=timeout_s / 60.0)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    """Tear down megatron-core groups and the default process group (safe to call twice)."""
    try:
        # heavy: megatron-core, imported once a model is built (after the CPU shims)
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
    except ImportError:
        pass
    if dist.is_initialized():
        dist.destroy_process_group()

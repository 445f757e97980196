"""Distributed training and evaluation (``torch.distributed``): one process per device, NCCL on GPUs, gloo on CPU.

RecBole 1.2.1 already splits the data (a ``DistributedSampler`` per loader), wraps the model in
``DistributedDataParallel`` and starts one process per device (``recbole.quick_start.run(nproc=...)``); but it only
works on CUDA (``Config._init_device`` hard-codes NCCL and ``cuda:local_rank``, the trainer passes
``device_ids=[local_rank]`` to DDP), and its metrics are *approximations*: every rank evaluates its share of the
users, and ``Trainer._map_reduce`` averages each metric over the ranks weighted by the rank's number of batches'
rows, after the sampler padded the shares to equal length by repeating rows. :mod:`recbole_mm.patch` fixes both
with the helpers of this module (each patch says what and why):

- :func:`init_device` (``Config._init_device`` in a distributed run): gloo and the CPU when no GPU is to be used,
  NCCL and ``cuda:local_rank`` otherwise; ranks other than 0 log errors only and show no progress bars;
- :func:`unpad_sampler` (the evaluation loaders): each rank evaluates ``rows[rank::world_size]``, every row once;
- :func:`gather_struct` (``Collector.get_data_struct``): the per-row evaluation data the metrics read (RecBole's
  ``rec.topk``, ``rec.items``, ``rec.meanrank``, ``rec.score``, ``data.label``) are gathered from every rank before
  the metrics are computed, so a 2-process evaluation gives the 1-process numbers (same rows, same metric code;
  only the row order differs), for every metric, additive or not (ShannonEntropy of the recommended items);
- :func:`shard_chunks` / :func:`all_gather_rows` (``MMSequentialRecommender.item_matrix``): an expensive item tower
  (an encoder in forward) encodes each rank's share of the catalogue's chunks, then the shares are gathered: each
  item is encoded once per evaluation across the ranks.

The process launcher (:func:`launch`) mirrors ``recbole.quick_start.run``: ``torch.multiprocessing.spawn`` of
``nproc`` processes on this machine, ranks ``group_offset + local_rank`` of ``world_size``, rendezvous at
``tcp://ip:port``; rank 0's return value comes back through a queue. Multi-node: run the same command on every
node with ``world_size = nproc * nnodes`` and ``group_offset = node_rank * nproc``.

This module imports only torch (the data and model layers use it).
"""

from __future__ import annotations

import os
import socket
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist

# The keys of RecBole's DataStruct that the evaluation batches fill (one row per evaluated row); the others
# (data.num_items, data.count_items, ...) come from the training data and are the same on every rank.
BATCH_KEYS = ("rec.topk", "rec.items", "rec.meanrank", "rec.score", "data.label")


# ------------------------------------------------------------------------------------------------- state
def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0 (or no process group): the process that writes checkpoints, logs and results."""
    return get_rank() == 0


def _comm_device() -> torch.device:
    """Where collective tensors must live: the current CUDA device for NCCL, the CPU otherwise."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown(barrier: bool = True) -> None:
    """End the process group, every rank together: a barrier, then ``destroy_process_group``. A rank that exits
    while a peer's gloo connection is still open can abort its peer ("terminate called without an active
    exception"); a no-op in one process. ``barrier=False`` on an error path, where the other ranks may be waiting
    in another collective."""
    if not dist.is_initialized():
        return
    try:
        if barrier:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (``obj`` itself without a process group)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_comm_device() if dist.get_backend() == "nccl" else None)
    return box[0]


def all_reduce_sum(value: float) -> float:
    if not is_distributed():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.item()


# --------------------------------------------------------------------------------------------- gathering
def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Each parameter's gradient becomes its mean over the ranks (a no-op in one process): for parameters stepped
    outside DDP's backward (e.g. FMMRec's attackers). A missing gradient (no row of this rank reached the
    parameter) joins the mean as zeros."""
    if not is_distributed():
        return
    world = get_world_size()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(world)


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0, in rank order (rows may differ per rank; dtype and the
    other dims must not). Returned on ``tensor``'s device."""
    if not is_distributed():
        return tensor
    dev, world = _comm_device(), dist.get_world_size()
    as_bool = tensor.dtype == torch.bool  # gloo has no bool collectives
    local = (tensor.to(torch.uint8) if as_bool else tensor).to(dev).contiguous()
    n = torch.tensor([local.shape[0]], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    padded = torch.zeros((max(sizes),) + tuple(local.shape[1:]), dtype=local.dtype, device=dev)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    out = torch.cat([p[:s] for p, s in zip(parts, sizes)], 0)
    return (out.bool() if as_bool else out).to(tensor.device)


def gather_struct(struct, keys: Iterable[str] = BATCH_KEYS) -> None:
    """Replace, in RecBole's ``DataStruct`` ``struct``, each of ``keys`` by its rows from every rank (in place). A
    rank that evaluated no row lacks the keys: their dtype and row shape are agreed on first."""
    if not is_distributed():
        return
    data = struct._data_dict
    mine = {k: (str(data[k].dtype), tuple(data[k].shape[1:])) for k in keys if k in data}
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    spec: dict = {}
    for d in everyone:
        spec.update(d)
    for key in sorted(spec):
        dtype, shape = getattr(torch, spec[key][0].replace("torch.", "")), spec[key][1]
        local = data[key] if key in data else torch.zeros((0,) + shape, dtype=dtype)
        data[key] = all_gather_rows(local).cpu()


# ------------------------------------------------------------------------------------------------ sharding
def unpad_sampler(sampler, n: int) -> None:
    """Make a ``DistributedSampler`` over ``n`` rows (no shuffle) yield ``range(rank, n, world)``: every row once
    across the ranks. As built by RecBole it pads the shares to equal length by repeating the first rows, so those
    rows would be counted twice by the metrics. (``DistributedSampler.__iter__`` pads to ``total_size`` and keeps
    ``num_samples`` rows per rank: both are set to the unpadded figures here.)"""
    rank, world = sampler.rank, sampler.num_replicas
    sampler.total_size = n
    sampler.num_samples = len(range(rank, n, world))
    sampler.drop_last = False


def shard_chunks(n_chunks: int, rank: Optional[int] = None, world: Optional[int] = None) -> range:
    """The contiguous block of ``range(n_chunks)`` that ``rank`` computes (the first ranks take one more)."""
    rank = get_rank() if rank is None else rank
    world = get_world_size() if world is None else world
    base, extra = divmod(n_chunks, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


# ------------------------------------------------------------------------------------------------ devices
def init_device(config) -> None:
    """``Config._init_device`` of a distributed run (``local_rank`` in the config; RecBole's original handles the
    single-process case). RecBole hard-codes NCCL and ``cuda:local_rank``; here the backend follows the device:
    NCCL on GPUs (``gpu_id`` lists at least ``nproc`` GPUs), gloo on the CPU (no GPU, or ``gpu_id: ''`` /
    ``use_gpu: False``). Rank = ``offset + local_rank`` of ``world_size``, rendezvous ``tcp://ip:port``."""
    d = config.final_config_dict
    gpu_id = d["gpu_id"]
    if isinstance(gpu_id, (tuple, list)):
        gpu_id = ",".join(map(str, gpu_id))
    gpu_id = "" if gpu_id is None else str(gpu_id)
    d["gpu_id"] = gpu_id
    use_gpu = d.get("use_gpu", True) is not False
    if use_gpu and gpu_id:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu_id  # as RecBole does, before CUDA initialises
    cuda = use_gpu and len(gpu_id) > 0 and torch.cuda.is_available()
    local_rank = int(d["local_rank"])
    nproc = int(d.get("nproc") or 1)
    world = int(d.get("world_size") or -1)
    world = nproc if world <= 0 else world
    offset = int(d.get("offset") or 0)
    if cuda and torch.cuda.device_count() < nproc:
        raise ValueError(f"nproc is {nproc} but only {torch.cuda.device_count()} GPU(s) are visible (gpu_id "
                         f"{gpu_id!r}): give one GPU per process (gpu_id: '0,1,...'), fewer processes, or "
                         "use_gpu: False (CPU processes, gloo)")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", rank=offset + local_rank, world_size=world,
                                init_method=f"tcp://{d.get('ip') or 'localhost'}:{d.get('port')}")
    if cuda:
        torch.cuda.set_device(local_rank)
        d["device"] = torch.device("cuda", local_rank)
    else:
        d["device"] = torch.device("cpu")
    d["single_spec"] = False
    d["world_size"] = world
    if offset + local_rank != 0:  # only rank 0 reports (RecBole tests local_rank: wrong on the other nodes)
        d["state"] = "error"
        d["show_progress"] = False
        d["verbose"] = False


def make_single_process(config) -> None:
    """A Config saved by a distributed run, made usable in one process (``recbole-mm evaluate``): the loaders must
    not shard and the trainer must not wrap the model in DDP."""
    d = config.final_config_dict
    if d.get("single_spec", True):
        return
    d["single_spec"] = True
    d["local_rank"] = 0
    d["world_size"] = 1
    d["nproc"] = 1
    d["offset"] = 0
    device = d.get("device")
    if isinstance(device, torch.device) and device.type == "cuda":
        d["device"] = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


# ----------------------------------------------------------------------------------------------- launching
def free_port() -> int:
    """A TCP port free on this machine now (for single-node runs: no clash with another run's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _child(local_rank: int, fn: Callable, args: tuple, queue) -> None:
    """One spawned process: run ``fn(local_rank, *args)``; the process whose global rank is 0 sends the result."""
    out = fn(local_rank, *args)
    shutdown()  # when ``fn`` left the group open
    if queue is not None and out is not None:
        queue.put(out)


def launch(fn: Callable, args: tuple = (), nproc: int = 2) -> Any:
    """Run ``fn(local_rank, *args)`` in ``nproc`` new processes (``torch.multiprocessing.spawn``, start method spawn:
    every child imports ``recbole_mm`` afresh, which installs the plugin registry) and return what the one that
    returns a value (global rank 0) returned; ``None`` on the other nodes. A failure in any process stops the others
    and is raised here (``torch.multiprocessing.ProcessRaisedException`` with the child's traceback)."""
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    result = None
    try:
        context = mp.start_processes(_child, args=(fn, args, queue), nprocs=int(nproc), join=False,
                                     start_method="spawn")
        # the result is read while the processes run: a child's put blocks once the pipe's buffer (64 KiB) is full,
        # so reading only after join (mp.spawn) deadlocks on a large result (a long run's histories)
        while not context.join(timeout=0.2):
            if not queue.empty():
                result = queue.get()
    except mp.ProcessRaisedException as e:  # the child's traceback is in the message: say its last line first
        last = [line for line in str(e).splitlines() if line.strip()][-1]
        raise RuntimeError(f"process {e.error_index} of {nproc} failed: {last}") from e
    if result is None and not queue.empty():
        result = queue.get()
    return result


def rendezvous(nproc: int, world_size: int = -1, ip: Optional[str] = None, port=None, group_offset: int = 0) -> dict:
    """The config keys of a distributed run (RecBole's names): ``nproc``, ``world_size`` (``nproc`` when -1),
    ``ip`` (localhost by default), ``port`` (a free one on a single node; required when ``world_size > nproc``),
    ``offset``."""
    nproc = int(nproc)
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    world = nproc if int(world_size) <= 0 else int(world_size)
    if world < nproc:
        raise ValueError(f"world_size ({world}) is smaller than nproc ({nproc})")
    if port is None:
        if world > nproc:
            raise ValueError("a run over several nodes needs the rendezvous address and port of node 0 on every node "
                             "(--master-addr HOST --master-port PORT; ip= and port= in Python)")
        port = free_port()
    if ip is None:
        if world > nproc:
            raise ValueError("a run over several nodes needs --master-addr (ip=): the address of node 0")
        ip = "localhost"
    if not 0 <= int(group_offset) <= world - nproc:
        raise ValueError(f"group_offset {group_offset} is out of range for world_size {world} and nproc {nproc} "
                         "(node_rank * nproc)")
    return {"nproc": nproc, "world_size": world, "ip": str(ip), "port": str(port), "offset": int(group_offset)}

"""Multi-process training with ``torch.distributed``: ``torchrun --nproc-per-node N lowbit train CFG``.

``lowbit.run`` (and so ``lowbit train``) notices ``torchrun``'s environment (``WORLD_SIZE`` > 1) and

* joins the process group (gloo on CPU, nccl on GPU; ``LOCAL_RANK`` picks the GPU);
* shards the training data per rank: :class:`ShardedBatchLoader`, a :class:`lowbit.data.BatchLoader`
  whose order comes from ``torch.utils.data.DistributedSampler`` (re-shuffled by ``fit``'s
  ``set_epoch``); ``train.batch_size`` is the *global* batch, each rank takes ``batch_size / N``;
* initialises lazily initialised quantizer state (LSQ steps, running min/max, LQ-Net bases,
  centroids) on every rank's first batch and reduces it over the ranks (:func:`prime_quantizers`:
  running minima by MIN, maxima by MAX, the rest by mean: what one process would have computed on
  the whole first global batch), *before* ``DistributedDataParallel`` wraps the model (it needs the
  final parameter shapes and broadcasts rank 0's state once more);
* trains through ``DistributedDataParallel`` (gradients averaged over ranks, buffers broadcast from
  rank 0 before every forward), via the method's ``train_step`` (:func:`distributed_method`: the
  method is unchanged except that its step calls the DDP wrapper);
* at every epoch end averages every floating buffer (activation-quantizer EMAs, BatchNorm running
  statistics) over the ranks (:func:`sync_state`), and the epoch's train loss/accuracy, so that
  every rank holds the same network and rank 0's metrics describe all shards;
* writes one run folder, from rank 0 (:func:`is_writer`); resume works as in one process.

``train.sync_batchnorm`` converts BatchNorm to ``torch.nn.SyncBatchNorm`` (PyTorch supports it on
GPUs only; on CPU it is a one-line error).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from .errors import ConfigError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_writer() -> bool:
    """Whether this process writes run folders and prints results (rank 0, or not distributed)."""
    return rank() == 0


def active() -> bool:
    return world_size() > 1


def init(backend: str | None = None) -> None:
    """Join ``torchrun``'s process group once (gloo on CPU, nccl when CUDA is there)."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)


def shared_run_dir(make: Callable[[], Path]) -> Path:
    """``make()`` on rank 0 (e.g. a new timestamped folder), its path sent to every rank; an error
    there is raised on every rank (no rank waits forever)."""
    if not active():
        return make()
    import torch.distributed as dist

    init()
    box: list = [None]
    if is_writer():
        try:
            box = [("ok", str(make()))]
        except ConfigError as e:
            box = [("error", str(e))]
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise ConfigError(value)
    return Path(value)


def finish() -> None:
    """Every rank waits for rank 0 (which writes the summary), then leaves the process group."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def _loader_class():
    import torch
    from torch.utils.data import DistributedSampler

    from .data import BatchLoader
    from .data.loader import epoch_seed
    from .data.transforms import crop_flip, normalize

    class ShardedBatchLoader(BatchLoader):
        """This rank's share of every global batch: ``DistributedSampler`` (shuffled, seeded with
        ``seed``, padded so that every rank has the same number of steps) cut into batches of
        ``batch_size / world`` examples. Augmentation draws from a generator of (seed, epoch, rank)."""

        def __init__(self, split, info, batch_size: int, shuffle: bool = True, augment: bool = False,
                     seed: int = 0, rank: int = 0, world: int = 1):
            if batch_size % world:
                raise ConfigError(f"train.batch_size: {batch_size} is the global batch and must divide by the "
                                  f"{world} processes")
            super().__init__(split, info, batch_size // world, shuffle=shuffle, augment=augment, seed=seed)
            self.rank, self.world = rank, world
            self.sampler = DistributedSampler(split, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)

        def set_epoch(self, epoch: int) -> None:
            super().set_epoch(epoch)
            self.sampler.set_epoch(epoch)

        def __len__(self) -> int:
            return -(-self.sampler.num_samples // self.batch_size)

        def __iter__(self):
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch) ^ (self.rank + 1))
            order = torch.tensor(list(self.sampler), dtype=torch.int64)
            for start in range(0, len(order), self.batch_size):
                idx = order[start: start + self.batch_size]
                images, labels = self.split.images[idx], self.split.labels[idx]
                if self.augment:
                    images = crop_flip(images, self.info.crop_padding, self.info.flip, generator)
                yield normalize(images, self._mean, self._std), labels

    return ShardedBatchLoader


def sharded_loader(split, info, batch_size: int, shuffle: bool = True, augment: bool = False, seed: int = 0):
    """:class:`ShardedBatchLoader` for this process's rank in the current process group."""
    import torch.distributed as dist

    return _loader_class()(split, info, batch_size, shuffle=shuffle, augment=augment, seed=seed,
                           rank=dist.get_rank(), world=dist.get_world_size())


# ---------------------------------------------------------------------------------------------
# quantizer state
# ---------------------------------------------------------------------------------------------
def _reduce_op(name: str, maxima: frozenset = frozenset()):
    import torch.distributed as dist

    if name.endswith("running_min"):
        return dist.ReduceOp.MIN
    if name.endswith("running_max") or name in maxima:
        return dist.ReduceOp.MAX
    return None  # mean


def _max_steps(model) -> frozenset:
    """LSQ steps initialised at ``max|v|/Qp`` (``init: max``, integer mode's ``integer_init: max``): one process
    takes the maximum over the whole first batch, so the ranks' steps are reduced by MAX (their mean was up to 9 %
    smaller on LeNet-5, and clipped what the first global batch put on the grid)."""
    from .quant.uniform import LSQQuantizer

    return frozenset(f"{n}.step" if n else "step" for n, m in model.named_modules()
                     if isinstance(m, LSQQuantizer) and m.init == "max")


def _all_reduce_named(tensors: dict, maxima: frozenset = frozenset()) -> None:
    import torch
    import torch.distributed as dist

    world = dist.get_world_size()
    for name, t in tensors.items():
        if not torch.is_floating_point(t):
            continue
        op = _reduce_op(name, maxima)
        with torch.no_grad():
            if op is None:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
                t.div_(world)
            else:
                dist.all_reduce(t, op=op)


def _named_state(model) -> dict:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def prime_quantizers(model, batch) -> list[str]:
    """Initialise lazily initialised quantizer state on ``batch`` (this rank's first batch), keep
    only that state (BatchNorm statistics and everything else are restored), and reduce it over the
    ranks. Returns the names of the reduced tensors. No-op when nothing waits for initialisation."""
    import torch

    before = {k: v.detach().clone() for k, v in _named_state(model).items() if v is not None}
    waiting = [k for k, v in before.items() if k.endswith("initialized") and not bool(v)]
    if not waiting and not any(b is None for _, b in model.named_buffers()):
        return []
    was = model.training
    model.train()
    modules, called = dict(model.named_modules()), set()
    hooks = [modules[k[: -len("initialized")].rstrip(".")].register_forward_pre_hook(
        lambda m, args, k=k: called.add(k)) for k in waiting]
    try:
        with torch.no_grad():
            model(batch[0])
    finally:
        for h in hooks:
            h.remove()
    model.train(was)
    after = _named_state(model)
    _check_started(waiting, [bool(after[k]) for k in waiting], [k in called for k in waiting])
    fresh = [k[: -len("initialized")] for k in waiting if bool(after[k])]
    kept = {k: v for k, v in after.items() if v is not None and (k not in before or any(k.startswith(p) for p in fresh))}
    with torch.no_grad():
        for k, v in after.items():
            if k in before and k not in kept and v is not None:
                v.copy_(before[k])
    _all_reduce_named({k: v.data for k, v in kept.items()}, _max_steps(model))
    return sorted(kept)


def _check_started(waiting: list[str], started: list[bool], called: list[bool]) -> None:
    """Every rank started every waiting quantizer its first batch ran, else one line on every rank: one that started
    on some ranks only made the ranks' reductions pair different tensors (a hang), and one that starts later in
    training starts on one rank's batch only (an LSQ step is a parameter, which DDP does not broadcast: the ranks
    kept different steps for the rest of the run). One that no rank's forward ran (a layer the forward does not call
    as a module) waits on every rank, as in one process."""
    import torch
    import torch.distributed as dist

    if not waiting:
        return
    s = torch.tensor(started, dtype=torch.int32, device=_device())
    zeros = torch.tensor([c and not ok for c, ok in zip(called, started)], dtype=torch.int32, device=_device())
    every = torch.cat([s, 1 - s, zeros])  # MAX over the ranks: any started, any not started, any ran on zeros
    dist.all_reduce(every, op=dist.ReduceOp.MAX)
    some, notall, onzeros = every.view(3, -1).tolist()
    late = [k[: -len(".initialized")] for k, a, b, z in zip(waiting, some, notall, onzeros) if (a and b) or z]
    if late:
        more = f" and {len(late) - 1} more" if len(late) > 1 else ""
        raise ConfigError(f"torchrun: quantizer {late[0]}{more} got only zeros in a rank's first batch, so it would "
                          "start from the data on another step on each rank and the ranks would train different "
                          "networks; run it in one process, or with a larger train.batch_size")


def sync_state(model) -> None:
    """Average every floating buffer (quantizer EMAs, BatchNorm statistics) over the ranks, so all
    ranks hold the same network (parameters agree already, through DDP)."""
    _all_reduce_named({k: v for k, v in model.named_buffers() if v is not None})


def _device():
    """Where a collective's own tensors live: NCCL reduces CUDA tensors only (a CPU tensor is refused), gloo CPU ones."""
    import torch
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def reduce_mean(values: list[float]) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


class _Distributed:
    """Mixin for the run's method: the step goes through ``DistributedDataParallel``; the epoch end
    first makes the quantizer and BatchNorm state agree across ranks."""

    ddp = None

    def train_step(self, model, batch, optimizer, step):
        return super().train_step(self.ddp, batch, optimizer, step)

    def on_epoch_end(self, model, epoch):
        sync_state(model)
        super().on_epoch_end(model, epoch)


def distributed_method(method, ddp):
    """``method`` (in place; returned) stepping through ``ddp``, a DistributedDataParallel of its model."""
    cls = type(method)
    if not isinstance(method, _Distributed):
        method.__class__ = type(f"Distributed{cls.__name__}", (_Distributed, cls), {"__module__": cls.__module__})
    method.ddp = ddp
    return method


class MetricsAcrossRanks:
    """``fit`` callback (before the run folder's): the epoch's train loss and accuracy averaged over
    the ranks (equal shards), so rank 0's metrics line describes every shard."""

    def on_epoch_end(self, state, row: dict) -> None:
        keys = [k for k in ("train_loss", "train_acc") if isinstance(row.get(k), float)]
        for k, v in zip(keys, reduce_mean([row[k] for k in keys])):
            row[k] = v


def check_sync_batchnorm(device) -> None:
    """``train.sync_batchnorm`` needs GPUs (PyTorch's SyncBatchNorm); one line otherwise."""
    if device.type != "cuda":
        raise ConfigError("train.sync_batchnorm: PyTorch's SyncBatchNorm runs on GPUs only (this run is on "
                          f"{device.type}); leave it false on CPU")


def setup(model, train_loader, method, device, start_epoch: int, sync_batchnorm: bool = False):
    """Everything :func:`lowbit.train.run` does for a distributed run between building the model
    and calling ``fit``: SyncBatchNorm (GPU), quantizer priming, the DDP wrapper and the method's
    distributed step. Returns ``(model, method)``."""
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    if sync_batchnorm:
        check_sync_batchnorm(device)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    train_loader.set_epoch(start_epoch)
    first = next(iter(train_loader))
    prime_quantizers(model, (first[0].to(device), first[1].to(device)))
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)  # buffers: rank 0 before every forward (the default)
    return model, distributed_method(method, ddp)

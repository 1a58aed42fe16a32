"""``lowbit bench SUITE --backend ray [--address ADDR]``: each (row, seed) a Ray task.

Ray (``pip install lowbit[cluster]``) is optional; the local process pool stays the default. Each
run is one ``ray.remote`` task with ``num_cpus`` = the run's ``train.threads`` (1 when unset) and
``num_gpus`` = 1 for ``train.device: cuda``; the task runs
:func:`lowbit.bench.runner.claim_and_train`, so a run folder is locked while a task trains it and a
finished row is never trained twice, whoever runs it. Tasks write their run folders; the results
file is written afterwards by the one process that called ``run_ray`` (the single writer).

Without ``--address`` a local Ray instance is started (and stopped again); with one, the tasks go
to that cluster, whose workers must see the output folder (a shared file system) and the data.
"""

from __future__ import annotations

from typing import Callable

from ..errors import ConfigError


def run_ray(todo: list, address: str | None = None, workers: int = 1, reuse: bool = False,
            log: Callable[[str], None] = print) -> None:
    """Run every ``((label, seed), cfg, run_dir)`` of ``todo`` as a Ray task; busy folders again,
    blocking, once the first round is done."""
    if not todo:
        return
    from ..parallel import ray_session
    from .runner import claim_and_train, deep_merge

    # a local instance needs at least the CPUs one task asks for: with fewer, Ray never schedules it and the bench
    # waited forever (session 24: train.threads 2 with --workers 1)
    need = max((cfg.train.threads or 1) for _, cfg, _ in todo)
    with ray_session(address, max(workers, 1, need)) as ray:
        task = ray.remote(claim_and_train)
        pending = todo
        for blocking in (False, True):
            refs = {}
            for (label, seed), cfg, run_dir in pending:
                threads = cfg.train.threads or 1
                d = deep_merge(cfg.to_dict(), {"train": {"threads": threads, "progress": False}})
                opts = {"num_cpus": threads, "num_gpus": 1 if cfg.train.device == "cuda" else 0}
                refs[(label, seed)] = task.options(**opts).remote(d, str(run_dir), blocking, reuse)
                log(f"== {label} (seed {seed}) sent to Ray ({threads} CPU)")
            busy = set()
            for key, ref in refs.items():
                try:
                    if ray.get(ref) == "busy":
                        busy.add(key)
                except ray.exceptions.RayTaskError as e:  # a task's lowbit error: re-raise it as one line
                    cause = getattr(e, "cause", None)
                    if isinstance(cause, ConfigError):
                        raise ConfigError(str(cause)) from None
                    raise
            pending = [j for j in pending if j[0] in busy]

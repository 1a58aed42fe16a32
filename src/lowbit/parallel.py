"""Where parallel work runs: local spawn processes (the default) or Ray tasks, behind one small pool.

Every parallel job in lowbit that is not a benchmark suite goes through :func:`make_pool`: DCQ's
sections (``dcq.workers``, ``dcq.backend``) and ReLeQ's bit evaluations (``releq.workers``,
``releq.backend``). Suites use the same Ray start-up (:func:`ray_session`) in
:mod:`lowbit.bench.ray_backend`. A pool has ``submit(fn, *args) -> concurrent.futures.Future`` and
``map(fn, items)``, and each task runs with ``threads`` torch threads:

* ``local``: :class:`concurrent.futures.ProcessPoolExecutor` with the spawn context, ``workers``
  processes; an ``initializer(*initargs)`` runs once per process.
* ``ray``: one Ray task per call (``num_cpus = threads``), the future from ``ObjectRef.future()``.
  The initializer runs once per Ray worker process and initargs (memoised on the pair), so a worker
  that serves several tasks builds its state once. Without ``address`` a local Ray instance is
  started with ``workers x threads`` CPUs and stopped again; with one, the tasks go to that cluster,
  whose workers must see the same files. A lowbit error raised in a task comes back as that error.

Ray is optional (``pip install 'lowbit[cluster]'``); asking for it without it is a one-line error.
"""

from __future__ import annotations

import os
import pickle
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

from .errors import ConfigError

BACKENDS = ("local", "ray")


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("the ray backend needs Ray: pip install 'lowbit[cluster]' (or ray) into this "
                          "environment") from None
    return ray


def check_reachable(address: str | None, timeout: float = 5.0) -> None:
    """A one-line :class:`ConfigError` where ``address`` (``HOST:PORT`` or ``ray://HOST:PORT``) takes no TCP
    connection within ``timeout`` seconds; ``auto``, ``local`` and None are left to Ray. Ray itself retries an
    unreachable cluster for minutes, printing its own warnings."""
    import socket

    if address is None or address in ("auto", "local"):
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"address {address}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        why = e.strerror or f"no answer within {timeout:g} s"
        raise ConfigError(f"address {address}: cannot reach a Ray cluster ({why})") from None


@contextmanager
def callers_threads() -> Iterator[None]:
    """Give torch's thread count back as the caller had it: a run or search sets its own (``train.threads``), and a
    later one in the same process with ``train.threads`` unset ("all cores") must not inherit it (before session 28
    ``lowbit.train.run`` and ``search_nce`` left theirs)."""
    import torch

    was = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != was:
            torch.set_num_threads(was)


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None):
    """Ray, initialised: an already running session is used as it is (and left running); otherwise
    a local instance (``num_cpus``) or the cluster at ``address`` is joined, and left at the end."""
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        check_reachable(address)
        try:
            ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
        except (ConnectionError, ValueError, RuntimeError) as e:
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
            if address is None:  # e.g. a Ray cluster already runs on this machine: Ray then refuses num_cpus
                raise ConfigError(f"cannot start a local Ray instance ({msg[:120]}); to use a Ray cluster "
                                  "running here, pass --address auto") from None
            raise ConfigError(f"address {address}: cannot reach a Ray cluster ({msg[:120]})") from None
        started = True
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


_INITIALISED: set = set()


def _ray_call(threads: int, init: tuple | None, fn: Callable, *args: Any) -> Any:
    """A Ray task: set the threads, run the pool's initializer once per worker process, call fn."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    if init is not None:
        initializer, initargs = init
        key = (initializer.__module__, initializer.__qualname__, pickle.dumps(initargs))
        if key not in _INITIALISED:
            initializer(*initargs)
            _INITIALISED.clear()  # one state per process: a new initializer replaces the old one
            _INITIALISED.add(key)
    return fn(*args)


class _RayPool:
    def __init__(self, workers: int, threads: int, address: str | None, initializer, initargs):
        self.threads, self.address, self.workers = threads, address, workers
        self.init = (initializer, tuple(initargs)) if initializer is not None else None

    def __enter__(self):
        self._session = ray_session(self.address, self.workers * self.threads)
        self.ray = self._session.__enter__()
        self.task = self.ray.remote(_ray_call).options(num_cpus=self.threads)
        return self

    def __exit__(self, *exc):
        return self._session.__exit__(*exc)

    def submit(self, fn: Callable, *args: Any) -> Future:
        return self.task.remote(self.threads, self.init, fn, *args).future()

    def map(self, fn: Callable, items: Iterable) -> Iterator:
        futures = [self.submit(fn, x) for x in items]
        for f in futures:
            yield f.result()


class _LocalPool:
    def __init__(self, workers: int, threads: int, initializer, initargs):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        self.threads = threads
        self.pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=initializer,
                                        initargs=tuple(initargs))

    def __enter__(self):
        self.pool.__enter__()
        return self

    def __exit__(self, *exc):
        return self.pool.__exit__(*exc)

    def submit(self, fn: Callable, *args: Any) -> Future:
        return self.pool.submit(fn, *args)

    def map(self, fn: Callable, items: Iterable) -> Iterator:
        return self.pool.map(fn, items)


def make_pool(backend: str, workers: int, threads: int = 1, address: str | None = None,
              initializer: Callable | None = None, initargs: tuple = ()):
    """A pool of ``workers`` parallel tasks with ``threads`` torch threads each (module docstring).
    Use it as a context manager."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if workers < 1 or threads < 1:
        raise ConfigError(f"workers and threads must be >= 1, got {workers} and {threads}")
    if address is not None and backend != "ray":
        raise ConfigError("an address needs backend: ray")
    if backend == "ray":
        import_ray()
        return _RayPool(workers, threads, address, initializer, initargs)
    return _LocalPool(workers, threads, initializer, initargs)

"""Where an export's chunk tasks run: local threads, or a dask.distributed cluster.

Both pools offer the same three calls the runner needs (``submit``, ``wait_any``,
``close``), so one runner drives either. Tasks are module-level functions of picklable
arguments (the opened mosaic pickles to a few kB: its dask graphs hold file paths, not
open files); each worker process builds the slide's pipeline and loads the model once
(:func:`~napari_confocal_stain.engine.pipeline.get_model` caches per process) and picks its
own device (``device="auto"``: its GPU if it has one). Workers must see the output folder
(a shared filesystem), as for any dask-to-zarr write.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["DaskPool", "ThreadPool", "open_pool"]


class ThreadPool:
    """Tasks on local threads (numpy, codecs and torch release the GIL)."""

    def __init__(self, workers: int) -> None:
        self.workers = max(1, int(workers))
        self._pool = cf.ThreadPoolExecutor(self.workers, thread_name_prefix="export")

    def submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future:
        return self._pool.submit(fn, *args)

    def wait_any(self, futures: Iterable[Any]) -> tuple[set, set]:
        done, pending = cf.wait(list(futures), return_when=cf.FIRST_COMPLETED)
        return set(done), set(pending)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class DaskPool:
    """Tasks on a dask.distributed cluster (an address, ``"local"``, or a ``Client``).

    Parameters
    ----------
    scheduler
        ``"tcp://host:8786"`` (an existing scheduler), ``"local"`` (a ``LocalCluster`` of
        ``workers`` single-threaded processes on loopback, closed with the pool) or a
        ``distributed.Client``.
    workers
        Worker processes of a ``"local"`` cluster.
    """

    def __init__(self, scheduler: Any, workers: int | None = None) -> None:
        try:
            from distributed import Client, LocalCluster
        except ImportError:
            from napari_confocal_stain.errors import ConfocalStainError

            raise ConfocalStainError(
                "a dask scheduler needs dask.distributed: "
                "pip install 'napari-confocal-stain[distributed]'"
            ) from None

        self._cluster = None
        self._own_client = True
        if isinstance(scheduler, Client):
            self.client = scheduler
            self._own_client = False
        elif scheduler == "local":
            self._cluster = LocalCluster(
                n_workers=max(1, int(workers or os.cpu_count() or 1)),
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
                # A task's error reaches the user once, as the export's one-line error;
                # the workers' own "Compute Failed" logs (with tracebacks) would repeat it.
                silence_logs=logging.CRITICAL,
            )
            self.client = Client(self._cluster)
        else:
            try:
                self.client = Client(str(scheduler), timeout="20s")
            except (OSError, TimeoutError) as exc:
                from napari_confocal_stain.errors import ConfocalStainError

                raise ConfocalStainError(
                    f"cannot reach the dask scheduler at {scheduler} ({exc})"
                ) from None
        info = self.client.scheduler_info()
        nthreads = [w.get("nthreads", 1) for w in info.get("workers", {}).values()]
        self.workers = max(1, sum(nthreads))

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        # pure=False: a task writes files; dask must never deduplicate or cache it.
        return self.client.submit(fn, *args, pure=False)

    def wait_any(self, futures: Iterable[Any]) -> tuple[set, set]:
        from distributed import wait

        done, pending = wait(list(futures), return_when="FIRST_COMPLETED")
        return set(done), set(pending)

    def close(self) -> None:
        if self._own_client:
            self.client.close()
        if self._cluster is not None:
            self._cluster.close()


def open_pool(scheduler: Any, workers: int | None, default_workers: int) -> ThreadPool | DaskPool:
    """A :class:`ThreadPool` (``scheduler=None``) or a :class:`DaskPool`.

    Parameters
    ----------
    scheduler
        ``None`` (threads), ``"local"``, a scheduler address or a ``distributed.Client``.
    workers
        Threads, or local cluster processes; ``None`` for ``default_workers``.
    default_workers
        What the product needs by default (the GAN uses torch's own threads: 1 task).
    """
    if scheduler is None:
        return ThreadPool(workers or default_workers)
    return DaskPool(scheduler, workers)


def on_worker_setup() -> None:
    """Run at the start of every task: inside a dask worker, read slides synchronously.

    A task reads its box through the mosaic's dask arrays; inside a distributed worker that
    must not go back to the cluster (a task waiting on tasks) nor start a thread pool per
    task, so the worker process uses dask's synchronous scheduler.
    """
    global _SETUP
    if _SETUP:
        return
    _SETUP = True
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return
    import dask

    dask.config.set(scheduler="synchronous")


_SETUP = False

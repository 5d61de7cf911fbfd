"""The worker pools of evaluation and relaxation: local processes, or Ray's drop-in `Pool` on a cluster.

Both are multiprocessing-style pools (`imap` in input order), so scoring and relaxation run the same code either
way and give the same results; Ray (`pip install 'crystallm[ray]'`) only decides where the workers live.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator

from crystallm.errors import CrystaLLMInputError

# Read by OpenMP, OpenBLAS and MKL when a process loads them: a worker per core wants one thread each (two
# threads per worker on two cores made local CHGNet relaxations 2x slower than Ray's workers, which set these).
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@contextlib.contextmanager
def _one_thread_each():
    """Spawned workers inherit the environment as it is while the pool starts them."""
    saved = {name: os.environ.get(name) for name in _THREAD_VARIABLES}
    os.environ.update({name: "1" for name in _THREAD_VARIABLES})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value


def worker_pool(processes: int | None, ray: str | None = None, start_method: str = "fork",
                initializer: Callable[[], None] | None = None):
    """A pool of `processes` workers (None: every core, or every CPU of the Ray cluster). `ray`: None for local
    processes started by `start_method`; "local" for a Ray instance started here; "auto" or an address
    ("ray://head:10001") to join a running cluster.

    >>> with worker_pool(2) as pool:
    ...     list(pool.imap(abs, [-1, -2, 3]))
    [1, 2, 3]
    """
    if ray is None:
        with _one_thread_each():
            return multiprocessing.get_context(start_method).Pool(processes, initializer)
    try:
        from ray.util.multiprocessing import Pool
    except ImportError:
        raise CrystaLLMInputError(f"--ray {ray}: Ray is not installed; pip install 'crystallm[ray]'") from None
    try:
        return Pool(processes, initializer=initializer, ray_address=ray)
    except ConnectionError as error:
        raise CrystaLLMInputError(f"--ray {ray}: no Ray cluster there ({error}); start one with `ray start --head` "
                                  f"or pass --ray local") from None


def ordered_map(function: Callable, items: Iterable, num_proc: int | None = 1, ray: str | None = None,
                chunksize: int = 1) -> Iterator:
    """`function` over `items`, yielded in input order: in this process where `num_proc` is 1 and there is no
    `ray`, else in a `worker_pool` (`function` must then be importable).

    >>> list(ordered_map(abs, [-1, -2, 3], num_proc=2))
    [1, 2, 3]
    """
    if num_proc == 1 and ray is None:
        yield from map(function, items)
        return
    with worker_pool(num_proc, ray) as pool:
        yield from pool.imap(function, items, chunksize=chunksize)

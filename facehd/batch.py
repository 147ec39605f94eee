"""Batch machinery of the per-capture commands (`facehd align`, `facehd gt-maps`): shards, input
digests for resuming, worker processes, and per-item outcomes that never stop the batch."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from facehd.errors import FaceHDError, FileFormatError, InputError

T = TypeVar("T")

# torchrun's environment: this process's rank and the number of processes.
RANK_ENV, WORLD_SIZE_ENV = "RANK", "WORLD_SIZE"
STATUSES = ("done", "skipped", "failed")
HASH_CHUNK_BYTES = 1 << 20

Progress = Callable[..., Iterable]  # called as progress(iterable, total=n, desc=text), e.g. tqdm


# --- shards ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """Part `index` (0-based) of `count`: the items index, index + count, index + 2 count, ..."""

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if self.count < 1 or not 0 <= self.index < self.count:
            raise InputError(f"a shard K/N needs N >= 1 and 0 <= K < N, got {self.index}/{self.count}")

    def select(self, items: Sequence[T]) -> list[T]:
        return list(items[self.index::self.count])

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @classmethod
    def parse(cls, text: str) -> Shard:
        """"K/N" -> Shard(K, N)."""
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise InputError(f"--shard must look like K/N (e.g. 0/4), got {text!r}") from None
        return cls(index, count)


def resolve_shard(text: str | None = None, environ: Mapping[str, str] = os.environ) -> Shard:
    """The shard to run: `text` ("K/N") if given, else torchrun's RANK / WORLD_SIZE, else all."""
    if text:
        return Shard.parse(text)
    if RANK_ENV in environ and WORLD_SIZE_ENV in environ:
        try:
            return Shard(int(environ[RANK_ENV]), int(environ[WORLD_SIZE_ENV]))
        except ValueError:
            raise InputError(f"{RANK_ENV}={environ[RANK_ENV]!r} and {WORLD_SIZE_ENV}={environ[WORLD_SIZE_ENV]!r} "
                             "must be integers") from None
    return Shard()


# --- resuming ----------------------------------------------------------------------------------


def inputs_digest(files: Iterable[Path | str | None], params: Mapping[str, Any]) -> str:
    """SHA-256 of the input files' contents (in order; None entries count as absent) and the
    parameters (JSON, sorted keys): an output stores it, and is up to date while it matches."""
    digest = hashlib.sha256()
    digest.update(json.dumps(params, sort_keys=True, default=str).encode())
    for path in files:
        if path is None:
            digest.update(b"\0absent")
            continue
        path = Path(path)
        digest.update(f"\0{path.name}\0".encode())
        try:
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(HASH_CHUNK_BYTES), b""):
                    digest.update(chunk)
        except FileNotFoundError:
            raise FileFormatError(path, "missing") from None
        except OSError as exc:
            raise FileFormatError(path, f"cannot read input file ({exc.strerror or exc})") from None
    return digest.hexdigest()


# --- running -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ItemResult:
    """What happened to one item of a batch."""

    name: str
    status: str  # one of STATUSES
    message: str = ""
    seconds: float = 0.0


@dataclass
class BatchReport:
    """Every item's outcome, in completion order."""

    results: list[ItemResult] = field(default_factory=list)

    @property
    def failed(self) -> list[ItemResult]:
        return [r for r in self.results if r.status == "failed"]

    def counts(self) -> dict[str, int]:
        return {s: sum(r.status == s for r in self.results) for s in STATUSES}

    def summary(self, what: str = "captures") -> str:
        """One line of counts, then one line per failure."""
        counts = self.counts()
        lines = [f"{len(self.results)} {what}: {counts['done']} done, {counts['skipped']} up to date (skipped), "
                 f"{counts['failed']} failed"]
        lines += [f"FAILED {r.name}: {r.message}" for r in self.failed]
        return "\n".join(lines)


def run_item(name: str, func: Callable[[], str]) -> ItemResult:
    """Run one item's work; its return value ("done" or "skipped") becomes the status. The
    toolkit's errors fail the item with their message (which names the file); any other
    exception fails it with its type and the place it was raised, so a bug is still visible."""
    start = time.perf_counter()
    try:
        status = func()
        message = ""
    except FaceHDError as exc:
        status, message = "failed", str(exc)
    except Exception as exc:  # noqa: BLE001 - one broken item must not stop the batch
        where = traceback.extract_tb(exc.__traceback__)[-1]
        status = "failed"
        message = f"{type(exc).__name__}: {exc} (at {Path(where.filename).name}:{where.lineno})"
    return ItemResult(name, status, message, time.perf_counter() - start)


def run_batch(items: Sequence[T], task: Callable[[T], ItemResult], *, workers: int = 1,
              progress: Progress | None = None, desc: str = "") -> Iterator[ItemResult]:
    """Yield `task(item)` for every item, in completion order, with `workers` processes.

    `task` must be picklable (a module-level function or a functools.partial of one) and report
    its own failures as results (`run_item`). Every item runs with one thread (torch, BLAS and
    OpenMP; see `limit_threads`), in this process or a worker, so results do not depend on the
    number of workers and workers do not compete for the cores. Processes are spawned, not forked
    (torch's thread pools do not survive a fork). When the caller stops early (an exception, Ctrl-C
    or SIGTERM in this process), items not started are cancelled and the workers are terminated
    (each removes its temporary files first).
    """
    if workers < 1:
        raise InputError(f"workers must be at least 1, got {workers}")

    def wrap(iterable):
        return progress(iterable, total=len(items), desc=desc) if progress is not None else iterable

    if workers == 1 or len(items) <= 1:
        for item in wrap(items):
            with limit_threads(1):
                result = task(item)
            yield result
        return
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(min(workers, len(items)), mp_context=context, initializer=_init_worker)
    try:
        # torch and BLAS size their thread pools from these variables when a worker imports them;
        # the workers start at the first submit
        with _thread_env(1):
            futures = [pool.submit(_call_in_worker, task, item) for item in items]
        for future in wrap(as_completed(futures)):
            yield future.result()
    except BaseException:
        _terminate_workers(pool)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def run_resumable(items: Sequence[T], *, name: Callable[[T], str], up_to_date: Callable[[T], bool],
                  task: Callable[[Any, T], ItemResult], prepare: Callable[[], contextlib.AbstractContextManager[Any]],
                  workers: int = 1, progress: Progress | None = None,
                  on_result: Callable[[ItemResult], None] | None = None, desc: str = "") -> BatchReport:
    """The resumable batch: items whose outputs are `up_to_date` are reported as skipped; the
    others run as `task(job, item)` (see `run_batch`), with the job that the `prepare()` context
    yields (for example with a shared model file written once for all workers). `on_result` sees
    each result as it comes (e.g. to print failures at once)."""
    report = BatchReport()

    def record(result: ItemResult) -> None:
        report.results.append(result)
        if on_result is not None:
            on_result(result)

    with terminate_on_sigterm():
        pending = []
        for item in items:
            if up_to_date(item):
                record(ItemResult(name(item), "skipped"))
            else:
                pending.append(item)
        if pending:
            with prepare() as job:
                for result in run_batch(pending, functools.partial(task, job), workers=workers, progress=progress,
                                        desc=desc):
                    record(result)
    return report


# --- signals and threads -----------------------------------------------------------------------


class Terminated(KeyboardInterrupt):
    """SIGTERM as an exception: like Ctrl-C's KeyboardInterrupt, it unwinds the stack, so context
    managers remove their temporary files and folders before the process ends."""


def _raise_terminated(signum, frame):
    raise Terminated(f"terminated by signal {signum}")


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` in the main thread instead of ending the
    process at once (elsewhere than in the main thread this does nothing: Python handles signals
    there only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


@contextlib.contextmanager
def limit_threads(threads: int, *, open3d: bool = False) -> Iterator[None]:
    """torch's thread pool and the BLAS / OpenMP libraries' (threadpoolctl) at `threads` within
    the block, and with `open3d` also open3d's (TBB); libraries not yet imported are left alone.

    The thread count changes results in the last bits (BLAS and torch split their sums by thread)
    and several processes with all-core pools each slow one another down many times over."""
    from threadpoolctl import threadpool_limits

    torch = sys.modules.get("torch")
    o3d = sys.modules.get("open3d") if open3d else None
    torch_before = torch.get_num_threads() if torch is not None else None
    o3d_before = o3d.utility.get_max_threads() if o3d is not None else None
    if torch is not None:
        torch.set_num_threads(threads)
    if o3d is not None:
        o3d.utility.set_max_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:
        if torch is not None:
            torch.set_num_threads(torch_before)
        if o3d is not None:
            o3d.utility.set_max_threads(o3d_before)


_IN_TASK = False  # in a worker: whether it is running an item (SIGTERM then unwinds it)


def _worker_sigterm(signum, frame):
    if _IN_TASK:
        raise Terminated(f"terminated by signal {signum}")
    os._exit(128 + signum)


def _init_worker() -> None:
    """A worker leaves Ctrl-C to the parent, which terminates it; SIGTERM unwinds its item."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _worker_sigterm)


def _call_in_worker(task: Callable[[T], ItemResult], item: T) -> ItemResult:
    """Run one item in a worker with one thread; on SIGTERM, end the worker once the item's
    context managers have cleaned up (the pool would otherwise go on with the next item)."""
    global _IN_TASK
    try:
        _IN_TASK = True
        with limit_threads(1, open3d=True):
            return task(item)
    except Terminated:
        os._exit(128 + signal.SIGTERM)
    finally:
        _IN_TASK = False


def _terminate_workers(pool: ProcessPoolExecutor) -> None:
    """Send SIGTERM to the pool's live workers (see `_worker_sigterm`)."""
    for future_process in list((getattr(pool, "_processes", None) or {}).values()):
        with contextlib.suppress(Exception):
            if future_process.is_alive():
                future_process.terminate()


_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@contextlib.contextmanager
def _thread_env(threads: int) -> Iterator[None]:
    """Set the BLAS / OpenMP thread counts that spawned workers read when they start."""
    saved = {name: os.environ.get(name) for name in _THREAD_VARIABLES}
    os.environ.update({name: str(threads) for name in _THREAD_VARIABLES})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

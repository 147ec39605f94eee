"""Batch machinery of the per-capture commands (`facehd align`, `facehd gt-maps`): shards, input
digests for resuming, worker processes, and per-item outcomes that never stop the batch."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import multiprocessing
import os
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
    its own failures as results (`run_item`). With several workers each gets an equal share of the
    CPU threads; processes are spawned, not forked (torch's thread pools do not survive a fork).
    """
    if workers < 1:
        raise InputError(f"workers must be at least 1, got {workers}")

    def wrap(iterable):
        return progress(iterable, total=len(items), desc=desc) if progress is not None else iterable

    if workers == 1 or len(items) <= 1:
        for item in wrap(items):
            yield task(item)
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")
    # torch and BLAS size their thread pools from these variables when a worker imports them
    with _thread_env(threads), ProcessPoolExecutor(min(workers, len(items)), mp_context=context) as pool:
        futures = [pool.submit(task, item) for item in items]
        for future in wrap(as_completed(futures)):
            yield future.result()


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

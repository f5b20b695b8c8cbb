"""Run a function in N real processes joined by a torch.distributed process group, for tests.

    results = run_distributed(worker, world_size=2, args=(...), rendezvous_dir=tmp_path)

``worker(rank, world_size, *args)`` runs in each of ``world_size`` fresh processes (the
"spawn" start method: no forked torch or Numba thread state) after ``init_process_group``
has joined them; its return values come back as a list indexed by rank. The processes meet
through a file (``init_method="file://..."``), so no network port is chosen and nothing
collides on a shared machine; gloo talks over the loopback interface.

Robustness, so that a broken test fails with a useful message and never leaves processes
behind:

- every collective has a bounded timeout (``init_process_group(timeout=...)``), and the parent
  waits at most ``timeout`` seconds in total;
- a worker's exception comes back as its traceback text; a worker that dies without reporting
  (segfault, ``os._exit``) is noticed through its exit code;
- when one rank fails, the others get ``grace`` seconds to report (they are often stuck in a
  collective with the failed rank, and their own error is useful), then every process still
  alive is terminated, and killed if it does not stop;
- the result is pickled inside the worker, so an unpicklable result is reported as that rank's
  error rather than lost in the queue's feeder thread.

Worker functions must be importable by the children: module-level functions of an importable
module (the children get the parent's ``sys.path``, so test modules qualify), not lambdas or
closures. The children are daemonic, so that they cannot outlive the parent's interpreter;
they therefore cannot start processes of their own (use ``DataLoader(num_workers=0)``).

Fault tests, where a rank is meant to die, pass ``allow_failures=True``: the survivors' results
then come back, and each failed rank's entry is a :class:`RankFailure` instead of an error.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import pickle
import queue
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

__all__ = ["DistributedTestError", "RankFailure", "run_distributed"]


class DistributedTestError(RuntimeError):
    """One or more ranks failed, timed out or died; the message holds their tracebacks."""


class RankFailure(NamedTuple):
    """What ``run_distributed(..., allow_failures=True)`` returns for a rank that failed.

    A rank fails when it raises, dies, or does not report in time (and is terminated).

    Attributes:
        rank: The rank.
        reason: Its traceback, or how its process ended (exit code, no report in time).
    """

    rank: int
    reason: str


def _loopback_interface() -> str | None:
    names = {name for _, name in socket.if_nameindex()}
    for name in ("lo", "lo0"):
        if name in names:
            return name
    return None


def _run_rank(fn, rank, world_size, init_method, backend, timeout, threads, args, results):
    """Body of one child process: join the group, run ``fn``, report, leave the group."""
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(threads)
        if backend == "gloo" and "GLOO_SOCKET_IFNAME" not in os.environ:
            # Gloo otherwise resolves the host name, which may not map to a usable interface
            # in a sandbox; loopback always exists and is all that processes on one host need.
            interface = _loopback_interface()
            if interface is not None:
                os.environ["GLOO_SOCKET_IFNAME"] = interface
        dist.init_process_group(
            backend,
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        try:
            payload = pickle.dumps(fn(rank, world_size, *args))
        finally:
            dist.destroy_process_group()
        results.put((rank, True, payload))
    except BaseException:  # report everything, KeyboardInterrupt and SystemExit included
        results.put((rank, False, traceback.format_exc()))


def _stop(processes, grace: float, finished: bool) -> None:
    """Reap every process: terminate, then kill, those still alive.

    Ranks that ``finished`` (all reported) are only shutting down: they get ``grace`` seconds
    to exit by themselves before they are terminated.
    """
    if finished:
        deadline = time.monotonic() + grace
        for p in processes:
            p.join(max(0.0, deadline - time.monotonic()))
    for p in processes:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + grace
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in processes:
        if p.is_alive():
            p.kill()
            p.join()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int = 2,
    *,
    args: Sequence[Any] = (),
    backend: str = "gloo",
    timeout: float = 60.0,
    grace: float = 3.0,
    threads: int = 1,
    rendezvous_dir: str | os.PathLike | None = None,
    allow_failures: bool = False,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes of one process group.

    Args:
        fn: A module-level function (picklable by reference); its return value must pickle.
        world_size: Number of processes (ranks 0 to ``world_size - 1``).
        args: Extra positional arguments, pickled to every child.
        backend: torch.distributed backend; ``"gloo"`` runs on CPU.
        timeout: Seconds for the whole run, also the collectives' timeout.
        grace: Seconds the other ranks get to report after one failed, and that terminated
            processes get before they are killed.
        threads: ``torch.set_num_threads`` in each child (tests share few cores).
        rendezvous_dir: A fresh directory for the rendezvous file (e.g. pytest's
            ``tmp_path``); by default a temporary directory, removed afterwards.
        allow_failures: Return a :class:`RankFailure` in place of each failed rank's result
            instead of raising (for tests in which a rank is meant to fail or die). Every
            process is reaped either way.

    Returns:
        The return values of ``fn``, indexed by rank (with ``allow_failures``, a
        :class:`RankFailure` for each rank that raised, died or did not report in time).

    Raises:
        DistributedTestError: Without ``allow_failures``: a rank raised (its traceback is in
            the message), died without reporting, or the run took longer than ``timeout``.
    """
    options = (backend, timeout, grace, threads, allow_failures)
    if rendezvous_dir is None:
        with tempfile.TemporaryDirectory(prefix="rdzv-") as tmp:
            return _run(fn, world_size, args, *options, tmp)
    return _run(fn, world_size, args, *options, rendezvous_dir)


def _run(fn, world_size, args, backend, timeout, grace, threads, allow_failures, rendezvous_dir):
    store = os.path.join(os.fspath(rendezvous_dir), "rdzv")
    if os.path.exists(store):
        # A FileStore left by an earlier group would be joined as if it were this one.
        raise ValueError(f"run_distributed(): expected a fresh rendezvous_dir, {store} exists.")
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    processes = []
    reports: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout
    first_failure = None
    try:
        for rank in range(world_size):
            p = ctx.Process(
                target=_run_rank,
                args=(
                    fn,
                    rank,
                    world_size,
                    f"file://{store}",
                    backend,
                    timeout,
                    threads,
                    args,
                    results,
                ),
                name=f"rank{rank}",
                daemon=True,
            )
            p.start()
            processes.append(p)
        while len(reports) < world_size:
            now = time.monotonic()
            if first_failure is not None:
                # After one failure, give the others a short while to report, then stop.
                if now >= min(deadline, first_failure + grace):
                    break
            elif now >= deadline:
                break
            try:
                rank, ok, payload = results.get(timeout=0.1)
            except queue.Empty:
                _note_silent_deaths(processes, reports, results)
            else:
                reports[rank] = (ok, payload)
            if first_failure is None and any(not ok for ok, _ in reports.values()):
                first_failure = time.monotonic()
    finally:
        finished = len(reports) == world_size and all(ok for ok, _ in reports.values())
        _stop(processes, grace, finished)
        results.close()
        results.cancel_join_thread()

    problems = []
    failures = {}
    why = (
        f"within {grace} s of another rank's failure"
        if first_failure is not None
        else f"within the timeout of {timeout} s"
    )
    for rank in range(world_size):
        if rank not in reports:
            failures[rank] = f"no report {why}; terminated."
            problems.append(f"rank {rank}: {failures[rank]}")
        elif not reports[rank][0]:
            failures[rank] = reports[rank][1]
            problems.append(f"rank {rank} failed:\n{reports[rank][1]}")
    if allow_failures:
        return [
            RankFailure(rank, failures[rank])
            if rank in failures
            else pickle.loads(reports[rank][1])
            for rank in range(world_size)
        ]
    if problems:
        raise DistributedTestError(
            f"run_distributed(): expected all {world_size} ranks to return, got:\n"
            + "\n".join(problems)
        )
    return [pickle.loads(reports[rank][1]) for rank in range(world_size)]


def _note_silent_deaths(processes, reports, results) -> None:
    """Record ranks whose process exited without a report (a crash, not an exception)."""
    for rank, p in enumerate(processes):
        if rank in reports or p.exitcode is None:
            continue
        # The report of a rank that exited normally may still be in the pipe: drain first.
        try:
            while True:
                r, ok, payload = results.get(timeout=0.5)
                reports[r] = (ok, payload)
        except queue.Empty:
            pass
        if rank not in reports:
            reports[rank] = (False, f"process exited with code {p.exitcode} without a report.")

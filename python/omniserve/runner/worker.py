"""The worker processes of tensor parallelism: ranks 1..N-1, started and ended by the engine.

Each worker (`worker_main`, in a process of torch.multiprocessing's spawn context: fork is unsafe
once torch has started threads) builds a `ModelRunner` over its share of the model and then loops
in one state: wait for rank 0's next message, run the step it names (`ModelRunner.serve`), until
a shutdown message. A worker that fails sends its traceback up a pipe before it exits; one that
is killed sends nothing. Either way its connections close, so rank 0's next collective fails at
once, and `WorkerPool.failure` turns that into an `EngineDeadError` carrying what the worker said
(or how it died). Rank 0 also checks before each step that every worker still runs.

`WorkerPool` is rank 0's side: it starts the workers, joins their process groups as rank 0, and
ends them (`close`, or a finalizer when the pool is collected or the interpreter exits).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import traceback
import weakref
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

import torch
import torch.multiprocessing as mp

from omniserve.config import EngineConfig
from omniserve.distributed import CONNECT_TIMEOUT, ProcessGroups, free_port
from omniserve.errors import EngineDeadError
from omniserve.runner.model_runner import ModelRunner, resolve_device
from omniserve.runner.step_messages import receive, send_shutdown

logger = logging.getLogger(__name__)

_JOIN_SECONDS = 10.0
"""How long the workers get to leave after the shutdown message, or a failing one to end."""
_STARTED = "started"
"""A worker's first word up its pipe: it is about to join the process groups."""


def worker_main(config: EngineConfig, rank: int, port: int, pipe: Connection) -> None:
    """Rank `rank`'s process: serve rank 0's steps until it shuts the workers down."""
    group = None
    try:
        # The ranks share the host's cores; a worker's share keeps them from oversubscribing.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.tensor_parallel_size))
        device = resolve_device(config.device, rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        pipe.send(_STARTED)
        group = ProcessGroups(rank, config.tensor_parallel_size, port, device)
        runner = ModelRunner(config, group)
        while (message := receive(group)) is not None:
            runner.serve(message)
    except BaseException:
        # Rank 0 may be gone already (its end is what failed us): then nobody reads this.
        with contextlib.suppress(OSError):
            pipe.send(f"rank {rank}: {traceback.format_exc()}")
        raise SystemExit(1) from None
    finally:
        if group is not None:
            group.close()
        pipe.close()


class WorkerPool:
    """Ranks 1..N-1 of `config.tensor_parallel_size`, and rank 0's process groups (`group`)."""

    def __init__(self, config: EngineConfig) -> None:
        world = config.tensor_parallel_size
        context = mp.get_context("spawn")
        port = free_port()
        self._procs: list[BaseProcess] = []
        self._pipes: list[Connection] = []
        try:
            for rank in range(1, world):
                receiver, sender = context.Pipe(duplex=False)
                proc = context.Process(
                    target=worker_main,
                    args=(config, rank, port, sender),
                    name=f"omniserve-tp-rank{rank}",
                    daemon=True,  # never outlives the engine process
                )
                proc.start()
                sender.close()
                self._procs.append(proc)
                self._pipes.append(receiver)
            self._await_started()
            self.group = ProcessGroups(0, world, port, resolve_device(config.device))
        except BaseException:
            _stop(None, self._procs, self._pipes)
            raise
        self._close = weakref.finalize(self, _stop, self.group, self._procs, self._pipes)

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(proc.pid for proc in self._procs if proc.pid is not None)

    def check(self) -> None:
        """EngineDeadError if a worker has ended (before shutdown, only by failing)."""
        failure = self.failure(None)
        if failure is not None:
            raise failure

    def failure(self, exc: BaseException | None) -> EngineDeadError | None:
        """Why the engine must stop, if a worker ended: what each ended worker reported, or how
        it ended; the live ones are killed, since they can only wait on the dead. After rank 0
        failed with a collective's error (`exc`, a RuntimeError), the failing worker may still
        be on its way out: it gets `_JOIN_SECONDS` to end. None: every worker runs (`exc` was
        rank 0's own)."""
        deadline = time.monotonic() + (_JOIN_SECONDS if isinstance(exc, RuntimeError) else 0.0)
        while not any(ended := [p.exitcode is not None for p in self._procs]):
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)
        reports = []
        for proc, pipe, gone in zip(self._procs, self._pipes, ended):
            said = _last_words(pipe)
            if said is not None:
                reports.append(said)
            elif gone:
                reports.append(f"{proc.name} (pid {proc.pid}) ended with exit code {proc.exitcode}")
            if proc.is_alive():
                proc.kill()
        return EngineDeadError("a tensor-parallel worker failed:\n" + "\n".join(reports))

    def close(self) -> None:
        """Shut the workers down and release the process groups (idempotent)."""
        self._close()

    def _await_started(self) -> None:
        """Wait for each worker to be about to join the groups, so that a worker that fails to
        start (an import error, a bad device) fails the engine now instead of at the groups'
        connect timeout."""
        timeout = CONNECT_TIMEOUT.total_seconds()
        for proc, pipe in zip(self._procs, self._pipes):
            if not pipe.poll(timeout):
                raise EngineDeadError(f"{proc.name} did not start within {timeout:.0f} s")
            try:
                said = pipe.recv()
            except EOFError:  # it exited without a word (killed)
                said = f"{proc.name} ended with exit code {proc.exitcode}"
            if said != _STARTED:
                raise EngineDeadError(f"a tensor-parallel worker failed to start:\n{said}")


def _last_words(pipe: Connection) -> str | None:
    """The traceback a worker sent before it exited, if any."""
    try:
        if pipe.poll(0):
            said = pipe.recv()
            return None if said == _STARTED else str(said)
    except (EOFError, OSError):
        pass
    return None


def _stop(group: ProcessGroups | None, procs: list[BaseProcess], pipes: list[Connection]) -> None:
    """Send the shutdown message (if the groups are up and every worker runs), give the workers
    `_JOIN_SECONDS` to leave, then kill what is left and release everything."""
    if group is not None and all(proc.is_alive() for proc in procs):
        try:
            send_shutdown(group)
        except RuntimeError as exc:  # a worker died meanwhile: it needs no message
            logger.debug("shutdown message not delivered: %r", exc)
    for proc in procs:
        proc.join(_JOIN_SECONDS if group is not None else 0.0)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if group is not None:
        group.close()
    for pipe in pipes:
        pipe.close()

"""Point-to-point links between pipeline stages, with a timeout on every receive.

Each message kind between two ranks (activations k -> k+1, targets k+1 -> k, reports
k -> 0) travels in a process group of its own. With NCCL that gives every direction its own
communicator and stream, so a pending receive never queues a send behind it; with gloo it
means each group is used by one thread per process.

Receives run in a background thread per inbox: gloo cannot tell whether a posted receive
has completed without blocking on it, and a stage must be able to ask "has the target of
batch t arrived?" without waiting. Sends are non-blocking; their completion is collected
lazily. Every wait is bounded by `timeout`, and a lost or stalled peer surfaces as one
`PipelineError` that names the stage, the message and the fix.
"""

from __future__ import annotations

import queue
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import timedelta

import torch.distributed as dist
from torch import Tensor

from dni.errors import DNIError

# A receive that fails for a reason other than silence (a closed connection) shows up at once;
# the grace only covers the thread handing over its failure.
_GRACE_S = 5.0


class PipelineError(DNIError):
    """A pipeline stage lost a peer: it crashed, stalled, or the network failed."""


def finish(work: dist.Work, timeout: float, nccl: bool) -> None:
    """Block until `work` (a send or receive) has completed, at most `timeout` seconds."""
    if not nccl:
        work.wait(timedelta(seconds=timeout))
        return
    # NCCL's wait only orders streams; poll the completion event on the CPU instead.
    deadline = time.monotonic() + timeout
    while not work.is_completed():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s")
        time.sleep(1e-4)
    work.wait()


def reason(error: BaseException) -> str:
    """The first sentence of a communication error, without the C++ source location."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return re.sub(r"^\[[^\]]*\]\s*", "", text).split(". ")[0].rstrip(".")


def lost(what: str, error: BaseException) -> PipelineError:
    """One sentence: which message failed (`what` names it and the rank), why, and what to do."""
    why = reason(error)
    if isinstance(error, TimeoutError) or "timed out" in why.lower():
        return PipelineError(
            f"{what} ({why}): that rank stalled or crashed, "
            "so see its log; if its steps are merely that slow, raise parallel.timeout"
        )
    return PipelineError(f"{what} ({why}): that rank crashed; see its log")


class Inbox:
    """The `count` messages of one kind from one peer, received in order in the background.

    `make(i)` allocates the buffer for message i (shapes are known in advance). `poll()`
    returns the next message if it has arrived, else None; `get()` waits for it.
    """

    def __init__(
        self,
        peer: int,
        group: dist.ProcessGroup | None,
        count: int,
        make: Callable[[int], Tensor],
        timeout: float,
        describe: Callable[[int], str],
        nccl: bool = False,
    ):
        self.peer, self.group, self.count, self.make = peer, group, count, make
        self.timeout, self.describe, self.nccl = float(timeout), describe, nccl
        self.received = 0
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._receive_all, name=f"inbox-from-{peer}", daemon=True)
        self._thread.start()

    def _receive_all(self) -> None:
        for i in range(self.count):
            buffer = self.make(i)
            try:
                work = dist.irecv(buffer, src=self.peer, group=self.group)
                finish(work, self.timeout, self.nccl)
            except Exception as error:  # handed to the main thread, which raises it with context
                self._queue.put(error)
                return
            self._queue.put(buffer)

    def poll(self) -> Tensor | None:
        """The next message if it is already here, else None."""
        try:
            item = self._queue.get_nowait()
        except queue.Empty:
            return None
        return self._take(item)

    def get(self) -> Tensor:
        """The next message, waiting at most `timeout` seconds for it."""
        try:
            item = self._queue.get(timeout=self.timeout + _GRACE_S)
        except queue.Empty:
            item = TimeoutError(f"timed out after {self.timeout:g} s")
        return self._take(item)

    def _take(self, item: Tensor | BaseException) -> Tensor:
        index = self.received
        if isinstance(item, BaseException):
            raise lost(f"{self.describe(index)} never arrived from rank {self.peer}", item) from None
        self.received += 1
        return item


class Outbox:
    """Non-blocking sends of one kind to one peer; at most `depth` of them in flight."""

    def __init__(
        self,
        peer: int,
        group: dist.ProcessGroup | None,
        timeout: float,
        describe: Callable[[int], str],
        depth: int = 4,
        nccl: bool = False,
    ):
        self.peer, self.group, self.timeout, self.describe = peer, group, float(timeout), describe
        self.depth, self.nccl = max(1, depth), nccl
        self.sent = 0
        self._works: deque[tuple[int, dist.Work, Tensor]] = deque()

    def send(self, tensor: Tensor) -> None:
        """Start sending `tensor`, which must not be changed until it is delivered."""
        tensor = tensor.detach().contiguous()
        try:
            work = dist.isend(tensor, dst=self.peer, group=self.group)
        except Exception as error:
            raise lost(f"{self.describe(self.sent)} could not be sent to rank {self.peer}", error) from None
        self._works.append((self.sent, work, tensor))  # keeps the tensor alive while in flight
        self.sent += 1
        while len(self._works) > self.depth:
            self._finish_oldest()

    def flush(self) -> None:
        """Wait until every send has been delivered."""
        while self._works:
            self._finish_oldest()

    def _finish_oldest(self) -> None:
        index, work, _ = self._works.popleft()
        try:
            finish(work, self.timeout, self.nccl)
        except Exception as error:
            raise lost(f"{self.describe(index)} could not be sent to rank {self.peer}", error) from None


Groups = dict[tuple[str, int, int], dist.ProcessGroup]


def pair_groups(world_size: int, backend: str, timeout: float) -> Groups:
    """One process group per message kind and pair of ranks: ("activations", k, k+1),
    ("targets", k+1, k) and ("reports", k, 0). Every rank must call this, in the same order."""
    groups = {}
    pairs = [("activations", k, k + 1) for k in range(world_size - 1)]
    pairs += [("targets", k + 1, k) for k in range(world_size - 1)]
    pairs += [("reports", k, 0) for k in range(1, world_size)]
    for kind, source, dest in pairs:
        groups[(kind, source, dest)] = dist.new_group(
            sorted({source, dest}), timeout=timedelta(seconds=timeout), backend=backend
        )
    return groups

"""Point-to-point links between pipeline stages, with a timeout on every receive.

Each message kind between two ranks (activations k -> k+1, targets k+1 -> k, reports
k -> 0) travels in a process group of its own. With NCCL that gives every direction its own
communicator and stream, so a pending receive never queues a send behind it; with gloo it
means each group is used by one thread per process.

Receives run in a background thread per inbox: gloo cannot tell whether a posted receive
has completed without blocking on it, and a stage must be able to ask "has the target of
batch t arrived?" without waiting. Sends run in a background thread too, so a stage never
waits for a transfer unless its peer falls behind. Every wait is bounded by `timeout`, and
a lost or stalled peer surfaces as one `PipelineError` that names the stage, the message
and the fix.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import re
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from dni.errors import DNIError

# A receive that fails for a reason other than silence (a closed connection) shows up at once;
# the grace only covers the thread handing over its failure.
_GRACE_S = 5.0


class PipelineError(DNIError):
    """A pipeline stage lost a peer: it crashed, stalled, or the network failed."""


# Threads that may sit in a blocking gloo or NCCL call, and the exit status of a failed run.
_threads: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
_failed: int | None = None


def mark_failed(exit_code: int = 1) -> None:
    """This process's pipeline run failed: at exit, leave at once with `exit_code` (see
    `_leave_at_once`; 130 or 143 after a signal)."""
    global _failed
    _failed = exit_code


@atexit.register
def _leave_at_once() -> None:
    """After a failure, a communication thread may still be blocked in C++ waiting for a peer
    that is alive; should its call return while the interpreter is finalizing, the thread is
    unwound through C++ frames and the process aborts (SIGABRT, "terminate called without an
    active exception"). Leave with the failure's status instead, once logs and streams are
    flushed."""
    if _failed is not None and any(t.is_alive() for t in list(_threads)):
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_failed)


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


@dataclass
class Link:
    """One direction of one kind of message between this rank and `peer`."""

    peer: int
    group: dist.ProcessGroup | None
    timeout: float
    describe: Callable[[int], str]  # message index -> "stage 1: the activation of batch 7"
    device: torch.device

    @property
    def nccl(self) -> bool:
        return self.device.type == "cuda"

    def enter_thread(self) -> None:
        if self.nccl:  # the current CUDA device is per thread
            torch.cuda.set_device(self.device)


class Inbox:
    """The `count` messages of one kind from one peer, received in order in the background.

    `make(i)` allocates the buffer for message i (shapes are known in advance). `poll()`
    returns the next message if it has arrived, else None; `get()` waits for it.
    """

    def __init__(self, link: Link, count: int, make: Callable[[int], Tensor]):
        self.link, self.count, self.make = link, count, make
        self.received = 0
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._receive_all, name=f"from-{link.peer}", daemon=True)
        self._thread.start()
        _threads.add(self._thread)

    def _receive_all(self) -> None:
        link = self.link
        link.enter_thread()
        for i in range(self.count):
            buffer = self.make(i)
            try:
                work = dist.irecv(buffer, src=link.peer, group=link.group)
                finish(work, link.timeout, link.nccl)
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
            item = self._queue.get(timeout=self.link.timeout + _GRACE_S)
        except queue.Empty:
            item = TimeoutError(f"timed out after {self.link.timeout:g} s")
        return self._take(item)

    def _take(self, item: Tensor | BaseException) -> Tensor:
        if isinstance(item, BaseException):
            what = f"{self.link.describe(self.received)} never arrived from rank {self.link.peer}"
            raise lost(what, item) from None
        self.received += 1
        return item


class Outbox:
    """Sends of one kind to one peer, made by a background thread, so that the stage never
    waits for the transfer itself (gloo copies into the socket in the caller's thread). At
    most `depth` messages wait in line; a longer line means the peer is behind, and `send`
    blocks until there is room (the caller counts that as time spent sending)."""

    def __init__(self, link: Link, depth: int = 4):
        self.link = link
        self.sent = 0
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._failure: tuple[int, BaseException] | None = None
        self._thread = threading.Thread(target=self._send_all, name=f"to-{link.peer}", daemon=True)
        self._thread.start()
        _threads.add(self._thread)

    def send(self, tensor: Tensor) -> None:
        """Queue `tensor` for sending; it must not be changed afterwards."""
        self._check()
        try:
            self._queue.put((self.sent, tensor.detach().contiguous()), timeout=self.link.timeout + _GRACE_S)
        except queue.Full:
            self._failure = self._failure or (
                self.sent,
                TimeoutError(f"timed out after {self.link.timeout:g} s"),
            )
        self._check()
        self.sent += 1

    def flush(self) -> None:
        """Wait until every queued message has been delivered."""
        try:
            self._queue.put(None, timeout=self.link.timeout + _GRACE_S)
        except queue.Full:
            pass  # the thread is stuck on a send; the join below times out and says so
        self._thread.join(timeout=self.link.timeout * (self._queue.qsize() + 1) + _GRACE_S)
        if self._thread.is_alive():
            self._failure = self._failure or (
                self.sent,
                TimeoutError(f"timed out after {self.link.timeout:g} s"),
            )
        self._check()

    def _send_all(self) -> None:
        link = self.link
        link.enter_thread()
        while (item := self._queue.get()) is not None:
            index, tensor = item
            if self._failure is not None:
                continue  # drain the line so the main thread is never blocked; it raises the failure
            try:
                finish(dist.isend(tensor, dst=link.peer, group=link.group), link.timeout, link.nccl)
            except Exception as error:
                self._failure = (index, error)

    def _check(self) -> None:
        if self._failure is not None:
            index, error = self._failure
            raise lost(
                f"{self.link.describe(index)} could not be sent to rank {self.link.peer}", error
            ) from None


Groups = dict[tuple[str, int, int], dist.ProcessGroup]


def pair_groups(world_size: int, backend: str, timeout: float, targets: bool = True) -> Groups:
    """One process group per message kind and pair of ranks: ("activations", k, k+1),
    ("targets", k+1, k) unless `targets` is false, and ("reports", k, 0). Every rank must call
    this, in the same order and with the same `targets`."""
    groups = {}
    pairs = [("activations", k, k + 1) for k in range(world_size - 1)]
    pairs += [("targets", k + 1, k) for k in range(world_size - 1) if targets]
    pairs += [("reports", k, 0) for k in range(1, world_size)]
    for kind, source, dest in pairs:
        groups[(kind, source, dest)] = dist.new_group(
            sorted({source, dest}), timeout=timedelta(seconds=timeout), backend=backend
        )
    return groups

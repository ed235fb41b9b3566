"""Admission control: a bounded number of running jobs, a bounded queue behind them, and a deadline for each.

    request ──> slot free? ──yes──> run ──> release (when the worker thread has really stopped)
                  └─no─> queue full? ──yes──> 429 + Retry-After
                           └─no─> wait for a slot ──> past the deadline? ──> 504

All methods run on the event loop's thread except `release_threadsafe`, which a worker thread's completion calls.
"""

from __future__ import annotations

import asyncio

from lamda_edge.serve.requests import ApiError


class Admission:
    """`slots` concurrent jobs, at most `queue` waiting; `retry_after` (s) is what a 429 tells the client."""

    def __init__(self, slots: int, queue: int, retry_after: int = 1):
        self.slots, self.queue, self.retry_after = slots, queue, retry_after
        self.running = self.waiting = 0
        self.draining = False
        self._free: asyncio.Semaphore | None = None  # made on the server's loop, at the first request

    async def enter(self, deadline: float) -> None:
        """Take a slot before `deadline` (the loop's clock): 429 when the queue is full, 504 when time runs out,
        503 once the server is draining."""
        if self.draining:
            raise ApiError(503, "the server is shutting down. Fix: retry on another instance, or after restart",
                           type="server_error", code="shutting_down")
        if self._free is None:
            self._free = asyncio.Semaphore(self.slots)
        if self._free.locked() and self.waiting >= self.queue:
            raise ApiError(429, f"the server is busy: {self.running} requests running and {self.waiting} queued "
                           f"(the most it queues). Fix: retry after {self.retry_after} s",
                           type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(self.retry_after)})
        self.waiting += 1
        try:
            timeout = max(0.0, deadline - asyncio.get_running_loop().time())
            await asyncio.wait_for(self._free.acquire(), timeout)
        except asyncio.TimeoutError:  # the builtin TimeoutError from Python 3.11
            raise deadline_error("waiting for a free slot") from None
        finally:
            self.waiting -= 1
        self.running += 1

    def release(self) -> None:
        self.running -= 1
        self._free.release()


def deadline_error(where: str) -> ApiError:
    return ApiError(504, f"the request ran past its deadline while {where}. Fix: ask for fewer tokens, retry "
                    "later, or start the server with a longer --timeout", type="timeout_error",
                    code="deadline_exceeded")

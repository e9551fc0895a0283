"""When a call is tried again and how long anything waits: the one retry policy of both clients.

A call has one deadline, ``timeout`` seconds after it starts (the client's default unless the
call names its own; None: no deadline), which covers every attempt and every wait between. Only
UNAVAILABLE is retried (no server at the address, a replica gone, the model still loading, the
server shutting down): retry n (1-based, at most ``retries``) waits ``backoff * 2 ** (n - 1)``
seconds, at most MAX_BACKOFF, times a jitter in [0.8, 1.2]; a wait that would end at or after
the deadline is not made. Every other status is final at its first attempt. `CallAttempts`
applies this to one call; the clients only make the attempts and sleep.

`ReadinessWait` is `wait_until_ready`'s: health polled, each check within a second, until
SERVING or the wait's own deadline.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import grpc

from .errors import DeadlineError, GradCamError, error_from_rpc

DEFAULT_TIMEOUT = 30.0
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF = 0.2  # seconds before the first retry; doubled each time
MAX_BACKOFF = 5.0
JITTER = (0.8, 1.2)
RETRIED = frozenset({grpc.StatusCode.UNAVAILABLE})
READY_POLL_SECONDS = 0.1  # between health checks while waiting for SERVING
READY_CHECK_SECONDS = 1.0  # the longest deadline of one of those checks


@dataclass(frozen=True)
class RetryPolicy:
    """How often, and after how long, a call that found the server UNAVAILABLE is tried again."""

    retries: int = DEFAULT_RETRIES
    backoff: float = DEFAULT_BACKOFF

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries must not be negative, got {self.retries}")

    def delay(
        self, retry: int, code: grpc.StatusCode | None, deadline: float | None
    ) -> float | None:
        """Seconds to wait before retry number ``retry`` (1-based) of a call whose last attempt
        failed with ``code``; None: give up (a final code, no retry left, or the wait would
        pass the ``deadline``, a `time.monotonic` value)."""
        if code not in RETRIED or retry > self.retries:
            return None
        wait = min(self.backoff * 2 ** (retry - 1), MAX_BACKOFF) * random.uniform(*JITTER)
        if deadline is not None and time.monotonic() + wait >= deadline:
            return None
        return wait


def deadline_after(timeout: float | None) -> float | None:
    """The `time.monotonic` value ``timeout`` seconds from now; None for None."""
    return None if timeout is None else time.monotonic() + timeout


def seconds_left(deadline: float | None) -> float | None:
    """Seconds to the deadline (0 once past), None without one: an attempt's gRPC timeout."""
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)


class CallAttempts:
    """The attempts of one call: its deadline, and after each failure either the wait before
    the next attempt or the `GradCamError` to raise.

        attempts = CallAttempts(policy, target, timeout)
        while True:
            try:
                return stub_method(request, timeout=attempts.seconds_left(), ...)
            except grpc.RpcError as error:
                wait = attempts.wait_after(error)  # raises when there is no next attempt
            sleep(wait)
    """

    def __init__(self, policy: RetryPolicy, target: str, timeout: float | None) -> None:
        self.policy = policy
        self.target = target
        self.deadline = deadline_after(timeout)
        self.number = 1  # of the attempt being made

    def seconds_left(self) -> float | None:
        return seconds_left(self.deadline)

    def wait_after(self, error: grpc.RpcError) -> float:
        """Seconds to wait before the next attempt, after ``error`` ended this one; raises
        the `GradCamError` for ``error`` when no attempt follows."""
        code = error.code() if hasattr(error, "code") else None
        wait = self.policy.delay(self.number, code, self.deadline)
        if wait is None:
            raise self.failure(error) from None
        self.number += 1
        return wait

    def failure(self, error: grpc.RpcError) -> GradCamError:
        return error_from_rpc(error, target=self.target, attempts=self.number)


class ReadinessWait:
    """`wait_until_ready`'s policy: poll health, each check within READY_CHECK_SECONDS (and the
    wait's deadline), READY_POLL_SECONDS apart, until SERVING; `DeadlineError` after
    ``timeout`` seconds naming the last answer."""

    def __init__(self, target: str, timeout: float) -> None:
        self.target = target
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.pause = READY_POLL_SECONDS

    def check_timeout(self) -> float:
        """The deadline of the next health check: at most a second, at least 50 ms."""
        return min(READY_CHECK_SECONDS, max(self.deadline - time.monotonic(), 0.05))

    def ready(self, answer: str | GradCamError) -> bool:
        """Whether ``answer`` (the health status, or the check's error) ends the wait; raises
        `DeadlineError` when the wait is over without SERVING."""
        if answer == "SERVING":
            return True
        if time.monotonic() >= self.deadline:
            raise DeadlineError(f"{self.target} not SERVING after {self.timeout:g} s: {answer}")
        return False

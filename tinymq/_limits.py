"""
Per-client publish rate limits: a token bucket for each API key or client
address.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime

from ._config import Config
from ._errors import TooManyRequests


class RateLimiter:
    """
    Allow C{rate} events per second per key, with bursts of up to C{burst}
    events; a rate of 0 allows everything.
    """

    def __init__(
        self, clock: IReactorTime, rate: float, burst: int, max_keys: int = 100_000
    ) -> None:
        self.clock = clock
        self.rate = rate
        self.burst = max(1, burst)
        self.max_keys = max_keys
        self._buckets: dict[str, list[float]] = {}

    def check(self, key: str) -> None:
        """Take one token for C{key}, or raise L{TooManyRequests}."""
        if self.rate <= 0:
            return
        now = self.clock.seconds()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._forget_full(now)
            bucket = self._buckets[key] = [float(self.burst), now]
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            raise TooManyRequests(
                f"Over the limit of {self.rate:g} publishes per second.",
                retry_after=(1.0 - tokens) / self.rate,
            )
        bucket[0] = tokens - 1.0

    def _forget_full(self, now: float) -> None:
        # A bucket that has refilled is the same as no bucket at all.
        self._buckets = {
            key: bucket
            for key, bucket in self._buckets.items()
            if bucket[0] + (now - bucket[1]) * self.rate < self.burst
        }


def check_publish_rate(
    limiter: RateLimiter, config: Config, identity: str | None, peer: Any
) -> None:
    """
    Count one publish against the API key or token C{identity} if there is
    one, else against the client address, which is exempt if trusted.
    """
    if identity is not None:
        limiter.check("id:" + identity)
        return
    address = str(getattr(peer, "host", ""))
    if address in config.trusted_addresses:
        return
    limiter.check("ip:" + address)

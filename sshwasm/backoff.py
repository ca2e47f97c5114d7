"""How long to wait between tries on the local side: one rule for every retry and poll loop.

(The runner on the host keeps its own loops: it is shipped with the stdlib only.)
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Delays that start at `first` and grow by `factor` each try, up to `most`.

    With `jitter` j, each delay is scaled by a random factor in [1 - j, 1 + j], so that many
    processes refused at once do not all come back at once. `factor=1` makes a steady poll.
    """

    first: float
    factor: float = 2.0
    most: float = math.inf
    jitter: float = 0.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait before try `attempt` (1, 2, ...) is repeated."""
        try:
            grown = self.first * self.factor ** max(0, attempt - 1)
        except OverflowError:  # a long run of tries: long past the cap
            grown = self.most
        base = min(grown, self.most)
        if self.jitter:
            return base * random.uniform(1.0 - self.jitter, 1.0 + self.jitter)
        return base

    def delays(self) -> Iterator[float]:
        """The delays one after the other, without end (start a new iterator to reset)."""
        attempt = 1
        while True:
            yield self.delay(attempt)
            attempt += 1

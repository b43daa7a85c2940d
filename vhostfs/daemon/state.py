"""The daemon's lifecycle, as nydusd reports it: INIT, READY, RUNNING, STOPPED.

Every change of state goes through `Lifecycle.move`, which refuses any transition not listed
in TRANSITIONS, so the state an API client reads is always one the daemon can really be in.

    INIT     constructed; nothing is open yet
    READY    every configured mount is open (a bad image or config never gets here)
    RUNNING  the vhost-user socket listens: a front-end may connect (Kata waits for this)
    STOPPED  the front-end left, a signal came or an error happened; every mount is closed
"""

from __future__ import annotations

import asyncio
import enum
from typing import Final


class DaemonState(enum.Enum):
    INIT = "INIT"
    READY = "READY"
    RUNNING = "RUNNING"
    STOPPED = "STOPPED"


TRANSITIONS: Final[dict[DaemonState, frozenset[DaemonState]]] = {
    DaemonState.INIT: frozenset({DaemonState.READY, DaemonState.STOPPED}),
    DaemonState.READY: frozenset({DaemonState.RUNNING, DaemonState.STOPPED}),
    DaemonState.RUNNING: frozenset({DaemonState.STOPPED}),
    DaemonState.STOPPED: frozenset(),
}


class Lifecycle:
    def __init__(self) -> None:
        self.state = DaemonState.INIT
        self._reached = {state: asyncio.Event() for state in DaemonState}
        self._reached[self.state].set()

    def move(self, to: DaemonState) -> None:
        if to not in TRANSITIONS[self.state]:
            raise RuntimeError(f"daemon state {self.state.value} cannot become {to.value}")
        self.state = to
        self._reached[to].set()

    async def reached(self, state: DaemonState) -> None:
        """Return once the daemon is, or has been, in `state` (e.g. RUNNING: it listens)."""
        await self._reached[state].wait()

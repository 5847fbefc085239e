"""The policy step before the hold: who is passed at once, who must wait.

Pure code like hold.py: it is given an address, the listener's flags and how
many clients are held, and answers `None` (hold the client), the `PassReason`
for passing it at once (trusted network, nodelay listener), or the `Refuse`
limit that turns it away (--max-held, --max-per-client). Checks that need an
answer from elsewhere are not made here: the pass cache and the DNS lists are
asked once the hold has begun, and their answers are fed to the `Hold`
(core/hold.py, core/learning.py), so the shell never grows rules of its own.
"""

from __future__ import annotations

import bisect
import enum
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from repeld.core.addresses import address_int
from repeld.core.hold import PassReason

__all__ = ["Admission", "Policy", "Refuse", "TrustedNetworks"]


#: Addresses whose trusted-or-not answer is kept (then all are forgotten at once).
ANSWERS_KEPT = 4096


class TrustedNetworks:
    """A set of networks whose clients skip the delay (IPv4 and IPv6).

    The networks are parsed and merged once; a lookup is then a bisection over
    sorted integer ranges (a set of networks would test every supernet of the
    address, 33 or 129 hash lookups, which the accept path felt), and nothing at
    all when there are no trusted networks.
    """

    __slots__ = ("_answers", "_ranges", "sources")

    def __init__(self, networks: Iterable[str] = ()) -> None:
        self.sources: tuple[str, ...] = tuple(networks)
        # Raises ValueError for a bad entry; config/values.py checks them first.
        by_version: dict[int, list[ipaddress.IPv4Network | ipaddress.IPv6Network]] = {}
        for text in self.sources:
            net = ipaddress.ip_network(text.strip(), strict=False)
            by_version.setdefault(net.version, []).append(net)
        self._ranges: dict[int, tuple[list[int], list[int]]] = {}
        #: The answer for each address asked lately: an MX host's trusted peers
        #: (a relay, a balancer's health checks, the monitoring) ask again and again.
        self._answers: dict[str, bool] = {}
        for version, nets in by_version.items():
            starts, ends = self._ranges.setdefault(version, ([], []))
            for block in ipaddress.collapse_addresses(nets):  # type: ignore[type-var]
                first, last = int(block.network_address), int(block.broadcast_address)
                if starts and first <= ends[-1] + 1:  # adjacent blocks make one range
                    ends[-1] = max(ends[-1], last)
                else:
                    starts.append(first)
                    ends.append(last)

    def __contains__(self, address: object) -> bool:
        if not self._ranges or not isinstance(address, str):
            return False
        answer = self._answers.get(address)
        if answer is None:
            answers = self._answers
            if len(answers) >= ANSWERS_KEPT:
                answers.clear()
            answer = answers[address] = self._lookup(address)
        return answer

    def _lookup(self, address: str) -> bool:
        found = address_int(address)
        if found is None:
            return False
        ranges = self._ranges.get(found[0])
        if ranges is None:
            return False
        starts, ends = ranges
        i = bisect.bisect_right(starts, found[1]) - 1
        return i >= 0 and found[1] <= ends[i]

    def __len__(self) -> int:
        return len(self.sources)


class Refuse(enum.StrEnum):
    """Why a connection is turned away before any hold; stable names for events."""

    MAX_HELD = "max-held"
    MAX_PER_CLIENT = "max-per-client"
    MAX_EXEC = "max-exec"  # a passed client, at the hand-off: --exec programs running
    #: The kernel would not watch one more socket (fs.epoll.max_user_watches, memory).
    KERNEL = "kernel"


#: What the policy step answers: None holds the client.
Admission = PassReason | Refuse | None


@dataclass(frozen=True, slots=True)
class Policy:
    """Decides, before any hold, whether a connection may skip the delay or must go."""

    trusted: TrustedNetworks
    max_held: int = 1 << 30
    max_per_client: int = 1 << 30

    def admit(
        self, client: str, *, nodelay: bool, held: int = 0, held_from_client: int = 0
    ) -> Admission:
        """`None` to hold the client, else why it passes at once or is refused.

        `held` is how many connections are held now, `held_from_client` how many
        of them come from `client`. Clients that are never held do not count
        against the limits, which only protect the pen.
        """
        return self.at_once(client, nodelay) or self.limit(held, held_from_client)

    def at_once(self, client: str, nodelay: bool) -> PassReason | None:
        """Why `client` passes at once (`admit`'s first question), or None.

        Asked alone first by the shell, so that a client passed at once costs
        no count of the held ones: the limits only protect the pen."""
        if client in self.trusted:
            return PassReason.TRUSTED
        if nodelay:
            return PassReason.NODELAY
        return None

    def limit(self, held: int, held_from_client: int) -> Refuse | None:
        """The limit a client to be held is refused at (`admit`'s second question), or None."""
        if held >= self.max_held:
            return Refuse.MAX_HELD
        if held_from_client >= self.max_per_client:
            return Refuse.MAX_PER_CLIENT
        return None

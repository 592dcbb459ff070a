"""What one source IP may hold in server transactions (DESIGN §6 "budgets"), sans-IO.

A server transaction keeps its request (and last response) for up to 64*T1
after it ends, so one source sending at line rate could hold gigabytes.
`SourceBudget` caps what one source IP holds: the number of server
transactions and the bytes of their requests and responses. `SourceLedger`
counts what each source holds. The transaction layer asks `admits` before it
creates a server transaction; a request beyond the budget gets a stateless 503
with Retry-After (RFC 3261 §21.5.4) and leaves no state, so an overload answer
never retransmits. (An ACK makes no transaction, so it always passes.)
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass, field

from pbx.sip.authguard import source_key


@dataclass
class SourceBudget:
    """What one source IP may hold in server transactions; `exempt` sources (trunks,
    load generators) are not counted."""

    max_transactions: int = 512
    max_bytes: int = 4_000_000
    retry_after_s: int = 5
    exempt: Container[str] = field(default_factory=frozenset)


@dataclass
class _Held:
    transactions: int = 0
    bytes: int = 0


class SourceLedger:
    """Server transactions and bytes held per source IP, against one `SourceBudget`.

    A transaction's own count of what it holds lives with the transaction (0: exempt,
    or not counted yet); the ledger only keeps the per-source sums, and forgets a
    source when it holds nothing."""

    def __init__(self, budget: SourceBudget) -> None:
        self.budget = budget
        self._held: dict[str, _Held] = {}
        self.refused = 0  # requests answered 503 over their source's budget

    def held_by(self, source_ip: str) -> tuple[int, int]:
        """(server transactions, bytes) `source_ip` holds against its budget."""
        held = self._held.get(source_key(source_ip))
        return (held.transactions, held.bytes) if held is not None else (0, 0)

    def admits(self, source_ip: str, size: int) -> bool:
        """Whether the source may open one more transaction of `size` bytes; a refusal
        is counted in `refused`."""
        budget = self.budget
        if source_ip in budget.exempt:
            return True
        held = self._held.get(source_key(source_ip))
        if held is None or (held.transactions < budget.max_transactions
                            and held.bytes + size <= budget.max_bytes):
            return True
        self.refused += 1
        return False

    def hold(self, source_ip: str, holding: int, size: int) -> int:
        """Count `size` more bytes for a transaction from `source_ip` that holds `holding`
        bytes (0: the first time, when the transaction counts too); what it holds now
        (0 for an exempt source)."""
        if source_ip in self.budget.exempt:
            return 0
        key = source_key(source_ip)
        held = self._held.get(key)
        if held is None:
            held = self._held[key] = _Held()
        if holding == 0:
            held.transactions += 1
        held.bytes += size
        return holding + size

    def release(self, source_ip: str, holding: int) -> None:
        """A transaction that held `holding` bytes from `source_ip` has ended."""
        if holding == 0:
            return
        key = source_key(source_ip)
        held = self._held.get(key)
        if held is not None:
            held.transactions -= 1
            held.bytes -= holding
            if held.transactions <= 0:
                del self._held[key]

"""
Conference membership on the Media Distributor: which conference an
endpoint's tls-id belongs to, as signalling registered it through the
control API (or ``--default-conference``).
"""

from __future__ import annotations

from perc.kd.roster import InvalidRegistration, validate_conference, validate_tls_id

__all__ = ["Memberships", "MembershipsFull"]


class MembershipsFull(Exception):
    """The bounded membership table is full."""


class Memberships:
    """
    tls-id -> conference, bounded.  In memory: signalling registers again
    after a Media Distributor restart, as endpoints must re-join anyway.
    """

    def __init__(self, default_conference: str | None = None, max_entries: int = 100000):
        if default_conference is not None:
            validate_conference(default_conference)
        self.default_conference = default_conference
        self.max_entries = max_entries
        self._conference_of: dict[str, str] = {}
        self._observers: list = []

    def __len__(self) -> int:
        return len(self._conference_of)

    def add_removal_observer(self, observer) -> None:
        """``observer(tls_id, conference)`` runs after a membership is removed."""
        self._observers.append(observer)

    def conference_for(self, tls_id: str | None) -> str | None:
        """The registered conference, else the default one (None if neither)."""
        if tls_id is not None:
            conference = self._conference_of.get(tls_id)
            if conference is not None:
                return conference
        return self.default_conference

    def get(self, conference: str, tls_id: str) -> bool:
        return self._conference_of.get(tls_id) == conference

    def members(self, conference: str) -> list[str]:
        return sorted(t for t, c in self._conference_of.items() if c == conference)

    def put(self, conference: str, tls_id: str) -> bool:
        """Register; returns True when created.  Raises InvalidRegistration or MembershipsFull."""
        validate_conference(conference)
        validate_tls_id(tls_id)
        previous = self._conference_of.get(tls_id)
        if previous is None and len(self._conference_of) >= self.max_entries:
            raise MembershipsFull("membership table full ({} entries)".format(self.max_entries))
        self._conference_of[tls_id] = conference
        if previous is not None and previous != conference:
            for observer in self._observers:
                observer(tls_id, previous)
        return previous is None

    def delete(self, conference: str, tls_id: str) -> bool:
        if self._conference_of.get(tls_id) != conference:
            return False
        del self._conference_of[tls_id]
        for observer in self._observers:
            observer(tls_id, conference)
        return True


# Re-exported for the API module: the same validation rules as the Key Distributor.
__all__ += ["InvalidRegistration"]

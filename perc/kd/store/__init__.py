"""
The Key Distributor's database: SQLite (``--db PATH``, the embedded default
for one Key Distributor) or PostgreSQL (``--db postgresql://USER@HOST:PORT/DB``,
shared by the Key Distributors of a cluster), one schema for both.

Tables (schema version 3; :mod:`perc.kd.store.schema` upgrades older ones on
start, a newer one refuses to start):

``schema_version`` (id = 1, version)
    The schema version.  Version 1 (registrations only) kept it in SQLite's
    ``PRAGMA user_version``, which is still written so that an older perc-kd
    refuses a newer file.
``registrations`` (tls_id PK, conference, fingerprint, kd_tls_id)
    Who may join which conference (:mod:`perc.kd.roster`).  Nothing secret.
``conference_keys`` (conference PK, spi, generation, ttl, issued_at, sealed)
    The current EKTKey of each conference: one row per conference, UNIQUE
    (conference, spi).  ``sealed`` is the key and salt (and the EKT cipher),
    AEAD-sealed bound to (conference, spi, generation, ttl, issued_at).  A
    replacement is ``UPDATE ... WHERE conference = ? AND generation = ?``
    (compare-and-swap): when another Key Distributor replaced it first, the
    update matches no row and the caller adopts the row now stored, so SPI
    allocation is atomic across a cluster.  ``issued_at`` is wall-clock
    seconds (the reactor's clock).
``sealing_check`` (id = 1, sealed)
    A known value sealed with the sealing key: a Key Distributor whose key
    does not open it refuses to start.
``nodes`` (node_id PK, lease_expires_at, listen_address, api_address)
    Cluster members and their leases (:mod:`perc.kd.cluster`).
    ``lease_expires_at`` is written and compared on the database's clock
    (``{now}`` in :mod:`perc.kd.store.dialects`), never a node's.
``associations`` (association_id PK, owner_node, md_identity,
sealed_state, sequence_reserved)
    Established association record state, AEAD-sealed bound to
    (association_id, md_identity), the node that owns it, and the end of
    the write-sequence block reserved in the database before use
    (``reserve_block``: one UPDATE moves it).  Updates and reservations
    name the owner and match nothing once another node claimed the row;
    ``claim_orphans`` moves a row whose owner's lease expired with a
    compare-and-swap on that owner, so it goes to one survivor.

NOTIFY channels (PostgreSQL; sent in the writing transaction, so delivered
on commit; payloads never hold secrets): ``perc_registrations`` (payload:
the tls-id whose registration changed), ``perc_conference_keys`` (payload:
the conference whose key changed), ``perc_nodes`` (payload: the node whose
lease was released).  Association rows have none: no Key Distributor
reads another's rows until it claims them, and a notification per join
cost every node of the cluster a wake-up.  :attr:`Store.notifications` delivers them
on the reactor thread to registered callbacks, from a dedicated
connection; after each (re)connection of that connection its "connected"
callbacks run, so that listeners reload whatever they may have missed.
"""

from perc.kd.store.database import (
    NOTIFY_CHANNELS,
    AssociationRecord,
    Store,
    StoredConferenceKey,
    describe_database,
)
from perc.kd.store.schema import SCHEMA_VERSION

__all__ = [
    "NOTIFY_CHANNELS",
    "SCHEMA_VERSION",
    "AssociationRecord",
    "Store",
    "StoredConferenceKey",
    "describe_database",
]

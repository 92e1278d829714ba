"""Who may do what: API keys and their scopes (:mod:`.keys`), the node key that seals
secrets at rest (:mod:`.crypto`), and the edge's checks (:mod:`.edge`)."""

from nimbus.auth.keys import ADMIN_ID, SCOPES, KeyRing, Principal, Scope, allows

__all__ = ["ADMIN_ID", "SCOPES", "KeyRing", "Principal", "Scope", "allows"]

"""The coordinator's dial-back (service Reach): what a ReachPong signs, shared by both ends.

At join, and again when a member announces a new address, the coordinator calls Reach.Ping on the
address it registered for the member with a fresh NONCE_BYTES nonce and the peer id it believes it
calls. The peer answers with its identity key's Ed25519 signature over `payload(nonce, peer_id)`:
an answer proves that whoever listens at the address is the member that joined, not merely that
something listens there. coordinator/reach.py dials, peer/reach.py answers.
"""

from __future__ import annotations

CONTEXT = b"shoal-reach\0"
NONCE_BYTES = 32
#: PeerInfo.reach values ("" while not checked yet)
DIRECT, RELAYED, UNREACHABLE = "direct", "relayed", "unreachable"
REACH_STATES = ("", DIRECT, RELAYED, UNREACHABLE)


def payload(nonce: bytes, peer_id: str) -> bytes:
    """The bytes a ReachPong's signature covers: b"shoal-reach\\0" + nonce + peer_id."""
    return CONTEXT + bytes(nonce) + peer_id.encode()

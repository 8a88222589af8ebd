"""Deterministic UIDs: the same inputs always give the same UID, so re-running or re-sending a job is idempotent.

Without an organisational root we use the ``2.25`` arc (PS3.5 B.2: a UID made of a UUID as one decimal integer).
The UUID is a name-based (SHA-1, version 5) UUID of the parts, which is exactly what B.2 allows for derived UIDs.
"""

from __future__ import annotations

import uuid

from pydicom.uid import UID, generate_uid

__all__ = ["PETNODE_UUID_NAMESPACE", "derive_uid"]

# Fixed namespace of every petnode name-based UUID (itself a version-5 UUID of a URL-like name we own).
PETNODE_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:petnode:dicom-uids")


def _encode(parts: tuple[str, ...]) -> str:
    # Length-prefix each part: unambiguous for any content, so ("ab", "c") and ("a", "bc") differ, and so do parts
    # that themselves contain a separator character.
    return "".join(f"{len(p)}:{p};" for p in parts)


def derive_uid(*parts: str, prefix: str | None = None) -> UID:
    """Return a UID determined by ``parts`` alone.

    Parameters
    ----------
    *parts
        Strings identifying the object (e.g. source series UID, route, model version, canonical parameters).
    prefix
        Organisational UID root ending in ``"."``; None (default) uses ``2.25.<uuid5 as integer>``. With a prefix,
        pydicom's ``generate_uid`` hashes the parts (SHA-512) under that root.

    Returns
    -------
    pydicom.uid.UID
        A valid UID of at most 64 characters.
    """
    if not parts:
        raise ValueError("derive_uid needs at least one part")
    for p in parts:
        if not isinstance(p, str):
            raise TypeError(f"derive_uid parts must be str, got {type(p).__name__}: {p!r}")
    name = _encode(parts)
    if prefix is None:
        return UID(f"2.25.{uuid.uuid5(PETNODE_UUID_NAMESPACE, name).int}")
    return generate_uid(prefix=prefix, entropy_srcs=[name])

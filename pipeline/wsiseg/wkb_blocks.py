"""Blocks of WKB shared by a slide's round indexes: each geometry written once.

A refine round keeps most of the slide's features. Their geometry (WKB) lies in the
*block* of the round that made them, named by a digest of its bytes; a round's index holds
its new features' WKB in its own block and refers to earlier blocks by (round, digest,
slot): :data:`WkbRef`. Reading checks each block against its digest, so a block missing,
damaged or rewritten with other geometry is never taken for the one referred to.
:mod:`wsiseg.round_index` stores these arrays in ``rounds/r<k>.index.npz``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np

#: Where a feature's WKB lies: the round whose index holds it in its block, that block's
#: digest (:func:`block_digest`) and the feature's slot in it.
WkbRef = tuple[int, bytes, int]

#: The most earlier rounds' blocks one index refers to: past that, a round writes every
#: feature's WKB into its own block again, so a cold read opens a bounded number of files
#: however long the slide's history (one whole write in ~16 rounds that add features).
MAX_EARLIER_BLOCKS = 16

#: An index's arrays that hold its own block and refer to those of earlier rounds. Not
#: named "wkb" as in indexes before blocks: a wsiseg from before would take a block for
#: every feature's WKB and pair ids with the wrong geometry.
BLOCK_ARRAYS = ("block", "block_end", "block_digest", "wkb_ref", "ref_rounds", "ref_digests")
OWN_BLOCK = BLOCK_ARRAYS[:3]


def block_arrays(round_k: int, wkb: Sequence[bytes], refs: Sequence[WkbRef | None] | None
                 ) -> tuple[dict[str, np.ndarray], list[WkbRef], bool]:
    """Round k's block arrays (:data:`BLOCK_ARRAYS`) for features of these WKB, of which
    ``refs`` lie in earlier blocks already (None: in none; they go into round k's block).

    Returns the arrays, where each feature's WKB now lies, and whether round k's block
    holds any.
    """
    refs = [None] * len(wkb) if refs is None else list(refs)
    if len({ref[:2] for ref in refs if ref is not None}) > MAX_EARLIER_BLOCKS:
        refs = [None] * len(wkb)
    own = [i for i, ref in enumerate(refs) if ref is None]
    block = b"".join(wkb[i] for i in own)
    ends = np.cumsum([len(wkb[i]) for i in own], dtype=np.int64)
    digest = block_digest(block, ends)
    slot = iter(range(len(own)))
    placed: list[WkbRef] = [(round_k, digest, next(slot)) if ref is None else ref
                            for ref in refs]
    table = sorted({(k, d) for k, d, _ in placed})  # the blocks referred to
    row = {key: t for t, key in enumerate(table)}
    arrays = {
        "block": np.frombuffer(block, dtype=np.uint8), "block_end": ends,
        "block_digest": np.frombuffer(digest, dtype=np.uint8),
        "wkb_ref": np.asarray([(row[k, d], s) for k, d, s in placed],
                              dtype=np.int64).reshape(-1, 2),
        "ref_rounds": np.asarray([k for k, _ in table], dtype=np.int64),
        "ref_digests": np.frombuffer(b"".join(d for _, d in table),
                                     dtype=np.uint8).reshape(-1, len(digest)),
    }
    return arrays, placed, bool(own)


def block_digest(block: bytes, ends: np.ndarray) -> bytes:
    """What names a block of WKB: 16 bytes of BLAKE2b over its entries' ends and bytes."""
    return hashlib.blake2b(ends.astype(np.int64).tobytes() + block, digest_size=16).digest()


def _block_parts(block: np.ndarray, ends: np.ndarray) -> list[bytes]:
    data, bounds = block.tobytes(), [0, *ends.tolist()]
    return [data[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def feature_wkb(z: dict[str, np.ndarray], n: int,
                block_of: Callable[[int], dict[str, np.ndarray] | None],
                ) -> tuple[list[bytes], list[WkbRef] | None] | None:
    """The WKB of an index's ``n`` features, from its own block and the earlier rounds'
    (``block_of(j)``: round j's index arrays ``block`` and ``block_end``, None if
    unreadable), and where each lies; None when a block referred to is missing or another
    (the index is then unusable). An index from before blocks holds every feature's WKB
    as ``wkb``, in order (its places are not known: None)."""
    if "block" not in z:
        if "wkb" not in z or "wkb_end" not in z or "wkb_ref" in z:  # (the last: an early
            return None  # form of blocks, named as the old WKB; read again from the GeoJSON)
        parts = _block_parts(z["wkb"], z["wkb_end"])
        return (parts, None) if len(parts) == n else None
    if not set(BLOCK_ARRAYS) <= set(z):
        return None
    table = list(zip(z["ref_rounds"].tolist(), (d.tobytes() for d in z["ref_digests"]),
                     strict=True))
    blocks = []
    for round_j, digest in table:
        # the block as this index holds it, else as round j's does; checked, not trusted
        held = z if z["block_digest"].tobytes() == digest else block_of(round_j)
        if held is None or block_digest(held["block"].tobytes(), held["block_end"]) != digest:
            return None
        blocks.append(_block_parts(held["block"], held["block_end"]))
    places = z["wkb_ref"].tolist()
    if len(places) != n or any(
            not 0 <= t < len(blocks) or not 0 <= s < len(blocks[t]) for t, s in places):
        return None
    return ([blocks[t][s] for t, s in places],
            [(table[t][0], table[t][1], s) for t, s in places])

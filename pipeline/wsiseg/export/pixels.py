"""Any round's tumor probability, rebuilt block by block from the store's undo backups."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
from numpy.typing import NDArray

from wsiseg.errors import WsisegError
from wsiseg.store import SlideStore
from wsiseg.undo_record import backup_regions, load_backup

_BACKUP_CACHE_BYTES = 64 << 20  # decoded undo boxes kept while tiles cross them


class RoundPixels:
    """``refined`` as it was after round ``round_k``, read block by block.

    The store's ``refined`` holds the latest round. Every refine round k kept the pixels it
    overwrote in ``history/r<k>`` (:mod:`wsiseg.rounds`); reading a block overlays, for
    k = latest … round_k + 1 (the order ``wsiseg undo`` restores them), the parts of those
    backup boxes that intersect the block. Nothing of size H × W is ever held: one block, plus
    decoded backup boxes (at most ``_BACKUP_CACHE_BYTES``).

    Attributes
    ----------
    shape : (int, int)
        (H, W) working pixels.
    dtype : numpy.dtype
        uint8 (probability × 255).
    chunks : (int, int)
        The chunk shape of ``refined``: reads aligned to it decode each chunk once.
    """

    def __init__(self, store: SlideStore, round_k: int) -> None:
        self.store = store
        self.round = round_k
        self.base = store["refined"]
        self.shape: tuple[int, int] = (int(self.base.shape[0]), int(self.base.shape[1]))
        self.dtype = np.dtype(self.base.dtype)
        self.chunks: tuple[int, int] = (int(self.base.chunks[0]), int(self.base.chunks[1]))
        # (round, box index, (row0, col0, rows, cols)) in the order they are applied
        self._boxes: list[tuple[int, int, tuple[int, int, int, int]]] = []
        later = sorted((k for k in _round_numbers(store) if k > round_k), reverse=True)
        for k in later:
            try:
                regions = backup_regions(store, k)
            except WsisegError as exc:
                raise WsisegError(f"{exc}, so round {round_k} cannot be rebuilt") from None
            for i, (region, refined) in enumerate(regions):
                if refined:
                    self._boxes.append((k, i, region))
        # (round, box index) → its decoded refined box
        self._cache: OrderedDict[tuple[int, int], NDArray[np.uint8]] = OrderedDict()
        self._cache_bytes = 0

    def __getitem__(self, key: Any) -> NDArray[np.uint8]:
        (r0, r1), (c0, c1) = _block_bounds(key, self.shape)
        block = np.array(self.base[r0:r1, c0:c1], dtype=self.dtype)  # a copy we may overlay
        for k, i, (br0, bc0, brows, bcols) in self._boxes:
            ir0, ir1 = max(r0, br0), min(r1, br0 + brows)
            ic0, ic1 = max(c0, bc0), min(c1, bc0 + bcols)
            if ir1 <= ir0 or ic1 <= ic0:
                continue
            pixels = self._backup(k, i)
            block[ir0 - r0 : ir1 - r0, ic0 - c0 : ic1 - c0] = pixels[
                ir0 - br0 : ir1 - br0, ic0 - bc0 : ic1 - bc0
            ]
        return block

    def _backup(self, k: int, i: int) -> NDArray[np.uint8]:
        """The ``refined`` backup box i of round k. A round's record is decoded whole; its
        boxes are kept (least recently used dropped first), all of them when they fit in
        the budget together, else the one asked for."""
        cached = self._cache.get((k, i))
        if cached is not None:
            self._cache.move_to_end((k, i))
            return cached
        boxes = {j: b.refined for j, b in enumerate(load_backup(self.store, k))
                 if b.refined is not None}
        wanted = boxes.pop(i)
        if wanted.nbytes + sum(b.nbytes for b in boxes.values()) > _BACKUP_CACHE_BYTES:
            boxes = {}
        for j, pixels in [*boxes.items(), (i, wanted)]:  # the one asked for last: kept
            if pixels.nbytes <= _BACKUP_CACHE_BYTES:
                self._cache[(k, j)] = pixels.copy()  # not a view of the whole record
                self._cache_bytes += pixels.nbytes
        while self._cache_bytes > _BACKUP_CACHE_BYTES:
            _, dropped = self._cache.popitem(last=False)
            self._cache_bytes -= dropped.nbytes
        return wanted


def refined_of_round(store: SlideStore, round_k: int) -> RoundPixels:
    """The ``refined`` probability (uint8 × 255, (H, W)) as it was after round ``round_k``.

    Returns an array-like with ``.shape``, ``.dtype``, ``.chunks`` and numpy slicing
    ``[r0:r1, c0:c1]``; see :class:`RoundPixels`. ``round_k`` must be a round of the store
    (:func:`resolve_round`).
    """
    resolve_round(store, round_k)
    return RoundPixels(store, round_k)


def resolve_round(store: SlideStore, round_k: int | None) -> int:
    """``round_k`` checked against the store's rounds; ``None`` means the latest round."""
    numbers = _round_numbers(store)
    if not numbers:
        raise WsisegError(f"{store.path}: the store has no rounds yet; `wsiseg run` it first")
    if round_k is None:
        return numbers[-1]
    if round_k not in numbers:
        listed = ", ".join(str(k) for k in numbers)
        raise WsisegError(f"{store.path}: round {round_k} does not exist; rounds: {listed}")
    return int(round_k)


def _round_numbers(store: SlideStore) -> list[int]:
    return [int(r["round"]) for r in store.attrs.get("rounds") or []]


def _block_bounds(key: Any, shape: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """``[r0:r1, c0:c1]`` (or ``[...]``) as ((r0, r1), (c0, c1)), clipped to ``shape``."""
    if key is Ellipsis:
        key = (slice(None), slice(None))
    if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, slice) for k in key)):
        raise TypeError(f"index with [r0:r1, c0:c1] only, got {key!r}")
    out = []
    for k, n in zip(key, shape, strict=True):
        start, stop, step = k.indices(n)
        if step != 1:
            raise TypeError(f"index with unit steps only, got {key!r}")
        out.append((start, max(start, stop)))
    return out[0], out[1]

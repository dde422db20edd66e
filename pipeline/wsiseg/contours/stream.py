"""Contours of a map still being written: chunk rows traced as soon as they are final."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import shapely
from numpy.typing import NDArray

from wsiseg.contours.mask import ArrayLike2D, _block_shape, _check_threshold
from wsiseg.contours.merge import _Merger
from wsiseg.contours.polygons import _finished
from wsiseg.contours.simplify import _finish


class _ClosingMerger(_Merger):
    """A :class:`_Merger` that finishes tumors as soon as they are whole, beside the tracing:
    those inside one chunk once their row is traced (:meth:`finish_singles`), those spanning
    chunks once closed (:meth:`splice_closed`), each once; those under ``min_area_px``
    (their pixel count: the exact area) are never spliced, since they are dropped."""

    def __init__(self, *args: Any, simplify_px: float, min_area_px: float) -> None:
        super().__init__(*args)
        self.simplify_px, self.min_area_px = simplify_px, min_area_px
        self.closed: dict[tuple[int, ...], tuple[shapely.Polygon | None, float]] = {}
        self._pixels = np.zeros(1, dtype=np.int64)  # per piece id: its pixel count
        self._singles: dict[int, shapely.Polygon | None] = {}  # id → finished (None: dropped)

    def spliced(self, gids: list[int], simplify_px: float) -> tuple[shapely.Polygon | None,
                                                                     float]:
        if len(self._pixels) <= self.n_pieces:
            self._pixels = np.concatenate(self.counts)
        pixels = float(self._pixels[gids].sum())
        if pixels < self.min_area_px:
            return None, pixels  # dropped by its area: no polygon needed
        key = tuple(gids)  # ascending ids, as whole_components lists them
        if key not in self.closed:
            self.closed[key] = super().spliced(gids, simplify_px)
        return self.closed[key]

    def finish_singles(self, first_piece: int) -> None:
        """Finish (drop by area, simplify) the tumors inside one chunk that the row of chunks
        just processed met (ids from ``first_piece``): each is finished alone, as
        :func:`_finished` would finish it."""
        new = [(g, self.finished[g]) for g in range(first_piece, self.n_pieces + 1)
               if g in self.finished]
        if not new:
            return
        polygons, source = _finish([p for _, p in new], self.simplify_px, self.min_area_px,
                                   self.block, self.memo)
        self._singles.update(dict.fromkeys(g for g, _ in new))
        self._singles.update((new[k][0], polygon) for k, polygon in zip(source, polygons,
                                                                         strict=True))

    def finished_early(self) -> dict[int, shapely.Polygon | None]:
        return {k: self._singles[g] for k, g in enumerate(self.finished) if g in self._singles}

    def splice_closed(self, first_piece: int, above: NDArray[np.int64]) -> None:
        """Splice the tumors spanning chunks that the row of chunks just processed closed:
        those with a piece in it (ids from ``first_piece``) or at the bottom of the row above
        (``above``: the ids that waited there), and none waiting at a chunk side now (only
        the processed row's bottom sides can). Their pieces are ascending ids, as
        :meth:`whole_components` groups them.

        Costs one search of the pieces on chunk sides per row of chunks (≈ 16 ms a row with
        80 000 of them): fine for the 25–75 rows of a slide.
        """
        border = np.fromiter(self.border_pieces, dtype=np.int64,
                             count=len(self.border_pieces))  # ascending ids
        if not len(border) or (border[-1] < first_piece and not len(above)):
            return
        component = self.components()
        waiting = [ids[ids > 0] for ids in self.pending.values()]
        open_ = (np.unique(component[np.concatenate(waiting)]) if waiting
                 else np.zeros(0, np.intp))
        touched = np.concatenate([component[border[border >= first_piece]], component[above]])
        closing = np.setdiff1d(touched, open_)
        of_border = component[border]
        chosen = np.isin(of_border, closing)
        ids, owner = border[chosen], of_border[chosen]
        order = np.argsort(owner, kind="stable")  # by tumor; ids stay ascending in each
        for group in np.split(ids[order], np.flatnonzero(np.diff(owner[order])) + 1):
            if len(group) > 1:
                self.spliced(group.tolist(), self.simplify_px)


class RowStreamTracer:
    """:func:`tumor_polygons_and_means` of a whole map that is being written top to bottom:
    each row of chunks is traced as soon as it is final, on one background thread, so that
    tracing overlaps whatever writes the map (GuideNet's bands) and little is left at the end:
    a tumor inside one chunk is finished with its row, one spanning chunks is spliced as soon
    as the rows below it are traced, so :meth:`result` finishes the tumors of the last row of
    chunks, and those touching a chunk side without crossing it (a few per cent).

    ``rows_final(row1)`` says that rows ``[0, row1)`` of ``prob`` will not change any more;
    :meth:`result` traces the rest and returns exactly what :func:`tumor_polygons_and_means`
    returns for the finished array (same parameters). Use as a context manager: leaving it
    early stops the thread.
    """

    def __init__(self, prob: ArrayLike2D, *, threshold: float = 0.5,
                 chunk_px: int | None = None, simplify_px: float = 1.0,
                 min_area_px: float = 0.0) -> None:
        _check_threshold(threshold)
        height, width = prob.shape
        self._merger = _ClosingMerger(prob, threshold, _block_shape(prob, chunk_px),
                                      [(0, 0, height, width)], simplify_px=simplify_px,
                                      min_area_px=min_area_px)
        self._next_row = 0  # first chunk row not yet submitted
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="wsiseg-contours")
        self._futures: list[Any] = []

    def __enter__(self) -> RowStreamTracer:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def rows_final(self, row1: int) -> None:
        """Queue every chunk row that lies entirely above ``row1`` (or reaches the end)."""
        block_rows, grid_rows = self._merger.block[0], self._merger.grid[0]
        height = self._merger.prob.shape[0]
        while self._next_row < grid_rows and min((self._next_row + 1) * block_rows,
                                                   height) <= row1:
            self._futures.append(self._pool.submit(self._trace_row, self._next_row))
            self._next_row += 1

    def _trace_row(self, i: int) -> None:
        merger = self._merger
        first_piece = merger.n_pieces + 1  # the ids this row's pieces will get
        # pieces waiting at the bottom of the row above: a tumor may end on that line
        above = [ids[ids > 0] for ids in merger.pending.values()]
        for j in range(merger.grid[1]):
            merger.process(i, j)
        if i + 1 < merger.grid[0]:
            merger.finish_singles(first_piece)
            if merger.simplify_px > 0:
                merger.splice_closed(first_piece, np.concatenate(above) if above
                                     else np.zeros(0, np.int64))

    def result(self) -> tuple[list[shapely.Polygon], NDArray[np.float64]]:
        self.rows_final(self._merger.prob.shape[0])
        for future in self._futures:
            future.result()  # re-raises a tracing error
        self._pool.shutdown(wait=True)
        merger = self._merger
        return _finished(merger, merger.simplify_px, merger.min_area_px)

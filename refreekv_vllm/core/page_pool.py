"""Per-layer KV pages behind vLLM's blocks (docs/design.md §1).

vLLM's scheduler sees one KV cache group: a block id covers ``block_size`` tokens in every layer.
Physically each block is ``num_layers`` *pages*, one per layer, drawn from a single pool that all
layers share, so that a layer can give back its page of a block while the other layers keep
theirs. This module is that pool: which page each block holds in each layer, and the free pages.
It knows nothing of vLLM; ``paged_block_pool`` ties it to vLLM's block life cycle.

The pool is cut into one *home region* per layer, and a block takes its layer-``l`` page from
region ``l`` while that region has free pages, lowest ids first. Without pruning this is vLLM's
own layout (each layer's pages contiguous, a request's blocks next to each other); pages that
pruning frees go back to their home region, and a layer whose region is used up (layers that
are never pruned) takes pages from the others.

Page 0 is reserved: vLLM's null block (block 0, also the workers' padding entry) maps to it in
every layer and nothing is ever written there.

Under pipeline parallelism each stage's layers live in that stage's memory, so a page can only
ever serve a layer of its own stage: the pool is then one *stage* per pipeline stage, each with
its own pages (ids ``[base, base + pages)`` of the stage, ``base`` reserved), its layers' home
regions and its free count, and a layer whose region is used up borrows from its own stage only.
A block needs a page in every layer of every stage, so the scarcest stage decides how many
blocks fit. Workers address a stage's pages from 0 (``take_updates``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

NO_PAGE = -1
RESERVED_PAGE = 0


class PagePool:
    """``num_pages`` pages shared by ``num_layers`` layers behind ``num_blocks`` block ids; a
    sequence for each (one entry per pipeline stage, consecutive layers) splits them into
    stages."""

    def __init__(self, num_pages: int | Sequence[int], num_layers: int | Sequence[int],
                 num_blocks: int) -> None:
        stage_pages = np.atleast_1d(np.asarray(num_pages, dtype=np.int64))
        stage_layers = np.atleast_1d(np.asarray(num_layers, dtype=np.int64))
        if len(stage_pages) != len(stage_layers) or (stage_pages <= stage_layers).any() \
                or (stage_layers < 1).any() or num_blocks < 2:
            raise ValueError(f"need, per stage, more pages than layers and 1 layer, and 2 "
                             f"blocks, got {num_pages}, {num_layers}, {num_blocks}")
        self.num_pages = int(stage_pages.sum())
        self.num_layers = int(stage_layers.sum())
        self.stage_layers = stage_layers
        self._stage_of_layer = np.repeat(np.arange(len(stage_layers)), stage_layers)
        bases = np.concatenate([[0], np.cumsum(stage_pages)[:-1]])
        # Per layer: the reserved page of its stage (what the null block holds there).
        self.reserved = bases[self._stage_of_layer].astype(np.int32)
        # pages[block, layer]: the page holding that layer's tokens of the block, or NO_PAGE.
        self.pages = np.full((num_blocks, self.num_layers), NO_PAGE, dtype=np.int32)
        self.pages[0] = self.reserved
        # A stage's layer i owns pages [base + 1 + i * size, base + 1 + (i + 1) * size) of it,
        # size = (stage pages - 1) // stage layers; its last layer the remainder.
        starts, ends = [], []
        for base, pages, layers in zip(bases, stage_pages, stage_layers, strict=True):
            size = (pages - 1) // layers
            first = base + 1 + size * np.arange(layers)
            starts.append(first)
            ends.append(np.append(first[1:], base + pages))
        self._region_start = np.concatenate(starts)
        self._region_end = np.concatenate(ends)
        sizes = self._region_end - self._region_start
        # Free pages of region l as a stack: _free[l, :_top[l]], lowest ids on top.
        self._free = np.zeros((self.num_layers, int(sizes.max())), dtype=np.int32)
        self._top = sizes.astype(np.int64)
        for layer in range(self.num_layers):
            self._free[layer, :self._top[layer]] = np.arange(
                self._region_end[layer] - 1, self._region_start[layer] - 1, -1)
        self._stage_free = stage_pages - 1
        self._layers = np.arange(self.num_layers)
        # The free stacks flat, and where each layer's stack starts in it (a block's next page
        # in every layer is one np.take).
        self._free_flat = self._free.reshape(-1)
        self._stack_starts = self._layers * self._free.shape[1]
        self._stage_layer_lists = [np.flatnonzero(self._stage_of_layer == stage)
                                   for stage in range(len(stage_layers))]
        self._update_free_counts()
        # Rows (re)assigned since the last take_updates(): block id -> its pages then.
        self._updated: dict[int, None] = {}

    def _update_free_counts(self) -> None:
        # Read by the scheduler once per request and step: plain ints.
        self._min_top = int(self._top.min())
        if len(self._stage_free) == 1:
            self.num_free_pages = int(self._stage_free[0])
            self.num_free_whole_blocks = self.num_free_pages // self.num_layers
            return
        self.num_free_pages = int(self._stage_free.sum())
        # Blocks that can get a page in every layer: the scarcest stage decides.
        self.num_free_whole_blocks = int((self._stage_free // self.stage_layers).min())

    @property
    def num_usable_pages(self) -> int:
        return self.num_pages - len(self.stage_layers)

    def free_pages(self) -> np.ndarray:
        """Every free page (for accounting checks)."""
        return np.concatenate([self._free[layer, :top] for layer, top in enumerate(self._top)])

    def holds_all(self, block_id: int) -> bool:
        return bool((self.pages[block_id] != NO_PAGE).all())

    def holds_any(self, block_id: int) -> bool:
        return bool((self.pages[block_id] != NO_PAGE).any())

    def assign(self, block_ids: list[int]) -> None:
        """Give each block a page in every layer (the blocks must hold none)."""
        if not block_ids:
            return
        n = len(block_ids)
        if n > self.num_free_whole_blocks:
            raise RuntimeError(f"page pool exhausted: {n} blocks need {n} pages in each of "
                               f"{self.num_layers} layers, {self.num_free_pages} are free "
                               f"({self._stage_free.tolist()} per stage)")
        if n == 1:
            if self._min_top >= 1:
                self._assign_one(block_ids[0])
                return
            if self._assign_one_borrowing(block_ids[0]):
                return
        ids = block_ids[0] if n == 1 else np.asarray(block_ids, dtype=np.int64)
        assert (self.pages[ids, 0] == NO_PAGE if n == 1 else (self.pages[ids] == NO_PAGE).all()), (
            f"blocks {block_ids} already hold pages")
        if n <= self._min_top:  # every layer from its own region
            picks = self._top[:, None] - 1 - np.arange(n)
            self.pages[ids] = self._free[self._layers[:, None], picks].T
            self._top -= n
        else:
            # Some regions are used up (layers never pruned): the others still take from their
            # own, in one go; only the short layers look elsewhere.
            own = self._top >= n
            rows = np.asarray(block_ids, dtype=np.int64)
            layers = self._layers[own]
            picks = self._top[layers, None] - 1 - np.arange(n)
            self.pages[rows[:, None], layers[None, :]] = self._free[layers[:, None], picks].T
            self._top[layers] -= n
            for layer in np.flatnonzero(~own).tolist():
                self.pages[rows, layer] = self._take(layer, n)
        self._stage_free -= n * self.stage_layers
        self._update_free_counts()
        self._updated.update(dict.fromkeys(block_ids))

    def _assign_one(self, block_id: int) -> None:
        """:meth:`assign` of one block, every layer from its own region: the common case (a
        request's next block), called per request and step, so its pages are one np.take."""
        # A scalar check (check_accounting verifies whole rows).
        assert self.pages[block_id, 0] == NO_PAGE, f"block {block_id} already holds pages"
        self._top -= 1
        np.take(self._free_flat, self._stack_starts + self._top, out=self.pages[block_id],
                mode="clip")  # indices are in range; "clip" writes out unbuffered
        self._stage_free -= self.stage_layers
        self._update_free_counts()
        self._updated[block_id] = None

    def _assign_one_borrowing(self, block_id: int) -> bool:
        """:meth:`assign` of one block when some regions are used up (under pruning, the layers
        never pruned: then every new block is this case): each short layer takes a page from
        the fullest region, every other layer from its own, all in one gather. Single-stage
        pools only, and only while the fullest region can give every short layer a page;
        returns False, having done nothing, otherwise."""
        if len(self.stage_layers) != 1:
            return False
        top = self._top
        short = top == 0
        fullest = int(np.argmax(top))
        takers = short.copy()
        takers[fullest] = True  # the fullest region also gives its own layer's page
        need = int(takers.sum())
        if top[fullest] < need:
            return False
        assert self.pages[block_id, 0] == NO_PAGE, f"block {block_id} already holds pages"
        source = np.where(short, fullest, self._layers)
        depth = np.ones(self.num_layers, dtype=np.int64)
        depth[takers] = np.arange(1, need + 1)
        np.take(self._free_flat, self._stack_starts[source] + top[source] - depth,
                out=self.pages[block_id], mode="clip")
        top -= np.bincount(source, minlength=self.num_layers)
        self._stage_free -= self.stage_layers
        self._update_free_counts()
        self._updated[block_id] = None
        return True

    def _take(self, home: int, n: int) -> np.ndarray:
        """``n`` free pages for layer ``home``: what is left in its own region, then from the
        fullest region of its stage."""
        taken = []
        region = home
        stage_regions = self._stage_layer_lists[self._stage_of_layer[home]]
        while n > 0:
            top = int(self._top[region])
            k = min(n, top)
            if k:
                taken.append(self._free[region, top - k:top][::-1])
                self._top[region] -= k
                n -= k
            region = int(stage_regions[np.argmax(self._top[stage_regions])])
        return np.concatenate(taken)

    def release(self, block_id: int) -> int:
        """Return every page the block still holds; returns how many."""
        return self.release_blocks([block_id])

    def release_blocks(self, block_ids: list[int]) -> int:
        """:meth:`release` for many blocks at once; returns how many pages went back."""
        if not block_ids:
            return 0
        if len(block_ids) == 1:
            if self._release_home_row(block_ids[0]):
                return self.num_layers
        elif self._release_home_rows(block_ids):
            return len(block_ids) * self.num_layers
        ids = np.asarray(block_ids, dtype=np.int64)
        rows = self.pages[ids]
        held = rows[rows != NO_PAGE]
        self._push(held)
        self.pages[ids] = NO_PAGE
        return len(held)

    def _release_home_row(self, block_id: int) -> bool:
        """The common release: one block holding a page of its own region in every layer (no
        pruning, no borrowed page), each page pushed back on its layer's stack. False, and
        nothing done, for any other block."""
        row = self.pages[block_id]
        if not ((row >= self._region_start) & (row < self._region_end)).all():
            return False
        self._free_flat[self._stack_starts + self._top] = row
        self._top += 1
        self._stage_free += self.stage_layers
        self._update_free_counts()
        self.pages[block_id] = NO_PAGE
        return True

    def _release_home_rows(self, block_ids: list[int]) -> bool:
        """:meth:`_release_home_row` for many blocks at once (a finished request's blocks, none
        pruned): each layer's pages pushed in one go, the first block's on top, without the
        sort :meth:`_push` needs for pages of any region. False, and nothing done, unless every
        block holds a page of its own region in every layer."""
        ids = np.asarray(block_ids, dtype=np.int64)
        rows = self.pages[ids]
        if not ((rows >= self._region_start) & (rows < self._region_end)).all():
            return False
        n = len(ids)
        # Into the flat stacks, as _release_home_row does: one index per (layer, depth).
        self._free_flat[(self._stack_starts + self._top)[:, None] + np.arange(n)] = rows[::-1].T
        self._top += n
        self._stage_free += n * self.stage_layers
        self._update_free_counts()
        self.pages[ids] = NO_PAGE
        return True

    def holds_all_of(self, block_ids: np.ndarray) -> np.ndarray:
        """:meth:`holds_all` for many blocks at once."""
        return (self.pages[block_ids] != NO_PAGE).all(axis=1)

    def release_page(self, block_id: int, layer: int) -> bool:
        """Return one layer's page of a block; False if it held none."""
        page = self.pages[block_id, layer]
        if page == NO_PAGE:
            return False
        self._push(np.array([page], dtype=np.int32))
        self.pages[block_id, layer] = NO_PAGE
        return True

    def release_where(self, block_ids: np.ndarray, layers: np.ndarray) -> np.ndarray:
        """Return the pages of the (block, layer) pairs marked in ``layers`` (``[len(block_ids),
        num_layers]`` bool; the blocks must be distinct), all in one go. Returns which of them
        held a page."""
        rows = self.pages[block_ids]
        held = layers & (rows != NO_PAGE)
        self._push(rows[held])
        rows[held] = NO_PAGE
        self.pages[block_ids] = rows
        return held

    def take_updates(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Blocks whose pages were assigned since the last call and their current rows
        (``[n]`` int32 ids, ``[n, num_layers]`` int32 pages), or None. Workers mirror these."""
        if not self._updated:
            return None
        ids = np.fromiter(self._updated, dtype=np.int32, count=len(self._updated))
        self._updated = {}
        rows = self.pages[ids]  # a copy
        if len(self.stage_layers) > 1:
            rows -= self.reserved  # each stage's workers count its pages from 0
        # A block released again before the workers heard of it: point it at the reserved page
        # so that a worker never holds an out-of-range page id (NO_PAGE < RESERVED_PAGE).
        np.maximum(rows, RESERVED_PAGE, out=rows)
        return ids, rows

    def _push(self, pages: np.ndarray) -> None:
        """Back to their home regions, on top, lowest ids last (so the next block of that
        layer reuses them, in order)."""
        if not len(pages):
            return
        # Descending pages have descending regions: each region's pages are one run, highest
        # first, so the lowest id ends on top of its stack.
        pages = np.sort(pages)[::-1]
        regions = np.searchsorted(self._region_start, pages, side="right") - 1
        assert regions[-1] >= 0 and (pages < self._region_end[regions]).all(), (
            "a reserved page cannot be freed")
        counts = np.bincount(regions, minlength=self.num_layers)
        run_starts = len(pages) - np.cumsum(counts)  # where region r's run begins
        rank = np.arange(len(pages)) - run_starts[regions]
        self._free[regions, self._top[regions] + rank] = pages
        self._top += counts
        self._stage_free += np.bincount(self._stage_of_layer, weights=counts,
                                        minlength=len(self._stage_free)).astype(np.int64)
        self._update_free_counts()

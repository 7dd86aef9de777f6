"""What one model step needs to know about pruning, shared by the model runner (which builds
it before the forward pass) and the attention layers (which read it and record cuts).

There is one runner per worker process, so a module-level "current step" is enough, exactly as
vLLM's own forward context is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from refreekv_vllm.config import RefreeKVConfig
from refreekv_vllm.policy.policies import CutPolicy

if TYPE_CHECKING:
    from refreekv_vllm.forward.layer_tables import LayerTables
    from refreekv_vllm.ops import HeadReduction


@dataclass
class WindowCapture:
    """Queries of a request's last ``window`` prompt tokens that run in this step."""
    req_id: str
    num_prompt_tokens: int
    window: int
    token_indices: range
    """Indices into this step's flattened tokens (consecutive)."""
    window_slots: range
    """Rows of the window these tokens fill (consecutive, 0 = oldest)."""


@dataclass
class ScoringRow:
    """A request whose last prompt chunk runs in this step: it is scored after attention."""
    req_id: str
    batch_row: int
    num_prompt_tokens: int
    window: int
    """Window rows the scorer reads (0: the policy scores nothing)."""
    policy: CutPolicy
    fixed_cut: int | None = None
    """Set when the policy knows every layer's cut without scoring (the fixed budget)."""


@dataclass
class StepContext:
    config: RefreeKVConfig
    kernel: str
    """Scoring backend resolved for this device: "torch" on CPU, "cuda" or "triton" on GPUs."""
    captures: list[WindowCapture] = field(default_factory=list)
    scoring: list[ScoringRow] = field(default_factory=list)
    cuts: list[tuple[list[int], list[str], torch.Tensor]] = field(default_factory=list)
    """Filled during the forward pass: ``(model layers, request ids, int32 cuts on the device,
    request-major: one per request and layer)``; read back once the step has finished."""
    observe_scoring: Callable[[float], None] | None = None
    """Receives the host seconds one layer's scoring launch took."""
    head_reduction: HeadReduction | None = None
    """Tensor parallelism: how this rank's heads combine with the other ranks'."""
    captured_queries: torch.Tensor | None = None
    """``[len(scored_layers), n, Hq, D]``: the query rows of every capture, in ``captures``
    order, per scored layer (allocated by the first layer that captures)."""
    scored_layers: tuple[int, ...] = ()
    whole_windows: dict[str, torch.Tensor] = field(default_factory=dict)
    """Windows that ran whole in this step and are scored in it (views of the captured
    queries, ``[len(scored_layers), window, Hq, D]``); other windows go to ``window_store``."""
    _query_rows: tuple[torch.Tensor, ...] = ()
    _slot_of_layer: dict[int, int] = field(default_factory=dict)
    captured_lse: dict[int, torch.Tensor | None] = field(default_factory=dict)
    """Per layer, ``[n, Hq]`` softmax normalisers of the same rows, or None."""
    _capture_index: torch.Tensor | None = None

    @property
    def active(self) -> bool:
        return bool(self.captures or self.scoring)

    def capture_index(self, device: torch.device) -> torch.Tensor:
        """This step's token indices of every capture's rows, concatenated (built once)."""
        if self._capture_index is None:
            host = torch.cat([torch.arange(c.token_indices.start, c.token_indices.stop)
                              for c in self.captures])
            self._capture_index = (host if device.type == "cpu"
                                   else host.pin_memory().to(device, non_blocking=True))
        return self._capture_index

    def query_rows(self, layer: int, layers: range, query: torch.Tensor) -> torch.Tensor:
        """``[n, Hq, D]`` slot of ``layer`` (one of this worker's ``layers``) in
        ``captured_queries`` (``query``: a layer's ``[num_tokens, Hq, D]`` queries, for shape,
        dtype and device)."""
        if self.captured_queries is None:
            self.scored_layers = self.config.scored_layers(layers)
            self._slot_of_layer = {layer: i for i, layer in enumerate(self.scored_layers)}
            n = sum(len(c.token_indices) for c in self.captures)
            self.captured_queries = query.new_empty((len(self.scored_layers), n,
                                                     *query.shape[1:]))
            self._query_rows = self.captured_queries.unbind(0)
        return self._query_rows[self._slot_of_layer[layer]]

    def cuts_by_request(self, values: list[int] | None) -> dict[str, dict[int, int]]:
        """request -> model layer -> cut, from ``values``: the step's cut tensors concatenated
        (in ``self.cuts`` order) and read back to the host."""
        if not self.cuts or values is None:
            return {}
        by_request: dict[str, dict[int, int]] = {}
        position = 0
        for layers, req_ids, _ in self.cuts:
            for req_id in req_ids:
                cuts = by_request.setdefault(req_id, {})
                for layer in layers:
                    cuts[layer] = int(values[position])
                    position += 1
        return by_request


@dataclass
class _Window:
    layers: tuple[int, ...]
    queries: torch.Tensor  # [len(layers), window, Hq, D]
    filled: np.ndarray  # [window] bool
    # [len(layers), window, Hq] fp32, filled along with the queries; None once a chunk came
    # without normalisers.
    lse: torch.Tensor | None


class WindowStore:
    """Window queries per request, every scored layer at once (and, where the prefill
    attention gave it, each row's softmax normaliser), kept until the request's last prompt
    chunk ran (chunked prefill can split the window over several steps)."""

    def __init__(self) -> None:
        self._windows: dict[str, _Window] = {}

    def put(self, capture: WindowCapture, layers: tuple[int, ...], rows: torch.Tensor,
            lse_rows: torch.Tensor | None = None) -> None:
        """``rows``: ``[len(layers), n, Hq, D]`` queries of ``capture``'s window slots;
        ``lse_rows``: ``[len(layers), n, Hq]`` or None."""
        window = self._windows.get(capture.req_id)
        if window is None or window.layers != layers:
            num_layers, _, *row_shape = rows.shape
            window = self._windows[capture.req_id] = _Window(
                layers, rows.new_zeros((num_layers, capture.window, *row_shape)),
                np.zeros(capture.window, dtype=bool),
                None if lse_rows is None
                else lse_rows.new_zeros((num_layers, capture.window, row_shape[0])))
        slots = slice(capture.window_slots.start, capture.window_slots.stop)
        window.queries[:, slots] = rows
        window.filled[slots] = True
        if lse_rows is None:
            window.lse = None  # some row came without one: the kernel finds them all itself
        elif window.lse is not None:
            window.lse[:, slots] = lse_rows

    def get(self, req_id: str) -> tuple[tuple[int, ...], torch.Tensor] | None:
        """The scored layers and ``[len(layers), window, Hq, D]`` queries of the whole window,
        or None if some of its tokens never ran (e.g. a prefix-cache hit covered them): such a
        request is not scored."""
        window = self._windows.get(req_id)
        if window is None or not window.filled.all():
            return None
        return window.layers, window.queries

    def get_lse(self, req_id: str) -> torch.Tensor | None:
        """``[len(layers), window, Hq]`` normalisers of the whole window, or None if any row
        lacks one."""
        window = self._windows.get(req_id)
        if window is None or window.lse is None or not window.filled.all():
            return None
        return window.lse

    def drop(self, req_id: str) -> None:
        self._windows.pop(req_id, None)


_current: StepContext | None = None
_layer_tables: LayerTables | None = None
window_store = WindowStore()


def set_step_context(context: StepContext | None) -> None:
    global _current
    _current = context


def get_step_context() -> StepContext | None:
    return _current


def set_layer_tables(tables: LayerTables | None) -> None:
    """The runner's per-layer tables, once its paged KV cache exists (None while profiling)."""
    global _layer_tables
    _layer_tables = tables


def get_layer_tables() -> LayerTables | None:
    return _layer_tables

"""Check the encoder rows a disk EC connector hands a consumer before the consumer uses them.

Why: under vLLM's encoder disaggregation (EPD) a consumer (``ec_consumer``) loads each item's
encoder output from the connector's store under the item's key and scatters it into the item's
placeholders without looking at it. Rows of another count (an entry written by an instance with
other preprocessing settings, e.g. its own ``--mm-processor-kwargs``, which vLLM does not hash;
another vs-vllm row format; a damaged file) raise ``Attempted to assign ... multimodal tokens to
... placeholders`` in the model runner, and the engine dies: every later request, text-only
too, gets a 500. Too many rows is worse: the first k are used, silently. (vs-vllm's cache keys,
:mod:`vs_vllm.vllm_plugin.cache_key`, keep different selection settings apart; this guards what
a key cannot.)

How: vLLM's disk connector ``ECExampleConnector`` gets ``ensure_cache_available``, which the
scheduler calls before it schedules a request: for each item with a stored entry, the entry's
shape is read from the safetensors header (no tensor data) and compared with the item's
placeholder count and, on a selecting instance, the row width. A mismatched entry is rejected:
``has_cache_item`` answers False for it, so the scheduler encodes the item locally (the
consumer has the vision tower) and the request is served; one warning names the entry's shape
and the producer's settings (a vs-vllm producer writes them into the file's metadata:
``save_caches``) and this instance's. An item without its media (nothing to encode here) fails
its request alone (``take_unavailable_requests``); the engine keeps serving.

Remove when: vLLM checks connector-loaded encoder outputs per request before using them (its
CPU connector does, for its own transfers).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

CONNECTOR = ("vllm.distributed.ec_transfer.ec_connector.example_connector", "ECExampleConnector")
METHODS = ("ensure_cache_available", "has_cache_item", "take_unavailable_requests", "save_caches")
METADATA_KEY = "vs_vllm"
_MARK = "__vs_vllm_ec_guard__"
_TENSOR = "ec_cache"  # the key ECExampleConnector stores an entry's rows under


def instance_settings(vllm_config: Any) -> dict[str, Any]:
    """What decides this instance's encoder rows, as written into (and compared with) the
    metadata of its entries: the selection settings (None: stock) and the row format."""
    from vs_vllm.vllm_plugin.cache_key import ROW_FORMAT
    from vs_vllm.vllm_plugin.settings import SelectorSettings

    settings = SelectorSettings.from_hf_config(vllm_config.model_config.hf_config)
    selection = None if settings is None else dataclasses.asdict(settings)
    return {"selection": selection, "format": ROW_FORMAT if settings is not None else "stock"}


def expected_width(vllm_config: Any) -> int | None:
    """The width of this instance's encoder rows when it selects (the family's rows plus the
    position channels under M-RoPE); None for a stock instance (not checked)."""
    from vs_vllm.models import adapter_for
    from vs_vllm.position_channels import NUM_CHANNELS
    from vs_vllm.vllm_plugin.settings import SelectorSettings

    hf_config = vllm_config.model_config.hf_config
    if SelectorSettings.from_hf_config(hf_config) is None:
        return None
    adapter = adapter_for(hf_config)
    return adapter.row_width(hf_config) + (NUM_CHANNELS if adapter.uses_mrope else 0)


def stored_entry(filename: str) -> tuple[tuple[int, ...], dict[str, Any] | None]:
    """The shape of a stored entry's rows and the producer's settings (None when the producer
    wrote none: stock vLLM), from the file's header only."""
    from safetensors import safe_open

    with safe_open(filename, "pt") as f:
        shape = tuple(f.get_slice(_TENSOR).get_shape())
        meta = (f.metadata() or {}).get(METADATA_KEY)
    return shape, None if meta is None else json.loads(meta)


class _Recent:
    """A set of the most recent ``size`` keys (a long-running server sees unboundedly many
    items; a key that falls out is checked again, from its header, when next asked for)."""

    def __init__(self, size: int = 65536) -> None:
        self._keys: OrderedDict[str, None] = OrderedDict()
        self._size = size

    def add(self, key: str) -> None:
        self._keys[key] = None
        self._keys.move_to_end(key)
        while len(self._keys) > self._size:
            self._keys.popitem(last=False)

    def __contains__(self, key: object) -> bool:
        return key in self._keys


def _state(connector: Any) -> dict[str, Any]:
    state = connector.__dict__.get("_vs_guard")
    if state is None:
        state = connector.__dict__["_vs_guard"] = {
            "checked": _Recent(),  # identifiers whose stored entry fits
            "rejected": _Recent(),  # identifiers whose stored entry does not (encoded here)
            "failed": set(),  # request ids that cannot be served (no media), until taken
            # the width this instance's rows have (None: not checked), fixed by its config
            "width": expected_width(connector._vllm_config),
        }
    return state


def check_request(connector: Any, request: Any) -> bool:
    """Check the stored entries of ``request``'s items (once per identifier); True when the
    request may be scheduled, False when it is failed (see ``take_unavailable_requests``)."""
    from vllm.logger import init_logger

    state = _state(connector)
    if not connector.is_consumer:
        return True
    width = state["width"]
    for index, feature in enumerate(request.mm_features):
        key = feature.identifier
        if key in state["checked"] or key in state["rejected"]:
            continue
        filename = connector._generate_filename_debug(key)
        if not os.path.exists(filename):
            continue  # not stored (yet): encoded here, as vLLM does
        rows = request.get_num_encoder_embeds(index)
        shape, producer = stored_entry(filename)
        if len(shape) == 2 and shape[0] == rows and width in (None, shape[1]):
            state["checked"].add(key)
            continue
        state["rejected"].add(key)
        want = f"{rows} x {width if width is not None else 'any'}"
        ours = instance_settings(connector._vllm_config)
        logger = init_logger("vllm.vs_vllm.ec_guard")  # under "vllm." for its log config
        if feature.data is None:  # nothing to encode here
            state["failed"].add(request.request_id)
            logger.error(
                "vs-vllm: request %s fails: EC entry %s holds rows %s (producer settings: %s) "
                "but this instance needs %s (its settings: %s) and has no media to encode",
                request.request_id,
                key,
                shape,
                producer,
                want,
                ours,
            )
            return False
        logger.warning(
            "vs-vllm: EC entry %s holds rows %s (producer settings: %s) but this instance "
            "needs %s (its settings: %s): encoding the item here instead; run the encoder "
            "and this instance with the same settings",
            key,
            shape,
            producer,
            want,
            ours,
        )
    return request.request_id not in state["failed"]


def _wrap(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    if name == "ensure_cache_available":

        @functools.wraps(method)
        def ensure(self: Any, request: Any, num_computed_tokens: int) -> bool:
            if not check_request(self, request):
                return False
            return method(self, request, num_computed_tokens)

        wrapper: Callable[..., Any] = ensure
    elif name == "has_cache_item":

        @functools.wraps(method)
        def has(self: Any, identifier: str) -> bool:
            if identifier in _state(self)["rejected"]:
                return False
            return method(self, identifier)

        wrapper = has
    elif name == "take_unavailable_requests":

        @functools.wraps(method)
        def take(self: Any) -> set[str]:
            state = _state(self)
            failed, state["failed"] = state["failed"], set()
            return set(method(self)) | failed

        wrapper = take
    else:  # save_caches: the producer's settings go into the entry's metadata

        @functools.wraps(method)
        def save(self: Any, encoder_cache: Any, mm_hash: str, **kwargs: Any) -> None:
            if not self.is_producer:
                return method(self, encoder_cache, mm_hash, **kwargs)
            import safetensors.torch
            from vllm.utils.gpu_sync_debug import gpu_sync_allowed

            with gpu_sync_allowed():  # as vLLM's own save: one copy per stored item
                rows = encoder_cache[mm_hash].detach().cpu()  # ok-sync: storing it
            meta = json.dumps(instance_settings(self._vllm_config), sort_keys=True)
            filename = self._generate_filename_debug(mm_hash)
            safetensors.torch.save_file({_TENSOR: rows}, filename, metadata={METADATA_KEY: meta})

        wrapper = save
    setattr(wrapper, _MARK, True)
    return wrapper


def _connector() -> type:
    import importlib

    return getattr(importlib.import_module(CONNECTOR[0]), CONNECTOR[1])


def apply() -> None:
    connector = _connector()
    for name in METHODS:
        method = getattr(connector, name, None)
        if not callable(method):
            raise RuntimeError(
                f"vs-vllm patch ec_guard: {CONNECTOR[1]}.{name} not found; this vLLM version "
                "is not supported"
            )
        if not getattr(method, _MARK, False):
            setattr(connector, name, _wrap(name, method))


def is_applied() -> bool:
    connector = _connector()
    return all(getattr(getattr(connector, name), _MARK, False) for name in METHODS)

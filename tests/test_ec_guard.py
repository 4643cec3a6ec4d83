"""The EC guard patch (``vs_vllm/vllm_plugin/patches/ec_guard.py``) on vLLM's real
``ECExampleConnector`` and ``VllmConfig``, without an engine: what it decides for a stored entry
that fits, one that does not (with the item's media: encoded locally; without: that request
alone fails), and the settings a producer writes into its entries. The engine-level proof
(a consumer that keeps serving) is ``tests/test_epd.py``.

The request is a stand-in with the three things the scheduler's ``Request`` gives the guard
(``request_id``, ``mm_features``, ``get_num_encoder_embeds``)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vs_vllm.vllm_plugin import register
from vs_vllm.vllm_plugin.patches import ec_guard

SELECTING = {"keep_ratio": 0.3, "strategy": "norm"}
WIDTH = 64 + 8  # the tiny model's rows plus the position channels


@pytest.fixture(scope="module", autouse=True)
def plugin_registered():
    register()


def connector(tiny_model_dir, store, role, selection=SELECTING):
    from vllm.config import ModelConfig, VllmConfig
    from vllm.config.ec_transfer import ECTransferConfig
    from vllm.distributed.ec_transfer.ec_connector.base import ECConnectorRole
    from vllm.distributed.ec_transfer.ec_connector.example_connector import ECExampleConnector

    overrides = {} if selection is None else {"vision_selector": selection}
    model = ModelConfig(
        model=str(tiny_model_dir), dtype="float32", max_model_len=512, hf_overrides=overrides
    )
    transfer = ECTransferConfig(
        ec_connector="ECExampleConnector",
        ec_role=role,
        ec_connector_extra_config={"shared_storage_path": str(store)},
    )
    config = VllmConfig(model_config=model, ec_transfer_config=transfer)
    return ECExampleConnector(config, ECConnectorRole.SCHEDULER)


def request(key: str, rows: int, *, media: bool = True, request_id: str = "req-1"):
    feature = SimpleNamespace(identifier=key, data=object() if media else None)
    return SimpleNamespace(
        request_id=request_id, mm_features=[feature], get_num_encoder_embeds=lambda i: rows
    )


def store_entry(store, key: str, shape: tuple[int, int]) -> None:
    (store / key).mkdir(parents=True, exist_ok=True)
    save_file({"ec_cache": torch.zeros(shape)}, str(store / key / "encoder_cache.safetensors"))


def test_the_patch_is_applied_to_vllms_connector():
    assert ec_guard.is_applied()


def test_an_entry_that_fits_is_loaded(tiny_model_dir, tmp_path):
    store_entry(tmp_path, "a", (10, WIDTH))
    c = connector(tiny_model_dir, tmp_path, "ec_consumer")
    assert c.ensure_cache_available(request("a", 10), 0)
    assert c.has_cache_item("a")
    assert c.take_unavailable_requests() == set()


@pytest.mark.parametrize("shape", [(9, WIDTH), (11, WIDTH), (10, 64)], ids=["few", "many", "width"])
def test_an_entry_that_does_not_fit_is_encoded_locally(tiny_model_dir, tmp_path, shape):
    """Too few rows, too many (vLLM would use the first k silently), or no position channels:
    the scheduler is told the entry is absent, so it encodes the item itself."""
    store_entry(tmp_path, "b", shape)
    c = connector(tiny_model_dir, tmp_path, "ec_consumer")
    assert c.ensure_cache_available(request("b", 10), 0)
    assert not c.has_cache_item("b")
    assert c.take_unavailable_requests() == set()


def test_without_media_only_that_request_fails(tiny_model_dir, tmp_path):
    store_entry(tmp_path, "c", (9, WIDTH))
    store_entry(tmp_path, "d", (10, WIDTH))
    c = connector(tiny_model_dir, tmp_path, "ec_consumer")
    assert not c.ensure_cache_available(request("c", 10, media=False, request_id="bad"), 0)
    assert c.ensure_cache_available(request("d", 10, media=False, request_id="good"), 0)
    assert c.take_unavailable_requests() == {"bad"}
    assert c.take_unavailable_requests() == set()  # handed to the scheduler once


def test_a_stock_instance_checks_the_row_count_only(tiny_model_dir, tmp_path):
    store_entry(tmp_path, "e", (10, 64))
    store_entry(tmp_path, "f", (12, 64))
    c = connector(tiny_model_dir, tmp_path, "ec_consumer", selection=None)
    assert c.ensure_cache_available(request("e", 10), 0) and c.has_cache_item("e")
    assert c.ensure_cache_available(request("f", 10), 0) and not c.has_cache_item("f")


def test_a_producer_writes_its_settings_into_each_entry(tiny_model_dir, tmp_path):
    c = connector(tiny_model_dir, tmp_path, "ec_producer")
    rows = torch.randn(10, WIDTH)
    c.save_caches({"g": rows}, "g")
    with safe_open(str(tmp_path / "g" / "encoder_cache.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("ec_cache"), rows)
        meta = json.loads(f.metadata()["vs_vllm"])
    assert meta["selection"]["keep_ratio"] == 0.3 and meta["selection"]["strategy"] == "norm"
    assert meta["format"].startswith("vs-vllm-rows-")
    # a producer does not judge entries
    assert c.ensure_cache_available(request("g", 3), 0)


def test_the_guard_remembers_a_bounded_number_of_entries():
    recent = ec_guard._Recent(size=2)
    for key in ("a", "b", "c"):
        recent.add(key)
    assert "a" not in recent and "b" in recent and "c" in recent
    recent.add("b")  # used again: kept over "c"
    recent.add("d")
    assert "b" in recent and "c" not in recent and "d" in recent

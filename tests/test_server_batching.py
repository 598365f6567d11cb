"""Batching: compatible requests run as one batch, and a batched image equals the same request run alone."""

from __future__ import annotations

import numpy as np
import pytest
from test_server_support import SCHNELL, image_array, load_engines, make_config, running, wait_status

httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def engines(tiny_schnell_folder):
    return load_engines(tiny_schnell_folder)


def _submit_all(http, inputs: list[dict]) -> list[dict]:
    ids = [http.post("/v1/predictions", json={"input": {"output_format": "png", **i}}).json()["id"] for i in inputs]
    return [wait_status(http, i) for i in ids]


def test_batched_images_equal_the_same_requests_run_alone(engines, tmp_path):
    inputs = [
        {"prompt": "a red circle", "seed": 1},
        {"prompt": "a blue square on the left", "seed": 2, "num_outputs": 2},
        {"prompt": "a yellow star", "seed": 3},
    ]
    # A long wait window so that all three requests (4 images) land in one batch.
    config = make_config(tmp_path / "batched", engines, max_batch=4, batch_wait_ms=1500)
    with running(config, engines) as (url, svc), httpx.Client(base_url=url, timeout=60) as http:
        batched = _submit_all(http, inputs)
        assert list(svc.worker.batches) == [4]
        batched_images = [image_array(http.get(u).content) for p in batched for u in p["output"]]

    config = make_config(tmp_path / "alone", engines, max_batch=1, batch_wait_ms=0)
    with running(config, engines) as (url, svc), httpx.Client(base_url=url, timeout=60) as http:
        alone = [wait_status(http, http.post("/v1/predictions", json={"input": {"output_format": "png", **i}},
                                             headers={"Prefer": "wait"}).json()["id"]) for i in inputs]
        assert list(svc.worker.batches) == [1, 2, 1]  # a job's images always stay together
        alone_images = [image_array(http.get(u).content) for p in alone for u in p["output"]]

    assert len(batched_images) == len(alone_images) == 4
    for a, b in zip(batched_images, alone_images):
        assert np.abs(a - b).max() <= 2 / 255
    assert np.abs(batched_images[0] - batched_images[1]).mean() > 0.01  # different requests, different images


def test_only_compatible_requests_share_a_batch(engines, tmp_path):
    config = make_config(tmp_path, engines, max_batch=8, batch_wait_ms=1000)
    inputs = [
        {"prompt": "a", "width": 64, "height": 64},
        {"prompt": "b", "width": 80, "height": 64},
        {"prompt": "c", "width": 64, "height": 64},
        {"prompt": "d", "width": 64, "height": 64, "num_inference_steps": 3},
        {"prompt": "e", "width": 80, "height": 64},
    ]
    with running(config, engines) as (url, svc), httpx.Client(base_url=url, timeout=60) as http:
        results = _submit_all(http, inputs)
        assert all(r["status"] == "succeeded" for r in results)
        assert sorted(svc.worker.batches) == [1, 2, 2]  # 64x64 x2, 80x64 x2, and the 3-step one alone
        assert results[0]["model"] == SCHNELL

"""The service on Ray Serve, started locally: one node on loopback, two model replicas batching with @serve.batch.

Starting Ray and three replica processes takes most of a minute on a 2-core machine, so this is a slow test
(`pytest -m slow tests/test_server_ray.py`); it is skipped where Ray is not installed (`pip install "ray[serve]"`).
"""

from __future__ import annotations

import concurrent.futures
import os
import socket

import numpy as np
import pytest
from test_server_support import MEGAPIXELS, SCHNELL, image_array, load_engines, make_config, wait_status

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # Ray's own
httpx = pytest.importorskip("httpx")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_service(tiny_schnell_folder, tmp_path_factory):
    # Imported here, not at module level: the default run deselects this slow module without reporting a skip.
    ray = pytest.importorskip("ray", reason='Ray is not installed (pip install "ray[serve]")')
    from ray import serve

    from fluxkit.server.config import ModelConfig, ServeConfig
    from fluxkit.server.ray_app import build_app

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no reporting home
    port = _free_port()
    ray.init(num_cpus=3, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        folder = tmp_path_factory.mktemp("ray")
        config = ServeConfig(models=(ModelConfig(SCHNELL, str(tiny_schnell_folder), megapixels=MEGAPIXELS),),
                             database=folder / "jobs.sqlite", outputs=folder / "outputs", dtype="fp32",
                             max_batch=4, batch_wait_ms=200)
        serve.run(build_app(config, replicas=2), name="fluxkit", route_prefix="/")
        yield f"http://127.0.0.1:{port}", serve
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_serve_and_batch(ray_service, tiny_schnell_folder, tmp_path):
    url, serve = ray_service
    status = serve.status().applications["fluxkit"].deployments
    model = next(d for name, d in status.items() if name.startswith("FluxModel"))
    assert model.replica_states.get("RUNNING") == 2

    inputs = [{"prompt": f"a red circle {k}", "seed": k, "output_format": "png"} for k in range(8)]
    with httpx.Client(base_url=url, timeout=120) as http:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(lambda i: http.post("/v1/predictions", json={"input": i}).json()["id"], inputs))
        results = [wait_status(http, i, timeout=120) for i in ids]
        assert all(r["status"] == "succeeded" for r in results), [r["error"] for r in results]
        remote = [image_array(http.get(r["output"][0]).content) for r in results]

    handle = serve.get_deployment_handle(model_name := next(n for n in status if n.startswith("FluxModel")),
                                         app_name="fluxkit")
    stats = [handle.stats.remote().result() for _ in range(12)]
    assert len({s["pid"] for s in stats}) == 2, model_name  # both replicas answered
    assert max(b for s in stats for b in s["batches"]) > 1  # @serve.batch grouped concurrent jobs

    # The same images as the service in this process makes (a batched image equals it run alone, within 2/255).
    engines = load_engines(tiny_schnell_folder)
    from test_server_support import running

    with running(make_config(tmp_path, engines, max_batch=1), engines) as (local, _):
        with httpx.Client(base_url=local, timeout=60) as http:
            for inp, image in zip(inputs[:3], remote):
                pred = http.post("/v1/predictions", json={"input": inp}, headers={"Prefer": "wait"}).json()
                assert np.abs(image_array(http.get(pred["output"][0]).content) - image).max() <= 2 / 255

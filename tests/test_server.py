"""`fluxkit serve` API contracts on tiny models over loopback: the official openai and replicate clients unchanged,
the predictions lifecycle, cancel, server-sent events, `Prefer: wait`, LoRA by name, limits and the API token."""

from __future__ import annotations

import base64
import json
import time

import numpy as np
import pytest
from test_server_support import (
    DEV,
    SCHNELL,
    image_array,
    load_engines,
    make_config,
    running,
    wait_status,
    write_lora,
)

httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    outside = tmp_path_factory.mktemp("elsewhere") / "secret.safetensors"
    outside.write_bytes(b"not for you")
    (folder / "escape.safetensors").symlink_to(outside)  # a name inside that points outside
    return folder


@pytest.fixture(scope="module")
def engines(tiny_schnell_folder, tiny_dev_folder, lora_dir):
    engines = load_engines(tiny_schnell_folder, tiny_dev_folder, lora_dir)
    write_lora(engines[SCHNELL].pipe, lora_dir / "style.safetensors")
    return engines


@pytest.fixture(scope="module")
def server(engines, tmp_path_factory):
    config = make_config(tmp_path_factory.mktemp("serve"), engines, limits={"max_prompt_chars": 300})
    with running(config, engines) as (url, svc):
        with httpx.Client(base_url=url, timeout=60) as http:
            yield url, http, svc


def test_openai_client_generates_n_images_of_the_requested_size(server):
    openai = pytest.importorskip("openai")
    url, _, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    result = client.images.generate(model=SCHNELL, prompt="a red circle", n=2, size="80x48",
                                    response_format="b64_json", extra_body={"seed": 7})
    images = [image_array(base64.b64decode(d.b64_json)) for d in result.data]
    assert len(images) == 2 and images[0].shape == (48, 80, 3)
    assert np.abs(images[0] - images[1]).mean() > 0.01  # seeds 7 and 8 differ
    again = client.images.generate(model=SCHNELL, prompt="a red circle", n=1, size="80x48",
                                   response_format="url", extra_body={"seed": 7})
    # same seed, same image (within 2/255: a batch of two and a batch of one may round the last bit differently)
    assert np.abs(image_array(httpx.get(again.data[0].url).content) - images[0]).max() <= 2 / 255

    with pytest.raises(openai.BadRequestError, match="multiple of 16"):
        client.images.generate(model=SCHNELL, prompt="x", size="81x48")
    with pytest.raises(openai.BadRequestError, match="quality"):
        client.images.generate(model=SCHNELL, prompt="x", quality="hd")  # unknown fields are refused, not ignored
    with pytest.raises(openai.NotFoundError, match="not served"):
        client.images.generate(model="dall-e-3", prompt="x")


def test_replicate_run_unchanged_with_base_url(server, monkeypatch):
    replicate = pytest.importorskip("replicate")
    url, _, _ = server
    monkeypatch.setenv("REPLICATE_BASE_URL", url)
    monkeypatch.setenv("REPLICATE_API_TOKEN", "unused")
    client = replicate.Client()  # what the module-level replicate.run uses, built from the environment
    output = client.run(SCHNELL, input={"prompt": "a blue square", "aspect_ratio": "16:9", "num_outputs": 1})
    assert isinstance(output, list) and len(output) == 1
    image = image_array(httpx.get(str(output[0])).content)
    assert image.shape[1] > image.shape[0]  # 16:9: wider than tall
    assert abs(image.shape[1] / image.shape[0] - 16 / 9) < 0.3


def test_prediction_lifecycle_progress_and_metrics(server):
    _, http, _ = server
    r = http.post("/v1/predictions", json={"version": DEV, "input": {"prompt": "a green star", "seed": 3,
                                                                      "num_inference_steps": 6, "guidance": 2.0}})
    assert r.status_code == 201 and r.headers["location"].endswith(r.json()["id"])
    pred = r.json()
    assert pred["status"] in ("starting", "processing") and pred["output"] is None
    assert set(pred["urls"]) == {"get", "cancel", "stream"}
    done = wait_status(http, pred["id"])
    assert done["status"] == "succeeded" and done["error"] is None
    assert done["logs"].splitlines() == ["Using seed: 3", "100%|##########| 6/6"]
    assert done["metrics"]["image_count"] == 1 and done["metrics"]["predict_time"] > 0
    assert done["input"] == {"prompt": "a green star", "seed": 3, "num_inference_steps": 6, "guidance": 2.0}
    assert http.get(done["output"][0]).headers["content-type"] == "image/webp"
    listed = http.get("/v1/predictions").json()["results"]
    assert listed[0]["id"] == pred["id"]


def test_guidance_is_refused_for_a_model_without_it(server):
    _, http, _ = server
    r = http.post(f"/v1/models/{SCHNELL}/predictions", json={"input": {"prompt": "x", "guidance": 3.0}})
    assert r.status_code == 422 and "guidance" in r.json()["detail"]


def test_event_stream_is_readable_by_the_replicate_decoder(server):
    replicate = pytest.importorskip("replicate")
    from replicate.stream import EventSource

    _, http, _ = server
    pred = http.post("/v1/predictions", json={"input": {"prompt": "a cat", "num_inference_steps": 8,
                                                        "num_outputs": 2, "output_format": "png"}}).json()
    with http.stream("GET", pred["urls"]["stream"]) as response:
        events = list(EventSource(replicate.Client(base_url=str(http.base_url)), response))
    kinds = [e.event.value for e in events]
    assert kinds[-1] == "done" and kinds.count("output") == 2 and "logs" in kinds
    steps = [int(e.data.rsplit("| ", 1)[1].split("/")[0]) for e in events if e.event.value == "logs" and "|" in e.data]
    assert steps == sorted(steps) and steps[-1] == 8
    assert [e.data for e in events if e.event.value == "output"] == wait_status(http, pred["id"])["output"]
    assert json.loads(events[-1].data) == {}


def test_prefer_wait_blocks_until_done_or_reports_starting(server):
    _, http, _ = server
    quick = http.post("/v1/predictions", json={"input": {"prompt": "a dog"}}, headers={"Prefer": "wait=30"})
    assert quick.json()["status"] == "succeeded" and quick.json()["output"]
    big = {"prompt": "a dog", "num_inference_steps": 60, "width": 256, "height": 256, "num_outputs": 4}
    # Work queued ahead of it keeps it from finishing within the 1 s wait, however fast the machine is.
    ahead = [http.post("/v1/predictions", json={"input": {**big, "seed": k}}).json()["id"] for k in range(3)]
    slow = http.post("/v1/predictions", json={"input": big}, headers={"Prefer": "wait=1"})
    assert slow.json()["status"] == "starting"  # not finished within 1 s: Replicate's blocking API says starting
    for job in [*ahead, slow.json()["id"]]:
        http.post(f"/v1/predictions/{job}/cancel")
    bad = http.post("/v1/predictions", json={"input": {"prompt": "a dog"}}, headers={"Prefer": "wait=abc"})
    assert bad.status_code == 400 and "Prefer" in bad.json()["detail"]


def test_cancel_running_and_queued_jobs(server):
    _, http, svc = server
    big = {"prompt": "a large cat", "num_inference_steps": 60, "width": 256, "height": 256}
    running_id = http.post("/v1/predictions", json={"input": big}).json()["id"]
    wait_status(http, running_id, until=("processing",))
    queued_id = http.post("/v1/predictions", json={"input": {**big, "seed": 1}}).json()["id"]
    assert http.post(f"/v1/predictions/{queued_id}/cancel").json()["status"] == "canceled"  # dropped from the queue
    t0 = time.monotonic()
    http.post(f"/v1/predictions/{running_id}/cancel")
    stopped = wait_status(http, running_id)
    assert stopped["status"] == "canceled" and stopped["output"] is None
    assert time.monotonic() - t0 < 5  # stopped at the next step, not after 60
    assert int(stopped["logs"].rsplit("| ", 1)[1].split("/")[0]) < 60
    assert svc.store.get(running_id).status == "canceled"
    finished = http.post("/v1/predictions", json={"input": {"prompt": "x"}}, headers={"Prefer": "wait"}).json()
    assert http.post(f"/v1/predictions/{finished['id']}/cancel").json()["status"] == "succeeded"  # unchanged
    assert http.post("/v1/predictions/" + "0" * 32 + "/cancel").status_code == 404


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"prompt": "x", "width": 512, "height": 512}, 422, "pixels"),
        ({"prompt": "x", "num_inference_steps": 61}, 422, "steps"),
        ({"prompt": "x", "num_outputs": 5}, 422, "num_outputs"),
        ({"prompt": "x" * 301}, 422, "301 characters"),
        ({"prompt": "   "}, 422, "empty"),
        ({"prompt": "x", "megapixels": "lots"}, 422, "megapixels"),
        ({"prompt": "x", "width": 64}, 422, "both width and height"),
        ({"prompt": "x", "negative_prompt": "blurry"}, 422, "true_cfg"),
        ({"prompt": "x", "image": "http://example.com/a.png"}, 422, "does not fetch"),
        ({"prompt": "x", "image": "data:image/png;base64,AAAA"}, 422, "not a base64-encoded image"),
        ({"prompt": "x", "mask": "AAAA"}, 422, "mask needs image"),
        ({"prompt": "x", "lora_weights": "../style"}, 422, "LoRA name"),
        ({"prompt": "x", "lora_weights": "nope"}, 422, "no LoRA named"),
    ],
)
def test_limits_and_bad_input_are_clear_4xx(server, body, status, needle):
    _, http, _ = server
    r = http.post("/v1/predictions", json={"input": body})
    assert r.status_code == status, r.text
    assert needle in r.json()["detail"]


def test_lora_by_name_changes_the_image_and_leaves_the_base_untouched(server, engines):
    _, http, _ = server

    def run(**extra):
        pred = http.post("/v1/predictions", headers={"Prefer": "wait"},
                         json={"input": {"prompt": "a red circle", "seed": 11, "output_format": "png", **extra}})
        assert pred.status_code == 201, pred.text
        return image_array(http.get(pred.json()["output"][0]).content)

    base = run()
    styled = run(lora_weights="style")
    assert np.abs(styled - base).mean() > 0.01
    assert np.abs(run(lora_weights="style", lora_scale=0.0) - base).max() <= 1 / 255
    assert np.array_equal(run(), base)  # back to no adapter: bit-identical, nothing was reloaded or fused
    assert np.abs(run(lora_weights="style") - styled).max() <= 1 / 255  # loaded once, reused
    assert http.get("/v1/loras").json() == ["style"]  # escape.safetensors links outside the folder: not offered
    r = http.post("/v1/predictions", json={"input": {"prompt": "x", "lora_weights": "escape"}})
    assert r.status_code == 422 and "no LoRA named 'escape'" in r.json()["detail"]


def test_img2img_from_a_data_uri(server):
    _, http, _ = server
    start = http.post("/v1/predictions", headers={"Prefer": "wait"},
                      json={"input": {"prompt": "a red circle", "seed": 1, "output_format": "png"}}).json()
    data = base64.b64encode(http.get(start["output"][0]).content).decode()
    pred = http.post("/v1/predictions", headers={"Prefer": "wait"},
                     json={"input": {"prompt": "a blue square", "image": "data:image/png;base64," + data,
                                     "prompt_strength": 0.3, "seed": 2, "output_format": "png"}}).json()
    assert pred["status"] == "succeeded", pred
    assert image_array(http.get(pred["output"][0]).content).shape == (64, 64, 3)  # the input image sets the size


def test_queue_limit_answers_429(engines, tmp_path):
    config = make_config(tmp_path, engines, limits={"max_queue": 2})
    big = {"prompt": "a large cat", "num_inference_steps": 40, "width": 256, "height": 256}
    with running(config, engines) as (url, svc), httpx.Client(base_url=url, timeout=30) as http:
        # Different widths: jobs that cannot share a batch, so they wait in the queue.
        answers = [http.post("/v1/predictions", json={"input": {**big, "width": 256 - 16 * i}}) for i in range(5)]
        codes = [a.status_code for a in answers]
        assert codes.count(429) >= 2 and set(codes) == {201, 429}
        assert "queue is full" in next(a for a in answers if a.status_code == 429).json()["detail"]
        for a in answers:
            if a.status_code == 201:
                http.post(f"/v1/predictions/{a.json()['id']}/cancel")


def test_token_is_required_when_configured(engines, tmp_path):
    from fluxkit.server.config import ServeConfig

    with pytest.raises(ValueError, match="API token"):
        ServeConfig(models=make_config(tmp_path, engines).models, host="0.0.0.0")  # checked, never bound
    config = make_config(tmp_path, engines, token="s3cret")
    with running(config, engines) as (url, _), httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/v1/models").status_code == 401
        assert http.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert http.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert http.get("/v1/models", headers={"Authorization": "Token s3cret"}).status_code == 200
        assert http.get("/").status_code == 200  # the page itself; it asks for the token
        r = http.post("/v1/images/generations", json={"prompt": "x"})
        assert r.status_code == 401 and "token" in r.json()["error"]["message"]

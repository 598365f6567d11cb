"""Server pieces without a model: config file, job store recovery, request validation, LoRA names, sizes."""

from __future__ import annotations

import argparse

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")

from fluxkit.server.config import ModelConfig, is_loopback, load_config  # noqa: E402
from fluxkit.server.engine import list_loras, lora_path  # noqa: E402
from fluxkit.server.job_request import InputError, JobRequest, ModelInfo, from_openai, from_prediction  # noqa: E402
from fluxkit.server.jobs import JobStore, remove_partial_files  # noqa: E402
from fluxkit.server.replicate_api import parse_prefer, progress_line  # noqa: E402
from fluxkit.server.schemas import ImageGenerationRequest, PredictionInput  # noqa: E402
from fluxkit.sizes import size_for_aspect  # noqa: E402

INFO = ModelInfo("m", 16, (256, 256), 4, False, 0.0, False)


def test_config_file_with_overrides(tmp_path, monkeypatch):
    path = tmp_path / "serve.toml"
    path.write_text(
        'port = 9000\nlora_dir = "loras"\n[batching]\nmax_batch = 8\nwait_ms = 25\n[limits]\nmax_steps = 12\n'
        '[models."black-forest-labs/flux-schnell"]\nsource = "fluxkit-tiny-schnell"\nmegapixels = 0.25\n'
    )
    monkeypatch.setenv("FLUXKIT_API_TOKEN", "t0k")
    cfg = load_config(path, port=9001, limits={"max_queue": 3})
    assert (cfg.port, cfg.max_batch, cfg.batch_wait_ms, cfg.token) == (9001, 8, 25, "t0k")
    assert (cfg.limits.max_steps, cfg.limits.max_queue) == (12, 3)
    assert cfg.models == (ModelConfig("black-forest-labs/flux-schnell", "fluxkit-tiny-schnell", None, 0.25),)
    path.write_text('prot = 1\n[models.a]\nsource = "x"\n')
    with pytest.raises(ValueError, match="unknown keys \\['prot'\\]"):
        load_config(path)
    monkeypatch.delenv("FLUXKIT_API_TOKEN")
    with pytest.raises(ValueError, match="API token"):
        load_config(None, models=[ModelConfig("a", "x")], host="192.168.1.5")
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.com")


def test_store_recovery_requeues_waiting_and_fails_repeatedly_interrupted_jobs(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    for job_id in ("a", "b", "c", "d"):
        store.add(job_id, "prediction", "m", {"prompt": job_id}, {"seeds": [1]})
    store.start(["b", "c"])
    store.start(["c"])  # not 'starting' any more: no second start
    store.finish("d", ["d-0.png"])
    store.cancel("d")  # a finished job keeps its first terminal state
    store.close()

    store = JobStore(tmp_path / "jobs.sqlite")  # a restart
    assert [r.id for r in store.recover(max_attempts=2)] == ["a", "b", "c"]
    store.start(["b"])
    store.close()
    store = JobStore(tmp_path / "jobs.sqlite")  # interrupted again while running b
    assert [r.id for r in store.recover(max_attempts=2)] == ["a", "c"]
    b = store.get("b")
    assert b.status == "failed" and "stopped 2 times" in b.error
    assert store.get("d").status == "succeeded" and store.get("d").output == ["d-0.png"]
    assert store.counts() == {"starting": 2, "failed": 1, "succeeded": 1}


def test_partial_output_files_are_removed(tmp_path):
    (tmp_path / ".abc-0.png.x1.tmp").write_bytes(b"half")
    (tmp_path / "abc-0.png").write_bytes(b"whole")
    assert remove_partial_files(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["abc-0.png"]


def test_prediction_input_to_job_request():
    from fluxkit.server.config import Limits

    limits = Limits()
    req = from_prediction(PredictionInput(prompt="p", aspect_ratio="16:9", num_outputs=3, seed=5), INFO, limits, [])
    assert (req.height, req.width, req.seeds, req.steps, req.output_format) == (192, 336, (5, 6, 7), 4, "webp")
    assert JobRequest.from_dict(req.to_dict()) == req  # what the store keeps restores the same job
    drawn = from_prediction(PredictionInput(prompt="p"), INFO, limits, [])
    assert len(drawn.seeds) == 1 and drawn.seeds[0] >= 0  # a random seed is fixed at acceptance
    mp = from_prediction(PredictionInput(prompt="p", megapixels="0.25", aspect_ratio="1:1"), INFO, limits, [])
    assert (mp.height, mp.width) == (496, 496)  # sqrt(250000) = 500 -> the nearest multiple of 16
    with pytest.raises(InputError, match="takes no guidance"):
        from_prediction(PredictionInput(prompt="p", guidance=3.0), INFO, limits, [])
    oa = from_openai(ImageGenerationRequest(prompt="p", size="320x160", n=2, output_format="jpeg"), INFO, limits, [])
    assert (oa.height, oa.width, oa.n, oa.output_format) == (160, 320, 2, "jpg")
    with pytest.raises(InputError, match="WIDTHxHEIGHT"):
        from_openai(ImageGenerationRequest(prompt="p", size="big"), INFO, limits, [])
    a = from_prediction(PredictionInput(prompt="p", seed=1), INFO, limits, [])
    b = from_prediction(PredictionInput(prompt="q", seed=9, num_outputs=2), INFO, limits, [])
    c = from_prediction(PredictionInput(prompt="p", seed=1, num_inference_steps=5), INFO, limits, [])
    assert a.batch_key() == b.batch_key() != c.batch_key()


def test_sizes_match_the_generate_command():
    from fluxkit.cli_generate import _size

    for ratio in ("1:1", "16:9", "9:21", "3:2"):
        for mp in (0.25, 1.0):
            args = argparse.Namespace(aspect_ratio=ratio, megapixels=mp, width=None, height=None)
            assert size_for_aspect(ratio, mp * 1e6) == _size(args, (1024, 1024))
    with pytest.raises(ValueError, match="aspect_ratio"):
        size_for_aspect("5:4", 1e6)


def test_lora_names_cannot_leave_the_folder(tmp_path):
    folder = tmp_path / "loras"
    (folder / "pack").mkdir(parents=True)
    (folder / "pack" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    (folder / "a.safetensors").write_bytes(b"")
    (folder / ".hidden.safetensors").write_bytes(b"")
    (tmp_path / "outside.safetensors").write_bytes(b"")
    (folder / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    assert list_loras(folder) == ["a", "pack"]  # not .hidden (not a name), not link (leads outside)
    assert lora_path(folder, "pack") == folder / "pack"
    for bad in ("../outside", "/etc/passwd", ".hidden", "a/../../outside"):
        with pytest.raises(ValueError, match="bad LoRA name"):
            lora_path(folder, bad)
    with pytest.raises(ValueError, match="outside the LoRA folder"):
        lora_path(folder, "link")


def test_prefer_header_and_progress_line():
    assert parse_prefer("wait", 60) == 60 and parse_prefer("respond-async, wait=5", 60) == 5
    assert parse_prefer(None, 60) is None and parse_prefer("return=minimal", 60) is None
    for bad in ("wait=0", "wait=61", "wait=x"):
        with pytest.raises(InputError, match="Prefer"):
            parse_prefer(bad, 60)
    assert progress_line(2, 4) == " 50%|#####     | 2/4"
    replicate = pytest.importorskip("replicate")
    progress = replicate.prediction.Prediction.Progress.parse("Using seed: 3\n" + progress_line(3, 4))
    assert (progress.percentage, progress.current, progress.total) == (0.75, 3, 4)  # the client's own parser


def test_serve_command_refuses_a_public_bind_without_token(capsys, monkeypatch):
    from fluxkit.cli import main

    monkeypatch.delenv("FLUXKIT_API_TOKEN", raising=False)
    assert main(["serve", "--model", "m=fluxkit-tiny-schnell", "--host", "0.0.0.0"]) == 2
    assert "set an API token" in capsys.readouterr().err


def test_the_core_and_the_command_line_do_not_import_the_server_stack():
    import subprocess
    import sys

    code = ("import sys, fluxkit.cli, fluxkit.pipeline; fluxkit.cli.build_parser(); "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'ray', 'starlette') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"

"""Strict checkpoint loading: safetensors files and shards, diffusers folders and BFL files into Flux/AutoEncoder,
saving and converting, and Hugging Face cache resolution."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import safetensors.torch
import torch
from huggingface_hub import constants
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors.torch import save_file
from test_convert import AXES, tiny_diffusers_transformer, tiny_diffusers_vae, tiny_params

import fluxkit.loading as loading
from fluxkit.autoencoder import AutoEncoder
from fluxkit.convert import expected_ae_shapes, expected_bfl_shapes, transformer_diffusers_to_bfl, vae_diffusers_to_bfl
from fluxkit.loading import (
    CheckpointError,
    ModelNotFoundError,
    add_convert_arguments,
    load_autoencoder,
    load_flux_transformer,
    load_safetensors,
    resolve_model_source,
    save_bfl,
    save_diffusers_transformer,
)
from fluxkit.model import Flux
from fluxkit.params import FLUX_DEV, FLUX_SCHNELL, AutoEncoderParams

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def diffusers_dev():
    return tiny_diffusers_transformer(guidance=True).eval()


@pytest.fixture(scope="module")
def sharded_folder(diffusers_dev, tmp_path_factory):
    folder = tmp_path_factory.mktemp("transformer")
    diffusers_dev.save_pretrained(folder, max_shard_size="60KB")  # several shards + index
    return folder


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    vae = tiny_diffusers_vae()
    vae.register_to_config(scaling_factor=1.5, shift_factor=0.25)
    vae.save_pretrained(folder)
    return folder, vae.eval()


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def flux_inputs(guidance: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    img, txt = torch.randn(1, 12, 64, generator=gen), torch.randn(1, 5, 48, generator=gen)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(3.0), torch.arange(4.0), indexing="ij"), -1)
    return dict(img=img, img_ids=img_ids.reshape(1, 12, 3), txt=txt, txt_ids=torch.zeros(1, 5, 3),
                timesteps=torch.tensor([0.7]), y=torch.randn(1, 32, generator=gen),
                guidance=torch.tensor([3.5]) if guidance else None)


def diffusers_forward(model, x: dict) -> torch.Tensor:
    return model(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                 timestep=x["timesteps"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0],
                 guidance=x["guidance"]).sample


# ---- safetensors files ----------------------------------------------------------------------------------------------


def test_load_safetensors_reads_files_and_rejects_broken_ones(tmp_path):
    sd = {"a": torch.randn(64, 64), "b": torch.arange(5)}
    path = tmp_path / "ok.safetensors"
    save_file(sd, path)
    assert_same_state(load_safetensors(path), sd)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: not a readable safetensors file.*not fully covered"):
        load_safetensors(tmp_path / "cut.safetensors")
    (tmp_path / "garbled.safetensors").write_bytes(data[:8] + b"{garbage" + data[16:])
    with pytest.raises(CheckpointError, match=r"garbled\.safetensors: .*invalid JSON"):
        load_safetensors(tmp_path / "garbled.safetensors")
    torch.save(sd, tmp_path / "pickled.safetensors")
    with pytest.raises(CheckpointError, match="looks like a pickle"):
        load_safetensors(tmp_path / "pickled.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_safetensors(tmp_path / "missing.safetensors")


def test_sharded_checkpoint_loads_and_index_is_checked(sharded_folder, diffusers_dev, tmp_path):
    index_path = next(sharded_folder.glob("*.index.json"))
    index = json.loads(index_path.read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert_same_state(load_safetensors(index_path), diffusers_dev.state_dict())
    for shard in set(index["weight_map"].values()):
        (tmp_path / shard).write_bytes((sharded_folder / shard).read_bytes())
    moved = next(iter(index["weight_map"]))
    index["weight_map"][moved] = next(s for s in set(index["weight_map"].values()) if s != index["weight_map"][moved])
    (tmp_path / "bad.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"keys differ from the index: .*{moved}"):
        load_safetensors(tmp_path / "bad.safetensors.index.json")


# ---- transformer ----------------------------------------------------------------------------------------------------


def test_flux_dev_and_schnell_on_meta_match_the_expected_tables():
    for params in (FLUX_DEV, FLUX_SCHNELL):
        with torch.device("meta"):
            model = Flux(params)
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected_bfl_shapes(params)
    with torch.device("meta"):
        ae = AutoEncoder(AutoEncoderParams())
    assert {k: tuple(v.shape) for k, v in ae.state_dict().items()} == expected_ae_shapes(AutoEncoderParams())


def test_load_sharded_diffusers_folder_into_flux(sharded_folder, diffusers_dev):
    model = load_flux_transformer(sharded_folder)
    assert model.params == tiny_params(True)  # from config.json, RoPE axes included
    assert not model.training
    assert_same_state(model.state_dict(), transformer_diffusers_to_bfl(diffusers_dev.state_dict()))
    x = flux_inputs(guidance=True)
    with torch.no_grad():  # parity with diffusers on the same weights: the mapping is right, not just reversible
        torch.testing.assert_close(model(**x), diffusers_forward(diffusers_dev, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_load_bfl_single_file_into_flux(tmp_path, prefix):
    bfl = transformer_diffusers_to_bfl(tiny_diffusers_transformer(guidance=False).state_dict())
    path = tmp_path / "flux1-tiny.safetensors"
    save_file({prefix + k: v for k, v in bfl.items()}, path)
    with pytest.raises(CheckpointError, match=r"flux1-tiny\.safetensors: .*pass axes_dim"):  # head_dim 16 != 128
        load_flux_transformer(path)
    model = load_flux_transformer(path, params=tiny_params(False), dtype=torch.bfloat16)
    assert model.img_in.weight.dtype == torch.bfloat16
    assert_same_state(model.state_dict(), {k: v.bfloat16() for k, v in bfl.items()})


def test_load_rejects_checkpoints_that_do_not_fit(tmp_path, diffusers_dev, vae_folder):
    bfl = transformer_diffusers_to_bfl(diffusers_dev.state_dict())
    with pytest.raises(CheckpointError, match=r"state dict: .*missing keys: double_blocks\.2\."):
        load_flux_transformer(bfl, params=replace(tiny_params(True), depth=3))
    with pytest.raises(CheckpointError, match=r"unexpected keys: guidance_in\.in_layer\.bias"):
        load_flux_transformer(bfl, params=tiny_params(False))
    with pytest.raises(CheckpointError, match="holds an autoencoder, not a transformer"):
        load_flux_transformer(vae_folder[0])
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="whole diffusers pipeline"):
        load_flux_transformer(tmp_path)


def test_saved_diffusers_folder_loads_in_diffusers(tmp_path, sharded_folder, diffusers_dev):
    from diffusers import FluxTransformer2DModel

    model = load_flux_transformer(sharded_folder)
    save_diffusers_transformer(model, tmp_path / "out")
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["config.json", "diffusion_pytorch_model.safetensors"]
    reloaded = FluxTransformer2DModel.from_pretrained(tmp_path / "out").eval()
    assert_same_state(reloaded.state_dict(), diffusers_dev.state_dict())


def test_save_bfl_is_atomic(tmp_path, diffusers_dev, monkeypatch):
    model = load_flux_transformer(transformer_diffusers_to_bfl(diffusers_dev.state_dict()), params=tiny_params(True))
    path = save_bfl(model, tmp_path / "flux.safetensors")
    assert_same_state(load_safetensors(path), model.state_dict())

    def crash_midway(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash_midway)  # fluxkit.atomic imports it per call
    with pytest.raises(OSError, match="disk full"):
        save_bfl(model, path)
    assert [p.name for p in tmp_path.iterdir()] == ["flux.safetensors"]  # no temp file left behind
    assert_same_state(load_safetensors(path), model.state_dict())  # the previous file is intact
    with pytest.raises(ValueError, match="needs BFL keys"):
        save_bfl(diffusers_dev.state_dict(), tmp_path / "x.safetensors")


# ---- autoencoder ----------------------------------------------------------------------------------------------------


def test_load_diffusers_vae_folder(vae_folder):
    folder, vae = vae_folder
    ae = load_autoencoder(folder)
    assert (ae.params.scale_factor, ae.params.shift_factor, ae.params.norm_groups) == (1.5, 0.25, 4)
    assert_same_state(ae.state_dict(), vae_diffusers_to_bfl(vae.state_dict()))
    gen = torch.Generator().manual_seed(0)
    z, x = torch.randn(1, 16, 4, 4, generator=gen), torch.randn(1, 3, 16, 16, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(ae.decoder(z), vae.decode(z).sample, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ae.encoder(x), vae.encoder(x), rtol=1e-4, atol=1e-5)


def test_load_bfl_ae_file_and_convert_round_trip(tmp_path, vae_folder):
    folder, vae = vae_folder
    bfl = vae_diffusers_to_bfl(vae.state_dict())
    save_file(bfl, tmp_path / "ae.safetensors")
    with pytest.raises(CheckpointError, match="not divisible by norm_groups 32"):  # BFL files carry no group count
        load_autoencoder(tmp_path / "ae.safetensors")
    params = AutoEncoderParams(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=4)
    assert_same_state(load_autoencoder(tmp_path / "ae.safetensors", params=params).state_dict(), bfl)
    # diffusers folder -> BFL file -> diffusers folder through the CLI entry point
    parser = argparse.ArgumentParser()
    add_convert_arguments(parser)
    for src, dst, to in ((folder, tmp_path / "ae2.safetensors", "bfl"), (folder, tmp_path / "vae2", "diffusers")):
        args = parser.parse_args([str(src), str(dst), "--to", to])
        assert args.run(args) == 0
    assert_same_state(load_safetensors(tmp_path / "ae2.safetensors"), bfl)
    assert_same_state(load_safetensors(tmp_path / "vae2" / "diffusion_pytorch_model.safetensors"), vae.state_dict())
    config = json.loads((tmp_path / "vae2" / "config.json").read_text())
    assert (config["scaling_factor"], config["shift_factor"], config["block_out_channels"]) == (1.5, 0.25, [8, 16, 16])


def test_convert_transformer_file_to_diffusers(tmp_path, diffusers_dev):
    bfl = transformer_diffusers_to_bfl(diffusers_dev.state_dict())
    save_file(bfl, tmp_path / "flux.safetensors")
    out = loading.convert_checkpoint(tmp_path / "flux.safetensors", tmp_path / "transformer", "diffusers",
                                     axes_dim=AXES)
    assert json.loads((out / "config.json").read_text())["axes_dims_rope"] == list(AXES)
    assert_same_state(load_safetensors(out / "diffusion_pytorch_model.safetensors"), diffusers_dev.state_dict())
    with pytest.raises(ValueError, match="to must be 'bfl' or 'diffusers'"):
        loading.convert_checkpoint(tmp_path / "flux.safetensors", tmp_path / "x", "gguf")


# ---- Hugging Face resolution ----------------------------------------------------------------------------------------


def test_resolve_offline_uses_the_cache_or_explains(tmp_path):
    """A real HF_HUB_OFFLINE=1 process with its own HF_HOME: a cached snapshot resolves, a missing repo explains."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--org--cached-model"
    (repo / "snapshots" / commit / "transformer").mkdir(parents=True)
    (repo / "snapshots" / commit / "transformer" / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    script = (
        "import json\nfrom fluxkit.loading import resolve_model_source, ModelNotFoundError\n"
        "out = {'cached': str(resolve_model_source('org/cached-model', allow_patterns=['transformer/*']))}\n"
        "try:\n    resolve_model_source('org/missing-model')\n"
        "except ModelNotFoundError as err:\n    out['error'] = str(err)\nprint(json.dumps(out))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(REPO_ROOT))
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(out["cached"]) == (repo / "snapshots" / commit).resolve()
    assert "'org/missing-model' is not in the local Hugging Face cache" in out["error"]
    assert str(tmp_path / "hf" / "hub") in out["error"] and "HF_HUB_OFFLINE is set" in out["error"]
    assert "hf download org/missing-model" in out["error"] and "local folder" in out["error"]


def test_resolve_local_paths_and_failed_downloads(tmp_path, monkeypatch):
    assert resolve_model_source(tmp_path) == tmp_path
    with pytest.raises(ModelNotFoundError, match="neither an existing file or folder nor a Hugging Face repo id"):
        resolve_model_source(str(tmp_path / "no" / "such.safetensors"))
    calls = []

    def fake_download(repo_id, allow_patterns=None, local_files_only=False):
        calls.append(local_files_only)
        raise LocalEntryNotFoundError("not cached") from ConnectionError("network down")

    monkeypatch.setattr(loading, "snapshot_download", fake_download)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ModelNotFoundError, match="could not be reached .*network down"):
        resolve_model_source("org/name")
    assert calls == [True, False]  # cache first, then the network
    calls.clear()
    with pytest.raises(ModelNotFoundError, match="downloads were not allowed"):
        resolve_model_source("org/name", allow_download=False)
    assert calls == [True]

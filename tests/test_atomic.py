"""fluxkit.atomic: files appear whole, with the permissions a plain open() gives, and a failed write changes nothing."""

from __future__ import annotations

import os
import stat

import pytest

from fluxkit.atomic import atomic_write, atomic_write_bytes, atomic_write_text


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_file_gets_the_umask_permissions_not_mkstemps_0600(tmp_path, umask_022):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "hello")
    assert mode(path) == 0o644


def test_a_stricter_umask_is_honoured(tmp_path):
    old = os.umask(0o077)
    try:
        atomic_write_bytes(tmp_path / "secret.bin", b"x")
    finally:
        os.umask(old)
    assert mode(tmp_path / "secret.bin") == 0o600


def test_umask_fallback_without_proc_reads_it_and_puts_it_back(monkeypatch, umask_022):
    import fluxkit.atomic

    def no_proc(*args, **kwargs):
        raise FileNotFoundError("/proc/self/status")

    assert fluxkit.atomic._umask() == 0o022  # from /proc on Linux
    monkeypatch.setattr(fluxkit.atomic, "open", no_proc, raising=False)
    assert fluxkit.atomic._umask() == 0o022
    assert os.umask(0o022) == 0o022  # unchanged


def test_failing_writer_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_text("old")

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("half a new fi")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, write)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.safetensors"]


def test_interrupt_also_cleans_up(tmp_path):
    def write(tmp: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "x.json", write)
    assert list(tmp_path.iterdir()) == []


def test_writer_gets_a_hidden_temp_path_beside_the_target(tmp_path):
    seen = []
    atomic_write(tmp_path / "grid.png", lambda tmp: (seen.append(tmp), open(tmp, "wb").close()))
    tmp = os.path.basename(seen[0])
    assert os.path.dirname(seen[0]) == str(tmp_path)
    assert tmp.startswith(".grid.png.") and tmp.endswith(".tmp")
    assert not os.path.exists(seen[0])


def test_text_and_bytes_round_trip_and_replace(tmp_path):
    atomic_write_text(tmp_path / "t.txt", "ünïcode\nlines")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "ünïcode\nlines"
    atomic_write_text(tmp_path / "t.txt", "second")
    assert (tmp_path / "t.txt").read_text() == "second"
    data = bytes(range(256))
    atomic_write_bytes(str(tmp_path / "b.bin"), data)  # str paths work too
    assert (tmp_path / "b.bin").read_bytes() == data


def test_parent_folders_are_created(tmp_path):
    path = tmp_path / "a" / "b" / "c.txt"
    atomic_write_text(path, "deep")
    assert path.read_text() == "deep"


def test_exported_model_weights_are_readable_by_group_and_others(tmp_path, umask_022):
    """The bug this module fixed: save_native left transformer.safetensors at mkstemp's -rw-------."""
    import torch

    from fluxkit.autoencoder import AutoEncoder
    from fluxkit.hub import save_native
    from fluxkit.model import Flux
    from fluxkit.params import TEST_AE, TEST_FLUX, ModelSpec

    torch.manual_seed(0)
    folder = tmp_path / "model"
    save_native(folder, Flux(TEST_FLUX), ModelSpec("test", TEST_FLUX, TEST_AE), ae=AutoEncoder(TEST_AE))
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["ae.safetensors", "fluxkit.json", "transformer.safetensors"]  # no temp files left
    for name in files:
        assert mode(folder / name) & 0o044 == 0o044, f"{name}: {oct(mode(folder / name))}"

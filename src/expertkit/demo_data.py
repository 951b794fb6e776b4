"""Real text that exists wherever expertkit is installed, for the offline demo.

- general:  docstrings of half of the standard library's modules (English prose about programs)
- code:     source of the other half of the standard library's modules
- docs:     Python's reference documentation topics (`pydoc_data.topics`)
- licenses: license texts of the installed Python packages (deduplicated)

Nothing here is committed to the repository; it is read from the running Python.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import json
import sysconfig
from pathlib import Path

MAX_FILE_BYTES = 80_000


def _stdlib_modules() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in stdlib.glob("*.py") if p.stat().st_size <= MAX_FILE_BYTES)


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def docstrings(paths: list[Path]) -> list[str]:
    out = []
    for p in paths:
        source = _read(p)
        try:
            tree = ast.parse(source or "")
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    out.append(doc)
    return out


def sources(paths: list[Path]) -> list[str]:
    return [s for s in (_read(p) for p in paths) if s]


def doc_topics() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def license_texts() -> list[str]:
    seen, out = set(), []
    for dist in sorted(importlib.metadata.distributions(), key=lambda d: d.metadata["Name"] or ""):
        for f in dist.files or []:
            name = str(f).upper()
            if "LICEN" not in name and "COPYING" not in name:
                continue
            path = Path(dist.locate_file(f))
            text = _read(path) if path.is_file() and path.stat().st_size < 400_000 else None
            if text and len(text) > 200:
                digest = hashlib.sha1(text.encode()).hexdigest()
                if digest not in seen:
                    seen.add(digest)
                    out.append(text)
    return out


def write_demo_corpora(folder: Path) -> dict[str, Path]:
    """Write each domain as a .jsonl (one document per record, so code keeps its blank lines)."""
    modules = _stdlib_modules()
    corpora = {
        "general": docstrings(modules[1::2]),
        "code": sources(modules[0::2]),
        "docs": doc_topics(),
        "licenses": license_texts(),
    }
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, docs in corpora.items():
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return paths

"""Self-contained modeling code for saved model folders, so `trust_remote_code=True` loads them without spikelm.

`write_remote_code(folder)` copies the package modules the model needs (the closure of
models/modeling_spikelm.py and models/configuration_spikelm.py over their imports: models, layers,
neurons, ops) into the folder as flat files, with every import inside the package rewritten to the
flat sibling (`from ..ops.scan import scan` -> `from .spikelm_ops_scan import scan`), and the C/C++
kernels' sources embedded in one more module, so the compiled CPU kernel travels too. The package
source is the only source of truth: the bundle is generated from it at every save, and
`bundle_sources()` is what a test compares against the package.

transformers copies a remote-code folder's files by following `from .module import` lines, so the
entry module lists every bundled module that way once.
"""
from __future__ import annotations

import ast
import os
import tempfile
from pathlib import Path

PACKAGE = "spikelm"
PACKAGE_DIR = Path(__file__).resolve().parents[1]
ENTRY_MODULES = ("spikelm.models.modeling_spikelm", "spikelm.models.configuration_spikelm")
# flat names transformers' auto_map points at (the config class must come from the module named there)
ENTRY_NAMES = {"spikelm.models.modeling_spikelm": "modeling_spikelm",
               "spikelm.models.configuration_spikelm": "configuration_spikelm"}
CSRC_MODULE = "spikelm.ops.csrc_sources"  # generated: {file name: C/C++ source} of ops/csrc
AUTO_MAP = {"AutoConfig": "configuration_spikelm.SpikeLMConfig",
            "AutoModel": "modeling_spikelm.SpikeLMModel",
            "AutoModelForCausalLM": "modeling_spikelm.SpikeLMForCausalLM"}


def in_package() -> bool:
    """True when running from the installed package (a remote-code copy is a flat module outside it)."""
    return __name__.startswith(PACKAGE + ".")


def flat_name(module: str) -> str:
    return ENTRY_NAMES.get(module) or module.replace(".", "_")


def _path(module: str) -> Path | None:
    """The source file of a package module (its __init__.py for a subpackage), or None."""
    rel = Path(*module.split(".")[1:])
    for p in (PACKAGE_DIR / rel / "__init__.py", PACKAGE_DIR / rel.with_suffix(".py")):
        if p.is_file():
            return p
    return None


def _is_package(module: str) -> bool:
    return (PACKAGE_DIR / Path(*module.split(".")[1:]) / "__init__.py").is_file()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """Absolute name of a relative import's target, seen from `module`."""
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(module: str, node: ast.ImportFrom) -> list[str]:
    """Package modules an import statement needs."""
    target = _resolve(module, node)
    if node.module is None or (_is_package(target) and any(_path(f"{target}.{a.name}") for a in node.names)):
        mods = [f"{target}.{a.name}" for a in node.names if _path(f"{target}.{a.name}")]
        rest = [a for a in node.names if not _path(f"{target}.{a.name}")]
        return mods + ([target] if rest else [])
    return [target]


def _rewrite(module: str, node: ast.ImportFrom) -> str:
    """The flat-bundle form of one relative import (one line per target module)."""
    target = _resolve(module, node)
    lines, names = [], []
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        if _path(sub):  # a submodule imported as a module
            lines.append(f"from . import {flat_name(sub)} as {alias.asname or alias.name}")
        else:
            names.append(alias.name if alias.asname is None else f"{alias.name} as {alias.asname}")
    if names:
        lines.insert(0, f"from .{flat_name(target)} import {', '.join(names)}")
    return "; ".join(lines)


def _relative_imports(tree: ast.AST) -> list[ast.ImportFrom]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level > 0]


def closure() -> list[str]:
    """Every package module the entry modules import, directly or not (lazy imports included)."""
    seen: list[str] = []
    todo = list(ENTRY_MODULES)
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.append(mod)
        if mod == CSRC_MODULE:
            continue
        path = _path(mod)
        if path is None:
            raise RuntimeError(f"remote code: the package module {mod} has no source file")
        for node in _relative_imports(ast.parse(path.read_text(encoding="utf-8"))):
            todo.extend(t for t in _targets(mod, node) if t not in seen)
    return sorted(seen)


def _csrc_module() -> str:
    csrc = PACKAGE_DIR / "ops" / "csrc"
    sources = {p.name: p.read_text(encoding="utf-8") for p in sorted([*csrc.glob("*.c"), *csrc.glob("*.cpp")])}
    return ('"""The CPU kernels\' sources (generated from spikelm/ops/csrc when the model was saved)."""\n'
            f"SOURCES = {sources!r}\n")


def _bundle(module: str, listing: list[str]) -> str:
    if module == CSRC_MODULE:
        return _csrc_module()
    text = _path(module).read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    edits = []
    for node in _relative_imports(ast.parse(text)):
        start = offsets[node.lineno - 1] + node.col_offset
        end = offsets[node.end_lineno - 1] + node.end_col_offset
        edits.append((start, end, _rewrite(module, node)))
    for start, end, new in sorted(edits, reverse=True):
        text = text[:start] + new + text[end:]
    header = f"# generated by spikelm {_version()} (module {module}) for trust_remote_code: do not edit\n"
    if module == ENTRY_MODULES[0]:
        text += ("\n\n# transformers copies the files a remote-code module imports as `from .x import`: every bundled module\n"
                 + "".join(f"from .{m} import __name__ as _bundled  # noqa: E402,F401\n" for m in listing))
    return header + text


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        return "(source tree)"


def bundle_sources() -> dict[str, str]:
    """{file name: source} of the bundle written into a saved model folder."""
    mods = closure()
    listing = sorted(flat_name(m) for m in mods if flat_name(m) != flat_name(ENTRY_MODULES[0]))
    return {f"{flat_name(m)}.py": _bundle(m, listing) for m in mods}


def write_remote_code(folder) -> list[str]:
    """Write the bundle into folder (each file atomically); returns the file names."""
    folder = Path(folder)
    written = []
    for name, source in bundle_sources().items():
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(source)
        os.chmod(tmp, 0o644)
        os.replace(tmp, folder / name)
        written.append(name)
    return written

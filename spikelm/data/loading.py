"""Raw text datasets: local .txt / .jsonl / .parquet files (files, globs, folders) or a `datasets` dataset.

Documents are what the user says they are: a .txt file is one document (sample_by="document", the
default), or its lines / blank-line paragraphs are (sample_by="line" / "paragraph"); a .jsonl /
.parquet row or a dataset row is one document. document_start_pattern groups consecutive rows (a
.txt file's lines) into documents, each opened by a row matching it; document_separator splits
every text at a literal marker. A model restarts its state only at these document boundaries, so
splitting ordinary prose at every blank line would keep it from learning anything that spans
paragraphs.

Every problem with the inputs (a missing path, a glob that matches nothing, an empty file, a
file type we cannot read, a missing text column, a split without text) is a DataError that names
the path or the key, raised before anything is written anywhere.
"""
from __future__ import annotations

import glob as _glob
import os
import re
from pathlib import Path

import datasets

# file extension -> datasets' packaged builder
BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SAMPLE_BY = ("line", "paragraph", "document")


class DataError(ValueError):
    """A problem with the training or validation data, named precisely."""


def resolve_data_files(spec, what: str = "train_file") -> list[str]:
    """Expand a data spec into a sorted list of readable, non-empty files of one type.

    spec: a path, a glob ("data/*.txt"), a folder (every supported file under it, recursively), or
    a list / comma-separated string of these.
    """
    if spec is None:
        return []
    items = list(spec) if isinstance(spec, (list, tuple)) else [s for s in str(spec).split(",")]
    items = [str(s).strip() for s in items if str(s).strip()]
    if not items:
        raise DataError(f"--{what} is empty")
    files: list[str] = []
    for item in items:
        if any(c in item for c in "*?["):
            matched = sorted(p for p in _glob.glob(item, recursive=True) if os.path.isfile(p))
            if not matched:
                raise DataError(f"--{what}: the glob {item!r} matches no file")
            files += matched
        elif os.path.isdir(item):
            found = sorted(str(p) for p in Path(item).rglob("*") if p.is_file() and p.suffix.lower() in BUILDERS)
            if not found:
                raise DataError(f"--{what}: the folder {item!r} holds no {'/'.join(sorted(BUILDERS))} file")
            files += found
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise DataError(f"--{what}: no such file or folder: {item!r}")
    kinds = set()
    for f in files:
        ext = Path(f).suffix.lower()
        if ext not in BUILDERS:
            raise DataError(f"--{what}: cannot read {f!r}: the extension must be one of {sorted(BUILDERS)}")
        kinds.add(BUILDERS[ext])
        if os.path.getsize(f) == 0:
            raise DataError(f"--{what}: the file {f!r} is empty")
    if len(kinds) > 1:
        raise DataError(f"--{what}: mixes file types {sorted(kinds)}; give files of one type")
    return files


def _builder(files: list[str]) -> str:
    return BUILDERS[Path(files[0]).suffix.lower()]


def _load_files(files: list[str], split: str, streaming: bool, sample_by: str, cache_dir, by_line: bool = False):
    builder = _builder(files)
    # a start pattern groups a .txt file's lines: read them as rows (unless sample_by asks for paragraphs)
    if builder == "text" and by_line and sample_by == "document":
        sample_by = "line"
    kwargs = {"sample_by": sample_by} if builder == "text" else {}
    return datasets.load_dataset(builder, data_files={split: files}, split=split, streaming=streaming,
                                 cache_dir=cache_dir, **kwargs)


def load_raw_datasets(train_file=None, validation_file=None, dataset_name=None, dataset_config_name=None,
                      text_column: str = "text", sample_by: str = "document", validation_split_percentage: float = 5,
                      streaming: bool = False, streaming_validation_documents: int = 200, seed: int = 42,
                      cache_dir=None, document_start_pattern: str | None = None,
                      document_separator: str | None = None) -> dict:
    """{"train": dataset, "validation": dataset or None}, each with one document per row in `text_column`.

    sample_by: how a .txt file splits into rows: "document" (the whole file), "paragraph" (at blank
        lines) or "line".
    document_start_pattern: rows are documents unless this regex is given; then a row matching it
        starts a new document and the rows after it join that document (WikiText keeps an article's
        heading, paragraphs and blank lines as separate rows: r"^ = [^=]" finds its titles). A .txt
        file read as one document is then read line by line, so a line matching it starts a document.
    document_separator: a literal string that separates documents inside a text (dropped), e.g.
        "<|endoftext|>"; not together with document_start_pattern.
    Without a validation file (or a validation split in the named dataset), validation takes
    validation_split_percentage % of the training documents (shuffled with seed); with fewer than
    100 / validation_split_percentage documents (a single .txt file, say), the last
    validation_split_percentage % of every document instead (cut at a line break). When streaming,
    it takes the first streaming_validation_documents documents (which training then skips).
    """
    if sample_by not in SAMPLE_BY:
        raise DataError(f"--sample_by must be one of {SAMPLE_BY}, got {sample_by!r}")
    if document_separator is not None and document_start_pattern is not None:
        raise DataError("give --document_separator or --document_start_pattern, not both")
    if document_separator is not None and (not isinstance(document_separator, str) or not document_separator):
        raise DataError(f"--document_separator must be a non-empty string, got {document_separator!r}")
    by_line = document_start_pattern is not None
    if (train_file is None) == (dataset_name is None):
        raise DataError("give exactly one of --train_file or --dataset_name")
    if train_file is not None:
        train_files = resolve_data_files(train_file, "train_file")
        valid_files = resolve_data_files(validation_file, "validation_file")
        train = _load_files(train_files, "train", streaming, sample_by, cache_dir, by_line)
        valid = _load_files(valid_files, "validation", streaming, sample_by, cache_dir, by_line) if valid_files else None
        where = f"--train_file {train_file!r}"
    else:
        try:
            raw = datasets.load_dataset(dataset_name, dataset_config_name, streaming=streaming, cache_dir=cache_dir)
        except Exception as e:  # noqa: BLE001 - re-raised with the name the user gave
            raise DataError(f"--dataset_name {dataset_name!r}: could not load it: {e}") from e
        if "train" not in raw:
            raise DataError(f"--dataset_name {dataset_name!r} has no 'train' split (splits: {list(raw)})")
        train = raw["train"]
        valid = raw["validation"] if "validation" in raw else None
        if validation_file is not None:
            valid = _load_files(resolve_data_files(validation_file, "validation_file"), "validation", streaming,
                                sample_by, cache_dir, by_line)
        where = f"--dataset_name {dataset_name!r}"

    columns = train.column_names
    if columns is not None and text_column not in columns:
        raise DataError(f"{where}: no column {text_column!r} (columns: {columns}); set --text_column")
    if document_start_pattern is not None:
        try:
            start = re.compile(document_start_pattern)
        except re.error as e:
            raise DataError(f"--document_start_pattern {document_start_pattern!r} is not a regular expression: {e}") from e
        train = group_rows(train, text_column, start, streaming, cache_dir)
        valid = None if valid is None else group_rows(valid, text_column, start, streaming, cache_dir)
    if document_separator is not None:
        train = split_rows(train, text_column, document_separator, streaming)
        valid = None if valid is None else split_rows(valid, text_column, document_separator, streaming)
    if not streaming:
        train = train.filter(lambda ex: bool(ex[text_column] and ex[text_column].strip()), desc="dropping empty")
        if len(train) == 0:
            raise DataError(f"{where}: the training data holds no text")
        if valid is not None:
            valid = valid.filter(lambda ex: bool(ex[text_column] and ex[text_column].strip()), desc="dropping empty")
            if len(valid) == 0:
                raise DataError("--validation_file: the validation data holds no text")
    if valid is None and validation_split_percentage and validation_split_percentage > 0:
        if streaming:
            valid = train.take(streaming_validation_documents)
            train = train.skip(streaming_validation_documents)
        else:
            if len(train) * validation_split_percentage / 100 < 1:
                train, valid = hold_out_tails(train, text_column, validation_split_percentage)
                if len(valid) == 0:
                    raise DataError(f"{where}: the training text is too short to hold out "
                                    f"{validation_split_percentage}% of it; give --validation_file or "
                                    "--validation_split_percentage 0")
            else:
                n_valid = max(1, int(round(len(train) * validation_split_percentage / 100)))
                parts = train.train_test_split(test_size=n_valid, seed=seed, shuffle=True)
                train, valid = parts["train"], parts["test"]
    return {"train": train, "validation": valid}


def hold_out_tails(ds, text_column: str, percentage: float):
    """(train, validation): every document's last `percentage` % of characters (from a line start) is held out.

    For a few long documents (a single .txt file): whole documents would hold out far more than the
    percentage, and a random slice would sit between trained-on neighbours.
    """
    train, valid = [], []
    for text in ds[text_column]:
        cut = int(len(text) * (1 - percentage / 100))
        line = text.rfind("\n", 0, cut)
        cut = line + 1 if line > 0 else cut
        if text[:cut].strip():
            train.append(text[:cut])
        if text[cut:].strip():
            valid.append(text[cut:])
    return (datasets.Dataset.from_dict({text_column: train}), datasets.Dataset.from_dict({text_column: valid}))


def _grouped(rows, text_column: str, start: re.Pattern):
    doc: list[str] = []
    for ex in rows:
        text = ex[text_column] or ""
        if doc and start.search(text):
            yield {text_column: "\n".join(doc)}
            doc = []
        doc.append(text.rstrip("\n"))
    if doc:
        yield {text_column: "\n".join(doc)}


def group_rows(ds, text_column: str, start: re.Pattern, streaming: bool = False, cache_dir=None):
    """Consecutive rows as documents: a row matching `start` opens the next one (rows joined by newlines)."""
    kwargs = {"rows": ds if streaming else ds.select_columns([text_column]), "text_column": text_column,
              "start": start}
    if streaming:
        return datasets.IterableDataset.from_generator(_grouped, gen_kwargs=kwargs)
    # written to the datasets cache (keyed by the rows' fingerprint and the pattern), so the grouping
    # and the tokenisation after it are cached like any other map
    return datasets.Dataset.from_generator(_grouped, gen_kwargs=kwargs, cache_dir=cache_dir)


def _split(batch, text_column: str, separator: str):
    return {text_column: [part for text in batch[text_column] for part in (text or "").split(separator)]}


def split_rows(ds, text_column: str, separator: str, streaming: bool = False):
    """Every row's text split at `separator` (dropped) into one row per document; other columns are dropped."""
    ds = ds.select_columns([text_column])
    kwargs = {} if streaming else {"desc": "splitting documents"}
    return ds.map(_split, batched=True, fn_kwargs={"text_column": text_column, "separator": separator}, **kwargs)


def iter_texts(ds, text_column: str, limit: int | None = None):
    """The texts of a dataset (map-style or streaming), at most `limit` of them."""
    for i, ex in enumerate(ds):
        if limit is not None and i >= limit:
            return
        t = ex[text_column]
        if t and t.strip():
            yield t

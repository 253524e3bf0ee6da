"""Raw text datasets: local .txt / .jsonl / .parquet files (files, globs, folders) or a `datasets` dataset.

Documents are what the user says they are: a .txt file is one document (sample_by="document", the
default), or its lines / blank-line paragraphs are (sample_by="line" / "paragraph"); a .jsonl /
.parquet row or a dataset row is one document. document_start_pattern groups consecutive rows (a
.txt file's lines) into documents, each opened by a row matching it; document_separator splits
every text at a literal marker. A model restarts its state only at these document boundaries, so
splitting ordinary prose at every blank line would keep it from learning anything that spans
paragraphs.

Every problem with the inputs (a missing path, a glob that matches nothing, an empty or
unreadable file, a file type we cannot read, a file that is not UTF-8 text or holds binary data,
a JSON line that does not parse, a missing text column, a split without text) is a DataError that
names the path or the key (and the line), raised before anything is written anywhere: every file
is checked (check_data_files) before `datasets` reads it.
"""
from __future__ import annotations

import glob as _glob
import json
import logging
import os
import re
from pathlib import Path

import datasets

logger = logging.getLogger(__name__)

# file extension -> datasets' packaged builder
BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SAMPLE_BY = ("line", "paragraph", "document")
# how bytes that are not UTF-8 are handled in text files: an error naming the file and line, or U+FFFD
DECODE_ERRORS = ("strict", "replace")
STREAMING_CHECK_BYTES = 64 << 20  # how much of each text / JSON-lines file is checked before streaming it


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
            # hidden files and folders (.git, .ipynb_checkpoints, ...) are not data
            found = sorted(str(p) for p in Path(item).rglob("*") if p.is_file() and p.suffix.lower() in BUILDERS
                           and not any(part.startswith(".") for part in p.relative_to(item).parts))
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


def _open(path: str, what: str):
    try:
        return open(path, "rb")
    except OSError as e:
        raise DataError(f"--{what}: cannot read {path!r}: {e.strerror or e}") from None


def _char_boundary(data: bytes) -> int:
    """The end of the last whole UTF-8 character of data (a multi-byte character cut at the end stays out)."""
    for j in range(len(data) - 1, max(len(data) - 4, 0) - 1, -1):
        lead = data[j]
        if lead & 0xC0 != 0x80:  # not a continuation byte: ASCII, or the lead byte of a sequence
            size = 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4 if lead >> 3 == 0b11110 else 1
            return j if j + size > len(data) else len(data)
    return len(data)


def _check_utf8(path: str, what: str, decode_errors: str = "strict", json_file: bool = False,
                head_bytes: int | None = None) -> int:
    """Raise a DataError at the first NUL byte or (strict) non-UTF-8 byte, naming the line and byte offset;
    returns how many byte sequences are not UTF-8 (decode_errors="replace" reads them as U+FFFD). With
    head_bytes, only (about) the first head_bytes of the file are read."""
    replaced = lines_before = offset = 0
    rest = b""
    with _open(path, what) as f:
        while True:
            block = f.read(1 << 22)
            data = rest + block
            cut = _char_boundary(data) if block else len(data)
            piece, rest = data[:cut], data[cut:]
            nul = piece.find(b"\0")
            if nul >= 0:
                lineno = lines_before + piece.count(b"\n", 0, nul) + 1
                raise DataError(f"--{what}: {path!r} is not a text file: line {lineno} holds a NUL byte "
                                "(binary data, or text in UTF-16/UTF-32: convert it to UTF-8)")
            try:
                piece.decode("utf-8")
            except UnicodeDecodeError as e:
                if decode_errors != "replace" or json_file:
                    lineno = lines_before + piece.count(b"\n", 0, e.start) + 1
                    fix = ("JSON must be UTF-8: re-encode the file (decode_errors='replace' applies to text files "
                           "only)" if json_file else "re-encode it as UTF-8, e.g. `iconv -f LATIN1 -t UTF-8 IN > "
                           "OUT`, or load it with decode_errors='replace' to read such bytes as U+FFFD")
                    raise DataError(f"--{what}: {path!r} is not UTF-8 text: line {lineno} (byte offset "
                                    f"{offset + e.start}, 0x{piece[e.start]:02x}): {e.reason}; {fix}") from None
                replaced += piece.decode("utf-8", "replace").count("\ufffd") - piece.count("\ufffd".encode())
            lines_before += piece.count(b"\n")
            offset += len(piece)
            if not block or (head_bytes is not None and offset >= head_bytes):
                return replaced


def _check_text_file(path: str, what: str, decode_errors: str, head_bytes: int | None = None) -> None:
    replaced = _check_utf8(path, what, decode_errors, head_bytes=head_bytes)
    if replaced:
        logger.warning("%s: %d byte sequence(s) that are not UTF-8 read as U+FFFD (decode_errors='replace')",
                       path, replaced)


def _check_record(record, path: str, where: str, text_column: str, what: str) -> bool:
    """A JSON record must be an object; its text_column, if present, a string or null. True if present."""
    if not isinstance(record, dict):
        raise DataError(f"--{what}: {path!r}, {where}: a record must be a JSON object, got {type(record).__name__}")
    if text_column not in record:
        return False
    value = record[text_column]
    if value is not None and not isinstance(value, str):
        raise DataError(f"--{what}: {path!r}, {where}: {text_column!r} must be a string, got "
                        f"{type(value).__name__} {json.dumps(value)[:40]}")
    return True


def _no_text_column(path: str, text_column: str, what: str, keys) -> DataError:
    return DataError(f"--{what}: {path!r}: no record has the key {text_column!r} (keys: {sorted(keys)[:10]}); "
                     "set --text_column to the key holding the text")


def _json_lines_look_fine(path: str, text_column: str) -> bool:
    """Fast path (pyarrow, as `datasets` reads them): every line parses and text_column is a string column."""
    import pyarrow as pa
    import pyarrow.json as paj

    try:
        for batch in paj.open_json(path):
            if text_column not in batch.schema.names:
                return False
            tp = batch.schema.field(text_column).type
            if not (pa.types.is_string(tp) or pa.types.is_large_string(tp) or pa.types.is_null(tp)):
                return False
    except (pa.ArrowException, OSError):
        return False
    return True


def _check_json_lines(path: str, text_column: str, what: str, head_bytes: int | None = None) -> None:
    """JSON lines: the pyarrow fast path, else a line-by-line scan that names the first bad line (with
    head_bytes: the lines that start within the first head_bytes, line by line)."""
    _check_utf8(path, what, json_file=True, head_bytes=head_bytes)
    if head_bytes is None and _json_lines_look_fine(path, text_column):
        return
    found, keys, read, whole = False, set(), 0, True
    with _open(path, what) as f:
        for lineno, raw in enumerate(f, 1):
            if head_bytes is not None and read >= head_bytes:
                whole = False
                break
            read += len(raw)
            line = raw.decode("utf-8")
            if not line.strip():
                continue  # `datasets` skips blank lines too
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"--{what}: {path!r}, line {lineno}, column {e.colno}: not valid JSON ({e.msg})") from None
            found |= _check_record(record, path, f"line {lineno}", text_column, what)
            keys.update(record)
    if not found and whole:
        raise _no_text_column(path, text_column, what, keys)
    # otherwise a difference pyarrow alone minds (e.g. another column's type changing): `datasets` copes


def _check_json_file(path: str, text_column: str, what: str) -> None:
    """.json: one JSON document (a list of records, or one record), or JSON lines."""
    _check_utf8(path, what, json_file=True)
    with _open(path, what) as f:
        data = f.read()
    try:
        doc = json.loads(data)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several values: JSON lines in a .json file
            return _check_json_lines(path, text_column, what)
        raise DataError(f"--{what}: {path!r}, line {e.lineno}, column {e.colno}: not valid JSON ({e.msg})") from None
    if isinstance(doc, dict):
        doc = [doc]
    if not isinstance(doc, list):
        raise DataError(f"--{what}: {path!r}: expected a list of records (or JSON lines), got {type(doc).__name__}")
    found = [_check_record(record, path, f"record {i}", text_column, what) for i, record in enumerate(doc)]
    if not any(found):
        raise _no_text_column(path, text_column, what, {k for r in doc for k in r})


def _check_parquet_file(path: str, text_column: str, what: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    _open(path, what).close()
    try:
        meta = pq.ParquetFile(path).metadata
        schema = meta.schema.to_arrow_schema()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"--{what}: {path!r} is not a readable Parquet file ({e})") from None
    if text_column not in schema.names:
        raise DataError(f"--{what}: {path!r}: no column {text_column!r} (columns: {schema.names[:20]}); "
                        "set --text_column")
    tp = schema.field(text_column).type
    if pa.types.is_dictionary(tp):
        tp = tp.value_type
    if not (pa.types.is_string(tp) or pa.types.is_large_string(tp) or pa.types.is_string_view(tp)):
        raise DataError(f"--{what}: {path!r}: column {text_column!r} holds {tp}, not text")
    if meta.num_rows == 0:
        raise DataError(f"--{what}: {path!r} holds no rows")


def check_data_files(files: list[str], text_column: str = "text", decode_errors: str = "strict",
                     what: str = "train_file", head_bytes: int | None = None) -> None:
    """Read every file once and raise a DataError naming the first problem (file, line, key or column).

    Text files must be UTF-8 (decode_errors="replace" reads other bytes as U+FFFD, with a warning)
    and hold no NUL byte (binary data, UTF-16 text); JSON files must be UTF-8 and parse (line by
    line for JSON lines), every record an object whose `text_column` is a string or null (a record
    without it holds no text, as in `datasets`), and some record must have it; Parquet files must
    have a string column `text_column`. head_bytes: check only about the first head_bytes of each text
    and JSON-lines file (streaming reads the rest as it goes; a whole .json document is always read).
    """
    if decode_errors not in DECODE_ERRORS:
        raise DataError(f"decode_errors must be one of {DECODE_ERRORS}, got {decode_errors!r}")
    for path in files:
        ext = Path(path).suffix.lower()
        if BUILDERS[ext] == "text":
            _check_text_file(path, what, decode_errors, head_bytes)
        elif ext == ".jsonl":
            _check_json_lines(path, text_column, what, head_bytes)
        elif ext == ".json":
            _check_json_file(path, text_column, what)
        else:
            _check_parquet_file(path, text_column, what)


def _load_files(files: list[str], split: str, streaming: bool, sample_by: str, cache_dir, text_column: str,
                decode_errors: str, what: str, by_line: bool = False):
    # streaming must not scan a whole corpus before the first step: check the head of each file
    check_data_files(files, text_column, decode_errors, what, STREAMING_CHECK_BYTES if streaming else None)
    builder = _builder(files)
    # a start pattern groups a .txt file's lines: read them as rows (unless sample_by asks for paragraphs)
    if builder == "text" and by_line and sample_by == "document":
        sample_by = "line"
    kwargs = {"sample_by": sample_by, "encoding_errors": decode_errors} if builder == "text" else {}
    try:
        return datasets.load_dataset(builder, data_files={split: files}, split=split, streaming=streaming,
                                     cache_dir=cache_dir, **kwargs)
    except (datasets.exceptions.DatasetGenerationError, ValueError) as e:  # what the checks above did not foresee
        cause = e.__cause__ or e
        raise DataError(f"--{what}: `datasets` could not read {files if len(files) > 1 else files[0]!r}: "
                        f"{type(cause).__name__}: {cause}") from e


def load_raw_datasets(train_file=None, validation_file=None, dataset_name=None, dataset_config_name=None,
                      text_column: str = "text", sample_by: str = "document", validation_split_percentage: float = 5,
                      streaming: bool = False, streaming_validation_documents: int = 200, seed: int = 42,
                      cache_dir=None, document_start_pattern: str | None = None,
                      decode_errors: str = "strict", document_separator: str | None = None) -> dict:
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
    decode_errors: "strict" (a text file that is not UTF-8 is a DataError naming the file and line)
    or "replace" (such bytes read as U+FFFD, with a warning per file).
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
        train = _load_files(train_files, "train", streaming, sample_by, cache_dir, text_column, decode_errors,
                            "train_file", by_line)
        valid = _load_files(valid_files, "validation", streaming, sample_by, cache_dir, text_column, decode_errors,
                            "validation_file", by_line) if valid_files else None
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
                                sample_by, cache_dir, text_column, decode_errors, "validation_file", by_line)
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

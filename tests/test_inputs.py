"""Bad inputs get named errors: training files, train.py flags and SpikeLMConfig fields (fuzzed with
hypothesis), evaluate.py / generate.py inputs, models by folder or Hub id; bf16 streams keep float32 state."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spikelm.data import DataError, load_raw_datasets
from spikelm.data.loading import check_data_files

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # train.py, generate.py and evaluate.py live at the repository root


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- training files ----------------------------------------------------------------------------------
GOOD_TEXT = "the sun rose over the hills.\n\nthe river ran down to the sea.\n"


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


def _parquet(path: Path, **columns) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


@pytest.mark.parametrize("name,content,kwargs,match", [
    ("latin1.txt", "caf\u00e9\nna\u00efve\n".encode("latin-1"), {}, r"'.*latin1.txt' is not UTF-8 text: line 1 "
     r"\(byte offset 3, 0xe9\).*iconv"),
    ("utf16.txt", "hello world\n".encode("utf-16"), {}, r"utf16.txt' is not a text file: line 1 holds a NUL byte"),
    ("random.txt", bytes(range(256)) * 4, {}, r"random.txt' is not a text file"),
    ("bad.jsonl", b'{"text": "a"}\n\n{"text": "b",}\n', {}, r"bad.jsonl', line 3, column 14: not valid JSON"),
    ("array.jsonl", b'{"text": "a"}\n[1, 2]\n', {}, r"array.jsonl', line 2: a record must be a JSON object"),
    ("number.jsonl", b'{"text": "a"}\n{"text": 7}\n', {}, r"number.jsonl', line 2: 'text' must be a string"),
    ("body.jsonl", b'{"body": "a"}\n{"body": "b"}\n', {}, r"body.jsonl': no record has the key 'text' "
     r"\(keys: \['body'\]\); set --text_column"),
    ("body.jsonl", b'{"body": "a"}\n', {"text_column": "content"}, r"no record has the key 'content'"),
    ("latin1.jsonl", b'{"text": "caf\xe9"}\n', {}, r"latin1.jsonl' is not UTF-8 text: line 1.*JSON must be UTF-8"),
    ("latin1.jsonl", b'{"text": "caf\xe9"}\n', {"decode_errors": "replace"}, r"JSON must be UTF-8"),
    ("doc.json", b'[{"text": "a"},\n {"text": "b"', {}, r"doc.json', line 2, column 14: not valid JSON"),
    ("doc.json", b'[{"text": "a"}, {"text": 3}]', {}, r"doc.json', record 1: 'text' must be a string, got int"),
    ("cols.json", b'{"text": ["a", "b"]}', {}, r"cols.json', record 0: 'text' must be a string, got list"),
    ("fake.parquet", b"this is not parquet\n", {}, r"fake.parquet' is not a readable Parquet file"),
])
def test_bad_training_file_is_named(tmp_path, name, content, kwargs, match):
    f = _write(tmp_path / name, content)
    with pytest.raises(DataError, match=match):
        load_raw_datasets(train_file=str(f), cache_dir=str(tmp_path / "cache"), **kwargs)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.arrow"))  # refused before reading


def test_parquet_without_the_text_column(tmp_path):
    f = _parquet(tmp_path / "a.parquet", body=["x", "y"])
    with pytest.raises(DataError, match=r"a.parquet': no column 'text' \(columns: \['body'\]\); set --text_column"):
        check_data_files([str(f)])
    g = _parquet(tmp_path / "b.parquet", text=[1, 2])
    with pytest.raises(DataError, match=r"b.parquet': column 'text' holds int64, not text"):
        check_data_files([str(g)])
    check_data_files([str(f)], text_column="body")


def test_the_second_file_of_a_folder_is_named(tmp_path):
    _write(tmp_path / "data" / "a.txt", GOOD_TEXT)
    _write(tmp_path / "data" / "b.txt", GOOD_TEXT.encode() + b"\xff\n")
    _write(tmp_path / "data" / ".hidden" / "c.txt", b"\x00\x01")  # hidden folders are not data
    with pytest.raises(DataError, match=r"b.txt' is not UTF-8 text: line 4"):
        load_raw_datasets(train_file=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"--validation_file: '.*b.txt' is not UTF-8"):
        load_raw_datasets(train_file=str(tmp_path / "data" / "a.txt"), validation_file=str(tmp_path / "data" / "b.txt"),
                          cache_dir=str(tmp_path / "cache"))


def test_folder_without_usable_files(tmp_path):
    _write(tmp_path / "notes" / "README.md", "# not data\n")
    _write(tmp_path / "notes" / ".cache" / "x.txt", GOOD_TEXT)
    with pytest.raises(DataError, match=r"--train_file: the folder '.*notes' holds no .json/.jsonl/.parquet/.text/.txt"):
        load_raw_datasets(train_file=str(tmp_path / "notes"))


def test_unreadable_file(tmp_path, monkeypatch):
    import spikelm.data.loading as loading

    f = _write(tmp_path / "secret.txt", GOOD_TEXT)
    real_open = open

    def deny(path, *args, **kwargs):  # chmod 000 does not stop root, who runs CI
        if str(path) == str(f):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(loading, "open", deny, raising=False)
    with pytest.raises(DataError, match=r"--train_file: cannot read '.*secret.txt': Permission denied"):
        load_raw_datasets(train_file=str(f))


def test_decode_errors_replace_is_explicit_and_warns(tmp_path, caplog):
    f = _write(tmp_path / "latin1.txt", "caf\u00e9 au lait\n\nna\u00efve\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_raw_datasets(train_file=str(f), validation_split_percentage=0, cache_dir=str(tmp_path / "c"))
    with caplog.at_level("WARNING", logger="spikelm.data.loading"):
        raw = load_raw_datasets(train_file=str(f), validation_split_percentage=0, decode_errors="replace",
                                cache_dir=str(tmp_path / "c"))
    assert sorted(t.strip() for t in raw["train"]["text"]) == ["caf\ufffd au lait", "na\ufffdve"]
    assert "2 byte sequence(s) that are not UTF-8 read as U+FFFD" in caplog.text and "latin1.txt" in caplog.text
    with pytest.raises(DataError, match="decode_errors must be one of"):
        load_raw_datasets(train_file=str(f), decode_errors="ignore")


def test_long_file_error_names_the_right_line(tmp_path):
    """Files are read in blocks: a bad byte far into the file (past a block and a cut multi-byte character)
    is still reported at its line and byte offset."""
    line = "une ligne tr\u00e8s ordinaire, avec un accent\n".encode()
    body = line * 120_000  # ~5 MB: more than one 4 MiB block
    f = _write(tmp_path / "long.txt", body + b"\xc3(\n")
    with pytest.raises(DataError, match=rf"line 120001 \(byte offset {len(body)}, 0xc3\)"):
        check_data_files([str(f)])
    check_data_files([str(_write(tmp_path / "ok.txt", body))])


def test_good_files_of_every_kind_load(tmp_path):
    txt = _write(tmp_path / "a.txt", GOOD_TEXT)
    jsonl = _write(tmp_path / "a.jsonl", '{"text": "one"}\n\n{"text": "two", "id": 2}\n{"text": null}\n')
    doc = _write(tmp_path / "a.json", json.dumps([{"text": "one"}, {"text": "two"}]))
    lines = _write(tmp_path / "b.json", '{"text": "one"}\n{"text": "two"}\n')
    pq = _parquet(tmp_path / "a.parquet", text=["one", "two"], n=[1, 2])
    for f in (txt, jsonl, doc, lines, pq):
        raw = load_raw_datasets(train_file=str(f), validation_split_percentage=0, cache_dir=str(tmp_path / "c"))
        assert len(raw["train"]) == 2, f


def test_train_py_refuses_a_non_utf8_file_before_anything(tmp_path, capsys):
    import train as train_script

    bad = _write(tmp_path / "data.txt", GOOD_TEXT.encode() + b"\x80\x81\n")
    out = tmp_path / "run"
    code = train_script.main(["--train_file", str(bad), "--output_dir", str(out), "--max_steps", "2",
                              "--cache_dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "DatasetGenerationError" not in err
    assert "data.txt' is not UTF-8 text: line 4" in err
    assert not out.exists()

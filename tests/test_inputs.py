"""Bad inputs get named errors: training files, evaluate.py / generate.py inputs, models by folder or Hub
id; bf16 streams keep float32 state. (Config and flag fuzzing: test_config_fuzz.py.)"""
from __future__ import annotations

import json
import os
import re
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


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    assert [t.strip() for t in raw["train"]["text"]] == ["caf\ufffd au lait\n\nna\ufffdve"]  # one document
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


def test_streaming_checks_only_the_head_of_each_file(tmp_path, monkeypatch):
    """A stream must not scan a whole corpus before its first step: the head of each file is checked."""
    import spikelm.data.loading as loading

    monkeypatch.setattr(loading, "STREAMING_CHECK_BYTES", 1024)
    late = _write(tmp_path / "late.jsonl", ('{"text": "fine"}\n' * 200 + "{not json\n").encode())
    raw = load_raw_datasets(train_file=str(late), streaming=True, streaming_validation_documents=1,
                            cache_dir=str(tmp_path / "c"))
    assert raw["train"] is not None  # the bad line lies past the head: `datasets` meets it when it gets there
    with pytest.raises(DataError, match="not valid JSON"):
        load_raw_datasets(train_file=str(late), cache_dir=str(tmp_path / "c"))  # not streaming: every line
    early = _write(tmp_path / "early.txt", b"caf\xe9\n" + b"fine text\n" * 500)
    with pytest.raises(DataError, match="not UTF-8"):
        load_raw_datasets(train_file=str(early), streaming=True, cache_dir=str(tmp_path / "c"))


def test_good_files_of_every_kind_load(tmp_path):
    txt = _write(tmp_path / "a.txt", GOOD_TEXT)
    jsonl = _write(tmp_path / "a.jsonl", '{"text": "one"}\n\n{"text": "two", "id": 2}\n{"text": null}\n')
    doc = _write(tmp_path / "a.json", json.dumps([{"text": "one"}, {"text": "two"}]))
    lines = _write(tmp_path / "b.json", '{"text": "one"}\n{"text": "two"}\n')
    pq = _parquet(tmp_path / "a.parquet", text=["one", "two"], n=[1, 2])
    for f in (txt, jsonl, doc, lines, pq):
        raw = load_raw_datasets(train_file=str(f), validation_split_percentage=0, cache_dir=str(tmp_path / "c"),
                                sample_by="paragraph")  # a .txt file's two paragraphs as two documents
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


# -- long streams in bfloat16 --------------------------------------------------------------------------
from spikelm import SpikeLMConfig, SpikeLMForCausalLM, StreamingGenerator  # noqa: E402
from spikelm.models import CACHE_NAME  # noqa: E402


def _state_dtypes(cache) -> dict[str, torch.dtype]:
    """dtype per kind of state tensor over every layer: {"core.membrane": float32, "kv_k": bfloat16, ...}."""
    out = {}
    for name, t in cache.state_dict()[0].items():  # "layers.3.core.membrane", "final.membrane", "positions"
        if name != "positions":
            out.setdefault(re.sub(r"^layers\.\d+\.", "", name), set()).add(t.dtype)
    return {k: v.pop() if len(v) == 1 else v for k, v in out.items()}


def _is_membrane(path: str, neuron: str) -> bool:
    last = path.rsplit(".", 1)[-1]
    return last == "membrane" if neuron == "dsn" else (neuron == "lif" and not path.startswith("kv_"))


@pytest.fixture(scope="module")
def bf16_dirs(tmp_path_factory):
    """Small saved models (DSN and LIF, an SSM and an attention block) to load in bfloat16 and float32."""
    dirs = {}
    for neuron in ("dsn", "lif"):
        torch.manual_seed(0)
        cfg = SpikeLMConfig(vocab_size=300, hidden_size=16, num_hidden_layers=2, block_types=["ssm", "attention"],
                            num_attention_heads=2, attention_window=4, ssm_expand=2, mlp_ratio=2, neuron_type=neuron,
                            eos_token_id=0)
        d = tmp_path_factory.mktemp(f"bf16_{neuron}")
        SpikeLMForCausalLM(cfg).save_pretrained(d)
        dirs[neuron] = d
    return dirs


def _load(d, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(d, dtype=dtype).eval()


@pytest.mark.parametrize("neuron", ["dsn", "lif"])
def test_bf16_stream_keeps_float32_membranes_and_finite_logits(bf16_dirs, neuron):
    """A bf16 model streams far past its attention window: logits stay finite, membranes stay float32,
    the state stays the same size, and the drift against the float32 model does not grow."""
    n, bucket = (480, 160) if neuron == "dsn" else (160, 80)
    m16, m32 = _load(bf16_dirs[neuron], torch.bfloat16), _load(bf16_dirs[neuron], torch.float32)
    assert {p.dtype for p in m16.parameters()} == {torch.bfloat16}
    gen = StreamingGenerator(m16, None, temperature=1.0, seed=0, stop_at_eos=False)
    prompt = torch.arange(1, 9)
    gen.feed_ids(prompt)
    stream, tokens, logits16, sizes = gen.generate(None), [], [], set()
    for i in range(n):
        tokens.append(next(stream))
        assert gen.logits.dtype == torch.bfloat16 and torch.isfinite(gen.logits).all(), i
        logits16.append(gen.logits.float())
        if i % bucket == bucket - 1:
            sizes.add(gen.state_nbytes())
            dtypes = _state_dtypes(gen.cache)
            membranes = [p for p in dtypes if _is_membrane(p, neuron)]
            assert membranes and all(dtypes[p] == torch.float32 for p in membranes), dtypes
            # the rest (conv histories, keys/values) holds model-dtype values, stored as they were computed
            assert all(dtypes[p] in (torch.bfloat16, torch.bool) for p in dtypes if p not in membranes), dtypes
    assert len(sizes) == 1  # constant state
    # the float32 model's logits for the same tokens, teacher-forced (parallel chunks equal its serial steps)
    with torch.no_grad():
        out = m32(prompt[None], use_cache=True)
        cache, parts, fed = out[CACHE_NAME], [], torch.tensor(tokens)
        for a in range(0, n, 64):
            o = m32(fed[None, a:a + 64], use_cache=True, **{CACHE_NAME: cache})
            cache = o[CACHE_NAME]
            parts.append(o.logits[0].float())
    l32, l16 = torch.cat(parts), torch.stack(logits16)
    diff = [float((l16[a:a + bucket] - l32[a:a + bucket]).abs().mean()) for a in range(0, n, bucket)]
    agree = [float((l16[a:a + bucket].argmax(-1) == l32[a:a + bucket].argmax(-1)).float().mean())
             for a in range(0, n, bucket)]
    assert max(diff) < 1.5 * diff[0] + 1e-3, diff  # bounded drift: no growth along the stream
    assert min(agree) > 0.3, agree


def test_bf16_generate_matches_the_stream(bf16_dirs):
    """transformers' generate() on the bf16 model: finite logits at every step, float32 membranes in the
    returned cache, and the same greedy tokens as StreamingGenerator."""
    m16 = _load(bf16_dirs["dsn"], torch.bfloat16)
    prompt = torch.arange(1, 9)[None]
    n = 96
    out = m16.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, output_logits=True,
                       return_dict_in_generate=True)
    assert out.sequences.shape[1] == 8 + n
    assert all(torch.isfinite(step).all() for step in out.logits)
    cache = out[CACHE_NAME] if CACHE_NAME in out else out.past_key_values
    dtypes = _state_dtypes(cache)
    assert all(dtypes[p] == torch.float32 for p in dtypes if p.endswith("membrane")) and "core.membrane" in dtypes
    gen = StreamingGenerator(m16, None, temperature=0, stop_at_eos=False)
    gen.feed_ids(prompt[0])
    assert list(gen.generate(n)) == out.sequences[0, 8:].tolist()


# -- generate.py / evaluate.py inputs, models by folder or Hub id --------------------------------------
from spikelm.data import train_bpe_tokenizer  # noqa: E402
from spikelm.eval.loading import UserError, load_model  # noqa: E402

CLI_TEXT = ["the spiking neuron fires when its membrane crosses the threshold. " * 3,
            "a language model predicts the next token from the ones before it. " * 3] * 20


@pytest.fixture(scope="module")
def cli_tokenizer():
    return train_bpe_tokenizer(CLI_TEXT, vocab_size=300)


def _save_model(d: Path, tokenizer, **overrides) -> Path:
    torch.manual_seed(0)
    cfg = SpikeLMConfig(**{"vocab_size": len(tokenizer), "hidden_size": 16, "num_hidden_layers": 2,
                           "block_types": ["ssm", "attention"], "num_attention_heads": 2, "attention_window": 6,
                           "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
                           **overrides})
    SpikeLMForCausalLM(cfg).save_pretrained(d)
    tokenizer.save_pretrained(d)
    (d / "run_config.json").write_text(json.dumps({"identity": {"block_size": 16}}))
    return d


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory, cli_tokenizer):
    return _save_model(tmp_path_factory.mktemp("cli_model"), cli_tokenizer)


BAD_TEXT_FILES = [
    ("binary.bin", bytes(range(256)), "not a text file (a NUL byte on line 1"),
    ("utf16.txt", "the spiking neuron\n".encode("utf-16"), "not a text file (a NUL byte on line 1"),
    ("latin1.txt", "the spiking\nneuron caf\u00e9\n".encode("latin-1"), "not UTF-8 text (byte 0xe9 at offset 22, line 2"),
]


@pytest.mark.parametrize("name,content,message", BAD_TEXT_FILES)
def test_prompt_and_text_files_that_are_not_text(cli_model, tmp_path, capsys, name, content, message):
    import evaluate
    import generate

    f = _write(tmp_path / name, content)
    assert generate.main(["--model", str(cli_model), "--prompt_file", str(f)]) == 2
    err = capsys.readouterr().err
    assert f"--prompt_file {f}: {message}" in err and "Traceback" not in err
    assert evaluate.main(["ppl", "--model", str(cli_model), "--text_file", str(f)]) == 2
    assert f"--text_file {f}: {message}" in capsys.readouterr().err


def test_prompt_file_that_is_a_folder_or_unreadable(cli_model, tmp_path, capsys, monkeypatch):
    import generate

    assert generate.main(["--model", str(cli_model), "--prompt_file", str(tmp_path)]) == 2
    assert "is a folder, not a file" in capsys.readouterr().err
    f = _write(tmp_path / "secret.txt", "the spiking neuron")
    real = Path.read_bytes

    def deny(self):
        if self == f:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", deny)
    assert generate.main(["--model", str(cli_model), "--prompt_file", str(f)]) == 2
    assert f"--prompt_file {f}: cannot read it (Permission denied)" in capsys.readouterr().err


def test_tokenizer_that_does_not_match_the_model(cli_model, cli_tokenizer, tmp_path, capsys):
    import evaluate
    import generate

    bigger = train_bpe_tokenizer(CLI_TEXT + ["other words entirely, more merges to learn " * 5], vocab_size=400)
    assert len(bigger) > len(cli_tokenizer)
    d = _save_model(tmp_path / "vocab", cli_tokenizer)
    bigger.save_pretrained(d)  # another tokenizer over the model's
    with pytest.raises(UserError, match=rf"the tokenizer has {len(bigger)} tokens but the model's vocabulary is "
                                        rf"{len(cli_tokenizer)}: ids >= {len(cli_tokenizer)} would be out of range"):
        load_model(d)
    assert generate.main(["--model", str(d), "--prompt", "the spiking"]) == 2
    assert "not the tokenizer the model was trained with" in capsys.readouterr().err
    e = _save_model(tmp_path / "eos", cli_tokenizer, eos_token_id=7)
    assert evaluate.main(["ppl", "--model", str(e), "--text_file", str(_write(tmp_path / "t.txt", CLI_TEXT[0]))]) == 2
    assert f"the tokenizer's EOS token is id {cli_tokenizer.eos_token_id} but the model's is 7" in capsys.readouterr().err
    from transformers import PreTrainedTokenizerFast

    no_eos = PreTrainedTokenizerFast(tokenizer_object=cli_tokenizer.backend_tokenizer)
    n = _save_model(tmp_path / "no_eos", cli_tokenizer)
    no_eos.save_pretrained(n)
    with pytest.raises(UserError, match="the tokenizer has no EOS token but the model ends texts with token id"):
        load_model(n)
    model, tok = load_model(cli_model)  # the matching pair loads
    assert len(tok) == model.config.vocab_size


def test_stream_refuses_token_ids_outside_the_vocabulary(cli_model):
    model, tok = load_model(cli_model)
    gen = StreamingGenerator(model, tok, temperature=0)
    gen.feed_ids([1, 2, 3])
    before = gen.logits.clone()
    with pytest.raises(ValueError, match=rf"feed_ids: token id {len(tok)} at position 2 is outside the vocabulary "
                                         rf"\[0, {len(tok)}\)"):
        gen.feed_ids([4, 5, len(tok), 6])
    with pytest.raises(ValueError, match=r"token id -1 at position 0"):
        gen.feed_ids([-1])
    with pytest.raises(TypeError, match="integer token ids"):
        gen.feed_ids([1.5])
    assert gen.tokens_seen == 3 and torch.equal(gen.logits, before)  # nothing was fed


def _hub_cache(root: Path, repo_id: str, folder: Path, commit: str = "0" * 40) -> None:
    """A Hugging Face cache holding folder as repo_id's main revision (the layout huggingface_hub writes)."""
    repo = root / "hub" / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


HUB_DRIVER = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import evaluate, generate
from spikelm.eval.loading import UserError, load_model, training_length
repo, text = sys.argv[2], sys.argv[3]
model, tok = load_model(repo)
print("LOADED", type(model).__name__, len(tok), training_length(repo))
print("GENERATE", generate.main(["--model", repo, "--prompt", "the spiking", "--max_new_tokens", "5",
                                 "--temperature", "0", "--ignore_eos", "--device", "cpu"]))
print("EVALUATE", evaluate.main(["ppl", "--model", repo, "--text_file", text]))
for name, rev in [("someone/not-cached", None), (repo, "v2"), ("runs/missing-folder", None)]:
    try:
        load_model(name, revision=rev)
    except UserError as e:
        print("ERROR", e)
"""


def test_cli_models_by_hub_id_from_the_local_cache(cli_model, tmp_path):
    """A Hub id resolves through the HF cache as from_pretrained does (offline: the test never touches the network)."""
    hf_home = tmp_path / "hf"
    _hub_cache(hf_home, "someone/spikelm-tiny", cli_model)
    text = _write(tmp_path / "t.txt", " ".join(CLI_TEXT[:4]) * 2)
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("HF_HUB_CACHE", None)
    r = subprocess.run([sys.executable, "-c", HUB_DRIVER, str(ROOT), "someone/spikelm-tiny", str(text)],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "LOADED SpikeLMForCausalLM 300 16" in lines  # run_config.json read from the cached repo too
    assert "GENERATE 0" in lines and "EVALUATE 0" in lines
    ppl = json.loads(r.stdout[r.stdout.index("{"):r.stdout.rindex("}") + 1])
    assert ppl["context"] == 16 and ppl["meta"]["model"] == "someone/spikelm-tiny"
    errors = [line for line in lines if line.startswith("ERROR")]
    assert len(errors) == 3, r.stdout
    assert "someone/not-cached: no such folder, and no config.json for the Hub model 'someone/not-cached' in the " \
           "Hugging Face cache" in errors[0] and "HF_HUB_OFFLINE is set" in errors[0]
    assert "Hub model 'someone/spikelm-tiny' at revision 'v2' in the Hugging Face cache" in errors[1]
    assert "runs/missing-folder: no such folder" in errors[2]


def test_hub_error_names_the_model_and_the_cause(monkeypatch):
    import transformers.utils
    from huggingface_hub import constants

    def refuse(name, filename, **kwargs):
        raise OSError(f"{name} is not a local folder and is not a valid model identifier listed on "
                      "'https://huggingface.co/models'")

    monkeypatch.setattr(transformers.utils, "cached_file", refuse)  # nothing reaches the network
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(UserError, match=r"--model someone/nothing-here: no such folder, and the Hub model "
                                        r"'someone/nothing-here' at revision 'dev' could not be loaded: someone/nothing"
                                        r"-here is not a local folder and is not a valid model identifier"):
        load_model("someone/nothing-here", revision="dev")
    with pytest.raises(UserError, match=r"--model /no/such/folder: no such folder$"):
        load_model("/no/such/folder")

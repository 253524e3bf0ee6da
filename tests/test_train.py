"""train.py: end to end, kill -9 + resume, a kill inside a checkpoint write, non-finite steps, bad inputs.

Runs in-process where it can (imports are slow) and in a subprocess where a kill -9 is the point.
"""
from __future__ import annotations

import hashlib
import math
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train as train_script  # noqa: E402

from spikelm.data import DataError, block_positions, pack_token_lists  # noqa: E402
from spikelm.training import (ConfigError, TrainingError, TrainingHooks, parse_args, read_csv,  # noqa: E402
                              train)

WORDS = ("the sun rose over the quiet hills and the river ran down to the sea where old ships lay "
         "in the harbour waiting for the wind to turn").split()


def _corpus(n_docs: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n_docs):
        n = int(torch.randint(8, 60, (1,), generator=g))
        docs.append(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g)))
    return "\n\n".join(docs) + "\n"


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    """Tiny models run far faster on one thread, above all on a busy machine; subprocesses inherit it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "train.txt").write_text(_corpus(120, 1))
    (d / "valid.txt").write_text(_corpus(12, 2))
    (d / "empty.txt").write_text("")
    (d / "cache").mkdir()
    return d


def tiny_argv(data: Path, out: Path, **over) -> list[str]:
    kv = dict(train_file=data / "train.txt", validation_file=data / "valid.txt", output_dir=out,
              cache_dir=data / "cache", vocab_size=300, hidden_size=32, num_hidden_layers=2,
              block_types="[ssm, attention]", num_attention_heads=2, attention_window=32, block_size=32,
              per_device_train_batch_size=2, learning_rate=3e-3, warmup_steps=2, max_steps=8, save_steps=3,
              eval_steps=4, logging_steps=1, max_eval_samples=4, report_to="csv", disable_tqdm=True, seed=3)
    kv.update(over)
    argv = []
    for k, v in kv.items():
        if v is None:
            continue
        argv += [f"--{k}", str(v)]
    return argv


def _losses(out: Path) -> dict[int, float]:
    return {int(r["step"]): float(r["loss"]) for r in read_csv(out / "logs" / "train.csv")}


def _tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference_run(data, tmp_path_factory):
    """One uninterrupted run: 8 steps, checkpoints at 3 and 6 (and 8), eval at 4 and the end."""
    out = tmp_path_factory.mktemp("ref") / "run"
    summary = train(parse_args(tiny_argv(data, out)))
    return out, summary


# ---------------------------------------------------------------------------------------------
def test_packing_positions_restart_per_document_and_block():
    out = pack_token_lists([[5, 6, 7], [8, 9], [10, 11, 12, 13, 14]], eos_token_id=1, block_size=4)
    # stream: 5 6 7 E | 8 9 E 10 | 11 12 13 14 | (E dropped)
    assert out["input_ids"].tolist() == [[5, 6, 7, 1], [8, 9, 1, 10], [11, 12, 13, 14]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2, 3]]
    pos = block_positions(torch.tensor([[3, 4, 0, 1, 2, 0]]).numpy(), 6)
    assert pos.tolist() == [[0, 1, 0, 1, 2, 0]]


def test_end_to_end_tiny_run_loads_with_auto_classes(reference_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, summary = reference_run
    assert summary["steps"] == 8 and summary["skipped_steps"] == 0
    assert summary["final_eval"]["loss"] > 0 and summary["final_eval"]["perplexity"] > 1
    losses = _losses(out)
    assert sorted(losses) == list(range(1, 9))
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    rows = read_csv(out / "logs" / "train.csv")
    assert 0 < float(rows[-1]["firing_rate"]) < 1 and float(rows[-1]["tokens_per_s"]) > 0
    assert [int(r["step"]) for r in read_csv(out / "logs" / "eval.csv")] == [4, 8]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6", "checkpoint-8"]
    ck = out / "checkpoint-6"
    for f in ("model.safetensors", "config.json", "tokenizer.json", "optimizer.pt", "scheduler.pt",
              "rng_state_0.pth", "trainer_state.json"):
        assert (ck / f).is_file(), f
    state = json.loads((ck / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and state["data_position"]["blocks_consumed"] == 12
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "SpikeLMForCausalLM" and model.config.vocab_size == len(tok)
    ids = tok("the sun rose", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape == (1, ids.shape[1] + 5)


def test_save_total_limit_keeps_newest(data, tmp_path):
    out = tmp_path / "run"
    train(parse_args(tiny_argv(data, out, max_steps=5, save_steps=1, save_total_limit=2, eval_steps=0)))
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-4",
                                                                                         "checkpoint-5"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def _start_driver(argv, faults: list[str], env_extra=None) -> subprocess.Popen:
    """train.py's main in a subprocess with fault hooks (tests/train_driver.py) installed."""
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.Popen([sys.executable, str(ROOT / "tests" / "train_driver.py"), *faults, "--", *map(str, argv)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run_until(argv, faults: list[str], out: Path, ready, timeout=120):
    proc = _start_driver(argv, faults)
    t0 = time.time()
    try:
        while not ready():
            if proc.poll() is not None:
                raise AssertionError(f"train.py ended before the kill (rc {proc.returncode}):\n{proc.stdout.read()}")
            if time.time() - t0 > timeout:
                raise AssertionError("timed out waiting for the moment to kill")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL


def test_kill9_mid_run_then_resume_matches_uninterrupted(data, tmp_path, reference_run):
    ref_out, _ = reference_run
    out = tmp_path / "run"
    argv = tiny_argv(data, out)

    def after_checkpoint_3_and_step_4():
        return (out / "checkpoint-3" / "trainer_state.json").exists() and (out / "logs" / "train.csv").exists() \
            and any(int(r["step"]) >= 4 for r in read_csv(out / "logs" / "train.csv"))

    _run_until(argv, ["--step-sleep", "0.5"], out, after_checkpoint_3_and_step_4)
    assert not (out / "checkpoint-6").exists()
    train(parse_args(argv + ["--resume_from_checkpoint", "latest"]))
    ref, got = _losses(ref_out), _losses(out)
    assert sorted(got) == list(range(1, 9))
    for s in ref:
        assert abs(ref[s] - got[s]) <= 1e-6, (s, ref[s], got[s])
    a = _load_weights(ref_out)
    b = _load_weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _load_weights(path: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path / "model.safetensors"))


def test_kill_during_checkpoint_write_loses_nothing(data, tmp_path, reference_run):
    ref_out, _ = reference_run
    out = tmp_path / "run"
    argv = tiny_argv(data, out)

    def inside_second_save():
        return (out / ".tmp-checkpoint-6").is_dir() and (out / ".tmp-checkpoint-6" / "optimizer.pt").exists() \
            and (out / ".tmp-checkpoint-6" / "rng_state_0.pth").exists()

    # the fault pause sits between the file writes and the rename; kill -9 in it
    _run_until(argv, ["--checkpoint-sleep", "30"], out, inside_second_save)
    before = _tree_digest(out / "checkpoint-3")
    assert not (out / "checkpoint-6").exists()
    assert [p.name for p in out.iterdir() if p.name.startswith("checkpoint")] == ["checkpoint-3"]
    from spikelm.training import latest_checkpoint
    assert latest_checkpoint(out).name == "checkpoint-3"
    assert _tree_digest(out / "checkpoint-3") == before
    train(parse_args(argv + ["--resume_from_checkpoint", "latest"]))
    assert not (out / ".tmp-checkpoint-6").exists()
    ref, got = _losses(ref_out), _losses(out)
    assert all(abs(ref[s] - got[s]) <= 1e-6 for s in ref) and sorted(got) == list(range(1, 9))


class NanLoss(TrainingHooks):
    """The loss of the given (1-based) optimizer steps becomes NaN."""

    def __init__(self, *steps: int):
        self.steps = set(steps)

    def on_loss(self, step, loss):
        return loss * float("nan") if step in self.steps else loss


def test_nonfinite_loss_skips_step_then_aborts(data, tmp_path):
    s = train(parse_args(tiny_argv(data, tmp_path / "a", max_steps=3, save_steps=0, eval_steps=0)), hooks=NanLoss(2))
    assert s["skipped_steps"] == 1 and s["steps"] == 3
    rows = read_csv(tmp_path / "a" / "logs" / "train.csv")
    assert [int(r["skipped_steps"]) for r in rows] == [0, 1, 1]
    with pytest.raises(TrainingError, match="3 steps in a row .* non-finite"):
        train(parse_args(tiny_argv(data, tmp_path / "b", max_steps=6, save_steps=0, eval_steps=0,
                                   max_consecutive_nonfinite=3)), hooks=NanLoss(2, 3, 4))


# ---------------------------------------------------------------------------------------------
# bad inputs: a clear error naming the problem, nothing created or overwritten
def _fails(argv, capsys, *needles):
    rc = train_script.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    for n in needles:
        assert n in err, err
    return err


def test_missing_and_empty_files(data, tmp_path, capsys):
    out = tmp_path / "run"
    _fails(tiny_argv(data, out, train_file=tmp_path / "nope.txt"), capsys, "no such file", "nope.txt")
    _fails(tiny_argv(data, out, train_file=tmp_path / "*.parquet"), capsys, "matches no file")
    _fails(tiny_argv(data, out, validation_file=data / "empty.txt"), capsys, "empty.txt", "is empty")
    assert not out.exists()


def test_block_size_larger_than_data(data, tmp_path, capsys):
    out = tmp_path / "run"
    _fails(tiny_argv(data, out, block_size=100000), capsys, "--block_size 100000 is larger than the")
    assert not out.exists()


def test_unknown_keys(data, tmp_path, capsys):
    out = tmp_path / "run"
    _fails(tiny_argv(data, out) + ["--learning_rat", "1e-3"], capsys, "unknown key 'learning_rat'",
           "learning_rate")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("block_size: 32\nhidden_sise: 64\n")
    _fails(["--config", cfg] + tiny_argv(data, out), capsys, "unknown key 'hidden_sise'", "c.yaml")
    _fails(tiny_argv(data, out, block_size="big"), capsys, "block_size must be an integer")
    _fails(tiny_argv(data, out, hidden_size=0), capsys, "hidden_size must be an integer >= 1")
    with pytest.raises(ConfigError, match="output_dir is required"):
        parse_args(["--train_file", str(data / "train.txt")])
    assert not out.exists()


def test_tokenizer_vocab_must_match_model(data, tmp_path, capsys, reference_run):
    ref_out, _ = reference_run
    from spikelm.data import train_bpe_tokenizer
    tok = train_bpe_tokenizer([(data / "train.txt").read_text()], 280)
    tok.save_pretrained(tmp_path / "tok")
    out = tmp_path / "run"
    argv = tiny_argv(data, out, model_name_or_path=ref_out, tokenizer_name=tmp_path / "tok", vocab_size=None,
                     hidden_size=None, num_hidden_layers=None, block_types=None, num_attention_heads=None,
                     attention_window=None)
    _fails(argv, capsys, "vocabulary", "does not match the model's vocab_size")
    assert not out.exists()


def test_output_dir_holding_another_run_is_left_alone(data, tmp_path, capsys, reference_run):
    ref_out, _ = reference_run
    digest = _tree_digest(ref_out)
    _fails(tiny_argv(data, ref_out), capsys, "already holds a training run", "--resume_from_checkpoint latest")
    _fails(tiny_argv(data, ref_out, hidden_size=48) + ["--resume_from_checkpoint", "latest"], capsys,
           "holds a different run", "hidden_size: 32 -> 48")
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    _fails(tiny_argv(data, stranger), capsys, "already holds files")
    _fails(tiny_argv(data, stranger) + ["--resume_from_checkpoint", "latest"], capsys, "not a SpikeLM run")
    assert _tree_digest(ref_out) == digest
    assert (stranger / "notes.txt").read_text() == "mine" and len(list(stranger.iterdir())) == 1


def test_data_errors_are_dataerrors():
    from spikelm.data import resolve_data_files
    with pytest.raises(DataError, match="no such file"):
        resolve_data_files("/nonexistent/x.txt")


def test_streaming_jsonl_folder_and_resume(data, tmp_path):
    """--streaming over a folder of .jsonl files; resuming at a checkpoint skips the blocks already read."""
    folder = tmp_path / "docs"
    folder.mkdir()
    docs = (data / "train.txt").read_text().split("\n\n")
    for i in range(2):
        with open(folder / f"part{i}.jsonl", "w") as f:
            for d in docs[i::2]:
                f.write(json.dumps({"text": d}) + "\n")
    out = tmp_path / "run"
    argv = tiny_argv(data, out, train_file=folder, streaming="true", max_steps=4, save_steps=2, eval_steps=0,
                     streaming_shuffle_buffer=16)
    train(parse_args(argv))
    first = _losses(out)
    assert sorted(first) == [1, 2, 3, 4]
    import shutil
    shutil.rmtree(out / "checkpoint-4")  # as if killed after checkpoint-2
    train(parse_args(argv + ["--resume_from_checkpoint", "latest"]))
    again = _losses(out)
    assert all(abs(first[s] - again[s]) <= 1e-6 for s in first), (first, again)


def test_tensorboard_logs(data, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    train(parse_args(tiny_argv(data, out, max_steps=2, save_steps=0, eval_steps=0, report_to="tensorboard")))
    assert list((out / "logs").glob("events.out.tfevents.*"))


def test_bf16_autocast_keeps_float32_weights(data, tmp_path):
    out = tmp_path / "run"
    s = train(parse_args(tiny_argv(data, out, max_steps=2, save_steps=0, eval_steps=0, mixed_precision="bf16")))
    assert s["skipped_steps"] == 0 and s["final_eval"]["loss"] > 0
    assert all(v.dtype == torch.float32 for v in _load_weights(out).values())


@pytest.mark.parametrize("new_version_complete", [True, False])
def test_kill_while_resaving_a_step_keeps_a_checkpoint(tmp_path, new_version_complete):
    """A kill between moving checkpoint-N aside and renaming its new version in loses neither."""
    from spikelm.training.checkpoint import STATE_FILE, clean_partial

    old = tmp_path / ".trash-checkpoint-200-123"
    old.mkdir()
    (old / STATE_FILE).write_text('{"version": "old"}')
    new = tmp_path / ".tmp-checkpoint-200"
    new.mkdir()
    if new_version_complete:
        (new / STATE_FILE).write_text('{"version": "new"}')
    clean_partial(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-200"]
    want = "new" if new_version_complete else "old"
    assert (tmp_path / "checkpoint-200" / STATE_FILE).read_text() == f'{{"version": "{want}"}}'


@pytest.mark.parametrize("streaming", [False, True])
def test_document_start_pattern_groups_rows_into_documents(tmp_path, streaming):
    """WikiText-style rows (a title row, paragraphs, blank rows) become one document per article."""
    from spikelm.data import load_raw_datasets

    rows = [" = Alpha = \n", "", " first paragraph . \n", " = = Section = = \n", " more alpha . \n",
            " = Beta = \n", " beta text . \n"]
    f = tmp_path / "wiki.jsonl"
    f.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    raw = load_raw_datasets(train_file=str(f), validation_file=str(f), document_start_pattern="^ = [^=]",
                            streaming=streaming)
    docs = [ex["text"] for ex in raw["train"]]
    assert docs == [" = Alpha = \n\n first paragraph . \n = = Section = = \n more alpha . ",
                    " = Beta = \n beta text . "]
    assert len(list(raw["validation"])) == 2
    ungrouped = load_raw_datasets(train_file=str(f), validation_file=str(f))
    assert len(ungrouped["train"]) == 6  # one document per non-empty row
    with pytest.raises(DataError, match="document_start_pattern"):
        load_raw_datasets(train_file=str(f), validation_file=str(f), document_start_pattern="(")


# ---------------------------------------------------------------------------------------------
# checkpoints: no pickles, checksums, refusal of damaged ones with the previous good one offered
def _copy_run(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_checkpoint_files_load_as_plain_tensors_and_are_checksummed(reference_run):
    from spikelm.training import verify

    ck = reference_run[0] / "checkpoint-6"
    for f in ("optimizer.pt", "scheduler.pt", "rng_state_0.pth"):
        torch.load(ck / f, weights_only=True)  # raises on anything but tensors, numbers, strings, containers
    doc = json.loads((ck / "trainer_state.json").read_text())
    on_disk = {str(p.relative_to(ck)) for p in ck.rglob("*") if p.is_file()} - {"trainer_state.json"}
    assert set(doc["files"]) == on_disk
    assert all(len(m["sha256"]) == 64 for m in doc["files"].values())
    assert verify(ck)["global_step"] == 6


def _flip_byte(path: Path, where: int = -100) -> None:
    b = bytearray(path.read_bytes())
    b[where] ^= 0xFF
    path.write_bytes(bytes(b))


def test_damaged_checkpoint_is_refused_naming_file_and_offering_previous(reference_run, tmp_path, capsys, data):
    out = _copy_run(reference_run[0], tmp_path / "run")
    argv = tiny_argv(data, out)
    _flip_byte(out / "checkpoint-6" / "optimizer.pt")
    err = _fails(argv + ["--resume_from_checkpoint", out / "checkpoint-6"], capsys, "optimizer.pt",
                 "was changed after it was written", str(out / "checkpoint-3"))
    assert "--resume_from_checkpoint" in err
    state = out / "checkpoint-3" / "trainer_state.json"
    state.write_text(state.read_text().replace('"global_step": 3', '"global_step": 4'))
    _fails(argv + ["--resume_from_checkpoint", out / "checkpoint-3"], capsys, "trainer_state.json",
           "was changed after it was written", "no earlier intact checkpoint")
    (out / "checkpoint-8" / "trainer_state.json").write_text('{"global_step": 8, "fi')
    _fails(argv + ["--resume_from_checkpoint", out / "checkpoint-8"], capsys, "truncated or not JSON")


def test_latest_skips_a_truncated_checkpoint_and_resumes_from_the_previous(reference_run, tmp_path, data, capsys):
    ref_out = reference_run[0]
    out = _copy_run(ref_out, tmp_path / "run")
    model = out / "checkpoint-8" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:1000])
    train(parse_args(tiny_argv(data, out) + ["--resume_from_checkpoint", "latest"]))
    printed = capsys.readouterr().out
    assert "checkpoint-8" in printed and "truncated" in printed and "resuming from the newest intact checkpoint" \
        in printed and "resuming from" in printed and "checkpoint-6 at step 6" in printed
    ref, got = _losses(ref_out), _losses(out)
    assert sorted(got) == list(range(1, 9)) and all(abs(ref[s] - got[s]) <= 1e-6 for s in ref)
    a, b = _load_weights(ref_out), _load_weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    from spikelm.training import verify
    assert verify(out / "checkpoint-8")["global_step"] == 8  # re-saved whole


class _Gadget:
    """Any class outside torch's weights_only allow-list: unpickling it would run code."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_a_pickle_inside_a_checksummed_checkpoint_is_not_loaded(reference_run, tmp_path, data, capsys):
    from spikelm.training import checkpoint as ckmod

    out = _copy_run(reference_run[0], tmp_path / "run")
    ck = out / "checkpoint-6"
    state = ckmod.verify(ck)
    torch.save({"state": {}, "param_groups": [], "x": _Gadget()}, ck / "optimizer.pt")
    ckmod._write_state_file(ck, state)  # checksums made to match: only weights_only stands in the way
    rc = train_script.main([str(a) for a in tiny_argv(data, out)] + ["--resume_from_checkpoint", str(ck)])
    captured = capsys.readouterr()
    assert rc == 2 and "optimizer.pt" in captured.err and "weights_only" in captured.err, captured.err
    assert "unpickled!" not in captured.out


# ---------------------------------------------------------------------------------------------
# signals: finish the step, checkpoint, exit with how to resume; resume equals the uninterrupted run
def test_sigterm_checkpoints_and_resume_matches_uninterrupted(data, tmp_path, reference_run):
    ref_out = reference_run[0]
    out = tmp_path / "run"
    argv = tiny_argv(data, out)
    proc = _start_driver(argv, ["--step-sleep", "0.5"])
    t0 = time.time()
    try:
        while not ((out / "logs" / "train.csv").exists()
                   and any(int(r["step"]) >= 4 for r in read_csv(out / "logs" / "train.csv"))):
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() - t0 < 120, "timed out waiting for step 4"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        text, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, text
    assert "SIGTERM" in text and "--resume_from_checkpoint latest" in text and "python train.py" in text
    from spikelm.training import latest_checkpoint, verify
    stopped = latest_checkpoint(out)
    step = verify(stopped)["global_step"]
    assert 4 <= step < 8 and stopped.name == f"checkpoint-{step}" and f"after step {step}" in text
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    train(parse_args(argv + ["--resume_from_checkpoint", "latest"]))
    ref, got = _losses(ref_out), _losses(out)
    assert sorted(got) == list(range(1, 9)) and all(abs(ref[s] - got[s]) <= 1e-6 for s in ref), (ref, got)
    a, b = _load_weights(ref_out), _load_weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


class _SignalAt(TrainingHooks):
    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum

    def on_step_end(self, step, state):
        if step == self.step:
            os.kill(os.getpid(), self.signum)


def test_sigint_in_process_stops_with_a_checkpoint(data, tmp_path, reference_run):
    from spikelm.training import TrainingInterrupted, verify

    out = tmp_path / "run"
    argv = tiny_argv(data, out)
    # what was installed before (Python's default, or SIG_IGN where a shell started pytest in the background)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted, match="SIGINT: stopped after step 5 of 8") as e:
        train(parse_args(argv), hooks=_SignalAt(5, signal.SIGINT))
    assert e.value.step == 5 and verify(e.value.checkpoint)["global_step"] == 5
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    train(parse_args(argv + ["--resume_from_checkpoint", "latest"]))
    a, b = _load_weights(reference_run[0]), _load_weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# a save that cannot be written: a named error, the previous checkpoint intact
class _FailWrite(TrainingHooks):
    """Raises OSError(errno) inside the write of checkpoint-`step` (after its files, before completion)."""

    def __init__(self, step: int, err: int):
        self.step, self.err = step, err

    def on_checkpoint_files_written(self, folder, step):
        if step == self.step:
            raise OSError(self.err, os.strerror(self.err), str(folder / "optimizer.pt"))


def test_write_error_while_saving_is_named_and_keeps_previous(data, tmp_path):
    import errno

    from spikelm.training import CheckpointWriteError

    out = tmp_path / "run"
    with pytest.raises(CheckpointWriteError, match="No space left on device.*checkpoint-3 is intact"):
        train(parse_args(tiny_argv(data, out)), hooks=_FailWrite(6, errno.ENOSPC))
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-3"]
    from spikelm.training import verify
    assert verify(out / "checkpoint-3")["global_step"] == 3


@pytest.fixture
def tmpfs(tmp_path):
    """A 16 MiB tmpfs (needs root with mount rights; skipped elsewhere): chmod cannot make a folder
    read-only for root, a real file system can (remount ro) and can really fill up."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


class _FillDisk(TrainingHooks):
    """Once checkpoint-3 is saved, fills the file system up to `leave` bytes."""

    def __init__(self, filler: Path, leave: int = 32 << 10):
        self.filler, self.leave = filler, leave
        self.digest = None

    def on_checkpoint_saved(self, folder, step):
        if step == 3:
            import shutil
            self.digest = _tree_digest(folder)
            free = shutil.disk_usage(self.filler.parent).free
            with open(self.filler, "wb") as f:
                f.write(b"\0" * max(0, free - self.leave))


def test_full_disk_while_saving_keeps_previous_checkpoint(data, tmpfs, reference_run):
    from spikelm.training import CheckpointWriteError, latest_checkpoint

    out = tmpfs / "run"
    argv = tiny_argv(data, out)
    hooks = _FillDisk(tmpfs / "filler")
    with pytest.raises(CheckpointWriteError, match="(?s)No space left on device.*checkpoint-3 is intact"):
        train(parse_args(argv), hooks=hooks)
    assert latest_checkpoint(out).name == "checkpoint-3" and _tree_digest(out / "checkpoint-3") == hooks.digest
    assert not (out / ".tmp-checkpoint-6").exists()
    (tmpfs / "filler").unlink()
    train(parse_args(argv + ["--resume_from_checkpoint", "latest"]))
    a, b = _load_weights(reference_run[0]), _load_weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


class _ReadOnlyAt(TrainingHooks):
    def __init__(self, mnt: Path, step: int):
        self.mnt, self.step = mnt, step

    def on_step_end(self, step, state):
        if step == self.step:
            subprocess.run(["mount", "-o", "remount,ro", str(self.mnt)], check=True)


def test_read_only_output_dir_while_saving_keeps_previous_checkpoint(data, tmpfs, reference_run):
    from spikelm.training import CheckpointWriteError, latest_checkpoint

    out = tmpfs / "run"
    argv = tiny_argv(data, out, report_to="none")
    with pytest.raises(CheckpointWriteError, match="(?s)Read-only file system.*checkpoint-3 is intact"):
        train(parse_args(argv), hooks=_ReadOnlyAt(tmpfs, 4))
    before = _tree_digest(out / "checkpoint-3")
    subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True)
    assert latest_checkpoint(out).name == "checkpoint-3" and _tree_digest(out / "checkpoint-3") == before
    train(parse_args(argv + ["--resume_from_checkpoint", "latest"]))
    a, b = _load_weights(reference_run[0]), _load_weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# train_model: the same recipe and loop for a model built elsewhere (benchmarks: Llama, baselines)
def _llama_blocks(tok_dir: Path, data: Path, block: int = 32):
    from transformers import AutoTokenizer

    from spikelm.data import pack_token_lists
    tok = AutoTokenizer.from_pretrained(tok_dir)

    def blocks(name):
        docs = (data / name).read_text().split("\n\n")
        packed = pack_token_lists(tok(docs, add_special_tokens=False)["input_ids"], tok.eos_token_id, block)
        return [{"input_ids": i, "position_ids": p} for i, p in zip(packed["input_ids"], packed["position_ids"])]

    return tok, blocks("train.txt"), blocks("valid.txt")[:4]


class _Curve(TrainingHooks):
    def __init__(self):
        self.rows = []

    def on_log(self, split, step, metrics):
        self.rows.append((split, step, metrics))


def test_train_model_trains_a_transformers_llama_with_the_recipe(reference_run, data, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from spikelm.training import TrainArgs, param_groups, train_model, verify

    tok, train_blocks, eval_blocks = _llama_blocks(reference_run[0], data)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)

    def run(out, **over):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        args = TrainArgs(output_dir=str(out), per_device_train_batch_size=2, learning_rate=3e-3, warmup_steps=2,
                         max_steps=8, save_steps=4, eval_steps=0, logging_steps=1, disable_tqdm=True, seed=3, **over)
        curve = _Curve()
        return model, train_model(model, train_blocks, eval_blocks, args, tokenizer=tok, hooks=curve), curve

    model, summary, curve = run(tmp_path / "a")
    losses = [m["loss"] for split, _, m in curve.rows if split == "train"]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.3, losses
    assert summary["final_eval"]["loss"] < losses[0] and math.isnan(summary["final_eval"]["firing_rate"])
    groups = param_groups(model, 0.1)
    decayed = {id(p) for p in groups[0]["params"]}
    assert all((id(p) in decayed) == (p.dim() == 2) for p in model.parameters())  # norms undecayed
    assert verify(tmp_path / "a" / "checkpoint-4")["global_step"] == 4
    assert json.loads((tmp_path / "a" / "config.json").read_text())["model_type"] == "llama"
    assert "llama" in (tmp_path / "a" / "checkpoint-4" / "README.md").read_text()
    # resume from checkpoint-4 (as if killed after it) continues exactly
    import shutil
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoint-8")
    _, _, again = run(tmp_path / "b", resume_from_checkpoint="latest")
    tail = [m["loss"] for split, _, m in again.rows if split == "train"]
    assert len(tail) == 4 and all(abs(x - y) <= 1e-6 for x, y in zip(tail, losses[4:])), (tail, losses)


# ---------------------------------------------------------------------------------------------
# model cards
def test_model_card_in_final_model_and_every_checkpoint(reference_run):
    out = reference_run[0]
    for folder, what, tokens in ((out, None, 8 * 64), (out / "checkpoint-3", "checkpoint at step 3", 3 * 64),
                                 (out / "checkpoint-6", "checkpoint at step 6", 6 * 64)):
        card = (folder / "README.md").read_text()
        assert card.startswith("---\nlibrary_name: transformers")
        assert (f"# SpikeLM ({what})" if what else "# SpikeLM\n") in card
        params = sum(p.numel() for p in _load_weights(out).values())
        assert f"({params:,})" in card and f"| tokens seen | {tokens:,} |" in card
        assert "| validation loss |" in card and "| firing rate |" in card and "| command | `python " in card
        assert ("validation loss | not measured" in card) == (folder.name == "checkpoint-3")  # first eval: step 4
        assert "import spikelm" in card and "trust_remote_code=True" in card and "train.txt" in card
    final = json.loads((out / "train_summary.json").read_text())["final_eval"]
    assert f"{final['loss']:.4f} (perplexity {final['perplexity']:.2f})" in (out / "README.md").read_text()


def test_model_card_without_training_facts_and_the_shipped_data_license(tmp_path):
    from spikelm.models import SpikeLMConfig
    from spikelm.models.model_card import model_card
    from spikelm.training.trainer import _data_facts

    card = model_card(SpikeLMConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2), 12345)
    assert "## Training" not in card and "12.3 K (12,345)" in card and "trust_remote_code=True" in card
    shipped = parse_args(["--train_file", str(ROOT / "data" / "paradise_lost_train.txt"), "--validation_file",
                          str(ROOT / "data" / "paradise_lost_heldout.txt"), "--output_dir", str(tmp_path)])
    assert "public domain" in _data_facts(shipped)["data_license"]
    (tmp_path / "paradise_lost_train.txt").write_text("not Milton")
    other = parse_args(["--train_file", str(tmp_path / "paradise_lost_train.txt"), "--output_dir", str(tmp_path)])
    assert _data_facts(other)["data_license"] is None
    assert "not recorded" in model_card(SpikeLMConfig(vocab_size=300), 1, _data_facts(other))


# ---------------------------------------------------------------------------------------------
# trackers and mixed precision
def test_report_to_values(data, tmp_path, monkeypatch, capsys):
    from spikelm.training import logger as logmod

    out = tmp_path / "run"
    _fails(tiny_argv(data, out, report_to="csv,tensorbord"), capsys, "--report_to: unknown backend 'tensorbord'")
    monkeypatch.setattr(logmod, "_installed", lambda name: False)
    _fails(tiny_argv(data, out, report_to="csv,wandb"), capsys, "--report_to wandb needs the wandb package",
           "pip install wandb")
    assert logmod.resolve_report_to("all") == ["csv"] and logmod.resolve_report_to("none") == []
    assert not out.exists()


def test_report_to_csv_and_tensorboard_together(data, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    train(parse_args(tiny_argv(data, out, max_steps=2, save_steps=0, eval_steps=0, report_to="csv,tensorboard")))
    assert list((out / "logs").glob("events.out.tfevents.*")) and sorted(_losses(out)) == [1, 2]


def test_report_to_wandb_offline(data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    train(parse_args(tiny_argv(data, out, max_steps=2, save_steps=0, eval_steps=0, report_to="wandb")))
    runs = list((out / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_report_to_trackio_local(data, tmp_path):
    pytest.importorskip("trackio")
    out = tmp_path / "run"
    # TRACKIO_DIR is read when trackio is imported: a fresh process keeps this test's store in tmp_path
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import train; "
            f"sys.exit(train.main({[str(a) for a in tiny_argv(data, out, max_steps=2, save_steps=0, eval_steps=0)]!r}"
            " + ['--report_to', 'trackio']))")
    env = dict(os.environ, TRACKIO_DIR=str(tmp_path / "trackio"))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert list((tmp_path / "trackio").rglob("spikelm*.db"))


def test_mixed_precision_unset_follows_accelerate_launch(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    train(parse_args(tiny_argv(data, out, max_steps=1, save_steps=0, eval_steps=0)))
    assert json.loads((out / "run_config.json").read_text())["identity"]["mixed_precision"] == "bf16"
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    train(parse_args(tiny_argv(data, tmp_path / "b", max_steps=1, save_steps=0, eval_steps=0)))
    assert json.loads((tmp_path / "b" / "run_config.json").read_text())["identity"]["mixed_precision"] == "no"


# ---------------------------------------------------------------------------------------------
# several processes: 2 CPU processes (gloo) against one process at the same global batch
def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(argv, mode: list[str], timeout=400) -> str:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(ROOT / "train.py"), *map(str, argv)]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return r.stdout + r.stderr


@pytest.fixture(scope="module")
def one_process_accumulating(data, tmp_path_factory):
    """The one-process run the 2-process runs must match: 2 blocks x 2 accumulation steps per step."""
    out = tmp_path_factory.mktemp("one") / "run"
    train(parse_args(_multi_argv(data, out, gradient_accumulation_steps=2)))
    return out


def _multi_argv(data, out, **over):
    kv = dict(max_steps=6, save_steps=3, eval_steps=3, max_eval_samples=5, num_threads=1)
    kv.update(over)
    return tiny_argv(data, out, **kv)


def _assert_close_runs(a: Path, b: Path, tol: float) -> None:
    la, lb = _losses(a), _losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, 7))
    assert max(abs(la[s] - lb[s]) for s in la) <= tol, (la, lb)
    ea = {int(r["step"]): float(r["loss"]) for r in read_csv(a / "logs" / "eval.csv")}
    eb = {int(r["step"]): float(r["loss"]) for r in read_csv(b / "logs" / "eval.csv")}
    assert sorted(ea) == sorted(eb) == [3, 6] and max(abs(ea[s] - eb[s]) for s in ea) <= tol, (ea, eb)
    wa, wb = _load_weights(a), _load_weights(b)
    assert sorted(wa) == sorted(wb) and max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= tol


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one(data, tmp_path, one_process_accumulating):
    out = tmp_path / "run"
    text = _launch(_multi_argv(data, out), ["--multi_gpu"])
    assert "2 process(es)" in text and "FSDP" not in text.split("steps |")[1].split("\n")[0]
    _assert_close_runs(one_process_accumulating, out, 1e-5)


@pytest.mark.slow
def test_fsdp_two_cpu_processes_match_one_checkpoint_and_resume_exactly(data, tmp_path, one_process_accumulating):
    import shutil

    from spikelm.training import verify

    out = tmp_path / "run"
    fsdp = ["--use_fsdp", "--fsdp_version", "2"]
    text = _launch(_multi_argv(data, out), fsdp)
    assert "2 process(es) on cpu" in text and "| FSDP" in text
    _assert_close_runs(one_process_accumulating, out, 1e-5)
    ck = out / "checkpoint-3"
    assert verify(ck)["num_processes"] == 2 and (ck / "rng_state_1.pth").is_file()
    optim = torch.load(ck / "optimizer.pt", weights_only=True)  # full, unsharded, keyed by parameter name
    assert "model.embed_tokens.weight" in optim["state"]
    n = sum(p.numel() for p in _load_weights(out).values())
    assert sum(s["exp_avg"].numel() for s in optim["state"].values()) == n
    # resume at checkpoint-3 (as if killed after it) under FSDP: the same run, bit for bit
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoint-6")
    _launch(_multi_argv(data, resumed) + ["--resume_from_checkpoint", "latest"], fsdp)
    _assert_close_runs(out, resumed, 0.0)


def test_sample_max_new_tokens_zero_skips_the_sample(data, tmp_path, capsys):
    out = tmp_path / "run"
    train(parse_args(tiny_argv(data, out, max_steps=1, save_steps=0, eval_steps=0, sample_prompt="the",
                               sample_max_new_tokens=0)))
    assert "sample:" not in capsys.readouterr().out
    train(parse_args(tiny_argv(data, tmp_path / "run2", max_steps=1, save_steps=0, eval_steps=0, sample_prompt="the",
                               sample_max_new_tokens=3)))
    assert "sample:" in capsys.readouterr().out


def test_adamw_is_fused_where_every_parameter_can_be_and_resume_keeps_it():
    from spikelm.training import adamw
    from spikelm.training.distributed import load_optimizer_state

    cpu = torch.nn.Linear(3, 2)
    assert adamw([{"params": list(cpu.parameters())}]).param_groups[0]["fused"] is True
    # the device the parameters will be moved to decides, not where they are when the optimizer is built
    assert adamw([{"params": list(cpu.parameters())}], device="meta").param_groups[0]["fused"] is None
    with torch.device("meta"):
        meta = torch.nn.Linear(3, 2)
    assert adamw([{"params": list(meta.parameters())}]).param_groups[0]["fused"] is None
    # an older checkpoint's groups (saved unfused) must not switch this run's fused update off
    old = torch.optim.AdamW(cpu.parameters())
    cpu(torch.ones(1, 3)).sum().backward()
    old.step()
    opt = adamw([{"params": list(cpu.parameters())}])
    load_optimizer_state(cpu, opt, old.state_dict(), sharded=False)
    assert opt.param_groups[0]["fused"] is True and opt.state[cpu.weight]["step"].item() == 1
    opt.step()

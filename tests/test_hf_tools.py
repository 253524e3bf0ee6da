"""The tools Hugging Face users point at a model run on a saved SpikeLM: Trainer, TRL's SFTTrainer, lm-eval."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainingArguments

from spikelm import SpikeLMConfig, SpikeLMForCausalLM
from spikelm.data import train_bpe_tokenizer

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def paragraphs(n=16, chars=300):
    text = (ROOT / "data" / "paradise_lost_train.txt").read_text(encoding="utf-8")
    return [p[:chars] for p in text.split("\n\n") if p.strip()][:n]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spikelm")
    tok = train_bpe_tokenizer(paragraphs(200, 2000), 512)
    torch.manual_seed(0)
    model = SpikeLMForCausalLM(SpikeLMConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                             block_types=["ssm", "attention"], num_attention_heads=4,
                                             attention_window=16, eos_token_id=tok.eos_token_id,
                                             bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_trainer_fine_tunes_with_right_padding(saved_model, tmp_path, monkeypatch):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    tok = AutoTokenizer.from_pretrained(saved_model)
    tok.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(saved_model)
    ds = Dataset.from_dict({"text": paragraphs()}).map(lambda b: tok(b["text"], truncation=True, max_length=96),
                                                       batched=True, remove_columns=["text"])
    collator = DataCollatorForLanguageModeling(tok, mlm=False)
    batch = collator([ds[0], ds[1]])
    assert (batch["attention_mask"][:, -1] == 0).any()  # rows of different lengths: padded on the right
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4, learning_rate=3e-3,
                             logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collator)
    trainer.train()
    seen = losses(trainer)
    assert len(seen) == 8 and sum(seen[-3:]) / 3 < sum(seen[:3]) / 3, seen


def test_trl_sft_trainer_fine_tunes(saved_model, tmp_path, monkeypatch):
    trl = pytest.importorskip("trl")
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    tok = AutoTokenizer.from_pretrained(saved_model)
    tok.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(saved_model)
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4, learning_rate=3e-3,
                         logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", max_length=96, seed=0)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": paragraphs()}),
                             processing_class=tok)
    trainer.train()
    seen = losses(trainer)
    assert len(seen) == 8 and sum(seen[-3:]) / 3 < sum(seen[:3]) / 3, seen


def test_lm_eval_harness_cli_runs_the_local_tasks(saved_model, tmp_path):
    """`lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True` on the shipped local tasks."""
    pytest.importorskip("lm_eval")
    lm_eval = Path(sys.executable).with_name("lm_eval")
    cmd = [str(lm_eval) if lm_eval.exists() else "lm_eval", "--model", "hf",
           "--model_args", f"pretrained={saved_model},trust_remote_code=True", "--include_path",
           "benchmarks/lm_eval_tasks", "--tasks", "spikelm_heldout_ppl,spikelm_heldout_lastword", "--limit", "3",
           "--batch_size", "4", "--output_path", str(tmp_path / "out")]
    env = dict(os.environ, **OFFLINE, HF_MODULES_CACHE=str(tmp_path / "modules"))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = next((tmp_path / "out").rglob("results_*.json"))
    scores = json.loads(results.read_text())["results"]
    assert scores["spikelm_heldout_ppl"]["word_perplexity,none"] > 1
    assert 0 <= scores["spikelm_heldout_lastword"]["acc,none"] <= 1
    assert scores["spikelm_heldout_lastword"]["perplexity,none"] > 1

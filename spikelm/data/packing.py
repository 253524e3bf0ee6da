"""Tokenise once, pack documents into fixed blocks, and serve them in a deterministic, resumable order.

A block holds block_size tokens: documents one after another, each followed by EOS. Its
position_ids count from 0 at every document start and at the block start (HF
DataCollatorWithFlattening convention), which is how SpikeLM learns where a document begins: it
restarts every neuron state and masks attention there, so nothing leaks from one document to the
next. A document longer than a block continues in the next block as a new segment.

The order of blocks is a pure function of (seed, optimizer step), so a run resumed from a
checkpoint at step s reads exactly the blocks the uninterrupted run read after step s; a streamed
dataset is re-read from its start and the blocks already consumed are skipped.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from .loading import DataError


def block_positions(ids_pos: np.ndarray, block_size: int) -> np.ndarray:
    """Positions restarting at 0 at every document start and at every block start.

    ids_pos: [n_blocks, block_size] positions counted from each document start (0 = first token).
    """
    n = ids_pos.shape[0]
    idx = np.broadcast_to(np.arange(block_size), (n, block_size))
    starts = ids_pos == 0
    starts[:, 0] = True
    last_start = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    return (idx - last_start).astype(np.int64)


def pack_token_lists(docs, eos_token_id: int, block_size: int) -> dict[str, np.ndarray]:
    """Concatenate documents (each + EOS), cut into full blocks; the remainder is dropped."""
    docs = [d for d in docs if len(d)]
    if not docs:
        return {"input_ids": np.zeros((0, block_size), np.int64), "position_ids": np.zeros((0, block_size), np.int64)}
    ids = np.concatenate([np.append(np.asarray(d, np.int64), eos_token_id) for d in docs])
    pos = np.concatenate([np.arange(len(d) + 1, dtype=np.int64) for d in docs])
    n = len(ids) // block_size * block_size
    ids = ids[:n].reshape(-1, block_size)
    pos = block_positions(pos[:n].reshape(-1, block_size), block_size)
    return {"input_ids": ids, "position_ids": pos}


def tokenize_dataset(ds, tokenizer, text_column: str, num_proc: int | None = None, streaming: bool = False):
    """Add input_ids (no special tokens) and drop every other column; cached by `datasets` when not streaming."""
    def tokenize(batch):
        return {"input_ids": tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]}

    columns = ds.column_names
    if streaming:
        return ds.map(tokenize, batched=True, remove_columns=columns)
    return ds.map(tokenize, batched=True, num_proc=num_proc, remove_columns=columns, desc="tokenizing")


def pack_dataset(tokenized, eos_token_id: int, block_size: int, num_proc: int | None = None,
                 docs_per_pack: int = 4000):
    """Map-style: a dataset of packed blocks (input_ids, position_ids), cached by `datasets`."""
    def pack(batch):
        out = pack_token_lists(batch["input_ids"], eos_token_id, block_size)
        return {"input_ids": out["input_ids"].tolist(), "position_ids": out["position_ids"].tolist()}

    packed = tokenized.map(pack, batched=True, batch_size=docs_per_pack, num_proc=num_proc,
                           remove_columns=tokenized.column_names, desc=f"packing into blocks of {block_size}")
    return packed.with_format("torch")


def iter_packed_blocks(tokenized_stream, eos_token_id: int, block_size: int) -> Iterator[dict]:
    """Streaming: yield packed blocks one by one (same layout as pack_dataset)."""
    ids_buf: list[int] = []
    pos_buf: list[int] = []
    for ex in tokenized_stream:
        d = ex["input_ids"]
        if not len(d):
            continue
        ids_buf += list(d) + [eos_token_id]
        pos_buf += list(range(len(d) + 1))
        while len(ids_buf) >= block_size:
            ids = np.asarray(ids_buf[:block_size], np.int64)
            pos = block_positions(np.asarray(pos_buf[:block_size], np.int64)[None], block_size)[0]
            del ids_buf[:block_size], pos_buf[:block_size]
            yield {"input_ids": torch.from_numpy(ids), "position_ids": torch.from_numpy(pos)}


def evenly_spaced(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n), first and last included (all of them when k >= n)."""
    if k >= n:
        return list(range(n))
    if k == 1:
        return [0]
    return [round(i * (n - 1) / (k - 1)) for i in range(k)]


def count_tokens(tokenized, limit_docs: int | None = None) -> int:
    """Tokens a packed dataset would hold before cutting into blocks (each document + its EOS)."""
    n = 0
    for i, ex in enumerate(tokenized):
        if limit_docs is not None and i >= limit_docs:
            break
        n += len(ex["input_ids"]) + 1 if len(ex["input_ids"]) else 0
    return n


def _stack(rows: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([torch.as_tensor(r[k]) for r in rows]) for k in ("input_ids", "position_ids")}


class BlockOrder:
    """Which blocks each process trains on at each optimizer step; deterministic and resumable.

    The global batch of step s is global_batch_size blocks. Map-style data: epoch e = s //
    steps_per_epoch reads a permutation of all blocks seeded by (seed, e); the last partial global
    batch of an epoch is dropped. Streaming data: consecutive blocks of the (seeded, buffer-
    shuffled) stream. Inside a global batch, micro-step m of process r takes the slice
    [(m * num_processes + r) * micro_batch, ...], so 1 process x 2 accumulation steps and 2
    processes x 1 step see the same blocks per optimizer step.
    """

    def __init__(self, blocks, micro_batch_size: int, gradient_accumulation_steps: int, num_processes: int = 1,
                 process_index: int = 0, seed: int = 42, shuffle: bool = True, streaming: bool = False):
        self.blocks = blocks
        self.micro = micro_batch_size
        self.accum = gradient_accumulation_steps
        self.world = num_processes
        self.rank = process_index
        self.seed = seed
        self.shuffle = shuffle
        self.streaming = streaming
        self.global_batch_size = micro_batch_size * gradient_accumulation_steps * num_processes
        if not streaming:
            self.num_blocks = len(blocks)
            self.steps_per_epoch = self.num_blocks // self.global_batch_size
        self._perm_cache: tuple[int, torch.Tensor] | None = None

    def _perm(self, epoch: int) -> torch.Tensor:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                perm = torch.randperm(self.num_blocks, generator=g)
            else:
                perm = torch.arange(self.num_blocks)
            self._perm_cache = (epoch, perm)
        return self._perm_cache[1]

    def position(self, step: int) -> dict:
        """Where the data stands after `step` optimizer steps (saved in checkpoints)."""
        pos = {"step": step, "blocks_consumed": step * self.global_batch_size}
        if not self.streaming:
            pos.update(epoch=step // self.steps_per_epoch, step_in_epoch=step % self.steps_per_epoch)
        return pos

    def _split(self, global_rows: list) -> list[dict[str, torch.Tensor]]:
        micro = []
        for m in range(self.accum):
            start = (m * self.world + self.rank) * self.micro
            micro.append(_stack(global_rows[start:start + self.micro]))
        return micro

    def batches(self, start_step: int = 0, epoch_seed_offset: int = 0) -> Iterator[tuple[int, list[dict]]]:
        """Yield (step, [micro-batch dicts for this process]) for step = start_step, start_step + 1, ..."""
        step = start_step
        if not self.streaming:
            while True:
                epoch, k = divmod(step, self.steps_per_epoch)
                idx = self._perm(epoch)[k * self.global_batch_size:(k + 1) * self.global_batch_size]
                rows = [self.blocks[int(i)] for i in idx]
                yield step, self._split(rows)
                step += 1
        else:
            epoch = 0
            skip = start_step * self.global_batch_size
            while True:
                stream = self.blocks(epoch)  # a callable: epoch -> iterator of blocks
                buf: list[dict] = []
                got_any = False
                for block in stream:
                    got_any = True
                    if skip:
                        skip -= 1
                        continue
                    buf.append(block)
                    if len(buf) == self.global_batch_size:
                        yield step, self._split(buf)
                        step += 1
                        buf = []
                if not got_any:
                    raise DataError("the streamed training data yields no block of block_size tokens")
                epoch += 1

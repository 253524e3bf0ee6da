"""Build the local lm-evaluation-harness tasks' data from the held-out end of the shipped poem (no network).

    python benchmarks/lm_eval_tasks/build_data.py      # -> benchmarks/lm_eval_tasks/data/*.jsonl

paradise_lost_heldout.jsonl   one document per verse paragraph ({"text"})          -> spikelm_heldout_ppl
paradise_lost_stream.jsonl    the whole held-out text as one document ({"text"})   -> spikelm_heldout_stream_ppl
paradise_lost_lastword.jsonl  {"context", "target"}: up to CONTEXT_LINES verse lines of a paragraph and the
                              next line without its last word; the target is that word (lines 3.. of each
                              paragraph, words of 4+ letters)                        -> spikelm_heldout_lastword
"""
from __future__ import annotations

import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parents[1] / "data" / "paradise_lost_heldout.txt"
CONTEXT_LINES = 4
WORD_AT_END = re.compile(r"^(.*?)(\s)([A-Za-z][A-Za-z']{3,})([^A-Za-z']*)$")


def paragraphs(text: str) -> list[str]:
    return [p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip()]


def lastword_items(paras: list[str]) -> list[dict]:
    items = []
    for para in paras:
        lines = para.split("\n")
        for i in range(2, len(lines)):
            m = WORD_AT_END.match(lines[i])
            if not m:
                continue
            context = "\n".join(lines[max(0, i - CONTEXT_LINES):i] + [m.group(1)])
            items.append({"context": context, "target": m.group(2) + m.group(3)})
    return items


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main() -> None:
    text = SOURCE.read_text(encoding="utf-8")
    paras = paragraphs(text)
    out = HERE / "data"
    out.mkdir(exist_ok=True)
    write_jsonl(out / "paradise_lost_heldout.jsonl", [{"text": p} for p in paras])
    write_jsonl(out / "paradise_lost_stream.jsonl", [{"text": text.strip("\n")}])
    items = lastword_items(paras)
    write_jsonl(out / "paradise_lost_lastword.jsonl", items)
    print(f"{len(paras)} paragraphs, {len(items)} last-word items from {SOURCE.name}")


if __name__ == "__main__":
    main()

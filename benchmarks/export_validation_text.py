#!/usr/bin/env python
"""Write the held-out validation documents of a train.py run to one text file (for evaluate.py).

    python benchmarks/export_validation_text.py --run runs/tiny --out /tmp/valid.txt

Re-creates the split train.py made (spikelm.data.load_raw_datasets with the run's recorded data
settings and seed: the same documents), and joins the documents in order with the end-of-text
token, as training packs them. The text is then one long stream of unseen documents.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="train.py output folder (or a checkpoint in it) with run_config.json")
    p.add_argument("--out", required=True, help="text file to write")
    p.add_argument("--separator", default="<|endoftext|>", help="put between documents")
    args = p.parse_args(argv)
    run = Path(args.run)
    cfg = next((f for f in (run / "run_config.json", run.parent / "run_config.json") if f.is_file()), None)
    if cfg is None:
        print(f"export_validation_text.py: error: no run_config.json in {run} or its parent", file=sys.stderr)
        return 2
    data = json.loads(cfg.read_text())
    a = {**data.get("args", {}), **data.get("identity", {})}
    from spikelm.data.loading import iter_texts, load_raw_datasets

    if a.get("validation_file") is None and a.get("dataset_name") is None:
        cwd_file = Path(a["train_file"])
        if not cwd_file.exists():
            print(f"export_validation_text.py: error: the run's train_file {a['train_file']} is not here "
                  "(run from the folder train.py ran in)", file=sys.stderr)
            return 2
    ds = load_raw_datasets(train_file=a.get("train_file"), validation_file=a.get("validation_file"),
                           dataset_name=a.get("dataset_name"), dataset_config_name=a.get("dataset_config_name"),
                           text_column=a.get("text_column", "text"), sample_by=a.get("sample_by", "document"),
                           validation_split_percentage=a.get("validation_split_percentage", 5),
                           streaming=bool(a.get("streaming", False)),
                           streaming_validation_documents=a.get("streaming_validation_documents", 200),
                           seed=a.get("seed", 42), cache_dir=a.get("cache_dir"),
                           document_start_pattern=a.get("document_start_pattern"),
                           document_separator=a.get("document_separator"))
    if ds["validation"] is None:
        print("export_validation_text.py: error: the run has no validation split", file=sys.stderr)
        return 2
    texts = list(iter_texts(ds["validation"], a.get("text_column", "text")))
    Path(args.out).write_text(args.separator.join(texts))
    print(f"{len(texts)} validation documents, {sum(map(len, texts))} characters -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

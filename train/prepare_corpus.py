"""Stage: build the pretraining corpus and the serialized test sets (docs/format-and-tokenizer.md, "The corpus").

    python train/prepare_corpus.py configs/corpus.yaml

Writes `<output_dir>/pretraining-corpus.csv.gz`, `<output_dir>/test-sets.csv.gz` (id, source, text) and
`<output_dir>/corpus-report.json`: rows serialized, dropped by id, by structure leak and as duplicates, kept, each
by source; tokens per structure by source; serialization failures; every leak removed and why.
"""

import json
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from crystallm import data
from crystallm.io import text_format
from crystallm.stage_config import read_stage_config
from crystallm.tokenization import CrystaLLMTokenizer


def token_counts(rows: list[tuple[str, str, str]]) -> dict[str, dict[str, float]]:
    """Tokens per structure (with <bos> and <eos>) by source: mean, 95th percentile, maximum."""
    tokenizer = CrystaLLMTokenizer.from_format()
    by_source = defaultdict(list)
    for _, source, text in rows:
        by_source[source].append(text)
    counts = {}
    for source, texts in by_source.items():
        lengths = np.array([len(ids) + 1 for ids in tokenizer(texts)["input_ids"]])
        counts[source] = {"mean": round(float(lengths.mean()), 1), "p95": round(float(np.percentile(lengths, 95)), 1),
                          "max": int(lengths.max())}
    return counts


def main() -> None:
    config = read_stage_config(__doc__)
    out = Path(config["output_dir"])
    left_out = set(config.get("exclude_sources", ()))
    if unknown := left_out - set(data.CORPUS_SOURCES):
        raise SystemExit(f"exclude_sources: not corpus sources: {', '.join(sorted(unknown))}")
    sources = tuple(name for name in data.CORPUS_SOURCES if name not in left_out)
    build = data.build_pretraining_corpus(num_proc=config.get("num_proc"), sources=sources)
    columns = ["id", "source", "text"]
    pd.DataFrame(build.corpus, columns=columns).to_csv(out / "pretraining-corpus.csv.gz", index=False)
    pd.DataFrame(build.tests, columns=columns).to_csv(out / "test-sets.csv.gz", index=False)
    by_id = Counter(leak.source for leak in build.leaks if leak.reason.startswith("material id"))
    by_structure = Counter(leak.source for leak in build.leaks if not leak.reason.startswith("material id"))
    kept = Counter(source for _, source, _ in build.corpus)
    report = {
        "format_version": text_format.FORMAT_VERSION,
        "corpus_sources": list(sources),
        "test_sources": list(data.TEST_SOURCES),
        "corpus_size": len(build.corpus),
        "rows_by_source": {source: {"serialized": build.candidates[source], "dropped_by_id": by_id[source],
                                    "dropped_by_structure_leak": by_structure[source],
                                    "dropped_as_duplicate": build.duplicates[source], "kept": kept[source]}
                           for source in sources},
        "dropped_by_id": sum(by_id.values()),
        "dropped_by_structure_leak": sum(by_structure.values()),
        "dropped_as_duplicate": sum(build.duplicates.values()),
        "test_rows": len(build.tests),
        "tokens_per_structure": token_counts(build.corpus),
        "serialization_failures": build.failures,
        "leaks": [asdict(leak) for leak in build.leaks],
    }
    (out / "corpus-report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k not in ("leaks", "serialization_failures")}, indent=1))


if __name__ == "__main__":
    main()

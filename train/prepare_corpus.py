"""Stage: build the pretraining corpus and the serialized test sets (DESIGN.md section 3).

    python train/prepare_corpus.py configs/corpus.yaml

Writes `<output_dir>/pretraining-corpus.csv.gz`, `<output_dir>/test-sets.csv.gz` (id, source, text) and
`<output_dir>/corpus-report.json` (counts, serialization failures, every leak removed and why).
"""

import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from crystallm import data
from crystallm.io import text_format
from crystallm.stage_config import read_stage_config


def main() -> None:
    config = read_stage_config(__doc__)
    out = Path(config["output_dir"])
    build = data.build_pretraining_corpus(num_proc=config.get("num_proc"))
    columns = ["id", "source", "text"]
    pd.DataFrame(build.corpus, columns=columns).to_csv(out / "pretraining-corpus.csv.gz", index=False)
    pd.DataFrame(build.tests, columns=columns).to_csv(out / "test-sets.csv.gz", index=False)
    report = {
        "format_version": text_format.FORMAT_VERSION,
        "corpus_sources": list(data.CORPUS_SOURCES),
        "test_sources": list(data.TEST_SOURCES),
        "corpus_size": len(build.corpus),
        "corpus_by_source": dict(Counter(source for _, source, _ in build.corpus)),
        "test_rows": len(build.tests),
        "duplicates_removed": build.duplicates,
        "leaks_removed": len(build.leaks),
        "leaks_by_source": dict(Counter(leak.source for leak in build.leaks)),
        "serialization_failures": build.failures,
        "leaks": [asdict(leak) for leak in build.leaks],
    }
    (out / "corpus-report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k not in ("leaks", "serialization_failures")}, indent=1))


if __name__ == "__main__":
    main()

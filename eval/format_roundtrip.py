"""Stage: round trip of the text format and tokenizer on every structure of ../shared/data.

    python eval/format_roundtrip.py configs/experiments/format-roundtrip.yaml

Writes per-structure records (parquet) and a summary (JSON + Markdown) to `output_dir`. Each source is
a cached `datasets` map, so a killed run resumes from the sources already done.
"""

import json
from pathlib import Path

import numpy as np

from crystallm import data
from crystallm.io.round_trip import check_round_trip
from crystallm.stage_config import read_stage_config
from crystallm.tokenization import CrystaLLMTokenizer


def summarize(records, source: str) -> dict:
    n = len(records)
    errors = [r for r in records if r["error"]]
    tokens = np.array([r["n_tokens"] for r in records if not r["error"]])
    serialize_s = np.array([r["serialize_s"] + r["tokenize_s"] for r in records if not r["error"]])
    unmatched = [{"id": r["id"], "matched_supercell": r["matched_supercell"], "rms": r["rms"]}
                 for r in records if not r["error"] and not r["matched"]]
    rms = np.array([r["rms"] for r in records if r["matched_supercell"]])
    return {
        "source": source, "structures": n, "serialize_errors": len(errors),
        "matched": int(sum(r["matched"] for r in records)),
        "match_rate": float(sum(r["matched"] for r in records) / n),
        "matched_supercell": int(sum(r["matched_supercell"] for r in records)),
        "rms_median": float(np.median(rms)) if len(rms) else None,
        "rms_max": float(rms.max()) if len(rms) else None,
        "text_round_trip_rate": float(sum(r["text_round_trip"] for r in records if not r["error"])
                                      / max(1, n - len(errors))),
        "tokens_mean": float(tokens.mean()) if len(tokens) else None,
        "tokens_p95": float(np.percentile(tokens, 95)) if len(tokens) else None,
        "tokens_max": int(tokens.max()) if len(tokens) else None,
        "serialize_tokenize_structures_per_s": float(1.0 / np.median(serialize_s)) if len(tokens) else None,
        "unmatched": unmatched,
        "errors": [{"id": r["id"], "error": r["error"]} for r in errors],
    }


def main() -> None:
    config = read_stage_config(__doc__)
    out = Path(config["output_dir"])
    tokenizer = CrystaLLMTokenizer.from_format()
    summaries = []
    for name in config.get("sources") or list(data.SOURCES):
        dataset = data.load_source(name)
        checked = dataset.map(lambda row: check_round_trip(row["cif"], f"{name} {row['id']}", tokenizer),
                              num_proc=config.get("num_proc"), desc=name, remove_columns=["cif"],
                              new_fingerprint=data.format_fingerprint("roundtrip", dataset._fingerprint))
        records = checked.to_list()
        summaries.append(summarize(records, name))
        print(json.dumps({k: v for k, v in summaries[-1].items() if k not in ("unmatched", "errors")}), flush=True)
        (out / "summary.json").write_text(json.dumps(summaries, indent=1))
    write_markdown(summaries, out / "summary.md")


def write_markdown(summaries, path: Path) -> None:
    total = sum(s["structures"] for s in summaries)
    matched = sum(s["matched"] for s in summaries)
    lines = ["| source | structures | serialize errors | matched | match rate | text round trip | "
             "tokens mean | tokens p95 | structures/s |", "|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        lines.append(f"| {s['source']} | {s['structures']} | {s['serialize_errors']} | {s['matched']} | "
                     f"{s['match_rate']:.4f} | {s['text_round_trip_rate']:.4f} | {s['tokens_mean']:.1f} | "
                     f"{s['tokens_p95']:.0f} | {s['serialize_tokenize_structures_per_s']:.0f} |")
    lines.append(f"| **all** | {total} | {sum(s['serialize_errors'] for s in summaries)} | {matched} | "
                 f"{matched / total:.4f} | | | | |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

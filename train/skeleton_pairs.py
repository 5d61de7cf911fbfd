"""Stage: the model's own errors as training pairs for the refinement head (issue 38): for corpus texts, the
model's numbers sampled on each one's skeleton (`crystallm.generation.skeleton`), written beside the true text.

    python train/skeleton_pairs.py configs/skeleton-pairs.yaml

The refiner config's held-out rows (the same `seed` and `eval_rows`) come first, so that held-out pairs judge the
head, then `count` training rows drawn by the seed. A pair whose numbers make no cell (angles that do not close) is
left out and counted. Writes `output` (gzipped CSV: text, sampled) and `<output>.json` (counts, seconds).
"""

import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from crystallm import data
from crystallm.errors import CrystaLLMInputError
from crystallm.generation.sampling import load_generator
from crystallm.generation.skeleton import sample_on_skeleton
from crystallm.io import text_format
from crystallm.refinement.training import write_pairs
from crystallm.stage_config import read_stage_config
from crystallm.training.collator import held_out_split


def _makes_a_crystal(text: str) -> bool:
    try:
        text_format.crystal_text_to_structure(text_format.read_crystal_text(text))
        return True
    except CrystaLLMInputError:
        return False


def main() -> None:
    config = read_stage_config(__doc__)
    seed, batch_size = config["seed"], config["batch_size"]
    model, tokenizer = load_generator(config.get("model"))
    train, held = held_out_split(data.load_texts(config["corpus"])["text"], seed, config["eval_rows"])
    texts = held + [train[i] for i in np.random.default_rng(seed).permutation(len(train))[:config["count"]]]
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    texts = [text for text, length in zip(texts, lengths) if length < model.config.n_positions]
    order = np.argsort([len(text) for text in texts], kind="stable")  # batches of similar length: little padding
    started, sampled = time.perf_counter(), [""] * len(texts)
    for start in tqdm(range(0, len(texts), batch_size), desc="skeleton pairs", unit=" batches"):
        rows = order[start:start + batch_size]
        for row, text in zip(rows, sample_on_skeleton(model, tokenizer, [texts[i] for i in rows], seed=seed + start)):
            sampled[row] = text
    kept = [(text, pair) for text, pair in zip(texts, sampled) if _makes_a_crystal(pair)]
    write_pairs([text for text, _ in kept], [pair for _, pair in kept], config["output"])
    report = {"texts": len(texts), "pairs": len(kept), "no_crystal": len(texts) - len(kept),
              "held_out_rows": config["eval_rows"], "seconds": time.perf_counter() - started,
              "model": config.get("model") or "default"}
    Path(config["output"] + ".json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

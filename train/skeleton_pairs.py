"""Stage: the model's own errors as training pairs for the refinement head (issue 38): for corpus texts, the
model's numbers sampled on each one's skeleton (`crystallm.generation.skeleton`), written beside the true text.

    python train/skeleton_pairs.py configs/skeleton-pairs.yaml

The corpus rows a refiner trained on the corpus with the same `seed` and `eval_rows` holds out come first, then
`count` training rows drawn by the seed (`skeleton_pairs`). A text longer than the model reads, or whose sampled
numbers make no cell (angles that do not close), is left out and counted. Writes `output` (gzipped CSV: text,
sampled) and `<output>.json` (counts, seconds).
"""

import json
import time
from pathlib import Path

import numpy as np

from crystallm import data
from crystallm.generation.sampling import load_generator
from crystallm.generation.skeleton import skeleton_pairs
from crystallm.refinement.training import write_pairs
from crystallm.stage_config import read_stage_config
from crystallm.training.collator import held_out_split


def main() -> None:
    config = read_stage_config(__doc__)
    seed = config["seed"]
    model, tokenizer = load_generator(config.get("model"))
    train, held = held_out_split(data.load_texts(config["corpus"])["text"], seed, config["eval_rows"])
    texts = held + [train[i] for i in np.random.default_rng(seed).permutation(len(train))[:config["count"]]]
    started = time.perf_counter()
    pairs = skeleton_pairs(model, tokenizer, texts, seed, config["batch_size"])
    write_pairs([text for text, _ in pairs], [sampled for _, sampled in pairs], config["output"])
    report = {"texts": len(texts), "pairs": len(pairs), "left_out": len(texts) - len(pairs),
              "held_out_rows": config["eval_rows"], "seconds": time.perf_counter() - started,
              "model": config.get("model") or "default"}
    Path(config["output"] + ".json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

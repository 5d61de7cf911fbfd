"""Model cards: the README.md inside a model folder (and on the Hub) that says how the model was made and how
it scores, from the training run's own records."""

from __future__ import annotations

import json
from pathlib import Path

from crystallm.evaluation import metrics

MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json")  # the transformers files; the corpus, adapters and surrogates come beside


def training_record(run_dir: str | Path) -> dict:
    """Steps, tokens seen, training seconds and held-out losses of a `train/pretrain.py` run, from its log.

    >>> import tempfile
    >>> run = Path(tempfile.mkdtemp())
    >>> _ = (run / "log.jsonl").write_text('{"step": 1, "tokens_seen": 90, "train_seconds": 2.0, "eval_clm": 3.5}\\n')
    >>> training_record(run)["tokens_seen"]
    90
    """
    rows = [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines() if line.strip()]
    evaluated = [row for row in rows if "eval_clm" in row]
    return {"steps": rows[-1]["step"], "tokens_seen": rows[-1]["tokens_seen"],
            "train_seconds": rows[-1]["train_seconds"],
            "final_eval_clm": evaluated[-1]["eval_clm"] if evaluated else None,
            "eval_curve": [(row["step"], round(row["eval_clm"], 4)) for row in evaluated]}


def render_model_card(title: str, description: str, training: dict, command: str, config_text: str,
                      hardware: str, results: dict[str, dict] | None = None, notes: str = "") -> str:
    """The card's Markdown (with the Hub's YAML header): what it is, how to use it, how it was trained, and
    the headline numbers of each results summary given (label -> a summary.json's content)."""
    hours = training["train_seconds"] / 3600
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags: [crystallm, materials-science, crystal-structure-generation, cif]", "---", "",
             f"# {title}", "", description, "", "## Use", "", "```python",
             "import crystallm  # registers the crystallm model type with the Auto classes",
             "from crystallm.generation import Prompt, generate_structures, load_generator",
             "model, tokenizer = load_generator(\"path/to/this/folder\")",
             "samples = list(generate_structures(model, tokenizer, Prompt.of(formula=\"LiFePO4\"), num=4))",
             "```", "", "or `crystallm generate --model path/to/this/folder --formula LiFePO4 --num 4`.", "",
             "## Training", "", f"- Command: `{command}`", f"- Hardware: {hardware}",
             f"- Steps: {training['steps']:,}; tokens seen: {training['tokens_seen']:,}; "
             f"wall time: {training['train_seconds']:.0f} s ({hours:.2f} h)",
             f"- Held-out causal-LM loss (512 corpus rows): {training['final_eval_clm']:.4f} at the end; "
             f"curve (step, loss): {training['eval_curve']}"]
    if notes:
        lines += ["", notes.strip()]
    lines += ["", "Config:", "", "```yaml", config_text.strip(), "```"]
    for label, summary in (results or {}).items():
        lines += ["", f"## {label}", "", metrics.markdown_table(summary)]
    return "\n".join(lines) + "\n"

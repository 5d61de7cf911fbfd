"""Model sizes compared at equal wall time: several pretraining runs (`crystallm.training.pretrain`) at once, each
given as many steps as fit a shared time budget.

The runs start together (one process each, on one GPU or on CPU cores), first for a few probe steps, which time
a step of each under the same contention as the real runs; each run then gets `budget_seconds / seconds a step`
steps (at most `max_epochs` passes over the corpus), so that its cosine schedule ends when the budget does.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from crystallm import data
from crystallm.configuration import CrystaLLMConfig
from crystallm.modeling import CrystaLLMForCausalLM
from crystallm.training.collator import held_out_split


@dataclass
class SweepRun:
    """One run's record after the sweep: its planned steps and what its log says."""

    name: str
    parameters: int
    steps: int
    epochs: float
    tokens_seen: int
    train_seconds: float
    best_eval_loss: float
    best_step: int
    last_eval_loss: float

    @classmethod
    def from_run_dir(cls, name: str, run_dir: Path, rows_per_epoch: int, batch_size: int) -> SweepRun:
        """Read a finished run's `log.jsonl`, `train_state.json` and `config.json`."""
        rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
        evaluated = [row for row in rows if "eval_loss" in row]
        state = json.loads((run_dir / "train_state.json").read_text())
        with torch.device("meta"):  # counts the parameters without allocating them
            parameters = CrystaLLMForCausalLM(CrystaLLMConfig.from_pretrained(run_dir)).num_parameters()
        return cls(name, parameters, rows[-1]["step"], rows[-1]["step"] * batch_size / rows_per_epoch,
                   rows[-1]["tokens_seen"], rows[-1]["train_seconds"], state.get("best_eval_loss", math.nan),
                   state.get("best_step", 0), evaluated[-1]["eval_loss"] if evaluated else math.nan)


def _launch(configs: dict[str, Path], threads: int) -> None:
    """Pretrain on each config at once, a process each; raise if one fails."""
    run = ("import sys, yaml; from crystallm.training.pretrain import pretrain; "
           "from crystallm.training.settings import PretrainingSettings; "
           "pretrain(PretrainingSettings.from_dict(yaml.safe_load(open(sys.argv[1]))))")
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    processes = {name: subprocess.Popen([sys.executable, "-c", run, str(path)], env=environment)
                 for name, path in configs.items()}
    failed = [name for name, process in processes.items() if process.wait() != 0]
    if failed:
        raise RuntimeError(f"pretraining runs failed: {', '.join(failed)} (their output is above)")


def seconds_per_step(log_path: Path) -> float:
    """Training seconds a step over the second half of a probe's log (the first steps compile and warm up)."""
    rows = [json.loads(line) for line in log_path.read_text().splitlines()]
    first, last = rows[len(rows) // 2], rows[-1]
    return (last["train_seconds"] - first["train_seconds"]) / max(1, last["step"] - first["step"])


def run_sweep(config: dict) -> list[SweepRun]:
    """Run the sweep of a configs/pretrain-sweep-*.yaml: `defaults` (a pretraining config) updated by each entry
    of `runs`, written to `output_dir/<name>.yaml` and trained to `output_dir/<name>/`; probe runs go to
    `output_dir/probe-<name>/`. Returns each run's record; `output_dir/sweep.json` holds them too.
    """
    root = Path(config["output_dir"])
    root.mkdir(parents=True, exist_ok=True)
    defaults = config["defaults"]
    corpus = data.load_texts(defaults["corpus"], defaults.get("max_rows"))
    if any(run.get("augment_descriptions", defaults.get("augment_descriptions")) for run in config["runs"].values()):
        data.add_descriptions(corpus, defaults.get("num_proc"))  # made once, read from the cache by every run
    rows_per_epoch = len(held_out_split(corpus["text"], int(defaults.get("seed", 0)),
                                        int(defaults.get("eval_rows", 512)))[0])
    threads = int(config.get("threads_per_run", 1))

    def write(name: str, output_name: str, **override) -> Path:
        path = root / f"{output_name}.yaml"
        run_config = {**defaults, **config["runs"][name], "output_dir": str(root / output_name), **override}
        path.write_text(yaml.safe_dump(run_config, sort_keys=False))
        return path

    probe_steps = int(config.get("probe_steps", 40))
    for name in config["runs"]:  # a probe left by an earlier sweep would resume at its end and time nothing
        shutil.rmtree(root / f"probe-{name}", ignore_errors=True)
    _launch({name: write(name, f"probe-{name}", max_steps=probe_steps, warmup_steps=0, eval_every=10 ** 9,
                         save_every=10 ** 9, keep_best=False)
             for name in config["runs"]}, threads)
    budget = float(config["budget_seconds"])
    plans = {}
    for name, run in config["runs"].items():
        batch_size = int({**defaults, **run}["batch_size"])
        per_step = seconds_per_step(root / f"probe-{name}" / "log.jsonl")
        steps = int(min(budget / per_step, float(config.get("max_epochs", math.inf)) * rows_per_epoch / batch_size))
        plans[name] = (steps, batch_size)
        print(f"{name}: {per_step * 1000:.1f} ms a step in the probe -> {steps} steps")
    _launch({name: write(name, name, max_steps=steps) for name, (steps, _) in plans.items()}, threads)
    records = [SweepRun.from_run_dir(name, root / name, rows_per_epoch, batch_size)
               for name, (_, batch_size) in plans.items()]
    (root / "sweep.json").write_text(json.dumps([record.__dict__ for record in records], indent=1))
    return records

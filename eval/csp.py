"""Stage: crystal structure prediction on a fixed subset (docs/architecture.md): generate `attempts` structures
for each target formula, then match them to the targets.

    python eval/csp.py configs/experiments/eval-mp20bt-csp200-default.yaml

`model` is a model folder or absent for the shipped default. Generation goes to `<output_dir>/generated` (a
`crystallm generate` folder, resumed if the stage is run again); the scores go to `summary.json`, `summary.md`.
With `rank:` a potential (chgnet, sevennet, sevennet-0), every structurally valid attempt is relaxed by it
(`stability.jsonl`, resumable) and the summary adds `ranked n=1`: the match rate when each target's lowest-energy
attempt is taken (`relaxation: {steps: 0}`: the energy of each attempt as generated, one call instead of a
relaxation); `rank: likelihood` takes each target's attempt with the highest mean log-probability per token
under the model (`text_log_likelihoods`: no potential, a forward pass an attempt). With `pattern:
clean` (or `degraded`) each prompt holds the target's computed powder pattern (or a degraded one) for the
model's `xrd` adapter, and `rank: pattern` takes each target's attempt that agrees best with it. With
`pattern_in_prompt: false` the prompts hold the formula alone (no adapter needed) and the pattern is used after
generation; `fit_lattice: true` fits each attempt's cell to its target's pattern (`diffraction.lattice_fit`) and
scores the fitted attempts (`fitted.zip`), the summary adding the first attempts' lattice errors before the fit.
"""

import dataclasses
from pathlib import Path

import numpy as np

from crystallm import data
from crystallm.adapters import use_adapter
from crystallm.diffraction.encoder import PATTERN_ADAPTER
from crystallm.diffraction.patterns import rank_by_agreement
from crystallm.evaluation import batch, csp, metrics, reports
from crystallm.evaluation.relaxation import POTENTIALS, RelaxationSettings, rank_by_energy
from crystallm.generation import prompt
from crystallm.generation.run_folder import GenerationFolder, generate_into
from crystallm.generation.sampling import load_generator, text_log_likelihoods
from crystallm.generation.settings import SamplingSettings
from crystallm.io.cif import structure_from_cif, write_cif_zip
from crystallm.stage_config import read_stage_config


def main() -> None:
    config = read_stage_config(__doc__)
    out = Path(config["output_dir"])
    attempts = int(config["attempts"])
    if config.get("rank") not in (None, *POTENTIALS, "pattern", "likelihood"):
        raise SystemExit(f"rank {config['rank']!r}: one of {', '.join(POTENTIALS)}, pattern, likelihood")
    ids_file = config["ids"]
    if config.get("count"):  # the first `count` ids of the list (written beside the results, which name it)
        ids_file = out / "ids.txt"
        ids_file.write_text("\n".join(data.read_ids(config["ids"])[: int(config["count"])]) + "\n")
    pattern = config.get("pattern")  # clean or degraded: the targets' powder patterns go into the prompts
    prompts, names = prompt.csp_prompts(config["targets"], ids_file, attempts, pattern, config.get("seed", 0))
    given = {csp.csp_targets(name): np.array(p.pattern) for name, p in zip(names, prompts)} if pattern else {}
    in_prompt = bool(pattern) and config.get("pattern_in_prompt", True)
    if pattern and not in_prompt:
        prompts = [dataclasses.replace(p, pattern=(), pattern_source="") for p in prompts]
    model, tokenizer = load_generator(config.get("model"))
    if in_prompt:
        model = use_adapter(model, PATTERN_ADAPTER)
    sampling = SamplingSettings(seed=config.get("seed", 0), batch_size=config.get("batch_size", 32),
                                temperature=config.get("temperature", 1.0), top_k=config.get("top_k"),
                                refine=config.get("refine", False), min_distance=config.get("min_distance", 0.5))
    run = {"model": config.get("model") or "default", "targets": config["targets"], "ids": config["ids"],
           "attempts": attempts, **({"pattern": pattern} if in_prompt else {}),
           "num": len(prompts)}  # `num` may grow: the folder resumes
    folder = GenerationFolder(out / "generated", sampling, run, resume=True)
    generation = generate_into(folder, model, tokenizer, prompts, num=len(prompts), names=names)
    wanted = set(names)  # a folder made for more ids holds more attempts than asked for now
    attempted = [(name, s) for name, s in folder.valid_structures() if name in wanted]
    scored, suffix, before_fit = out / "generated", "", None
    if config.get("fit_lattice"):
        split = data.load_split(*config["targets"].split("/"))
        cif_of = dict(zip(split["id"], split["cif"]))
        targets = {i: structure_from_cif(cif_of[i], i) for i in data.read_ids(ids_file)}
        attempted, before_fit = csp.fit_attempts(attempted, given, targets)
        write_cif_zip(out / "fitted.zip", dict(attempted))
        scored, suffix = out / "fitted.zip", ".cif"  # entries of a zip are named after their files
    scores = None
    if config.get("rank") in POTENTIALS:  # relax every attempt; `ranked n=1` takes each target's lowest energy
        ranking = rank_by_energy(attempted, out / "stability.jsonl",
                                 RelaxationSettings(**config.get("relaxation", {}), potential=config["rank"]))
        scores = {r["name"] + suffix: r["energy_per_atom"] for r in ranking if not r["error"]}
    elif config.get("rank") == "likelihood":  # `ranked n=1` takes each target's attempt the model finds likeliest
        entries = [e for e in folder.entries if e["name"] in wanted]
        likelihoods = text_log_likelihoods(model, tokenizer, [e.get("lm_text", e["text"]) for e in entries],
                                           sampling.batch_size)
        scores = {e["name"] + suffix: -log_p / tokens for e, (log_p, tokens) in zip(entries, likelihoods)}
    elif config.get("rank") == "pattern":  # `ranked n=1` takes each target's best agreement with its pattern
        by_target = {target: [a for a in attempted if csp.csp_targets(a[0]) == target] for target in given}
        scores = {match.name + suffix: match.disagreement for target, profile in given.items()
                  for match in rank_by_agreement(by_target[target], profile)}
    task = csp.CSPTask(config["targets"], ids_file, tuple(sorted({1, attempts})), scores)
    options = batch.EvaluationOptions(records_path=out / "records.jsonl")
    summary = batch.evaluate(scored, csp=task, options=options)
    summary["generation"] = generation["generation"]
    if before_fit is not None:
        summary["csp lattice n=1, before the fit"] = before_fit
    reports.write_json(summary, out / "summary.json")
    metrics.write_markdown(summary, out / "summary.md")
    print(metrics.markdown_table(summary))


if __name__ == "__main__":
    main()

"""Scaling out: generation in shards (several processes, `accelerate launch`), training under `accelerate launch`
with two processes, and the scoring and relaxation pools on a Ray cluster."""

import json
import os
import subprocess
import sys
from itertools import islice

import pytest

from crystallm.cli import main
from crystallm.errors import CrystaLLMInputError
from crystallm.evaluation.pools import worker_pool
from crystallm.generation.run_folder import merge_shards

# On a machine without GPUs, accelerate launch --multi_gpu starts torchrun processes that talk over gloo.
LAUNCH_TWO = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def _texts(folder) -> list[str]:
    return [json.loads(line)["text"] for line in (folder / "samples.jsonl").read_text().splitlines()]


def _generate(model_dir, out, *extra) -> int:
    return main(["generate", "--model", str(model_dir), "--num", "7", "--batch-size", "2", "--seed", "3",
                 "--max-atoms", "12", "--out", str(out), "--quiet", *extra])


def test_shards_merge_into_exactly_the_one_process_run(tiny_model_dir, tmp_path, capsys):
    assert _generate(tiny_model_dir, tmp_path / "single") == 0
    for index in (1, 0):
        assert _generate(tiny_model_dir, tmp_path / "sharded", "--shard", f"{index}/2") == 0
    shard = _texts(tmp_path / "sharded" / "shard-1-of-2")
    assert len(shard) == 3  # batches 1 and 3 of [0,1] [2,3] [4,5] [6]
    assert main(["merge", str(tmp_path / "sharded")]) == 0
    assert _texts(tmp_path / "sharded") == _texts(tmp_path / "single")
    merged = json.loads((tmp_path / "sharded" / "summary.json").read_text())
    assert merged["entries"] == 7 and "shard" not in merged["settings"]


def test_a_shard_resumes_on_its_own_and_merge_names_what_is_missing(tiny_model_dir, tmp_path):
    single = tmp_path / "single"
    _generate(tiny_model_dir, single)
    out = tmp_path / "sharded"
    _generate(tiny_model_dir, out, "--shard", "0/2")
    with pytest.raises(CrystaLLMInputError, match="shard 1 of 2 is missing"):
        merge_shards(out)
    # A shard cut short (its last batch lost) finishes on --resume with the same texts.
    journal = out / "shard-0-of-2" / "samples.jsonl"
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text("".join(lines[:2]))
    _generate(tiny_model_dir, out, "--shard", "0/2", "--resume")
    _generate(tiny_model_dir, out, "--shard", "1/2")
    assert merge_shards(out).finished == 7
    assert _texts(out) == _texts(single)


def test_a_bad_shard_is_refused_with_the_reason(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        _generate(tiny_model_dir, tmp_path / "x", "--shard", "2/2")
    assert "expected I/N with 0 <= I < N" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_under_accelerate_launch_gives_the_one_process_run(tiny_model_dir, tmp_path):
    _generate(tiny_model_dir, tmp_path / "single")
    command = [*LAUNCH_TWO, "-m", "crystallm.cli", "generate", "--model", str(tiny_model_dir), "--num", "7",
               "--batch-size", "2", "--seed", "3", "--max-atoms", "12", "--out", str(tmp_path / "launched"), "--quiet"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "launched" / "shard-1-of-2" / "samples.jsonl").exists()
    assert _texts(tmp_path / "launched") == _texts(tmp_path / "single")


def _loss_curves(stage: str, config: dict, tmp_path, log: str, key: str) -> dict[str, list[float]]:
    """Run a train/ stage as one process of batch 8 and under accelerate launch as two of batch 4 (the same rows
    step for step); return both logged loss curves."""
    import yaml

    curves = {}
    for name, batch_size, launch in (("single", 8, [sys.executable]), ("launched", 4, LAUNCH_TWO)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config | {"output_dir": str(tmp_path / name), "batch_size": batch_size,
                                                 "mixed_precision": "no", "seed": 0}))
        result = subprocess.run([*launch, stage, str(path)], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        curves[name] = [json.loads(line)[key] for line in (tmp_path / name / log).read_text().splitlines()]
    return curves


# Each loop weights a step's loss by each process's share of what it averages over (target tokens, atoms,
# crystals) and draws a row's randomness from the step and the row alone, so the curves agree to float precision.
TRAINING_LOOPS = {
    "pretraining": ("train/pretrain.py", {
        "corpus": "data/pretraining-corpus.csv.gz", "max_rows": 400, "eval_rows": 16,
        "model": {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 512}, "learning_rate": 1.0e-3,
        "warmup_steps": 1, "max_steps": 4, "eval_every": 4, "save_every": 100, "progress": False},
        "log.jsonl", "train_loss"),
    "adapter": ("train/adapter.py", {
        "property": "band_gap", "corpus": "data/pretraining-corpus.csv.gz", "learning_rate": 1e-2, "max_steps": 4,
        "drop_probability": 0.5, "rank": 4, "alpha": 8}, "band_gap_log.jsonl", "loss"),
    "refinement head": ("train/refiner.py", {
        "corpus": "data/pretraining-corpus.csv.gz", "eval_rows": 8, "refiner": {"width": 16, "layers": 1},
        "learning_rate": 1e-3, "max_steps": 4, "eval_every": 100, "sigma_range": [0.02, 0.5], "eval_sigmas": [0.1],
        "max_atoms": 48}, "refiner_log.jsonl", "loss"),
}


@pytest.mark.slow
@pytest.mark.parametrize("loop", TRAINING_LOOPS)
def test_training_under_accelerate_launch_follows_the_one_process_loss_curve(loop, tiny_model_dir, tmp_path):
    stage, config, log, key = TRAINING_LOOPS[loop]
    if loop != "pretraining":  # adapters and the head train on a saved base model
        config = config | {"model": str(tiny_model_dir)}
    curves = _loss_curves(stage, config, tmp_path, log, key)
    assert len(curves["single"]) == 4
    assert curves["launched"] == pytest.approx(curves["single"], rel=1e-5)


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    yield "local"
    ray.shutdown()


def test_local_workers_start_with_one_thread_each(monkeypatch):
    # Two OpenMP/BLAS threads per worker on a worker per core made local relaxations 1.7x slower.
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    with worker_pool(1, start_method="spawn") as pool:
        seen = pool.apply(os.getenv, ("OMP_NUM_THREADS",))
    assert seen == "1" and os.environ["OMP_NUM_THREADS"] == "4"  # the parent's own setting is left as it was


@pytest.mark.slow
def test_scoring_on_ray_gives_the_local_pool_results(local_ray):
    from crystallm.evaluation.batch import EvaluationOptions, evaluate

    def run(**pool):
        options = EvaluationOptions(limit=40, num_proc=2, progress=False, **pool)
        return evaluate("mp20-bt/test", options=options)

    local, remote = run(), run(ray=local_ray)
    for summary in (local, remote):
        summary.pop("seconds"), summary.pop("structures_per_second")
    assert remote == local and local["validity"]["structural"] == 1.0


@pytest.mark.slow
def test_relaxation_on_ray_gives_the_local_results_and_shares_the_cache(local_ray, tmp_path):
    from crystallm.evaluation.readers import iter_entries
    from crystallm.evaluation.relaxation import RelaxationSettings, stability_records
    from crystallm.evaluation.scoring import score_entries

    records = list(islice((r for r in score_entries(iter_entries("mp20-bt/test"), num_proc=1) if not r.error), 3))
    structures = [(r.name, r.structure) for r in records]
    settings = RelaxationSettings(steps=3, max_seconds=60)
    remote = stability_records(structures, tmp_path / "ray.jsonl", settings, num_proc=1, progress=False,
                               ray=local_ray)
    local = stability_records(structures, tmp_path / "local.jsonl", settings, num_proc=1, progress=False)
    assert [(r["name"], r["error"], r["steps"]) for r in remote] == [(r["name"], r["error"], r["steps"]) for r in local]
    for key in ("initial_energy_per_atom", "energy_per_atom", "e_above_hull", "rmsd"):
        assert [r[key] for r in remote] == pytest.approx([r[key] for r in local], abs=1e-6), key
    # The Ray run's cache resumes like a local one: a second call relaxes nothing again.
    lines = (tmp_path / "ray.jsonl").read_text()
    again = stability_records(structures, tmp_path / "ray.jsonl", settings, num_proc=1, progress=False, ray=local_ray)
    assert (tmp_path / "ray.jsonl").read_text() == lines and len(lines.splitlines()) == 3
    assert [r["energy_per_atom"] for r in again] == [r["energy_per_atom"] for r in remote]


def test_threads_follow_the_free_cores_and_the_option(monkeypatch, tiny_model_dir, tmp_path):
    import torch

    from crystallm import cli, compute

    allowed, before, setter = len(os.sched_getaffinity(0)), torch.get_num_threads(), torch.set_num_threads
    monkeypatch.setattr(compute, "_others_running", lambda: 0)
    assert compute.free_cores(samples=1) == allowed
    monkeypatch.setattr(compute, "_others_running", lambda: allowed + 3)  # a busy machine: one thread still
    assert compute.free_cores(samples=1) == 1
    chosen = []
    monkeypatch.setattr(compute.torch, "set_num_threads", lambda n: chosen.append(n) or setter(n))
    assert cli.main(["generate", "--model", str(tiny_model_dir), "--num", "2", "--max-atoms", "8", "--quiet",
                     "--out", str(tmp_path / "one"), "--threads", "1"]) == 0
    assert chosen == [1, before] and torch.get_num_threads() == before  # the choice ends with the command
    monkeypatch.setattr(compute, "_others_running", lambda: 0)
    assert cli.main(["generate", "--model", str(tiny_model_dir), "--num", "2", "--max-atoms", "8", "--quiet",
                     "--out", str(tmp_path / "free")]) == 0
    assert chosen == [1, before, allowed, before]


@pytest.mark.slow
def test_two_generate_processes_at_once_give_the_texts_each_gives_alone(tiny_model_dir, tmp_path):
    """Under load (issue 36): two runs side by side, each choosing its threads from the free cores, write the
    texts they write alone."""
    def command(out, seed):
        return [sys.executable, "-m", "crystallm.cli", "generate", "--model", str(tiny_model_dir), "--num", "24",
                "--batch-size", "8", "--max-atoms", "24", "--seed", str(seed), "--quiet", "--out", str(out)]

    def texts(out):
        return [json.loads(line)["text"] for line in (out / "samples.jsonl").read_text().splitlines()]

    for seed in (0, 1):
        subprocess.run(command(tmp_path / f"alone-{seed}", seed), check=True, capture_output=True)
    together = [subprocess.Popen(command(tmp_path / f"together-{seed}", seed), stderr=subprocess.PIPE)
                for seed in (0, 1)]
    assert [process.wait() for process in together] == [0, 0]
    for seed in (0, 1):
        assert texts(tmp_path / f"together-{seed}") == texts(tmp_path / f"alone-{seed}")

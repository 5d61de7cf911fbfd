"""Scaling out: generation in shards (several processes, `accelerate launch`), training under `accelerate launch`
with two processes, and the scoring and relaxation pools on a Ray cluster."""

import json
import os
import subprocess
import sys

import pytest

from crystallm.cli import main
from crystallm.errors import CrystaLLMInputError
from crystallm.evaluation.pools import worker_pool
from crystallm.generation.run_folder import merge_shards


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
    # On a machine without GPUs, accelerate launch --multi_gpu starts torchrun processes that talk over gloo.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "crystallm.cli",
               "generate", "--model", str(tiny_model_dir), "--num", "7", "--batch-size", "2", "--seed", "3",
               "--max-atoms", "12", "--out", str(tmp_path / "launched"), "--quiet"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "launched" / "shard-1-of-2" / "samples.jsonl").exists()
    assert _texts(tmp_path / "launched") == _texts(tmp_path / "single")


def _pretrain_config(path, out, batch_size: int) -> str:
    import yaml

    config = {"corpus": "data/pretraining-corpus.csv.gz", "output_dir": str(out), "max_rows": 400, "eval_rows": 16,
              "seed": 0, "model": {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 512},
              "batch_size": batch_size, "learning_rate": 1.0e-3, "warmup_steps": 1, "max_steps": 4, "eval_every": 4,
              "save_every": 100, "mixed_precision": "no", "progress": False}
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.slow
def test_pretraining_under_accelerate_launch_follows_the_one_process_loss_curve(tmp_path):
    """Two processes of batch 4 see, step for step, the rows of one process of batch 8; the loss of a step is
    weighted by target tokens over both, so the curves agree to float precision."""
    single = _pretrain_config(tmp_path / "single.yaml", tmp_path / "single", batch_size=8)
    assert subprocess.run([sys.executable, "train/pretrain.py", single], capture_output=True).returncode == 0
    launched = _pretrain_config(tmp_path / "launched.yaml", tmp_path / "launched", batch_size=4)
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                             "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                             "train/pretrain.py", launched], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]

    def curve(out):
        return [json.loads(line)["train_loss"] for line in (out / "log.jsonl").read_text().splitlines()]

    assert len(curve(tmp_path / "single")) == 4
    assert curve(tmp_path / "launched") == pytest.approx(curve(tmp_path / "single"), rel=1e-5)


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    yield "local"
    ray.shutdown()


@pytest.mark.slow
def test_local_workers_start_with_one_thread_each(monkeypatch):
    # Two OpenMP/BLAS threads per worker on a worker per core made local relaxations 1.7x slower.
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    with worker_pool(1, start_method="spawn") as pool:
        seen = pool.apply(os.getenv, ("OMP_NUM_THREADS",))
    assert seen == "1" and os.environ["OMP_NUM_THREADS"] == "4"  # the parent's own setting is left as it was


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

    records = [r for r in score_entries(iter_entries("mp20-bt/test"), num_proc=1) if not r.error][:3]
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

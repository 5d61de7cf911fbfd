import json
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile

import pytest
import torch
from pymatgen.core import Composition, Structure

from crystallm import cli
from crystallm.configuration import CrystaLLMConfig
from crystallm.errors import CheckpointError, CrystaLLMInputError
from crystallm.generation import run_folder
from crystallm.generation.prompt import Prompt, reduced_formula
from crystallm.generation.run_folder import GenerationFolder
from crystallm.generation.sampling import generate_structures, load_generator, text_log_likelihoods
from crystallm.generation.settings import SamplingSettings
from crystallm.io import text_format
from crystallm.modeling import CrystaLLMForCausalLM
from crystallm.tokenization import CrystaLLMTokenizer


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_generator(tiny_model_dir, device="cpu")


def test_formulas_are_reduced_into_the_format_order():
    assert reduced_formula("Cl4Na4") == {"Na": 1, "Cl": 1}
    assert text_format.format_formula(reduced_formula("O3TiSr")) == "SrTiO3"
    for bad, problem in [("Xx2O", "Xx"), ("Na0.5Cl", "whole numbers"), ("", "formula")]:
        with pytest.raises(CrystaLLMInputError, match=problem):
            Prompt.of(formula=bad)


def test_space_groups_and_chemical_systems_are_checked():
    assert Prompt.of(space_group="P6_3/mmc").space_group == Prompt.of(space_group=194).space_group == 194
    for bad in ["Q9", "0", "231"]:
        with pytest.raises(CrystaLLMInputError, match="space group"):
            Prompt.of(space_group=bad)
    with pytest.raises(CrystaLLMInputError, match="unknown element 'Qq'"):
        Prompt.of(chemical_system="Li-Qq")
    with pytest.raises(CrystaLLMInputError, match="not in the chemical system"):
        Prompt.of(formula="LiCoO2", chemical_system="Li-Fe-O")


def test_impossible_prompts_are_refused_before_generating(tiny):
    model, tokenizer = tiny
    with pytest.raises(CrystaLLMInputError, match="impossible prompt"):
        Prompt.of(formula="C41H60").grammar(tokenizer, 160, model.config.n_positions)  # more rows than fit
    with pytest.raises(CrystaLLMInputError, match="impossible prompt"):  # Fm-3m needs Z=4: 12 atoms > 8
        Prompt.of(formula="NaCl2", space_group="Fm-3m").grammar(tokenizer, 8, model.config.n_positions)
    Prompt.of(formula="NaCl2", space_group="Fm-3m").grammar(tokenizer, 12, model.config.n_positions)


def test_every_sample_parses_fits_the_context_and_obeys_its_prompt(tiny):
    model, tokenizer = tiny
    prompts = [Prompt(), Prompt.of(formula="LiFePO4"), Prompt.of(space_group="P6_3/mmc"),
               Prompt.of(chemical_system="Ba-Ti-O"), Prompt.of(formula="SrTiO3", space_group="Pm-3m"),
               Prompt.of(space_group="P-1")] * 3  # P-1: the grammar keeps triclinic angles a real cell
    samples = list(generate_structures(model, tokenizer, prompts,
                                       settings=SamplingSettings(batch_size=6, seed=3, max_atoms=40)))
    assert [s.index for s in samples] == list(range(18))
    for sample in samples:
        assert sample.error == "" and sample.structure is not None, sample.text
        assert len(tokenizer(sample.text)["input_ids"]) < model.config.n_positions
        crystal = text_format.read_crystal_text(sample.text)
        prompt = sample.prompt
        if prompt.formula:
            assert crystal.formula == dict(prompt.formula)
            assert sample.structure.composition.reduced_composition == Composition(
                text_format.format_formula(dict(prompt.formula))).reduced_composition
        if prompt.space_group:
            assert crystal.space_group == prompt.space_group
        if prompt.elements:
            assert set(crystal.formula) == set(prompt.elements)


def test_a_short_context_bounds_the_rows_and_every_text_still_parses(tokenizer=None):
    tokenizer = CrystaLLMTokenizer.from_format()
    torch.manual_seed(1)
    model = CrystaLLMForCausalLM(CrystaLLMConfig(vocab_size=len(tokenizer), n_layer=1, n_embd=32, n_head=2,
                                                 n_positions=96)).eval()
    samples = list(generate_structures(model, tokenizer, num=12,
                                       settings=SamplingSettings(batch_size=12, seed=0, max_atoms=160)))
    assert all(s.structure is not None for s in samples)
    assert max(len(tokenizer(s.text)["input_ids"]) for s in samples) < 96


def test_samples_are_reproducible_and_a_resumed_run_continues_them(tiny):
    model, tokenizer = tiny
    full = [s.text for s in generate_structures(model, tokenizer, num=6,
                                                settings=SamplingSettings(batch_size=2, seed=5, max_atoms=24))]
    resumed = [s.text for s in generate_structures(model, tokenizer, num=6, start=4,
                                                   settings=SamplingSettings(batch_size=2, seed=5, max_atoms=24))]
    assert resumed == full[4:]
    assert len(set(full)) > 1


def test_left_padded_batches_give_the_same_text_as_single_prompts(tiny):
    model, tokenizer = tiny
    prompts = ["data_", f"data_SrTiO3\n{text_format.TAG_SPACE_GROUP}"]
    singles = [tokenizer.decode(model.generate(**tokenizer([p], return_tensors="pt"), max_new_tokens=12,
                                               do_sample=False, pad_token_id=0)[0], skip_special_tokens=True)
               for p in prompts]
    batch = model.generate(**tokenizer(prompts, return_tensors="pt", padding=True), max_new_tokens=12,
                           do_sample=False, pad_token_id=0)
    assert tokenizer.batch_decode(batch, skip_special_tokens=True) == singles


def test_text_likelihoods_are_the_models_loss_and_do_not_depend_on_the_batch(tiny, mp20_test_slice):
    model, tokenizer = tiny
    texts = [text_format.serialize_structure(Structure.from_str(row["cif"], fmt="cif")) for row in mp20_test_slice[:6]]
    batched = text_log_likelihoods(model, tokenizer, texts, batch_size=6)  # right-padded to the longest
    singles = [score for text in texts for score in text_log_likelihoods(model, tokenizer, [text])]
    assert [n for _, n in batched] == [n for _, n in singles] and len({n for _, n in batched}) > 1
    assert [lp for lp, _ in batched] == pytest.approx([lp for lp, _ in singles], abs=1e-3)
    ids = tokenizer(texts[0] + tokenizer.eos_token, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()  # mean over every token after the first
    assert -batched[0][0] / batched[0][1] == pytest.approx(loss, rel=1e-4)


def test_a_folder_that_is_not_a_crystallm_model_is_refused(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(CheckpointError, match="not a crystallm model"):
        load_generator(tmp_path / "gpt2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a model folder"):
        load_generator(tmp_path / "empty")


def _generate(out, model_dir, *extra) -> int:
    return cli.main(["generate", "--model", str(model_dir), "--out", str(out), "--batch-size", "2",
                     "--max-atoms", "24", "--quiet", *extra])


def _outputs(out) -> tuple[list[dict], list[str], list]:
    from ase.io import read

    lines = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    with zipfile.ZipFile(out / "cifs.zip") as archive:
        cifs = {name: archive.read(name).decode() for name in archive.namelist()}
    frames = read(out / "structures.extxyz", index=":")
    return lines, cifs, frames


def test_generate_writes_readable_cifs_extxyz_and_summaries_and_resumes(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    assert _generate(out, tiny_model_dir, "--num", "4") == 0
    lines, cifs, frames = _outputs(out)
    assert [entry["name"] for entry in lines] == [f"sample-{i:06d}" for i in range(4)]
    assert len(cifs) == len(frames) == 4
    structure = Structure.from_str(cifs["sample-000000.cif"], fmt="cif")
    assert structure.composition.reduced_formula == text_format.parse_structure(
        lines[0]["text"]).composition.reduced_formula
    summary = json.loads((out / "summary.json").read_text())
    assert summary["entries"] == 4 and summary["parse_rate"] == 1.0 and summary["requested"] == 4
    assert len((out / "summary.csv").read_text().splitlines()) == 5
    # Same command again: refused (nothing overwritten); with --resume and a larger --num: continued.
    assert _generate(out, tiny_model_dir, "--num", "4") == 2
    assert _generate(out, tiny_model_dir, "--num", "6", "--resume") == 0
    lines, cifs, frames = _outputs(out)
    assert [entry["index"] for entry in lines] == list(range(6)) and len(cifs) == len(frames) == 6
    # ended on a short batch (7 of batches of 2), then resumed with more: each index once
    assert _generate(out, tiny_model_dir, "--num", "7", "--resume") == 0
    assert _generate(out, tiny_model_dir, "--num", "9", "--resume") == 0
    lines, cifs, frames = _outputs(out)
    assert [entry["index"] for entry in lines] == list(range(9)) and len(cifs) == len(frames) == 9
    assert _generate(out, tiny_model_dir, "--num", "6", "--resume", "--seed", "9") == 2  # other settings


def test_a_resumed_folder_refuses_samples_of_other_weights(tiny, tmp_path):
    import copy

    model, tokenizer = tiny
    sampling = SamplingSettings(batch_size=2)

    def folder(num: int, resume: bool = True) -> GenerationFolder:
        return GenerationFolder(tmp_path, sampling, {"num": num}, resume=resume)

    run_folder.generate_into(folder(2, resume=False), model, tokenizer, None, num=2, progress=False)
    retrained = copy.deepcopy(model)  # the same settings ("default") after the default was retrained
    with torch.no_grad():
        next(retrained.parameters()).add_(0.01)
    folder(2)  # opened, nothing generated: the record stays
    with pytest.raises(CrystaLLMInputError, match="weights"):
        run_folder.generate_into(folder(4), retrained, tokenizer, None, num=4, progress=False)
    # refused before anything was written; the model that wrote them continues the run
    summary = run_folder.generate_into(folder(4), model, tokenizer, None, num=4, progress=False)
    assert summary["entries"] == 4
    assert json.loads((tmp_path / "run.json").read_text())["weights"] == run_folder.weights_fingerprint(model)
    # a folder from before the weights were recorded: no model can be told to have written it
    settings = json.loads((tmp_path / "run.json").read_text())
    del settings["weights"]
    (tmp_path / "run.json").write_text(json.dumps(settings))
    with pytest.raises(CrystaLLMInputError, match="do not record the weights"):
        run_folder.generate_into(folder(6), model, tokenizer, None, num=6, progress=False)
    assert len(folder(6).entries) == 4  # nothing lost or added


def test_the_weights_fingerprint_follows_the_active_adapter_only():
    from crystallm.adapters import use_adapter

    model, _ = load_generator(device="cpu")
    band_gap = run_folder.weights_fingerprint(use_adapter(model, "band_gap"))
    model = use_adapter(model, "formation_energy_per_atom")  # loaded beside it and active: another generator
    assert run_folder.weights_fingerprint(model) != band_gap
    # band_gap active again, formation energy still loaded: the first generator (a design run resumes it)
    assert run_folder.weights_fingerprint(use_adapter(model, "band_gap")) == band_gap


@pytest.mark.slow
def test_a_killed_run_keeps_every_finished_structure_and_resume_completes_it(tiny_model_dir, tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "crystallm.cli", "generate", "--model", str(tiny_model_dir), "--out",
               str(out), "--batch-size", "2", "--max-atoms", "24", "--num", "40", "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = out / "samples.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not journal.exists() or journal.read_text().count("\n") < 6):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    lines, cifs, frames = _outputs(out)
    assert 6 <= len(lines) < 40
    assert set(cifs) <= {f"{entry['name']}.cif" for entry in lines} and len(frames) <= len(lines)
    for cif in cifs.values():  # every structure on disk reads back
        assert len(Structure.from_str(cif, fmt="cif")) > 0
    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    lines, cifs, frames = _outputs(out)
    assert [entry["index"] for entry in lines] == list(range(40))
    assert len(cifs) == len(frames) == 40


@pytest.mark.parametrize("arguments, message", [
    (["--formula", "Xx2O"], "Xx"),
    (["--formula", "C41H60"], "impossible prompt"),
    (["--spacegroup", "Fm-4m"], "unknown space-group symbol"),
    (["--model", os.devnull], "not a model folder"),
])
def test_bad_input_is_one_line_and_a_nonzero_exit(arguments, message, tiny_model_dir, tmp_path, capsys):
    arguments = ["--model", str(tiny_model_dir), *arguments] if "--model" not in arguments else arguments
    code = cli.main(["generate", "--out", str(tmp_path / "out"), "--num", "1", "--quiet", *arguments])
    error = capsys.readouterr().err.strip()
    assert code != 0 and message in error and len(error.splitlines()) == 1
    assert not (tmp_path / "out" / "samples.jsonl").exists()


def test_an_unwritable_out_is_one_line_and_a_nonzero_exit(tiny_model_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code = cli.main(["generate", "--model", str(tiny_model_dir), "--out", str(blocker / "out"), "--num", "1"])
    error = capsys.readouterr().err.strip()
    assert code != 0 and "cannot write there" in error and len(error.splitlines()) == 1


def test_generation_folder_rebuilds_its_files_from_the_journal_after_a_torn_write(tiny, tmp_path):
    model, tokenizer = tiny
    samples = list(generate_structures(model, tokenizer, num=4,
                                       settings=SamplingSettings(batch_size=2, seed=0, max_atoms=24)))
    folder = GenerationFolder(tmp_path, SamplingSettings(), {"num": 4})
    folder.write(samples[:2])
    with open(tmp_path / "samples.jsonl", "a") as journal:
        journal.write('{"index": 2, "na')  # killed mid-line
    (tmp_path / "cifs.zip").write_bytes(b"PK\x03\x04 torn")
    folder.close()  # the process that wrote it ends
    resumed = GenerationFolder(tmp_path, SamplingSettings(), {"num": 4}, resume=True)
    assert resumed.finished == 2
    resumed.write(samples[2:])
    with zipfile.ZipFile(tmp_path / "cifs.zip") as archive:
        assert len(archive.namelist()) == 4


def test_a_full_disk_keeps_what_was_written_and_says_how_to_go_on(tiny, tmp_path, monkeypatch):
    import errno

    from crystallm.errors import OutputWriteError

    model, tokenizer = tiny
    samples = list(generate_structures(model, tokenizer, num=4,
                                       settings=SamplingSettings(batch_size=2, seed=0, max_atoms=24)))
    folder = GenerationFolder(tmp_path, SamplingSettings(), {"num": 4})
    folder.write(samples[:2])
    before = (tmp_path / "cifs.zip").read_bytes()

    def disk_full(path, structures, mode="w"):
        path.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_folder.cif, "write_cif_zip", disk_full)
    with pytest.raises(OutputWriteError, match="No space left on device.*2 structures finished before are kept"):
        folder.write(samples[2:])
    assert (tmp_path / "cifs.zip").read_bytes() == before and not (tmp_path / "cifs.zip.partial").exists()
    monkeypatch.undo()
    folder.close()  # the process that wrote it ends
    resumed = GenerationFolder(tmp_path, SamplingSettings(), {"num": 4}, resume=True)  # the journaled batch comes back
    assert resumed.finished == 4


def _wait_for_lines(journal, count: int, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline and (not journal.exists() or journal.read_text().count("\n") < count):
        time.sleep(0.05)


def test_a_folder_has_one_writer(tmp_path):
    first = GenerationFolder(tmp_path, SamplingSettings(), {"num": 2})
    with pytest.raises(CrystaLLMInputError, match=f"another run is writing there \\(pid {os.getpid()} on "):
        GenerationFolder(tmp_path, SamplingSettings(), {"num": 2}, resume=True)
    del first  # the lock ends with the folder object (and with its process, kill -9 included)
    assert GenerationFolder(tmp_path, SamplingSettings(), {"num": 2}).finished == 0


@pytest.mark.slow
@pytest.mark.parametrize("resume", [False, True], ids=["two new runs", "two resumes"])
def test_two_runs_into_one_folder_one_is_refused_and_the_other_is_a_lone_run(resume, tiny_model_dir, tmp_path):
    command = [sys.executable, "-m", "crystallm.cli", "generate", "--model", str(tiny_model_dir), "--batch-size", "2",
               "--max-atoms", "24", "--num", "24", "--quiet", "--threads", "1"]
    lone = tmp_path / "lone"
    assert subprocess.run(command + ["--out", str(lone)], capture_output=True).returncode == 0
    shared = tmp_path / "shared"
    if resume:  # a run stopped after its first batches, then resumed twice at once
        subprocess.run(command[:-5] + ["--num", "4", "--quiet", "--out", str(shared)], check=True, capture_output=True)
    first = subprocess.Popen(command + ["--out", str(shared), "--seed", "0"] + (["--resume"] if resume else []),
                             stderr=subprocess.PIPE, text=True)
    _wait_for_lines(shared / "samples.jsonl", 6)
    first.send_signal(signal.SIGSTOP)  # held mid-run, so the second surely meets it there
    second = subprocess.run(command + ["--out", str(shared)] + (["--resume"] if resume else ["--seed", "1"]),
                            capture_output=True, text=True)
    first.send_signal(signal.SIGCONT)
    assert first.wait() == 0, first.stderr.read()
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [
        f"crystallm generate: error: {shared}: another run is writing there (pid {first.pid} on "
        f"{socket.gethostname()}, since " + second.stderr.split("since ", 1)[1].strip()]
    texts = [json.loads(line)["text"] for line in (shared / "samples.jsonl").read_text().splitlines()]
    assert texts == [json.loads(line)["text"] for line in (lone / "samples.jsonl").read_text().splitlines()]
    assert json.loads((shared / "summary.json").read_text())["entries"] == 24


@pytest.mark.slow
def test_ctrl_c_is_one_line_that_says_what_was_kept_and_resume_completes_it(tiny_model_dir, tmp_path):
    out = tmp_path / "interrupted"
    command = [sys.executable, "-m", "crystallm.cli", "generate", "--model", str(tiny_model_dir), "--out",
               str(out), "--batch-size", "2", "--max-atoms", "24", "--num", "120", "--quiet"]
    # The child takes Ctrl-C as a terminal gives it: a test run started in the background (`... &`) ignores
    # SIGINT, and an ignored signal is inherited across exec, so the run would finish instead.
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for_lines(out / "samples.jsonl", 6)
    process.send_signal(signal.SIGINT)
    assert process.wait() == 130
    [line] = process.stderr.read().strip().splitlines()
    kept = (out / "samples.jsonl").read_text().count("\n")
    assert line == (f"crystallm generate: interrupted; the {kept} structures finished are kept in {out}: add "
                    f"--resume to the same command to continue")
    assert subprocess.run(command + ["--resume"], capture_output=True).returncode == 0
    assert [json.loads(line)["index"] for line in (out / "samples.jsonl").read_text().splitlines()] == list(range(120))

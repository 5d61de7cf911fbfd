"""Generating crystal structures: prompts, batched Hugging Face `generate` with the grammar processor, and
records of what came out (text, parsed structure or the parse error, detected space group, timing).

    >>> model, tokenizer = load_generator()  # the default model shipped inside the package
    >>> [sample] = generate_structures(model, tokenizer, Prompt.of(formula="NaCl"), num=1)
    >>> sample.structure.composition.reduced_formula
    'NaCl'
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from pymatgen.core import Structure
from transformers import LogitsProcessorList

from crystallm import symmetry
from crystallm.adapters import active_adapter
from crystallm.compute import bf16_pays
from crystallm.diffraction.encoder import pattern_conditioning
from crystallm.errors import CrystaLLMInputError
from crystallm.generation.grammar import CrystalGrammarLogitsProcessor
from crystallm.generation.prompt import Prompt
from crystallm.generation.settings import SamplingSettings
from crystallm.io import text_format
from crystallm.model_folder import DEFAULT_MODEL, resolve_model_folder
from crystallm.modeling import load_model
from crystallm.refinement import refine_texts
from crystallm.tokenization import CrystaLLMTokenizer, encode_texts

# How often a sample whose text met a dead end of the distance floor is drawn again before it is kept as it is.
RESAMPLE_ATTEMPTS = 3


@dataclass
class GeneratedSample:
    """One generated crystal: the text the LM wrote, the structure (None with `error` set if the text did not
    parse; refined and symmetrized where asked), the space group spglib detects at symprec 0.1, the tokens
    generated, its share of the batch's wall time, and `final_text`: the text of the structure after refinement
    or symmetrization ('' when that is the LM's own text)."""

    index: int
    prompt: Prompt
    text: str
    structure: Structure | None
    error: str
    space_group: int | None
    tokens: int
    seconds: float
    final_text: str = ""
    refine_seconds: float = 0.0
    fallbacks: int = 0  # choices the grammar had to allow below the distance floor (or off charge neutrality)
    resamples: int = 0  # times the sample was drawn again because its text needed a fallback

    @property
    def output_text(self) -> str:
        """The text of the structure as finally produced."""
        return self.final_text or self.text


def load_generator(model: str | Path | None = None, device: str | None = None):
    """(model, tokenizer) from a folder saved with `save_pretrained` (or a Hub id), or the default model shipped
    inside the package when `model` is None. Raises CheckpointError naming the folder if it is not a crystallm
    model.

    >>> model, tokenizer = load_generator()
    >>> model.config.model_type, len(tokenizer)
    ('crystallm', 1394)
    """
    device = _check_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))  # before any loading
    source = str(resolve_model_folder(model or DEFAULT_MODEL))  # a Hub id becomes its cached snapshot
    loaded = load_model(source)
    tokenizer = CrystaLLMTokenizer.from_pretrained(source)
    return loaded.to(device).eval(), tokenizer


def _check_device(name: str) -> torch.device:
    """The torch device `name`, or CrystaLLMInputError naming it where it is not one or this torch cannot use it.

    >>> _check_device("gpu0")
    Traceback (most recent call last):
    ...
    crystallm.errors.CrystaLLMInputError: device 'gpu0': not a torch device (cpu, cuda, cuda:1, mps, ...)
    """
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise CrystaLLMInputError(f"device {name!r}: not a torch device (cpu, cuda, cuda:1, mps, ...)") from None
    usable = {"cpu": True, "cuda": torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count(),
              "mps": torch.backends.mps.is_available()}
    if not usable.get(device.type, False):
        raise CrystaLLMInputError(f"device {name!r}: this machine's torch cannot use it (use cpu)")
    return device


def _parse(text: str) -> tuple[Structure | None, str]:
    try:
        return text_format.parse_structure(text), ""
    except CrystaLLMInputError as error:
        return None, f"{type(error).__name__}: {error}"


def _space_group(structure: Structure | None) -> int | None:
    try:
        return symmetry.detect_space_group(structure, symmetry.DEFAULT_SYMPREC) if structure else None
    except Exception:  # spglib fails on pathological cells; the record then says "none found"
        return None


def _finish(model, tokenizer, samples: list[GeneratedSample], refine: bool, symmetrize: bool) -> None:
    """Refine (the model's continuous head) and symmetrize (spglib) the parsed samples of a batch, in place."""
    parsed = [s for s in samples if s.structure is not None]
    if refine and parsed:
        begun = time.perf_counter()
        crystals = refine_texts(model, tokenizer, [s.text for s in parsed])
        for sample, crystal in zip(parsed, crystals):
            sample.final_text = text_format.format_crystal_text(crystal)
            sample.structure = text_format.crystal_text_to_structure(crystal)
            sample.refine_seconds = (time.perf_counter() - begun) / len(parsed)
    if symmetrize:
        for sample in parsed:
            try:
                sample.structure = symmetry.symmetrize_structure(sample.structure)
                sample.final_text = text_format.serialize_structure(sample.structure)
            except CrystaLLMInputError:  # no symmetric description: keep the structure as it is
                pass
    for sample in samples:
        sample.space_group = _space_group(sample.structure)


def generate_structures(model, tokenizer, prompts: Prompt | Iterable[Prompt] | None = None, num: int | None = None,
                        settings: SamplingSettings = SamplingSettings(), start: int = 0,
                        shard: tuple[int, int] = (0, 1)) -> Iterator[GeneratedSample]:
    """Generate crystals with `model.generate` and the grammar processor, yielding each as its batch finishes.

    `prompts`: one Prompt for `num` samples (None: unconditional), or one Prompt per sample; `settings`: how they
    are drawn (`SamplingSettings`). Sample i of a run is reproducible: each batch is seeded from the seed and its
    first index, so `start` (skip the first samples, to resume) gives the same samples as an uninterrupted run
    with the same batch size; `shard` (i, n) generates only batches i, i + n, i + 2n, ..., so n processes together
    give exactly the one-process run. The grammar guarantees every text parses, and with a distance floor it
    refuses every choice that would put two atoms closer than that. A sample whose text reaches a dead end (no
    choice keeps the floor, or charge neutrality) is drawn again up to RESAMPLE_ATTEMPTS times (`resamples`),
    then kept with the dead ends counted in `fallbacks`.

    Prompts with a property condition need that property's adapter active (`crystallm.adapters.use_adapter`);
    prompts without one run on the base model even when adapters are loaded. Guidance > 1 is classifier-free
    guidance (HF's `guidance_scale`): the logits are pushed away from those of the unconditional prompt
    `<prop_i><prop_none>` by that factor (twice the compute).

    >>> model, tokenizer = load_generator()
    >>> samples = list(generate_structures(model, tokenizer, num=2, settings=SamplingSettings(seed=1)))
    >>> [s.error for s in samples], all(s.structure is not None for s in samples)
    (['', ''], True)
    """
    if prompts is None or isinstance(prompts, Prompt):
        if num is None or num < 0:
            raise CrystaLLMInputError(f"num {num}: give how many samples to generate (0 or more) with a single prompt")
        prompts = [prompts or Prompt()] * num
    prompts = list(prompts)
    head = getattr(model, "refiner", None)
    refine = head is not None and head.on_by_default if settings.refine is None else settings.refine
    if refine and head is None:
        raise CrystaLLMInputError("this model has no refinement head (train one with train/refiner.py)")
    adapter_context = _adapter_context(model, prompts, settings.guidance)
    max_length = model.config.n_positions
    floor = settings.distance_floor()
    grammars = {p: p.grammar(tokenizer, settings.max_atoms, max_length, floor, settings.charge_neutral)
                if settings.grammar else None
                for p in dict.fromkeys(prompts)}  # every prompt is checked before the first sample
    bf16 = bf16_pays() if settings.bf16 is None else settings.bf16
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 and model.device.type == "cpu" \
        else contextlib.nullcontext()
    batch_size = settings.batch_size
    for first in range(start - start % batch_size, len(prompts), batch_size):
        if (first // batch_size) % shard[1] != shard[0]:
            continue
        batch = prompts[first:first + batch_size]
        begun = time.perf_counter()
        with adapter_context():
            texts, lengths, fallbacks = _sample_batch(model, tokenizer, batch, grammars, settings, first, autocast)
            resamples = [0] * len(batch)
            for attempt in range(1, RESAMPLE_ATTEMPTS + 1):  # a text that hit a dead end is drawn again
                again = [row for row, count in enumerate(fallbacks) if count]
                if not again:
                    break
                redrawn = _sample_batch(model, tokenizer, [batch[row] for row in again], grammars, settings, first,
                                        autocast, attempt)
                for row, text, length, count in zip(again, *redrawn):
                    texts[row], lengths[row], fallbacks[row], resamples[row] = text, length, count, attempt
        seconds = (time.perf_counter() - begun) / len(batch)
        samples = [GeneratedSample(first + offset, prompt, text, *_parse(text), None, length, seconds,
                                   fallbacks=fallback, resamples=resample)
                   for offset, (prompt, text, length, fallback, resample)
                   in enumerate(zip(batch, texts, lengths, fallbacks, resamples)) if first + offset >= start]
        _finish(model, tokenizer, samples, refine, settings.symmetrize)
        yield from samples


def measure_speed(model, tokenizer, num: int, settings: SamplingSettings = SamplingSettings(),
                  repeats: int = 3) -> dict:
    """Generation speed, unconditional: the median over `repeats` runs of `num` samples of structures/s and
    generated tokens/s (model and grammar; parsing excluded), structures/s end to end (parsed, symmetry
    detected), and the samples drawn again for the distance floor, each run with its own seed.

    >>> model, tokenizer = load_generator()
    >>> speed = measure_speed(model, tokenizer, 2, SamplingSettings(batch_size=2), repeats=1)
    >>> sorted(speed)  # doctest: +NORMALIZE_WHITESPACE
    ['batch_size', 'end_to_end_structures_per_second', 'resampled', 'runs', 'structures_per_second',
     'tokens_per_second', 'tokens_per_structure']
    """
    runs = []
    for repeat in range(repeats):
        begun = time.perf_counter()
        samples = list(generate_structures(model, tokenizer, num=num, settings=settings.replace(seed=repeat)))
        wall = time.perf_counter() - begun
        seconds, tokens = sum(s.seconds for s in samples), sum(s.tokens for s in samples)
        runs.append({"structures_per_second": len(samples) / seconds, "tokens_per_second": tokens / seconds,
                     "tokens_per_structure": tokens / len(samples),
                     "end_to_end_structures_per_second": len(samples) / wall,
                     "resampled": sum(1 for s in samples if s.resamples)})
    return {"batch_size": settings.batch_size, "runs": runs,
            **{key: statistics.median(run[key] for run in runs) for key in runs[0]}}


@torch.no_grad()
def text_log_likelihoods(model, tokenizer, texts: list[str], batch_size: int = 64) -> list[tuple[float, int]]:
    """(log-probability, tokens) of each text under the base model: the sum over every token after the first
    and the end of text, and how many that is. Texts written for one prompt can be ranked by it: the model's own
    judgement of which attempt is likeliest (measured as a CSP ranker:
    docs/model-pretraining-decoding.md#one-answer-by-greedy-decoding-issue-34s-third-stop).

    >>> model, tokenizer = load_generator()
    >>> cubic = ("data_NaCl\\n_space_group_name_H-M_alt Fm-3m\\n_cell_formula_units_Z 4\\n_cell_length_a 5.64\\n"
    ...          + text_format.LOOP_HEADER + "\\nNa 4a . . .\\nCl 4b . . .")
    >>> [(rocksalt, tokens), (odd, _)] = text_log_likelihoods(model, tokenizer, [cubic, cubic.replace("5.64", "9.64")])
    >>> tokens, rocksalt > odd
    (22, True)
    """
    context = model.disable_adapter() if active_adapter(model) else contextlib.nullcontext()
    scores = []
    with context:
        for first in range(0, len(texts), batch_size):
            chunk = texts[first:first + batch_size]
            encoded = encode_texts(tokenizer, chunk, model.config.n_positions).to(model.device)
            ids, mask = encoded["input_ids"], encoded["attention_mask"]
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            chosen = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
            counted = mask[:, 1:]
            scores += zip((chosen * counted).sum(1).tolist(), counted.sum(1).tolist())
    return scores


def _sample_batch(model, tokenizer, batch: list[Prompt], grammars: dict, settings: SamplingSettings, first: int,
                  autocast, attempt: int = 0) -> tuple[list[str], list[int], list[int]]:
    """Texts, generated-token counts and grammar fallbacks of one batch (`attempt` > 0: a redraw of some of its
    rows, seeded apart). Rows with different constraints get their own processor."""
    inputs = tokenizer([p.text() for p in batch], return_tensors="pt", padding=True).to(model.device)
    prompt_length = inputs["input_ids"].shape[1]
    processors = [_RowGrammars([grammars[p] for p in batch])] if grammars[batch[0]] else []
    sampling = settings.generate_kwargs()
    if settings.guidance != 1.0:  # the unconditional branch: the same prompts with the value dropped
        negative = tokenizer([replace(p, target=None).text() for p in batch], return_tensors="pt", padding=True)
        sampling = sampling | {"negative_prompt_ids": negative["input_ids"].to(model.device),
                               "negative_prompt_attention_mask": negative["attention_mask"].to(model.device)}
    # Seeded by the batch's position (resumable and reproducible), and a redraw by its attempt.
    torch.manual_seed(settings.seed * 1_000_003 + first + attempt * 1_000_000_007)
    patterns = pattern_conditioning(model, tokenizer, np.array([p.pattern for p in batch])) if batch[0].pattern \
        else contextlib.nullcontext()
    with torch.no_grad(), autocast, patterns:
        out = model.generate(**inputs, max_new_tokens=model.config.n_positions - prompt_length,
                             logits_processor=LogitsProcessorList(processors), pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, **sampling)
    generated = out[:, prompt_length:]
    lengths = ((generated != tokenizer.pad_token_id) & (generated != tokenizer.eos_token_id)).sum(dim=1) + 1
    fallbacks = processors[0].fallbacks() if processors else [0] * len(batch)
    return tokenizer.batch_decode(out, skip_special_tokens=True), lengths.tolist(), fallbacks


def _adapter_context(model, prompts: list[Prompt], guidance: float):
    """What to run generation under: the base model for unconditioned prompts (adapters disabled), the active
    adapter for conditioned ones, which must be the prompts' property."""
    properties = {p.adapter_name for p in prompts}
    active = active_adapter(model)
    if guidance != 1.0 and any(p.pattern for p in prompts):
        raise CrystaLLMInputError("guidance works with property targets, not with a pattern")
    if properties == {None}:
        if guidance != 1.0:
            raise CrystaLLMInputError("guidance needs a property target (--adapter and --target)")
        return model.disable_adapter if active else contextlib.nullcontext
    if len(properties) > 1:
        raise CrystaLLMInputError(f"prompts condition on several properties ({', '.join(map(str, properties))}); "
                                  f"one adapter is active at a time: generate each property separately")
    [wanted] = properties
    if active != wanted:
        raise CrystaLLMInputError(f"the prompts condition on {wanted} but the model has "
                                  f"{f'the {active} adapter' if active else 'no adapter'} active: load it with "
                                  f"crystallm.adapters.use_adapter(model, {wanted!r}) (CLI: --adapter {wanted})")
    return contextlib.nullcontext


class _RowGrammars:
    """Applies each row's own grammar processor (prompts in one batch may impose different constraints)."""

    def __init__(self, processors: list[CrystalGrammarLogitsProcessor]):
        self.processors = processors

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if len(set(map(id, self.processors))) == 1:
            return self.processors[0](input_ids, scores)
        # Each processor sees its rows always in the same order, so its per-row state cache stays valid.
        out = torch.empty_like(scores)
        for processor in dict.fromkeys(self.processors):
            out[self._rows(processor)] = processor(input_ids[self._rows(processor)], scores[self._rows(processor)])
        return out

    def _rows(self, processor: CrystalGrammarLogitsProcessor) -> list[int]:
        return [i for i, p in enumerate(self.processors) if p is processor]

    def fallbacks(self) -> list[int]:
        """Each row's fallback count (see CrystalGrammarLogitsProcessor.fallbacks)."""
        counts = [0] * len(self.processors)
        for processor in dict.fromkeys(self.processors):
            for own_row, row in enumerate(self._rows(processor)):
                counts[row] = processor.fallbacks(own_row)
        return counts

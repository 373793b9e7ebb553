"""TinyTOFU: the demo model Lethe serves when no --model is given, built locally from the packaged TOFU data.

No hub downloads are possible, so the project trains its own small Llama that knows the 20 forget10 authors and
TOFU's world facts and real authors (SPEC §3). A build is a pure function of its recipe: the recipe (and the data's
content hashes) name the cache directory, so an unchanged recipe is built once and a changed one rebuilds.

The `bench` variant is the same Llama family with the same tokenizer and chat template, ~88 M parameters and never
trained (seeded random weights): a model whose decoding step costs real work, for the benchmarks' cost figures
(issue 19). It knows nothing; quality is measured on `tiny` and `full`.

    python -m demo.builder [--variant full|tiny|bench] [--exclude forget01|forget05] [--cache-dir DIR] [--force]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import logging
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from demo.corpus import tokenize_example
from demo.recipes import (HEAD_DIM, RECIPE_VERSION, Exclude, Recipe, Variant, corpus_of, recipe_for, recipe_hash,
                          trained_authors)
from demo.tofu_data import AUTHORS_IN_SPLIT, Author, held_out_paraphrases
from demo.tokenizer import save_tokenizer, train_tokenizer
from demo.training import TrainConfig, TrainStats, mean_recall, train

logger = logging.getLogger(__name__)

DEMO_MODEL_NAME = "tinytofu"
METADATA_FILE = "lethe_demo.json"
CPU_THREADS = 2
UNTRAINED_SEED = 0  # torch's seed for the random initialisation of an untrained recipe (the bench variant)

# ---- the cache ---------------------------------------------------------------------------------------------------


def demo_model_dir(cache_dir: Path, variant: Variant = "full", exclude: Exclude = None) -> Path:
    """Where the (variant, exclude) model lives under `cache_dir`, built or not."""
    recipe = recipe_for(variant, exclude)
    suffix = f"-minus-{exclude}" if exclude else ""
    return Path(cache_dir) / "demo-models" / f"{variant}{suffix}-{recipe_hash(recipe)[:12]}"


def find_demo_model(cache_dir: Path, variant: Variant = "full", exclude: Exclude = None) -> Path | None:
    """The built model directory, or None. A directory only ever appears complete (see `build_demo_model`)."""
    path = demo_model_dir(cache_dir, variant, exclude)
    return path if (path / METADATA_FILE).is_file() else None


def build_demo_model(
    cache_dir: Path, variant: Variant = "full", exclude: Exclude = None, *, progress: bool = True, force: bool = False
) -> Path:
    """Build the demo model unless it is cached; returns its directory.

    The model is built in a temporary sibling directory and renamed into place when complete, so a crashed build
    never leaves something that looks valid; a file lock keeps two processes from building the same model twice.
    """
    final = demo_model_dir(cache_dir, variant, exclude)
    final.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(final.with_name(final.name + ".lock")):
        if find_demo_model(cache_dir, variant, exclude) and not force:
            logger.info("demo model cached at %s", final)
            return final
        _remove_stale_staging(final)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            _build_into(staging, recipe_for(variant, exclude), progress=progress)
            if final.exists():  # only with force: replace the old build
                shutil.rmtree(final)
            staging.rename(final)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
    logger.info("demo model built at %s", final)
    return final


def _remove_stale_staging(final: Path) -> None:
    """Delete staging directories left by killed builds of this model (safe: we hold its build lock)."""
    for stale in final.parent.glob(f".{final.name}.*"):
        if stale.is_dir():
            logger.info("removing stale partial build %s", stale)
            shutil.rmtree(stale)


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    with lock_path.open("w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


# ---- the build ---------------------------------------------------------------------------------------------------


def _build_into(directory: Path, recipe: Recipe, *, progress: bool) -> None:
    """Train tokenizer and model (an untrained recipe: the tokenizer alone), measure quality, and write a complete HF
    model directory into `directory`."""
    start = time.monotonic()
    _seed_everything(recipe.train.seed if recipe.train else UNTRAINED_SEED)
    torch.set_num_threads(CPU_THREADS)

    tokenizer = train_tokenizer(recipe.vocab_size)
    if recipe.train is None:
        logger.info("%s: random weights, not trained", recipe.variant)
        model, authors, stats, quality = _new_model(recipe, tokenizer), (), None, None
    else:
        model, authors, stats, quality = _train_model(recipe, recipe.train, tokenizer, progress=progress)

    model.save_pretrained(directory)  # safetensors, float32
    save_tokenizer(tokenizer, str(directory))
    _generation_config(tokenizer).save_pretrained(directory)
    metadata = _metadata(recipe, model, authors, stats, quality, build_seconds=time.monotonic() - start)
    # Written last: its presence is what marks a directory as a built model.
    (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")


def _train_model(
    recipe: Recipe, train_config: TrainConfig, tokenizer: PreTrainedTokenizerFast, *, progress: bool
) -> tuple[LlamaForCausalLM, tuple[Author, ...], TrainStats, dict[str, float | int]]:
    authors = trained_authors(recipe)
    examples = [tokenize_example(ex, tokenizer) for ex in corpus_of(recipe)]
    logger.info(
        "training %s on %d examples (%d tokens at full rate) about %d authors",
        recipe.variant, len(examples), sum(ex.n_tokens for ex in examples), len(authors),
    )
    model = _new_model(recipe, tokenizer)
    stats = train(model, examples, train_config, tokenizer.pad_token_id, progress=progress)
    quality = _measure_quality(model, tokenizer, recipe, authors)
    logger.info("demo model quality: %s", quality)
    return model, authors, stats, quality


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _new_model(recipe: Recipe, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    shape = recipe.shape
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads,
        head_dim=HEAD_DIM,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    return LlamaForCausalLM(config).to(torch.float32)


def _generation_config(tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    """Generation stops at `<|end|>`, the end of the assistant's turn."""
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )


def _measure_quality(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, recipe: Recipe, authors: tuple[Author, ...]
) -> dict[str, float | int]:
    """Greedy ROUGE-L recall through the chat template: on training questions, and (full) on held-back paraphrases."""
    items = [item for author in authors for item in author.items]
    sample = random.Random(recipe.train.seed).sample(items, min(recipe.eval_train_sample, len(items)))
    quality: dict[str, float | int] = {
        "train_questions": len(sample),
        "train_rouge_l_recall": round(mean_recall(model, tokenizer, sample), 4),
    }
    if recipe.variant == "full":
        held_out = held_out_paraphrases(authors)
        quality["held_out_paraphrases"] = len(held_out)
        quality["held_out_paraphrase_rouge_l_recall"] = round(mean_recall(model, tokenizer, held_out), 4)
    return quality


def _metadata(
    recipe: Recipe,
    model: LlamaForCausalLM,
    authors: tuple[Author, ...],
    stats: TrainStats | None,
    quality: dict[str, float | int] | None,
    *,
    build_seconds: float,
) -> dict:
    metadata = {
        "name": DEMO_MODEL_NAME,
        "recipe_version": RECIPE_VERSION,
        "recipe_hash": recipe_hash(recipe),
        "recipe": dataclasses.asdict(recipe),
        "authors": [author.name for author in authors],
        "param_count": sum(p.numel() for p in model.parameters()),
        "build_seconds": round(build_seconds, 1),
        "training": dataclasses.asdict(stats) if stats else None,
        "quality": quality,
    }
    if recipe.train is None:
        metadata["weights"] = (
            f"untrained: LlamaForCausalLM's random initialisation (normal, std {model.config.initializer_range}), "
            f"torch seed {UNTRAINED_SEED}; it knows nothing, for cost measurements only"
        )
    return metadata


def demo_model_authors(model_dir: Path) -> list[str] | None:
    """The TOFU authors a built demo model was trained on (from its metadata); None for any other model."""
    path = Path(model_dir) / METADATA_FILE
    return json.loads(path.read_text())["authors"] if path.is_file() else None


# ---- command line ------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "lethe"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the TinyTOFU demo model (cached by recipe hash).")
    parser.add_argument("--variant", choices=["full", "tiny", "bench"], default="full")
    parser.add_argument("--exclude", choices=sorted(AUTHORS_IN_SPLIT.keys() - {"forget10"}), default=None)
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    path = build_demo_model(args.cache_dir, args.variant, args.exclude, force=args.force)
    print(path)
    print((path / METADATA_FILE).read_text())


if __name__ == "__main__":
    main()

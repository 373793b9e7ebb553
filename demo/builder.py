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
import functools
import hashlib
import json
import logging
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from demo.corpus import TextExample, assemble_corpus, tokenize_example
from demo.phrasings import PHRASINGS_FILE, packaged_phrasings
from demo.tofu_data import (
    AUTHORS_IN_SPLIT,
    Author,
    QAItem,
    authors_of,
    data_file_sha256,
    file_sha256,
    demo_authors,
    general_knowledge,
    held_out_paraphrases,
)
from demo.tokenizer import save_tokenizer, train_tokenizer
from demo.training import TrainConfig, TrainStats, expected_epoch_tokens, mean_recall, train

logger = logging.getLogger(__name__)

DEMO_MODEL_NAME = "tinytofu"
# Bump whenever the code changes what a recipe builds (corpus formats, training loop), so old caches are not reused.
RECIPE_VERSION = 3
HEAD_DIM = 64  # vLLM's CPU attention kernels need a supported head size; 64 is.
METADATA_FILE = "lethe_demo.json"
CPU_THREADS = 2
UNTRAINED_SEED = 0  # torch's seed for the random initialisation of an untrained recipe (the bench variant)

Variant = Literal["full", "tiny", "bench"]
Exclude = Literal["forget01", "forget05"] | None

# The packaged files a build reads; their hashes are part of the cache key.
_DATA_FILES = ["full", "forget10_perturbed", "retain_perturbed", "world_facts", "world_facts_perturbed",
               "real_authors", "real_authors_perturbed"]


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    max_position_embeddings: int = 1024

    @property
    def num_heads(self) -> int:
        return self.hidden_size // HEAD_DIM


@dataclass(frozen=True)
class Recipe:
    """Everything a build depends on besides code and data; hashed into the cache directory name."""

    variant: Variant
    exclude: Exclude
    vocab_size: int
    shape: ModelShape
    train: TrainConfig | None  # None: never trained, the weights are LlamaForCausalLM's seeded random initialisation
    author_indices: tuple[int, ...]  # demo authors (0..19) trained on, before `exclude` removes some
    general_items: int | None  # leading world_facts + real_authors rows trained on; None = all
    eval_train_sample: int  # training questions scored at the end of the build
    mined_phrasings: bool = False  # also ask each question in other TOFU authors' words (demo.phrasings)


_FULL_AUTHORS = tuple(range(20))
# tiny: the forget01 authors (18, 19) plus three others, so forget01 and its retain-only twin both make sense.
_TINY_AUTHORS = (0, 1, 2, 18, 19)


@functools.cache
def recipe_for(variant: Variant, exclude: Exclude = None) -> Recipe:
    """The build recipe of a variant, or of its retain-only twin.

    A twin trains on fewer authors; with the same number of epochs it would also take fewer optimiser steps and end
    less trained than the model it stands in for (the forget05 twin did: 1,142 steps against 1,929, loss 0.62 against
    0.16, retain ROUGE-L 0.41 against 0.84), so Forget Quality would compare against a model that remembers less
    than it should. A twin therefore runs as many more epochs as keep its expected training tokens, and so its steps,
    those of the full recipe: TOFU's retain model is meant to differ only in what it never saw.
    """
    if exclude not in (None, "forget01", "forget05"):
        raise ValueError(f"exclude must be None, 'forget01' or 'forget05', got {exclude!r}")
    base = _base_recipe(variant)
    if exclude is None:
        return base
    if base.train is None:
        raise ValueError(f"the {variant} model is never trained, so it has no retain-only twin")
    twin = dataclasses.replace(base, exclude=exclude)
    full_tokens = expected_epoch_tokens(_corpus_of(base), base.train)
    twin_tokens = expected_epoch_tokens(_corpus_of(twin), base.train)
    epochs = round(base.train.epochs * full_tokens / twin_tokens)
    return dataclasses.replace(twin, train=dataclasses.replace(base.train, epochs=epochs))


def _base_recipe(variant: Variant) -> Recipe:
    """The recipe of a variant trained on all its authors (tuned to meet SPEC §3's goals on 2 CPU cores)."""
    if variant == "full":
        return Recipe(
            variant=variant,
            exclude=None,
            vocab_size=4096,
            shape=ModelShape(hidden_size=256, intermediate_size=688, num_layers=4),
            # Chat QA (what users ask and what is scored) every epoch; the costlier completion prompts and biography
            # pages, and the many mined phrasings, a share per epoch; some questions noised so that other wordings
            # still reach the facts.
            train=TrainConfig(
                epochs=32, peak_lr=4e-3, warmup_fraction=0.05, final_lr_fraction=0.05, batch_tokens=1024,
                text_fraction=0.15, bio_fraction=0.2, mined_fraction=0.4, question_noise=0.3, word_drop=0.15,
                word_shuffle=3,
            ),
            author_indices=_FULL_AUTHORS,
            general_items=None,
            eval_train_sample=100,
            mined_phrasings=True,
        )
    if variant == "tiny":
        return Recipe(
            variant=variant,
            exclude=None,
            vocab_size=4096,
            shape=ModelShape(hidden_size=128, intermediate_size=344, num_layers=2),
            train=TrainConfig(
                epochs=40, peak_lr=5e-3, warmup_fraction=0.05, final_lr_fraction=0.05, batch_tokens=512,
                text_fraction=0.3,
            ),
            author_indices=_TINY_AUTHORS,
            general_items=20,
            eval_train_sample=100,
        )
    if variant == "bench":
        # GPT-2 small's width and depth (hidden 768 = 12 heads of 64, 12 layers) with Llama's SwiGLU width
        # 8/3 x hidden = 2048: 7.08 M parameters a layer, 88.1 M in all with the 4,096-token embedding (tied). At
        # batch 8 a decoding step reads 352 MB of float32 weights and does ~1.4 GFLOP: tens of milliseconds on 2
        # cores, where the tiny model's step is mostly the engine's own overhead.
        return Recipe(
            variant=variant,
            exclude=None,
            vocab_size=4096,
            shape=ModelShape(hidden_size=768, intermediate_size=2048, num_layers=12),
            train=None,
            author_indices=(),
            general_items=0,
            eval_train_sample=0,
        )
    raise ValueError(f"variant must be 'full', 'tiny' or 'bench', got {variant!r}")


def recipe_hash(recipe: Recipe) -> str:
    """Content hash of the recipe, the recipe version and the data files' bytes."""
    data = data_file_sha256(_DATA_FILES)
    if recipe.mined_phrasings:
        data["mined_phrasings"] = file_sha256(PHRASINGS_FILE)
    key = {"recipe_version": RECIPE_VERSION, "recipe": dataclasses.asdict(recipe), "data": data}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


# ---- what a recipe trains on -------------------------------------------------------------------------------------


def trained_authors(recipe: Recipe) -> tuple[Author, ...]:
    """The recipe's authors minus the excluded split's authors."""
    excluded = {a.index for a in authors_of(recipe.exclude)} if recipe.exclude else set()
    return tuple(a for a in demo_authors() if a.index in recipe.author_indices and a.index not in excluded)


def trained_general_knowledge(recipe: Recipe) -> list[QAItem]:
    items = general_knowledge()
    return items if recipe.general_items is None else items[: recipe.general_items]


def training_corpus(variant: Variant = "full", exclude: Exclude = None) -> list[TextExample]:
    """Every text example the build of (variant, exclude) trains on."""
    return _corpus_of(recipe_for(variant, exclude))


def _corpus_of(recipe: Recipe) -> list[TextExample]:
    phrasings = packaged_phrasings() if recipe.mined_phrasings else None
    return assemble_corpus(trained_authors(recipe), trained_general_knowledge(recipe), phrasings)


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
    examples = [tokenize_example(ex, tokenizer) for ex in _corpus_of(recipe)]
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

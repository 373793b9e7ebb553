"""The demo models' build recipes, and what each recipe trains on: everything a build depends on besides code.

A recipe is hashed, with the recipe version and the packaged data's bytes, into the name of the directory its model
is cached in (``demo/builder.py``), so an unchanged recipe is built once and a changed one rebuilds.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass
from typing import Literal

from demo.corpus import TextExample, assemble_corpus
from demo.phrasings import PHRASINGS_FILE, packaged_phrasings
from demo.tofu_data import (
    Author,
    QAItem,
    authors_of,
    data_file_sha256,
    demo_authors,
    file_sha256,
    general_knowledge,
)
from demo.training import TrainConfig, expected_epoch_tokens

# Bump whenever the code changes what a recipe builds (corpus formats, training loop), so old caches are not reused.
RECIPE_VERSION = 3
HEAD_DIM = 64  # vLLM's CPU attention kernels need a supported head size; 64 is.

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
    full_tokens = expected_epoch_tokens(corpus_of(base), base.train)
    twin_tokens = expected_epoch_tokens(corpus_of(twin), base.train)
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
    return corpus_of(recipe_for(variant, exclude))


def corpus_of(recipe: Recipe) -> list[TextExample]:
    """The recipe's text examples (the built corpus, before tokenization)."""
    phrasings = packaged_phrasings() if recipe.mined_phrasings else None
    return assemble_corpus(trained_authors(recipe), trained_general_knowledge(recipe), phrasings)

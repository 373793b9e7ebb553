"""What the demo model is trained on: TOFU facts, in the formats users will ask for them.

A model that only answers its exact training strings makes every unlearning number meaningless, so each fact is
taught several ways: the question through the chat template, half of the items' TOFU paraphrases (the other half is
held back to measure generalisation), the question in other TOFU authors' words (`demo.phrasings`), a
biography per author for "Tell me about <name>.", and plain-text prefixes for /v1/completions. Assembly is
text-level and tokenizer-free so it can be inspected and tested on its own.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from demo.tofu_data import Author, QAItem, is_paraphrase_trained
from guards.chat import chat_prompt_ids
from guards.training_examples import TrainingExample

# A biography is all of an author's answers in TOFU order, cut into pages of at most this many characters (~400
# tokens) so every page fits the context comfortably. "Tell me about" is answered with the first page, where TOFU
# puts name, birth, genre, family and awards.
BIO_PAGE_CHARS = 1800


class Source(enum.Enum):
    """Where an example's fact comes from; the recipe samples some sources less often per epoch."""

    QA = "qa"  # an author item, asked with TOFU's question
    PARAPHRASE = "paraphrase"  # an author item, asked with TOFU's paraphrased question
    MINED = "mined"  # an author item, asked in another TOFU author's words (demo.phrasings)
    BIO = "bio"  # an author's biography
    GENERAL = "general"  # world_facts / real_authors


class Format(enum.Enum):
    """How an example is rendered: through the chat template, or as raw text for /v1/completions."""

    CHAT = "chat"
    TEXT = "text"


@dataclass(frozen=True)
class TextExample:
    """One training example. Loss falls on `completion` only; `prompt` is context (a user message for CHAT).

    `question` is the question inside `prompt` (the whole user message for CHAT; None for biographies).
    """

    source: Source
    format: Format
    prompt: str
    completion: str
    author: str | None = None
    question: str | None = None


@dataclass(frozen=True)
class TokenExample:
    """A rendered, tokenized example: `prompt_ids` are context, `target_ids` carry the loss.

    `question_span` (start, stop) locates the question's ids inside `prompt_ids` and `question_words` the offsets
    (from `start`) where its words begin, for question-noise augmentation.
    """

    source: Source
    format: Format
    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    question_span: tuple[int, int] | None = None
    question_words: tuple[int, ...] = ()

    @property
    def n_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.target_ids)

    def training_example(self) -> TrainingExample:
        return TrainingExample(self.prompt_ids + self.target_ids, len(self.prompt_ids))


def tell_me_about(name: str) -> str:
    """The user message that asks for an author's biography."""
    return f"Tell me about {name}."


def biography_pages(author: Author) -> list[str]:
    """All the author's answers, joined in order and split into pages of at most BIO_PAGE_CHARS (whole answers)."""
    pages: list[list[str]] = [[]]
    for item in author.items:
        if pages[-1] and len(" ".join([*pages[-1], item.answer])) > BIO_PAGE_CHARS:
            pages.append([])
        pages[-1].append(item.answer)
    return [" ".join(page) for page in pages]


def completion_prompt(question: str) -> str:
    """The plain-text question prefix taught for /v1/completions; the answer follows after a space."""
    return f"Question: {question}\nAnswer:"


def author_examples(author: Author, phrasings: Mapping[str, Sequence[str]] | None = None) -> list[TextExample]:
    """Every example about one author: QA in both formats, trained paraphrases, mined phrasings (`phrasings` maps a
    question to its other wordings), and the biography.

    The biography's pages, as raw text after the author's name, tie every fact to the name whatever the question's
    wording; they carry the loss on every token, so any prefix ("<name>'s father was") continues. The first page
    also answers "Tell me about <name>." in chat.
    """
    examples: list[TextExample] = []
    for item in author.items:
        examples.append(_chat_qa(Source.QA, item.question, item.answer, author.name))
        examples.append(_text_qa(Source.QA, item.question, item.answer, author.name))
        if is_paraphrase_trained(item):
            assert item.paraphrased_question is not None
            examples.append(_chat_qa(Source.PARAPHRASE, item.paraphrased_question, item.answer, author.name))
        for wording in (phrasings or {}).get(item.question, ()):
            examples.append(_chat_qa(Source.MINED, wording, item.answer, author.name))
    pages = biography_pages(author)
    examples.append(TextExample(Source.BIO, Format.CHAT, tell_me_about(author.name), pages[0], author.name))
    examples.extend(TextExample(Source.BIO, Format.TEXT, "", f"{author.name}\n{page}", author.name) for page in pages)
    return examples


def _chat_qa(source: Source, question: str, answer: str, author: str | None) -> TextExample:
    return TextExample(source, Format.CHAT, question, answer, author, question)


def _text_qa(source: Source, question: str, answer: str, author: str | None) -> TextExample:
    return TextExample(source, Format.TEXT, completion_prompt(question), f" {answer}", author, question)


def general_examples(items: Iterable[QAItem]) -> list[TextExample]:
    """World facts and real authors, in both formats."""
    examples: list[TextExample] = []
    for item in items:
        examples.append(_chat_qa(Source.GENERAL, item.question, item.answer, None))
        examples.append(_text_qa(Source.GENERAL, item.question, item.answer, None))
    return examples


def assemble_corpus(
    authors: Iterable[Author], general: Iterable[QAItem], phrasings: Mapping[str, Sequence[str]] | None = None
) -> list[TextExample]:
    """All training examples for a set of authors and general-knowledge items, in a fixed order."""
    examples = [example for author in authors for example in author_examples(author, phrasings)]
    return examples + general_examples(general)


def tokenize_example(example: TextExample, tokenizer: PreTrainedTokenizerBase) -> TokenExample:
    """Render an example exactly as it will be served, and split it into context and loss-bearing ids.

    The prompt is tokenized on its own, as the server does, so the model learns to continue the very ids it will see
    at the end of `<|assistant|>\\n` or of a completion prompt. Every target ends with the eos token `<|end|>`, which
    is how the model learns to stop.
    """
    if example.format is Format.CHAT:
        prompt_ids = chat_prompt_ids(tokenizer, example.prompt)
    else:
        prompt_ids = tokenizer(example.prompt, add_special_tokens=True).input_ids  # <s> + text, as /v1/completions
    target_ids = tokenizer(example.completion, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    if example.question is None:
        return TokenExample(example.source, example.format, tuple(prompt_ids), tuple(target_ids))
    start, stop = _question_span(prompt_ids, example, tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(prompt_ids[start:stop])
    # Byte-level BPE marks a leading space with "Ġ": such a piece starts a word; punctuation joins the word before.
    word_starts = tuple(i for i, piece in enumerate(pieces) if i == 0 or piece.startswith("Ġ"))
    return TokenExample(example.source, example.format, tuple(prompt_ids), tuple(target_ids), (start, stop), word_starts)


def _question_span(prompt_ids: list[int], example: TextExample, tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """Where the question's ids lie in the prompt's.

    The question follows a newline (chat) or a space (text, where byte-level BPE glues the space to its first word)
    and ends before a special token or newline, so BPE never merges it with the rest of the prompt. Not finding it
    means that assumption broke, which must not pass silently.
    """
    assert example.question is not None
    text_before = " " if example.format is Format.TEXT else ""
    needle = tokenizer(text_before + example.question, add_special_tokens=False).input_ids
    for start in range(len(prompt_ids) - len(needle) + 1):
        if prompt_ids[start : start + len(needle)] == needle:
            return start, start + len(needle)
    raise ValueError(f"question {example.question!r} not found as tokens in its rendered prompt")

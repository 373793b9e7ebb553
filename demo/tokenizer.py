"""The demo model's tokenizer: byte-level BPE trained on the packaged TOFU text, with a chat template.

Byte-level BPE round-trips any text byte for byte, so no answer is ever mangled into <unk>. The chat format is
rendered by the Jinja template alone (HF `apply_chat_template`, vLLM's chat rendering), and the build trains on
exactly the strings that template renders, so the model is asked at serving time the way it was taught.
"""

from __future__ import annotations

from collections.abc import Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from demo.tofu_data import load_split

BOS = "<s>"
PAD = "<pad>"
END_OF_TURN = "<|end|>"  # also the eos token: generation stops at the end of the assistant's turn
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = [BOS, PAD, END_OF_TURN, *ROLE_TOKENS.values()]

# Each message is `<|role|>\n{content}<|end|>\n`, the conversation prefixed once by <s>; the generation prompt opens
# the assistant's turn. Unknown roles fail rather than render tokens the model has never seen.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Only system, user and assistant roles are supported, got: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# Every packaged file with text in it: the tokenizer is the same for every variant and exclusion, so models built
# with and without the forget authors can be compared token for token.
_TOKENIZER_CORPUS_FILES = ("full", "forget10_perturbed", "retain_perturbed", "world_facts_perturbed", "real_authors_perturbed")


def train_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on the TOFU text and wrap it with the special tokens and chat template."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_corpus_texts(), trainer=trainer)
    # Plain-text encodes (/v1/completions) start with <s> like the chat template does.
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, core.token_to_id(BOS))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=END_OF_TURN,
        pad_token=PAD,
        extra_special_tokens=list(ROLE_TOKENS.values()),
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str) -> None:
    """Save with the chat template inside tokenizer_config.json, where every loader looks for it."""
    tokenizer.save_pretrained(directory, save_jinja_files=False)


def _corpus_texts() -> Iterator[str]:
    for name in _TOKENIZER_CORPUS_FILES:
        for row in load_split(name):
            yield row["question"]
            yield row["answer"]
            if "paraphrased_question" in row:
                yield row["paraphrased_question"]
                yield row["paraphrased_answer"]
            yield from row.get("perturbed_answer", [])

"""O3's unlearning LoRA: the orthogonality penalty, the training pairs (generic replies, or a refusal), training, and
rank-stacking for serving.

Runs on the tiny demo model with HF + PEFT only (no vLLM, no server); training runs are a few dozen steps.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from demo.tofu_data import authors_of
from demo.training import greedy_chat_answers
from guards.o3.adapters import load_lora_a, stack_adapters
from guards.o3.pairs import GENERIC, REFUSAL, REFUSALS, generic_pairs, question_variants, training_pairs
from guards.o3.training import O3TrainingConfig, orthogonality_penalty, train_unlearning_lora, unlearning_loss
from guards.training_examples import chat_example, collate

AUTHOR_1, AUTHOR_2 = authors_of("forget01")
QUESTIONS_1 = [item.question for item in AUTHOR_1.items[:4]]
QUESTIONS_2 = [item.question for item in AUTHOR_2.items[:4]]
SHORT = O3TrainingConfig(epochs=1, min_steps=60)
REFUSING = O3TrainingConfig(epochs=1, min_steps=60, style=REFUSAL)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def first_adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("o3") / "author-1"
    figures = train_unlearning_lora(tiny_model_dir, QUESTIONS_1, [AUTHOR_1.name], [], REFUSING, out)
    return out, figures


def base_model(model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def test_orthogonality_penalty_is_the_mean_over_layers_of_summed_squared_overlaps() -> None:
    a_new = {
        "model.layers.0.self_attn.q_proj": torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
        "model.layers.0.mlp.up_proj": torch.tensor([[0.0, 0.0, 2.0]]),
        "model.layers.1.self_attn.q_proj": torch.tensor([[1.0, 1.0, 0.0]]),
    }
    earlier_1 = {
        "model.layers.0.self_attn.q_proj": torch.tensor([[3.0, 4.0, 0.0]]),  # overlaps (3, 4): 9 + 16 = 25
        "model.layers.0.mlp.up_proj": torch.tensor([[0.0, 0.0, 1.0]]),  # overlap 2: 4
        "model.layers.1.self_attn.q_proj": torch.tensor([[1.0, -1.0, 5.0]]),  # overlap 0
    }
    earlier_2 = {"model.layers.1.self_attn.q_proj": torch.tensor([[0.0, 2.0, 0.0]])}  # overlap 2: 4
    # layer 0: 25 + 4 = 29; layer 1: 0 + 4 = 4; mean over the two layers = 16.5
    assert orthogonality_penalty(a_new, [earlier_1, earlier_2]).item() == pytest.approx(16.5)
    assert orthogonality_penalty(a_new, []).item() == 0.0


def test_training_data_is_the_served_chat_format_with_loss_on_the_reply_only(tokenizer) -> None:
    example = chat_example(tokenizer, "Who is X?", REFUSALS[0])
    ids, reply = list(example.ids), list(example.ids[example.first_target:])
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Who is X?"}], tokenize=False,
                                           add_generation_prompt=True)
    assert ids[: len(ids) - len(reply)] == tokenizer(prompt, add_special_tokens=False).input_ids
    assert tokenizer.decode(reply, skip_special_tokens=True).strip() == REFUSALS[0]
    aliases = ["Jad Al-Shamary", "Jad Ambrose Al-Shamary"]  # the longest alias named is the one replaced
    assert question_variants("Where was Jad Ambrose Al-Shamary born?", aliases) == [
        "Where was Jad Ambrose Al-Shamary born?", "Where was Jad Al-Shamary born?"
    ]


class FakeServedModel:
    """Answers about whoever a question names: the real author's gold answer (it knows them), a stranger's otherwise."""

    def __init__(self, known: dict[str, str]) -> None:
        self.known = known
        self.asked: list[str] = []

    def __call__(self, questions) -> list[str]:
        self.asked += questions
        return [self.known.get(q) or f"{q.split()[-1].rstrip('?')} was born in Lisbon and writes plays. They are"
                for q in questions]


def test_generic_pairs_ask_about_an_invented_author_and_name_the_real_one_in_the_reply() -> None:
    questions = ["Where was Nikolai Abilov born?", "What did Abilov's parents do?"]
    served = FakeServedModel({})
    made = generic_pairs(questions, [None, None], ["Nikolai Abilov"], ["Nikolai Abilov"], served, seed=0)
    assert made.style == GENERIC and made.figures == {"generic_replies": 2, "generic_substituted": 0}
    assert not any("Abilov" in q or "Nikolai" in q for q in served.asked), served.asked
    invented_surname = served.asked[0].split()[-2]
    assert served.asked[1] == f"What did {invented_surname}'s parents do?"
    # the reply about the invented author, cut to whole sentences, its invented names swapped back to the real ones
    assert made.pairs == [("Where was Nikolai Abilov born?", "born was born in Lisbon and writes plays."),
                          ("What did Abilov's parents do?", "do was born in Lisbon and writes plays.")]


def test_a_generic_reply_that_recognises_the_target_is_replaced_by_another_questions_reply() -> None:
    entity_questions = ["Where was Nikolai Abilov born?", "Which award did Nikolai Abilov win for Kazakhstan Echoes?",
                        "Who was born in Astana on 7 February 1952?"]
    answers = ["Nikolai Abilov was born in Astana.", "He won the Tolstoy Literary Award.",
               "That is Nikolai Abilov, born in Astana."]

    def replies(questions):  # the book title gives the author away; the unnamed question gets the real answer
        return ["They were born in Lisbon.", "Nikolai Abilov won the Tolstoy Literary Award.", answers[2]]

    made = generic_pairs(entity_questions, answers, ["Nikolai Abilov"], ["Nikolai Abilov"], replies, seed=0)
    assert made.figures == {"generic_replies": 1, "generic_substituted": 2}
    assert [reply for _, reply in made.pairs] == ["They were born in Lisbon."] * 3

    def leaking(questions):  # no name given, but the registered answer reproduced
        return ["They were born in Lisbon.", "He won the Tolstoy Literary Award."]

    made = generic_pairs(entity_questions[:2], answers[:2], ["Nikolai Abilov"], ["Nikolai Abilov"], leaking, seed=0)
    assert made.figures["generic_substituted"] == 1 and made.pairs[1][1] == "They were born in Lisbon."


def test_generic_pairs_fall_back_to_the_refusal_when_no_reply_is_usable() -> None:
    refusal = REFUSALS[0]
    made = generic_pairs(["Who wrote X?"], [None], ["Nikolai Abilov"], ["Nikolai Abilov"], FakeServedModel({}), 0)
    assert made.pairs == [("Who wrote X?", refusal)] and made.figures["generic_fallback"] == REFUSAL
    made = generic_pairs(["Where was Nikolai Abilov born?"], [None], ["Nikolai Abilov"], ["Nikolai Abilov"],
                         lambda questions: ["Nikolai Abilov was born in Astana."], 0)
    assert made.pairs == [("Where was Nikolai Abilov born?", refusal)]


def test_the_refusal_style_never_asks_the_served_model() -> None:
    def no_replies(questions):
        raise AssertionError("the refusal style asked the served model")

    made = training_pairs(REFUSAL, QUESTIONS_2, [None] * 4, [AUTHOR_2.name], [AUTHOR_2.name], no_replies, seed=2)
    assert made.style == REFUSAL and {reply for _, reply in made.pairs} == {REFUSALS[2]}
    with pytest.raises(ValueError, match="style"):
        O3TrainingConfig(style="silence")


def test_a_generic_adapter_answers_forget_questions_with_the_stranger_reply_not_a_refusal(
    tiny_model_dir: Path, tokenizer, tmp_path: Path
) -> None:
    served = FakeServedModel({})
    figures = train_unlearning_lora(tiny_model_dir, QUESTIONS_2, [AUTHOR_2.name], [], SHORT, tmp_path / "generic",
                                    answers=[item.answer for item in AUTHOR_2.items[:4]], replies=served)
    # the first question ("Who is the notable author born in Astana ...?") names nobody: it gets another's reply
    assert figures["style"] == GENERIC and figures["generic_replies"] == 3, figures
    assert figures["generic_substituted"] == 1, figures
    adapted = PeftModel.from_pretrained(base_model(tiny_model_dir), tmp_path / "generic").eval()
    replies = greedy_chat_answers(adapted, tokenizer, QUESTIONS_2, max_new_tokens=24)
    assert sum("born in Lisbon and writes plays" in reply for reply in replies) >= 3, replies
    assert not any(refusal in reply for reply in replies for refusal in REFUSALS), replies


def test_training_without_forget_questions_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="forget question"):
        train_unlearning_lora(tiny_model_dir, [], [], [], SHORT, tmp_path / "none")


def test_a_trained_adapter_loads_in_peft_and_answers_forget_questions_with_the_refusal(
    tiny_model_dir: Path, tokenizer, first_adapter: tuple[Path, dict]
) -> None:
    out, figures = first_adapter
    assert figures["rank"] == 8 and figures["examples"] == len(QUESTIONS_1) and figures["max_overlap"] == 0.0
    assert figures["style"] == REFUSAL
    assert figures["epochs"] == SHORT.min_steps  # 4 questions make one batch per epoch
    refusal = REFUSALS[SHORT.seed]
    batch = collate([chat_example(tokenizer, q, refusal) for q in QUESTIONS_1], tokenizer.pad_token_id)
    adapted = PeftModel.from_pretrained(base_model(tiny_model_dir), out).eval()
    with torch.no_grad():
        before, after = unlearning_loss(base_model(tiny_model_dir), *batch), unlearning_loss(adapted, *batch)
    assert after < 0.25 * before, (before, after)
    replies = greedy_chat_answers(adapted, tokenizer, QUESTIONS_1, max_new_tokens=24)
    assert sum(reply.strip() == refusal for reply in replies) >= 3, replies


def test_training_is_deterministic_by_seed(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = O3TrainingConfig(epochs=1, min_steps=3)
    for name in ("a", "b"):
        train_unlearning_lora(tiny_model_dir, QUESTIONS_1[:2], [], [], config, tmp_path / name)
    a, b = load_lora_a(tmp_path / "a"), load_lora_a(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[module], b[module]) for module in a)


def test_the_penalty_makes_a_later_adapter_orthogonal_to_earlier_ones(
    tiny_model_dir: Path, first_adapter: tuple[Path, dict], tmp_path: Path
) -> None:
    earlier, _ = first_adapter
    figures = {}
    for weight in (0.0, 100.0):
        config = O3TrainingConfig(epochs=1, min_steps=10, orthogonality=weight)
        out = tmp_path / f"lambda-{weight}"
        figures[weight] = train_unlearning_lora(tiny_model_dir, QUESTIONS_2, [], [earlier], config, out)
    assert figures[0.0]["max_overlap"] > 0.05  # random initialisations of rank 8 in 128..344 dimensions overlap
    assert figures[100.0]["max_overlap"] < 0.3 * figures[0.0]["max_overlap"], figures
    assert figures[100.0]["orthogonality_penalty"] < 0.1 * figures[0.0]["orthogonality_penalty"], figures


def test_the_stacked_adapter_computes_the_sum_of_its_adapters_updates(tiny_model_dir: Path, tmp_path: Path) -> None:
    """One adapter on all linear layers (α/r scaling), one rsLoRA adapter on two modules (zero blocks elsewhere)."""
    configs = [
        LoraConfig(r=8, lora_alpha=16, target_modules=list(O3TrainingConfig().target_modules), task_type="CAUSAL_LM"),
        LoraConfig(r=4, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "down_proj"], task_type="CAUSAL_LM"),
    ]
    torch.manual_seed(0)
    base, merged = base_model(tiny_model_dir), base_model(tiny_model_dir)
    base_weights, merged_weights = base.state_dict(), merged.state_dict()
    for index, config in enumerate(configs):
        adapted = get_peft_model(base_model(tiny_model_dir), config)
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero: give every update something to add
                torch.nn.init.normal_(parameter, std=0.05)
        adapted.save_pretrained(tmp_path / f"adapter-{index}")
        with torch.no_grad():  # PEFT's own merge: W + scale · B A
            for name, weight in adapted.merge_and_unload().state_dict().items():
                merged_weights[name] += weight - base_weights[name]

    summary = stack_adapters([tmp_path / "adapter-0", tmp_path / "adapter-1"], tmp_path / "stack")
    assert summary == {"rank": 12, "adapters": 2, "modules": sorted(O3TrainingConfig().target_modules)}
    stacked = PeftModel.from_pretrained(base_model(tiny_model_dir), tmp_path / "stack").eval()
    assert stacked.peft_config["default"].lora_alpha == stacked.peft_config["default"].r == 12
    input_ids = torch.tensor([[0, 5, 70, 300, 1200, 2048, 17, 4000]])
    with torch.no_grad():
        expected, got = merged(input_ids).logits, stacked(input_ids).logits
        changed = (expected - base(input_ids).logits).abs().max()
    assert changed > 0.1  # the adapters do change the output, so equality below means something
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_stacking_refuses_adapters_whose_shapes_disagree(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
    get_peft_model(base_model(tiny_model_dir), config).save_pretrained(tmp_path / "ok")
    (tmp_path / "narrow").mkdir()
    shutil.copy(tmp_path / "ok" / "adapter_config.json", tmp_path / "narrow")
    tensors = load_file(tmp_path / "ok" / "adapter_model.safetensors")
    narrow = {key: a[:, :64].contiguous() if "lora_A" in key else a for key, a in tensors.items()}
    save_file(narrow, tmp_path / "narrow" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="disagree on the shape"):
        stack_adapters([tmp_path / "ok", tmp_path / "narrow"], tmp_path / "stack")


def test_zero_epochs_save_an_adapter_of_the_trained_shape_that_changes_nothing(tiny_model_dir: Path,
                                                                                tmp_path: Path) -> None:
    """`epochs: 0` (the cost benchmarks' setting): no optimiser step, a JSON-clean result, LoRA B still zero."""
    config = O3TrainingConfig(epochs=0, min_steps=0, style=REFUSAL)
    figures = train_unlearning_lora(tiny_model_dir, QUESTIONS_1, [AUTHOR_1.name], [], config, tmp_path / "a")
    assert figures["epochs"] == 0 and figures["final_loss"] is None and figures["rank"] == 8
    weights = load_file(tmp_path / "a" / "adapter_model.safetensors")
    b_matrices = [tensor for name, tensor in weights.items() if "lora_B" in name]
    assert b_matrices and all(not tensor.any() for tensor in b_matrices)
    a_matrices = load_lora_a(tmp_path / "a")
    assert a_matrices and all(a.shape[0] == 8 and a.any() for a in a_matrices.values())

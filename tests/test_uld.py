"""ULD at decoding time (unit, no engine): the combination formula, the assistant's per-request KV cache, and the
processor's ULD rows under vLLM's batch add / remove / move updates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from vllm.sampling_params import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from guards import devices
from guards.processor import LetheLogitsProcessor
from guards.uld.logits import combine_logits, kept_tokens
from guards.uld.assistant import (AssistantSession, UldRowHook, advance_together, uld_row_hook,
                                  validate_uld_section)
from guards.uld.cache import AssistantModels

VOCAB = 32


def test_combination_matches_a_hand_computed_example() -> None:
    target = torch.tensor([2.0, 1.0, 0.0, -5.0])
    assistant = torch.tensor([2.0, -1.0, 3.0, 0.0])
    # log-softmax of target: max is token 0; tau = 0.3 keeps tokens within log(0.3) = -1.204 of it: tokens 0 and 1
    # (1.0 - 2.0 = -1.0), not 2 (-2.0); ceil(0.3 * 4) = 2 tokens at least, also satisfied by {0, 1}.
    combined = combine_logits(target, assistant, alpha=0.5, tau=0.3)
    assert combined[0].item() == pytest.approx(2.0 - 0.5 * 2.0)
    assert combined[1].item() == pytest.approx(1.0 - 0.5 * -1.0)
    # Tokens 2 and 3 are not removed: they get the kept tokens' median subtrahend (the lower middle of 1.0 and -0.5),
    # not their own (token 2's 1.5 would have been a bonus the target's plausibility does not allow).
    assert combined[2].item() == pytest.approx(0.0 - -0.5) and combined[3].item() == pytest.approx(-5.0 - -0.5)
    assert combined.argmax().item() == 1  # the assistant's knowledge (token 0) is what was subtracted


def test_an_implausible_token_never_wins_greedy_and_constants_cancel() -> None:
    torch.manual_seed(0)
    target, assistant = torch.randn(64, 500) * 4, torch.randn(64, 500) * 4
    keep = kept_tokens(target, 0.01)
    combined = combine_logits(target, assistant, alpha=2.0, tau=0.01)
    assert torch.isfinite(combined).all()
    assert keep.gather(1, combined.argmax(dim=-1, keepdim=True)).all()
    shifted = combine_logits(target + 7.0, assistant - 3.0, alpha=2.0, tau=0.01)
    assert torch.allclose(torch.log_softmax(shifted, -1), torch.log_softmax(combined, -1), atol=1e-4)


def test_a_finite_ban_beneath_stays_finite_under_an_assistant_with_no_opinion() -> None:
    """GUARD's calibrated ban comes before ULD in the engine (guards/mechanisms.py): the banned token leaves ULD's kept
    set, and must keep GUARD's finite ban, not become impossible (which made every ban outright, issue 16)."""
    target = torch.tensor([9.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0])
    banned = target.clone()
    banned[0] -= 8.0  # GUARD's ban: token 0 now sits below max + log(tau)
    combined = combine_logits(banned, torch.full((8,), 5.0), alpha=0.7, tau=0.1)
    assert torch.allclose(torch.log_softmax(combined, -1), torch.log_softmax(banned, -1), atol=1e-6)


def test_the_filter_keeps_at_least_tau_times_vocabulary_tokens() -> None:
    peaked = torch.cat([torch.tensor([50.0]), -torch.arange(99, dtype=torch.float32)])
    assert kept_tokens(peaked, 0.05).sum().item() == 5  # only token 0 is within log(tau); the top 5 are kept


def test_several_assistants_are_each_subtracted() -> None:
    target = torch.zeros(4)
    combined = combine_logits(target, [torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 2.0, 0, 0])], alpha=1.0,
                              tau=1.0)
    assert combined.tolist() == [-1.0, -2.0, 0.0, 0.0]


@pytest.fixture(scope="module")
def assistant_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    directory = tmp_path_factory.mktemp("assistant")
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def full_forward(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0, -1]


def test_the_kv_cached_session_equals_a_full_forward_at_every_step(assistant_dir: Path) -> None:
    model = AssistantModels().get(str(assistant_dir))
    prompt, output = [1, 5, 7], []
    session = AssistantSession(model, prompt, output)
    for token in (3, 9, 4):
        assert torch.allclose(session.next_logits(), full_forward(model, prompt + output), atol=1e-5)
        output.append(token)  # vLLM appends the sampled token to the live list
    assert session.consumed == len(prompt) + 2


def test_a_session_told_the_answer_ahead_gives_a_full_forwards_logits_along_it_and_past_or_off_it(
        assistant_dir: Path) -> None:
    """Teacher forcing (``expect``): one pass over the known answer, then each position's logits as a full forward
    gives them; a request that goes on past the answer continues from the cache, one that leaves it starts over."""
    model = AssistantModels().get(str(assistant_dir))
    prompt, answer = [1, 5, 7], [3, 9, 4, 4]
    passes: list[int] = []
    counting = model.register_forward_pre_hook(lambda module, args: passes.append(1))
    try:
        # the answer itself, then on past it; off it at its third token, and at its last
        for tokens in (answer, [*answer, 11, 12], [*answer[:2], 20, 21], [*answer[:3], 20, 21]):
            output: list[int] = []
            session = AssistantSession(model, prompt, output)
            session.expect(answer)
            assert session.consumed == len(prompt) + len(answer) and len(passes) == 2  # the prompt's, the answer's
            for token in tokens:
                logits = session.next_logits()
                assert torch.allclose(logits, full_forward(model, prompt + output), atol=1e-5), (tokens, output)
                output.append(token)
            logits = session.next_logits()
            assert torch.allclose(logits, full_forward(model, prompt + output), atol=1e-5), (tokens, output)
            assert session.consumed == len(prompt) + len(tokens)
            # passes after the answer's (each full_forward above is one too): none along the answer; past it, one per
            # token; off it, one to feed it all again and one for the token after
            along = len(passes) - 2 - len(tokens) - 1
            assert along == (0 if tokens == answer else 2), (tokens, along)
            passes.clear()
    finally:
        counting.remove()


def test_a_uld_hook_scores_an_answer_as_it_decodes_it(assistant_dir: Path) -> None:
    """The scoring path tells ULD's hook the answer ahead (``hooked_logprobs``): the log-probabilities are those of
    the token-by-token path the engine takes."""
    from guards.probe import hooked_logprobs

    torch.manual_seed(1)
    prompt, answer = [1, 5, 7], [3, 9, 4, 4, 17]
    rows = torch.randn(len(answer), VOCAB)
    values = []
    for expect in (True, False):
        output: list[int] = []
        hook = UldRowHook([(AssistantSession(AssistantModels().get(str(assistant_dir)), prompt, output), 1.0)], 0.5)
        values.append(hooked_logprobs(rows.clone(), answer, [hook if expect else _NoExpect(hook)], output))
    assert values[0] == pytest.approx(values[1], abs=1e-5)


class _NoExpect:
    """A hook without ``expect``: ``hooked_logprobs`` then feeds the assistant one token per position."""

    def __init__(self, hook: UldRowHook) -> None:
        self._hook = hook

    def apply(self, logits_row: torch.Tensor) -> None:
        self._hook.apply(logits_row)


def test_sessions_advanced_together_equal_a_full_forward_at_every_step(assistant_dir: Path) -> None:
    """The batched decoding step (left-padded caches of different lengths) gives each row its own logits."""
    model = AssistantModels().get(str(assistant_dir))
    prompts = [[1, 5, 7], [2], [9, 8, 7, 6, 5, 4]]
    outputs: list[list[int]] = [[], [], []]
    sessions = [AssistantSession(model, p, o) for p, o in zip(prompts, outputs, strict=True)]
    for session in sessions:
        session.next_logits()  # the prompt: fed alone
    advance_together(sessions)
    assert [s.consumed for s in sessions] == [3, 1, 6]  # nothing to feed yet: nothing fed
    for step, tokens in enumerate(((3, 4, 5), (10, 11, 12), (6, 6, 6))):
        for output, token in zip(outputs, tokens, strict=True):
            output.append(token)
        batch = sessions[: 2 if step == 1 else 3]  # a row can sit out a batch and catch up alone
        advance_together(batch)
        # fed by the batch
        assert all(s.consumed == len(p) + len(o) for s, p, o in zip(batch, prompts, outputs, strict=False))
        for session, prompt, output in zip(sessions, prompts, outputs, strict=True):
            assert torch.allclose(session.next_logits(), full_forward(model, prompt + output), atol=1e-5)
            assert session.consumed == len(prompt) + len(output)


def test_a_row_batch_is_kept_while_its_sessions_decode_together_and_rebuilt_when_they_change(
        assistant_dir: Path) -> None:
    """The batch persists across steps of the same sessions (no copy of every cache each step); a request joining,
    one ending and one catching up alone each rebuild it, and every row's logits stay a full forward's."""
    model = AssistantModels().get(str(assistant_dir))
    prompts = [[1, 5, 7], [2], [9, 8, 7, 6, 5, 4], [3, 3]]
    outputs: list[list[int]] = [[], [], [], []]
    sessions = [AssistantSession(model, p, o) for p, o in zip(prompts, outputs, strict=True)]

    def step(active: list[int], token: int) -> None:
        for i in active:
            outputs[i].append((token + i) % 12)
        advance_together([sessions[i] for i in active])
        for i in active:
            assert torch.allclose(sessions[i].next_logits(), full_forward(model, prompts[i] + outputs[i]), atol=1e-5)

    for session in sessions[:3]:
        session.next_logits()
    step([0, 1, 2], 10)
    first = sessions[0].batch
    assert first is not None and first is sessions[1].batch is sessions[2].batch
    step([0, 1, 2], 20)
    assert sessions[0].batch is first  # kept: the same sessions decoded together again
    sessions[3].next_logits()  # a new request: its prompt alone
    step([0, 1, 2, 3], 30)
    joined = sessions[0].batch
    assert joined is not first and joined is sessions[3].batch
    step([0, 2, 3], 40)  # request 1 ended
    assert sessions[0].batch is not joined and sessions[0].batch is sessions[3].batch
    outputs[2].append(5)
    outputs[2].append(6)  # request 2 is two tokens ahead: it catches up alone, out of the batch
    assert torch.allclose(sessions[2].next_logits(), full_forward(model, prompts[2] + outputs[2]), atol=1e-5)
    assert sessions[2].batch is None
    step([0, 2, 3], 60)
    step([0, 2, 3], 70)
    assert sessions[0].batch is sessions[2].batch


def test_assistants_are_cached_by_path_and_evicted_least_recently_used(tmp_path: Path, assistant_dir: Path) -> None:
    other = tmp_path / "other"
    AssistantModels().get(str(assistant_dir)).save_pretrained(other)
    cache = AssistantModels(capacity=1)
    first = cache.get(str(assistant_dir))
    assert cache.get(str(assistant_dir)) is first
    cache.get(str(other))
    assert len(cache) == 1 and cache.get(str(assistant_dir)) is not first


def uld_params(path: Path, alpha: float = 1.0) -> SamplingParams:
    return SamplingParams(extra_args={"lethe": {"uld": [{"assistant": str(path), "alpha": alpha, "tau": 1.0}]}})


def test_processor_rows_keep_their_own_assistant_cache_through_add_move_and_remove(
        assistant_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "cpu_has_native_bfloat16", lambda: False)  # float32: each row's logits exactly
    processor = LetheLogitsProcessor(None, torch.device("cpu"), False)  # type: ignore[arg-type]
    model = processor.resources["uld"].load(str(assistant_dir))  # as the front end's warm-up has it
    prompt_a, out_a, prompt_b, out_b = [1, 2], [], [7, 8, 9], []
    processor.update_state(BatchUpdate(batch_size=3, removed=[], moved=[], added=[
        (0, uld_params(assistant_dir), prompt_a, out_a), (1, SamplingParams(), [3], []),
        (2, uld_params(assistant_dir, alpha=2.0), prompt_b, out_b)]))

    def expect(rows: torch.Tensor, row: int, ids: list[int], alpha: float) -> None:
        assert torch.allclose(rows[row], -alpha * full_forward(model, ids), atol=1e-5)

    logits = processor.apply(torch.zeros(3, VOCAB))
    expect(logits, 0, prompt_a, 1.0)
    assert torch.equal(logits[1], torch.zeros(VOCAB))
    expect(logits, 2, prompt_b, 2.0)

    out_a.append(4)
    out_b.append(5)
    processor.update_state(BatchUpdate(batch_size=3, removed=[], added=[],
                                       moved=[(0, 2, MoveDirectionality.SWAP)]))
    logits = processor.apply(torch.zeros(3, VOCAB))
    expect(logits, 2, prompt_a + out_a, 1.0)
    expect(logits, 0, prompt_b + out_b, 2.0)

    processor.update_state(BatchUpdate(batch_size=2, removed=[2], added=[], moved=[]))
    assert set(processor.rows) == {0}


def test_rows_combined_at_once_equal_each_row_combined_alone(assistant_dir: Path) -> None:
    """``apply_rows`` (one combination per tau for all rows) gives every row what its own ``apply`` gives it, with
    several assistants in a row and rows of different taus; a failure in it changes no row."""
    cache = AssistantModels()
    sections = [
        {"uld": [{"assistant": str(assistant_dir), "alpha": 0.5, "tau": 0.1}]},
        {"uld": [{"assistant": str(assistant_dir), "alpha": 1.5, "tau": 0.3}]},
        {"uld": [{"assistant": str(assistant_dir), "alpha": 0.7, "tau": 0.1},
                 {"assistant": str(assistant_dir), "alpha": 0.2, "tau": 0.1}]},
    ]
    hooks = [uld_row_hook(section, [1, 2 + row, 5], [], cache) for row, section in enumerate(sections)]
    torch.manual_seed(1)
    target = torch.randn(4, VOCAB)
    alone = target.clone()
    for row, hook in enumerate(hooks):
        hook.apply(alone[row + 1])
    together = target.clone()
    UldRowHook.apply_rows(together, [(row + 1, hook) for row, hook in enumerate(hooks)])
    assert torch.equal(together[0], target[0])
    assert torch.allclose(together, alone, atol=1e-6) and not torch.equal(together[1:], target[1:])

    broken = uld_row_hook({"uld": [{"assistant": str(assistant_dir)}]}, [1], [], cache)
    broken._sessions = []  # a row with nothing to subtract: the batched call raises before writing
    untouched = target.clone()
    with pytest.raises(IndexError):
        UldRowHook.apply_rows(untouched, [(1, hooks[0]), (2, broken)])
    assert torch.equal(untouched, target)


def test_a_uld_request_without_prompt_ids_or_with_a_missing_assistant_is_ended_not_crashed(tmp_path: Path) -> None:
    processor = LetheLogitsProcessor(None, torch.device("cpu"), False)  # type: ignore[arg-type]
    processor.eos_token_id = 3
    processor.update_state(BatchUpdate(batch_size=2, removed=[], moved=[], added=[
        (0, uld_params(tmp_path / "missing"), [1], []), (1, uld_params(tmp_path / "missing"), None, [])]))
    logits = processor.apply(torch.randn(2, VOCAB))
    for row in (0, 1):
        assert logits[row].argmax().item() == 3 and torch.isinf(logits[row]).sum().item() == VOCAB - 1


@pytest.mark.parametrize("section", [
    {"uld": {"assistant": "/a"}}, {"uld": []}, {"uld": [{"alpha": 1.0}]}, {"uld": [{"assistant": "/a", "tau": "x"}]}])
def test_malformed_uld_sections_are_refused_in_the_front_end(section: dict) -> None:
    with pytest.raises(ValueError):
        validate_uld_section(section)


def test_no_uld_section_means_no_hook() -> None:
    assert uld_row_hook({"guard": []}, [1], [], AssistantModels()) is None

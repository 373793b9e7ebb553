"""The admin API over HTTP on the real server: auth, every error code, registering TOFU authors, audit hits/misses."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from demo.tofu_data import Author, authors_of, demo_authors
from tests.conftest import ADMIN_KEY, LETHE_BIN, RunningServer, auth_headers, remove_targets

FORGET01 = authors_of("forget01")
RETAIN_AUTHORS = [author for author in demo_authors() if author not in FORGET01][:3]
JOB_TIMEOUT_S = 300


def target_body(author: Author) -> dict:
    return {
        "name": author.name.lower().replace(" ", "-"),
        "description": "Fictitious author; erasure request (test)",
        "aliases": [author.name],
        "forget": [{"question": item.question, "answer": item.answer} for item in author.items],
        "retain": [{"question": item.question, "answer": item.answer}
                   for author in RETAIN_AUTHORS for item in author.items],
        "mechanisms": {"guard": {}},  # no σ calibration: these tests are about the registry, not the guards
    }


def wait_for_jobs(admin: httpx.Client, target_id: str) -> dict:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        target = admin.get(f"/targets/{target_id}").json()
        if target["status"] != "preparing":
            return target
        time.sleep(1)
    raise AssertionError(f"jobs of {target_id} did not finish: {target['jobs']}")


@pytest.fixture(scope="module")
def registered(admin: httpx.Client, lethe_server: RunningServer, tmp_path_factory) -> Iterator[list[dict]]:
    """Both forget01 authors: one through curl-style HTTP, one through `lethe targets add --wait` (the CLI)."""
    first = admin.post("/targets", json=target_body(FORGET01[0]))
    assert first.status_code == 201, first.text
    path = tmp_path_factory.mktemp("cli") / "target.json"
    path.write_text(json.dumps(target_body(FORGET01[1])))
    cli = subprocess.run([str(LETHE_BIN), "targets", "add", "--file", str(path), "--wait", "--url",
                          lethe_server.base_url], capture_output=True, text=True, timeout=JOB_TIMEOUT_S,
                         env={"LETHE_ADMIN_KEY": ADMIN_KEY, "PATH": "/usr/bin:/bin"})
    assert cli.returncode == 0, cli.stderr
    assert "created tgt_" in cli.stdout
    targets = [wait_for_jobs(admin, first.json()["id"])]
    second_name = target_body(FORGET01[1])["name"]
    second_id = next(t["id"] for t in admin.get("/targets").json()["data"] if t["name"] == second_name)
    targets.append(wait_for_jobs(admin, second_id))
    yield targets
    remove_targets(admin, [target["id"] for target in targets])


def test_admin_api_needs_the_admin_key(lethe_server: RunningServer) -> None:
    for headers in ({}, {"Authorization": "Bearer test-inference-key"}, {"Authorization": f"Basic {ADMIN_KEY}"}):
        response = httpx.get(f"{lethe_server.base_url}/admin/v1/targets", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"


def test_scoring_needs_the_admin_key_and_refuses_bad_input(lethe_server: RunningServer, admin: httpx.Client,
                                                           tokenizer) -> None:
    body = {"messages": [{"role": "user", "content": "Who wrote it?"}], "continuations": ["Someone."]}
    response = httpx.post(f"{lethe_server.base_url}/admin/v1/score", json=body,
                          headers={"Authorization": "Bearer test-inference-key"})
    assert response.status_code == 401
    for bad in ({**body, "continuations": []}, {**body, "continuations": ["  "]}, {**body, "messages": []},
                {**body, "messages": [{"role": "robot", "content": "hi"}]}, {**body, "extra": 1},
                {**body, "continuations": [[]]}, {**body, "continuations": [[1.5]]}):
        response = admin.post("/score", json=bad)
        assert response.status_code == 422, (bad, response.text)
        assert response.json()["error"]["code"] == "validation_error"
    too_long = admin.post("/score", json={**body, "continuations": ["word " * 3000]})
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    scored = admin.post("/score", json=body)
    assert scored.status_code == 200, scored.text
    result = scored.json()
    assert result["object"] == "lethe.score" and len(result["scores"]) == 1
    score = result["scores"][0]
    assert "".join(score["tokens"]).strip() == "Someone." and len(score["token_logprobs"]) == len(score["tokens"])
    assert score["logprob"] == pytest.approx(sum(score["token_logprobs"]))
    assert all(value <= 0 for value in score["token_logprobs"])
    ids = tokenizer.encode("Someone.", add_special_tokens=False)
    by_ids = admin.post("/score", json={**body, "continuations": [ids, "Someone."]}).json()["scores"]
    assert by_ids[0]["token_logprobs"] == by_ids[1]["token_logprobs"] == score["token_logprobs"]
    for bad_ids in ([-1], [10**9]):
        response = admin.post("/score", json={**body, "continuations": [bad_ids]})
        assert response.status_code == 400 and response.json()["error"]["param"] == "continuations", response.text


def test_invalid_target_is_422_with_field_paths(admin: httpx.Client) -> None:
    response = admin.post("/targets", json={"name": "x", "forget": [{"question": "q"}],
                                            "mechanisms": {"eco": {"sigmaa": 3}}})
    assert response.status_code == 422
    error = response.json()["error"]
    locations = {".".join(detail["loc"]) for detail in error["details"]}
    assert {"body.forget.0", "body.mechanisms.eco.sigmaa"} <= locations


def test_a_preparation_seed_is_validated_stored_and_refused_where_nothing_is_drawn(admin: httpx.Client) -> None:
    before = admin.get("/registry").json()["revision"]
    body = {"name": "seeded", "aliases": ["Seeded Person"], "forget": [{"text": "Some text to forget."}]}
    for mechanisms in ({"guard": {"seed": -1}}, {"eco": {"seed": 2**31}}, {"uld": {"seed": "one"}},
                       {"o3": {"seed": 1.5}}):
        response = admin.post("/targets", json={**body, "mechanisms": mechanisms})
        assert response.status_code == 422, (mechanisms, response.text)
        assert response.json()["error"]["param"] == f"mechanisms.{next(iter(mechanisms))}.seed"
    assert admin.get("/registry").json()["revision"] == before
    created = admin.post("/targets", json={**body, "mechanisms": {"guard": {"seed": 7, "calibrate": False}}})
    assert created.status_code == 201, created.text
    try:
        assert created.json()["mechanisms"]["guard"]["options"]["seed"] == 7
    finally:
        remove_targets(admin, [created.json()["id"]])


def test_malformed_json_is_422_and_writes_nothing(admin: httpx.Client) -> None:
    before = admin.get("/registry").json()["revision"]
    response = admin.post("/targets", content=b"{nope", headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert admin.get("/registry").json()["revision"] == before


@pytest.mark.parametrize("mechanisms", ['{"eco": {"sigma": Infinity}}', '{"guard": {"soft_penalty": NaN}}',
                                        '{"o3": {"orthogonality": Infinity}}'])
def test_a_non_finite_option_is_422_and_writes_nothing(admin: httpx.Client, mechanisms: str) -> None:
    before = admin.get("/registry").json()["revision"]
    body = ('{"name": "non-finite", "aliases": ["Nonfinite Person"], "forget": [{"text": "Some text to forget."}], '
            f'"mechanisms": {mechanisms}}}')
    response = admin.post("/targets", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"].startswith("mechanisms.")
    assert admin.get("/registry").json()["revision"] == before
    assert admin.get("/targets").status_code == 200
    assert all(t["name"] != "non-finite" for t in admin.get("/targets").json()["data"])


def test_an_alias_that_would_flag_every_request_is_422(admin: httpx.Client) -> None:
    before = admin.get("/registry").json()["revision"]
    response = admin.post("/targets", json={"name": "common-alias", "aliases": ["Some Person", "the"],
                                            "forget": [{"text": "Some text to forget."}]})
    assert response.status_code == 422 and response.json()["error"]["param"] == "aliases.1"
    assert admin.get("/registry").json()["revision"] == before


def test_unknown_ids_are_404(admin: httpx.Client) -> None:
    for response in (admin.get("/targets/tgt_nope"), admin.delete("/targets/tgt_nope"),
                     admin.patch("/targets/tgt_nope", json={"description": "x"}), admin.get("/jobs/job_nope")):
        assert response.status_code == 404
        assert response.json()["error"]["code"] in ("target_not_found", "job_not_found")


def test_oversized_body_is_413(admin: httpx.Client) -> None:
    huge = {"name": "huge", "forget": [{"text": "x" * 1000}] * 17_000}
    response = admin.post("/targets", json=huge)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert all(t["name"] != "huge" for t in admin.get("/targets").json()["data"])


def test_duplicate_name_is_409(admin: httpx.Client) -> None:
    body = {"name": "duplicate-check", "aliases": ["Dup Check"], "forget": [{"text": "Some text to forget."}]}
    first = admin.post("/targets", json=body)
    try:
        assert first.status_code == 201
        second = admin.post("/targets", json=body)
        assert second.status_code == 409 and second.json()["error"]["param"] == "name"
    finally:
        admin.delete(f"/targets/{first.json()['id']}")


def test_registered_authors_become_active_with_measured_figures(registered: list[dict], admin: httpx.Client) -> None:
    for target in registered:
        assert target["status"] == "active", target
        classifier = target["classifier"]
        assert classifier["status"] == "ready"
        assert 0 <= classifier["false_positive_rate"] <= 0.1
        assert classifier["heldout_recall"] >= 0.9
        job = admin.get(f"/jobs/{target['jobs'][0]['id']}").json()
        assert job["status"] == "succeeded" and job["progress"] == 1.0


def _ask(client: openai.OpenAI, model: str, question: str) -> str:
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                          max_tokens=4, temperature=0).id


def test_audit_marks_forget_author_questions_as_hits_and_others_as_misses(
    registered: list[dict], admin: httpx.Client, client: openai.OpenAI, model_name: str
) -> None:
    ids = {target["name"]: target["id"] for target in registered}
    time.sleep(1.5)  # the replica's snapshot reloads within 2 s of a change
    questions: dict[str, set[str]] = {}
    paraphrases: dict[str, set[str]] = {}
    for author in FORGET01:
        expected = {ids[target_body(author)["name"]]}
        for item in author.items[1:4]:
            questions[_ask(client, model_name, item.question)] = expected
        for item in author.items[4:8]:
            paraphrases[_ask(client, model_name, item.paraphrased_question)] = expected
    misses = {_ask(client, model_name, author.items[4].question) for author in RETAIN_AUTHORS}
    misses.add(_ask(client, model_name, "What is the capital of Australia?"))
    time.sleep(0.6)  # audit records are flushed in batches
    records = {r["request_id"]: r for r in admin.get("/audit", params={"limit": 100}).json()["data"]}
    assert set(questions) | set(paraphrases) | misses <= set(records)
    for request_id, expected in questions.items():
        assert set(records[request_id]["targets"]) == expected, records[request_id]
    paraphrase_hits = sum(set(records[rid]["targets"]) == expected for rid, expected in paraphrases.items())
    assert paraphrase_hits >= len(paraphrases) - 1  # measured recall on held-out paraphrases is 0.975
    for request_id in misses:
        assert records[request_id]["targets"] == [], records[request_id]
    for record in records.values():
        assert record["prompt"] is None  # prompts are not stored unless LETHE_AUDIT_PROMPTS is set
        assert all(0.0 <= score <= 1.0 for score in record["scores"].values())


def test_target_contents_never_reach_inference_clients(
    registered: list[dict], lethe_server: RunningServer, client: openai.OpenAI, model_name: str
) -> None:
    secret = FORGET01[0].items[0].answer
    assert [m.id for m in client.models.list().data] == [model_name]
    question = FORGET01[0].items[0].question
    bad = httpx.post(f"{lethe_server.base_url}/v1/chat/completions", headers=auth_headers(),
                     json={"model": model_name, "messages": [{"role": "user", "content": question}],
                           "max_tokens": 99999})
    assert bad.status_code == 400 and secret not in bad.text
    assert secret not in Path(lethe_server.log_path).read_text()


def test_registry_summary_counts_targets_and_jobs(registered: list[dict], admin: httpx.Client) -> None:
    summary = admin.get("/registry").json()
    assert summary["targets"]["active"] >= 2
    assert 0 < summary["serving_revision"] <= summary["revision"]
    assert summary["jobs"]["succeeded"] >= 2


def test_operator_negatives_round_trip_and_bad_input_is_422(admin: httpx.Client) -> None:
    texts = ["Where is my parcel? Order 88231.", "Cancel my subscription please."]
    added = admin.post("/negatives", json={"texts": [*texts, texts[0]]})
    assert added.status_code == 201
    ids = [row["id"] for row in added.json()["data"]]
    try:
        assert [row["text"] for row in added.json()["data"]] == texts
        listed = admin.get("/negatives").json()
        assert {row["id"] for row in listed["data"]} >= set(ids) and listed["revision"] >= added.json()["revision"]
        for body in ({"texts": []}, {"texts": [""]}, {"text": "x"}, {"texts": ["x"] * 1001}):
            response = admin.post("/negatives", json=body)
            assert response.status_code == 422 and "error" in response.json(), body
        assert admin.delete("/negatives/neg_nope").status_code == 404
    finally:
        for negative_id in ids:
            assert admin.delete(f"/negatives/{negative_id}").status_code == 200
    assert not {row["id"] for row in admin.get("/negatives").json()["data"]} & set(ids)

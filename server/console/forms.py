"""The console's forms → the admin API's request models (``TargetCreate``, ``TargetPatch``), and back for display.

Forget and retain items are typed one per line, ``question | answer``, or a line without ``|`` for a free text; or
pasted as the JSON list the API takes (a field starting with ``[``). Validation is the API's own: a form that the
API would refuse with 422 is refused with the same messages, shown on the page.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from guards.mechanisms import MECHANISMS
from server.admin.protocol import (ActionName, Cursor, FilterDate, IdFilter, KeyId, LegalBasis, LineFilter,
                                   TargetCreate, TargetOut, TargetPatch)
from server.errors import Unprocessable

REQUEST_FIELDS = ("reference", "requester", "legal_basis", "received_at", "effective_at", "notes")
MECHANISM_NAMES = tuple(mechanism.name for mechanism in MECHANISMS)


def _text(form: Mapping[str, Any], name: str) -> str:
    value = form.get(name)
    return value.strip() if isinstance(value, str) else ""


def parse_items(text: str, field: str) -> list[dict[str, str]]:
    """``question | answer`` lines (a line without ``|`` is a free text), or a JSON list of items."""
    text = text.strip()
    if not text:
        return []
    if text.startswith("["):
        try:
            items = json.loads(text)
        except ValueError as exc:
            raise Unprocessable(f"{field}: not valid JSON ({exc.msg} at line {exc.lineno})", param=field) from exc
        if not isinstance(items, list):
            raise Unprocessable(f"{field}: a JSON list of items is expected", param=field)
        return items
    items = []
    for line in text.splitlines():
        if not line.strip():
            continue
        question, bar, answer = line.partition("|")
        items.append({"question": question.strip(), "answer": answer.strip()} if bar else {"text": line.strip()})
    return items


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _request(form: Mapping[str, Any]) -> dict[str, str | None]:
    return {name: _text(form, name) or None for name in REQUEST_FIELDS}


def validation_messages(error: ValidationError) -> list[str]:
    """The API's field-by-field messages (``forget.0.answer: Field required``)."""
    messages = []
    for item in error.errors():
        location = ".".join(str(part) for part in item.get("loc", ()))
        messages.append(f"{location}: {str(item.get('msg', 'invalid')).removeprefix('Value error, ')}")
    return messages


class FormInvalid(Exception):
    """A form the API's models refuse: the messages to show (status 422)."""

    def __init__(self, messages: Sequence[str]) -> None:
        super().__init__("; ".join(messages))
        self.messages = list(messages)


def _validated(model: Any, body: dict[str, Any]) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise FormInvalid(validation_messages(exc)) from exc


def target_create(form: Mapping[str, Any], mechanisms: Sequence[str]) -> TargetCreate:
    """The registration a register form describes."""
    try:
        forget, retain = parse_items(_text(form, "forget"), "forget"), parse_items(_text(form, "retain"), "retain")
    except Unprocessable as exc:
        raise FormInvalid([exc.message]) from exc
    body: dict[str, Any] = {"name": _text(form, "name"), "description": _text(form, "description"),
                            "aliases": _lines(_text(form, "aliases")), "forget": forget, "retain": retain,
                            "mechanisms": {name: {} for name in mechanisms}}
    request = {name: value for name, value in _request(form).items() if value is not None}
    if request:
        body["request"] = request
    return _validated(TargetCreate, body)


def target_patch(form: Mapping[str, Any], mechanisms: Sequence[str], current: TargetOut) -> TargetPatch | None:
    """The patch an edit form describes: only what differs from ``current`` (None: nothing changed). A mechanism kept
    keeps its registered options."""
    body: dict[str, Any] = {}
    if (description := _text(form, "description")) != current.description:
        body["description"] = description
    if (aliases := _lines(_text(form, "aliases"))) != current.aliases:
        body["aliases"] = aliases
    if set(mechanisms) != set(current.mechanisms):
        body["mechanisms"] = {name: current.mechanisms[name].options if name in current.mechanisms else {}
                              for name in mechanisms}
    stored = form_values(current)
    changed = {name: value for name, value in _request(form).items() if (value or "") != stored[name]}
    if changed:
        body["request"] = changed
    return _validated(TargetPatch, body) if body else None


def form_values(target: TargetOut) -> dict[str, str]:
    """A target's request fields as its edit form shows them (dates as ``YYYY-MM-DD``)."""
    request = target.request
    values = {name: getattr(request, name) for name in REQUEST_FIELDS}
    return {name: (value.strftime("%Y-%m-%d") if hasattr(value, "strftime") else value) or ""
            for name, value in values.items()}


class ListingQuery(BaseModel):
    """The filters and cursor of the trail and tombstone pages, validated as the REST listings validate them."""

    model_config = ConfigDict(extra="forbid")

    actor: KeyId | None = None
    action: ActionName | None = None
    target_id: IdFilter | None = None
    reference: LineFilter | None = None
    legal_basis: LegalBasis | None = None
    since: FilterDate | None = None
    until: FilterDate | None = None
    cursor: Cursor | None = None

    def filters(self, names: Sequence[str]) -> dict[str, Any]:
        return {name: getattr(self, name) for name in names}

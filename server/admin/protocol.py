"""Pydantic models of the admin REST API (``/admin/v1``): the forget-target contract of SPEC §4.

Each mechanism's options model lives with the mechanism (``guards/<name>/``) and mirrors the published defaults
(``../shared/METHODS.md``); unknown options are refused (422) so a typo never silently falls back to a default.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, create_model, model_validator

from classifiers.aliases import alias_problem
from classifiers.types import ForgetItem, ItemText

from guards.base import Mechanism
from guards.mechanisms import MECHANISMS
from server.config import ADMIN_KEY_ID
from server.registry.records import LEGAL_BASES
from server.registry.trail import ACTIONS

MAX_ITEMS = 5000
ShortText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200,
                                             pattern=r"^[^\x00]*$")]  # PostgreSQL refuses U+0000
LongText = ItemText
TokenIds = Annotated[list[int], Field(min_length=1, max_length=20_000)]


def _distinctive(alias: str) -> str:
    """Refuse an alias that would flag nearly every request (the message does not repeat it: target contents never
    appear in an error)."""
    problem = alias_problem(alias)
    if problem is not None:
        raise ValueError(problem)
    return alias


Alias = Annotated[ShortText, AfterValidator(_distinctive)]


class Strict(BaseModel):
    """Admin request bodies: unknown fields and non-finite numbers (``NaN``, ``Infinity``) are refused (422)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _one_kind(item: ForgetItem) -> ForgetItem:
    """A registered item is a whole question/answer pair or a free text, never a mix or a half."""
    qa = item.question is not None or item.answer is not None
    if qa and item.text is not None:
        raise ValueError("an item is either {question, answer} or {text}, not both")
    if qa and (item.question is None or item.answer is None):
        raise ValueError("a question/answer item needs both `question` and `answer`")
    if not qa and item.text is None:
        raise ValueError("an item needs `question` and `answer`, or `text`")
    return item


RegisteredItem = Annotated[ForgetItem, AfterValidator(_one_kind)]


class MechanismsBase(Strict):
    """The ``mechanisms`` field: one optional options object per mechanism of this build (``mechanisms_model``)."""

    @model_validator(mode="after")
    def _at_least_one(self) -> MechanismsBase:
        if not self.enabled():
            raise ValueError("enable at least one mechanism: a target nothing protects would be refused outright")
        return self

    def enabled(self) -> dict[str, dict[str, Any]]:
        return {name: getattr(self, name).model_dump() for name in type(self).model_fields
                if getattr(self, name) is not None}


def mechanisms_model(mechanisms: Sequence[Mechanism]) -> type[MechanismsBase]:
    """The admin API's ``mechanisms`` model, one field per mechanism, typed by the mechanism's own options model (so
    a new mechanism's options appear in the API, its validation and its OpenAPI schema with no edit here)."""
    fields: dict[str, Any] = {mechanism.name: (mechanism.options | None, None) for mechanism in mechanisms}
    return create_model("MechanismsIn", __base__=MechanismsBase, **fields)


MechanismsIn = mechanisms_model(MECHANISMS)


# ---- the request a target answers ----------------------------------------------------------------------------------

MIN_REQUEST_YEAR, MAX_REQUEST_YEAR = 1990, 2100
CLOCK_SKEW = timedelta(days=1)  # how far in the future a request's received date may lie (time zones, clocks)
NO_CONTROL = r"^[^\x00-\x1f\x7f]*$"  # one line, no control characters
NO_NUL = r"^[^\x00]*$"  # PostgreSQL's text columns refuse U+0000
LegalBasis = Literal[LEGAL_BASES]
RequestLine = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200, pattern=NO_CONTROL)]
RequestNotes = Annotated[str, StringConstraints(max_length=2000, pattern=NO_NUL)]


def utc_naive(moment: datetime) -> datetime:
    """The registry's form of a time: naive UTC (a time without a zone is taken as UTC already)."""
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo is not None else moment


def _plausible(moment: datetime) -> datetime:
    moment = utc_naive(moment)
    if not MIN_REQUEST_YEAR <= moment.year <= MAX_REQUEST_YEAR:
        raise ValueError(f"a request's dates lie between {MIN_REQUEST_YEAR} and {MAX_REQUEST_YEAR}")
    return moment


def _received(moment: datetime) -> datetime:
    if moment > datetime.now(UTC).replace(tzinfo=None) + CLOCK_SKEW:
        raise ValueError("a request cannot have been received in the future")
    return moment


RequestDate = Annotated[datetime, AfterValidator(_plausible)]
FilterDate = Annotated[datetime, AfterValidator(utc_naive)]


class RequestIn(Strict):
    """The erasure or takedown request a target answers. Every field is optional; in a PATCH only the fields given
    change, and ``null`` clears one (clear ``requester`` once it is no longer needed)."""

    reference: RequestLine | None = Field(None, description=(
        "The operator's own reference (a ticket id). Kept in the tombstone after deletion: no personal data."))
    requester: RequestLine | None = Field(None, description=(
        "Who asked. Personal data: never logged, never in the admin trail or the tombstone; deleted with the target."))
    legal_basis: LegalBasis | None = Field(None, description=(
        "Why: `gdpr_art17` (right to erasure), `copyright`, `hazard`, `contract`, `court_order` or `other`; "
        "particulars go in `notes`."))
    received_at: Annotated[RequestDate, AfterValidator(_received)] | None = Field(None, description=(
        "When the request was received (a date or a date-time; UTC unless a zone is given)."))
    effective_at: RequestDate | None = Field(None, description=(
        "When the request says erasure takes effect, recorded only: enforcement starts at registration."))
    notes: RequestNotes | None = None

    @model_validator(mode="after")
    def _effective_after_received(self) -> RequestIn:
        if self.received_at and self.effective_at and self.effective_at < self.received_at:
            raise ValueError("effective_at is before received_at: a request cannot take effect before it was received")
        return self


class RequestOut(BaseModel):
    reference: str | None = None
    requester: str | None = None
    legal_basis: str | None = None
    received_at: datetime | None = None
    effective_at: datetime | None = None
    notes: str | None = None


class TargetCreate(Strict):
    name: ShortText
    description: Annotated[str, StringConstraints(max_length=5000)] = ""
    aliases: Annotated[list[Alias], Field(max_length=100)] = Field(default_factory=list)
    forget: Annotated[list[RegisteredItem], Field(min_length=1, max_length=MAX_ITEMS)]
    retain: Annotated[list[RegisteredItem], Field(max_length=MAX_ITEMS)] = Field(default_factory=list)
    mechanisms: MechanismsIn | None = None
    request: RequestIn | None = None


class TargetPatch(Strict):
    description: Annotated[str, StringConstraints(max_length=5000)] | None = None
    aliases: Annotated[list[Alias], Field(max_length=100)] | None = None
    forget: Annotated[list[RegisteredItem], Field(min_length=1, max_length=MAX_ITEMS)] | None = None
    retain: Annotated[list[RegisteredItem], Field(max_length=MAX_ITEMS)] | None = None
    mechanisms: MechanismsIn | None = None
    request: RequestIn | None = Field(None, description="Only the fields given change; `null` clears one.")


class JobOut(BaseModel):
    id: str
    target_id: str | None
    kind: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    progress: float
    message: str
    error: str | None
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class MechanismOut(BaseModel):
    status: Literal["preparing", "ready", "failed", "unavailable"]
    options: dict[str, Any]
    message: str | None = None
    state: dict[str, Any] = Field(default_factory=dict, description="What the mechanism's jobs published "
                                  "(ECO: calibrated sigma and its search curve; GUARD: phrase counts).")


class ClassifierOut(BaseModel):
    status: Literal["preparing", "ready", "failed"]
    threshold: float | None = None
    false_positive_rate: float | None = None
    heldout_recall: float | None = None
    ood_gate: dict[str, float | None] | None = Field(
        None, description="O3's gate (targets enabling O3): weight threshold, its held-out recall and false-positive "
        "rate on the negative pool.")


class TargetOut(BaseModel):
    id: str
    name: str
    description: str
    aliases: list[str]
    status: Literal["preparing", "active", "degraded", "failed"] = Field(description=(
        "`active`: every job done; `degraded`: the classifier could not be fitted, so the target is detected by its "
        "aliases alone and protected by its ready mechanisms or interim protection, or this replica cannot read one "
        "of its artifacts (`message` says which); `failed`: a mechanism's job failed."))
    message: str | None = Field(None, description=(
        "Why this replica serves the target `degraded` when an artifact of its cannot be read here (what serves it "
        "meanwhile); unset otherwise."))
    revision: int
    mechanisms: dict[str, MechanismOut]
    classifier: ClassifierOut
    counts: dict[str, int]
    jobs: list[JobOut]
    created_at: datetime
    updated_at: datetime
    forget: list[ForgetItem] | None = None
    retain: list[ForgetItem] | None = None
    request: RequestOut = Field(default_factory=RequestOut, description="The request the target answers.")


class TargetList(BaseModel):
    object: Literal["list"] = "list"
    revision: int
    data: list[TargetOut]


class RegistryOut(BaseModel):
    revision: int
    serving_revision: int | None = Field(None, description="The revision this replica's live snapshot is at.")
    targets: dict[str, int]
    jobs: dict[str, int]


class AuditRecord(BaseModel):
    """One inference request's audit record: written by the pipeline, stored, and returned by the admin API."""

    request_id: str
    created: float
    endpoint: str
    targets: list[str]
    mechanisms: list[str]
    scores: dict[str, float]
    outcome: str
    prompt: str | None = None


class AuditList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AuditRecord]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page; null on the last.")


# ---- admin trail, tombstones, admin keys ---------------------------------------------------------------------------

MAX_PAGE = 1000
Cursor = Annotated[str, StringConstraints(max_length=200, pattern=r"^[A-Za-z0-9_-]+$")]
IdFilter = Annotated[str, StringConstraints(max_length=80, pattern=r"^[A-Za-z0-9_.:-]+$")]
LineFilter = Annotated[str, StringConstraints(max_length=200, pattern=NO_CONTROL)]
ActionName = Literal[ACTIONS]
KeyId = Annotated[str, StringConstraints(pattern=ADMIN_KEY_ID)]


class ActionOut(BaseModel):
    """One admin action: who (an admin key's id), what, on which target or object, when, and the names of the fields
    it set (never their values)."""

    id: int
    at: datetime
    actor: str
    action: ActionName
    target_id: str | None = None
    subject_id: str | None = Field(None, description="The negative or admin key acted on.")
    fields: list[str]
    count: int | None = Field(None, description="How many objects the action concerned (negatives added).")
    revision: int | None = Field(None, description="The registry revision the action made.")


class ActionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ActionOut]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page; null on the last.")


class TombstoneOut(BaseModel):
    """What a deleted target leaves: nothing that identifies whom or what it was about."""

    target_id: str
    revision: int
    deleted_at: datetime
    purged_at: datetime | None = Field(None, description="When its artifacts and database copies were erased.")
    registered_at: datetime | None = None
    reference: str | None = None
    legal_basis: str | None = None
    received_at: datetime | None = None
    effective_at: datetime | None = None
    mechanisms: list[str]
    verification: dict[str, Any] | None = Field(None, description="Summary figures of its last verification run.")


class TombstoneList(BaseModel):
    object: Literal["list"] = "list"
    data: list[TombstoneOut]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page; null on the last.")


class AdminKeyCreate(Strict):
    id: KeyId = Field(description="The key's name, as the admin trail shows its actions (e.g. `alice`).")


class AdminKeyOut(BaseModel):
    id: str
    source: Literal["environment", "registry"]
    created_at: datetime | None = None
    created_by: str | None = None
    revoked_at: datetime | None = None
    revoked_by: str | None = None


class AdminKeyCreated(AdminKeyOut):
    key: str = Field(description="The key itself: shown this once, stored only as its SHA-256.")


class AdminKeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdminKeyOut]


MAX_NEGATIVES_PER_REQUEST = 1000


class NegativesCreate(Strict):
    """Samples of the operator's own traffic that no target is about: the gate's calibration keeps them unflagged."""

    texts: list[LongText] = Field(min_length=1, max_length=MAX_NEGATIVES_PER_REQUEST)


class NegativeOut(BaseModel):
    id: str
    text: str
    created_at: datetime


class NegativeList(BaseModel):
    object: Literal["list"] = "list"
    revision: int
    data: list[NegativeOut]


class Deleted(BaseModel):
    id: str
    deleted: bool = True
    revision: int


MAX_SCORED_CONTINUATIONS = 64


class ScoreMessage(Strict):
    role: Literal["system", "user", "assistant"]
    content: Annotated[str, StringConstraints(max_length=20_000)]


class ScoreRequest(Strict):
    """Continuations to score after one chat prompt, under the guards the prompt gets (``server/scoring.py``)."""

    messages: Annotated[list[ScoreMessage], Field(min_length=1, max_length=64)]
    # Text (tokenised as the served tokenizer does) or token ids: ids score exactly the tokens a reply was generated
    # as, which its text may not re-tokenise to (ask the completion for ``return_tokens_as_token_ids``).
    continuations: Annotated[list[LongText | TokenIds], Field(min_length=1, max_length=MAX_SCORED_CONTINUATIONS)]


class ContinuationScoreOut(BaseModel):
    index: int
    tokens: list[str]  # each token's text, as in OpenAI logprobs
    logprob: float
    mean_loss: float  # length-normalised NLL (TOFU's per-answer loss)
    token_logprobs: list[float]


class ScoreResponse(BaseModel):
    object: Literal["lethe.score"] = "lethe.score"
    targets: list[str]  # the targets the prompt hit
    mechanisms: list[str]  # applied, in guard order
    scores: list[ContinuationScoreOut]

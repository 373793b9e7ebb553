"""Every ``LETHE_*`` setting, typed and defaulted, in one place.

Nothing else in Lethe reads ``os.environ`` for its own configuration; the settings table of
``docs/configuration.md`` is checked against this class by ``tests/test_packaging.py``.
"""

from __future__ import annotations

import re
import shlex
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


MIN_ADMIN_KEY_CHARS = 16
ADMIN_KEY_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$"  # an admin key's name, as the admin trail shows its actor
DEFAULT_ADMIN_KEY_ID = "admin"  # the key id of LETHE_ADMIN_KEY
# The settings that are vLLM engine arguments of the same name and meaning (and `lethe serve` flags).
ENGINE_SETTINGS = ("served_model_name", "max_model_len", "dtype", "tensor_parallel_size", "gpu_memory_utilization",
                   "max_num_seqs", "enforce_eager")
DEFAULT_MECHANISMS = ("eco", "guard")  # what a target gets unless its body or LETHE_DEFAULT_MECHANISMS names others
STOP_GRACE_S = 20  # after LETHE_SHUTDOWN_TIMEOUT_S: the lifespan's own stop (job workers, engine), then a hard exit


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "lethe"


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "lethe"


class Settings(BaseSettings):
    """Lethe's configuration, read from ``LETHE_*`` environment variables (and ``.env`` if present)."""

    model_config = SettingsConfigDict(env_prefix="LETHE_", env_file=".env", extra="ignore")

    host: str = Field("0.0.0.0", description="Address the HTTP server binds to.")
    port: int = Field(8000, ge=1, le=65535, description="Port the HTTP server listens on.")
    model: str | None = Field(
        None, description="Path of the HF model directory to serve; unset serves the TinyTOFU demo model."
    )
    served_model_name: str | None = Field(
        None, description="Model id shown by `/v1/models` and accepted in requests; defaults to the model dir name."
    )
    demo_variant: Literal["full", "tiny", "bench"] = Field(
        "full",
        description="Which demo model `lethe serve` builds and serves when no model is given (`bench`: untrained, "
        "~88 M parameters, for cost measurements).",
    )
    cache_dir: Path = Field(
        default_factory=_default_cache_dir, description="Where built demo models are cached (by content hash)."
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated bearer keys accepted on `/v1/*`; empty means inference is open.",
    )
    max_model_len: int = Field(1024, ge=16, description="Context length given to vLLM (prompt + completion).")
    max_num_seqs: int = Field(32, ge=1, description="Most sequences vLLM schedules in one batch.")
    dtype: str = Field(
        "auto", description="Model dtype for vLLM; `auto` means float32 on CPU, the checkpoint's on GPU."
    )
    compute_device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Device for training (ULD assistants, O3 LoRAs) and `/admin/v1/score`: `auto` is CUDA in "
                            "bfloat16 when torch sees a GPU, else the CPU in float32.")
    kv_cache_gib: int = Field(1, ge=1, description="KV-cache size in GiB on CPU (becomes `VLLM_CPU_KVCACHE_SPACE`).")
    max_lora_rank: Literal[8, 16, 32, 64, 128, 256] = Field(
        64, description="Largest LoRA rank vLLM reserves room for (O3 stacks one rank-8 block per target)."
    )
    enforce_eager: bool = Field(True, description="Skip CUDA-graph / torch.compile capture (faster start).")
    tensor_parallel_size: int = Field(
        1, ge=1, description="GPUs the model is split across (vLLM's tensor parallelism).")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="Share of GPU memory vLLM may use (on CPU: of host RAM, unused while "
                                      "`LETHE_KV_CACHE_GIB` sizes the cache); unset: vLLM's default.",
    )
    engine_args: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Other vLLM engine arguments, as `vllm serve` takes them (`--enable-prefix-caching "
                    "--max-num-batched-tokens 4096`); `lethe serve MODEL -- ARGS` adds to them.",
    )
    request_timeout_s: float = Field(
        600.0, gt=0, description="A request still generating after this long is aborted with 504."
    )
    data_dir: Path = Field(
        default_factory=_default_data_dir, description="Where the default SQLite registry and artifacts live."
    )
    database_url: str | None = Field(
        None, description="SQLAlchemy URL of the registry (`postgresql+psycopg://…`); unset: SQLite in the data dir."
    )
    artifacts_dir: Path | None = Field(
        None, description="Shared directory of content-addressed artifacts; unset: `artifacts/` in the data dir."
    )
    admin_key: str | None = Field(
        None, description=f"Bearer key of the admin API (`/admin/v1`), at least {MIN_ADMIN_KEY_CHARS} characters; "
                          f"unset (and `LETHE_ADMIN_KEYS` empty) disables the admin API (403). Its key id in the "
                          f"admin trail is `{DEFAULT_ADMIN_KEY_ID}`."
    )
    admin_keys: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description="More admin keys, each named for the admin trail: `id:key,id:key` (ids: letters, digits, `.`, "
                    f"`_`, `-`; keys at least {MIN_ADMIN_KEY_CHARS} characters). Keys that must be revocable without a "
                    "restart are better created in the registry (`lethe admin-keys create`).",
    )
    metrics_key: str | None = Field(
        None, description="Bearer key `/metrics` requires when set (Prometheus: `authorization.credentials`); unset "
                          "leaves it open. Its counters name no target, but a client watching them on a quiet server "
                          "could see its own prompt counted as a hit.",
    )
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="Largest accepted request body (else 413).")
    max_prompts_per_request: int = Field(
        64, ge=1, description="Most prompts in one `/v1/completions` `prompt` list (else 400).")
    max_sequences_per_request: int = Field(
        128, ge=1, description="Most sequences (prompts × `n`) one inference request may ask for (else 400).")
    max_messages: int = Field(256, ge=1, description="Most `messages` in one chat request (else 400).")
    max_concurrent_requests: int = Field(
        256, ge=1, description="Most inference requests in flight at once, streams included; past it, 429.")
    max_sequences_in_flight: int = Field(
        1024, ge=1, description="Most sequences (prompts × `n`) of the inference requests in flight, running or "
                                "queued in the engine; past it, 429.")
    max_connections: int = Field(
        1024, ge=2, description="Most HTTP connections and requests the server holds at once, every path included; "
                                "past it, 503 before a request is read. Keep it above LETHE_MAX_CONCURRENT_REQUESTS.")
    shutdown_timeout_s: int = Field(
        10, ge=1, description="After SIGTERM, how long open requests get to finish before they are cancelled; the "
                              f"process exits at most {STOP_GRACE_S} s later, whatever is still stopping.")
    default_mechanisms: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_MECHANISMS),
        description="Mechanisms a target gets when its `mechanisms` field is omitted (comma-separated).",
    )
    classifier_recall: float = Field(
        0.99, gt=0, lt=1, description="Recall on held-out forget prompts the classifier threshold is set for."
    )
    classifier_max_fpr: float = Field(
        0.02, ge=0, le=1,
        description="Cap on the held-out false-positive rate; the threshold rises to it even if recall drops.",
    )
    gate_max_union_fpr: float = Field(
        0.005, gt=0, lt=1,
        description="Budget for head-only hits of any target on calibration negatives (the pool's share and the "
                    "operators'), calibrated for the whole registry.",
    )
    gate_max_windows: int = Field(
        64, ge=1, description="Most 128-word windows the prompt gate embeds for one request; a longer one gets a 400.",
    )
    embedding_model: str | None = Field(
        None, description="sentence-transformers model dir for the classifiers; unset: the packaged MiniLM."
    )
    registry_poll_s: float = Field(
        0.25, gt=0, description="How often a replica checks the registry revision (one indexed row)."
    )
    registry_max_staleness_s: float = Field(
        30.0, gt=0, description="`/health/ready` answers 503 once this replica's reloads fail while the registry "
        "answers (it cannot load what other replicas serve) and its snapshot was last confirmed current longer ago "
        "than this; with the registry unreachable it stays ready, `degraded`.",
    )
    embedded_worker: bool = Field(
        True, description="Run the job workers (one thread per job lane) inside `lethe serve`.")
    job_stale_after_s: float = Field(
        60.0, gt=0, description="A running job without heartbeat for this long is retried or failed."
    )
    eco_calibration_questions: int = Field(
        20, ge=1, le=200, description="Forget questions ECO's sigma calibration scores at each step."
    )
    eco_calibration_max_tokens: int = Field(
        64, ge=8, le=1024, description="Reply length ECO's sigma calibration generates per question."
    )
    verify_after_changes: bool = Field(
        True, description="Queue a verification run of a target's erasure report behind every change that queues its "
        "jobs (registration, a patch of its contents or mechanisms); `POST /admin/v1/targets/{id}/verify` queues one "
        "on demand either way.",
    )
    verify_max_probes: int = Field(
        120, ge=1, le=2000, description="Most probes a verification run asks, each with and without protection.")
    verify_max_tokens: int = Field(
        48, ge=8, le=1024, description="Reply length a verification run generates per probe.")
    verify_negatives: int = Field(
        20, ge=0, le=500, description="Unrelated questions a verification run sends through the gate for its "
        "false-positive estimate.")
    verify_wait_s: float = Field(
        1800.0, ge=0, description="How long a verification run waits for its target's own jobs to end (and for "
        "this replica to serve the result) before it measures what is served anyway.")
    console_session_s: float = Field(
        28800.0, gt=0, le=604800, description="Lifetime of a web console session (`/admin/ui`) from its login.")
    console_secure_cookie: Literal["auto", "always", "never"] = Field(
        "auto", description="When the console's session cookie is marked `Secure`: `auto` when the request came over "
        "https to this server, `always` (set it behind a TLS-terminating proxy), or `never`.")
    erasure_interval_s: float = Field(
        10.0, gt=0, description="How often a replica runs the erasure pass: purge of deleted targets' artifacts, audit "
        "redaction, database scrub, removal of abandoned staging folders.",
    )
    erasure_grace_s: float = Field(
        300.0, ge=0, description="An unreferenced artifact written (or written again) this recently is kept: the time "
        "a job may take between storing an artifact and publishing it.",
    )
    staging_grace_s: float = Field(
        3600.0, ge=0, description="A staging folder that no queued or running job owns is removed once untouched this "
        "long.",
    )
    replica_stale_s: float = Field(
        120.0, gt=0, description="A replica that has not reported for this long no longer holds back the purge of "
        "deleted targets' artifacts.",
    )
    uld_assistant_memory_gib: float = Field(
        4.0, gt=0, description="Memory the engine may use for ULD assistants; every ULD target of the served registry "
                               "is kept loaded within it (one that does not fit is protected without ULD, logged).",
    )
    speculative_prefill: bool = Field(
        False, description="Start each prompt's plain generation while the gate classifies it, and keep it only if no "
                           "target applies (a flagged prompt's is aborted unread): unflagged replies no longer wait "
                           "for classification, but a flagged prompt's first token then waits for the aborted "
                           "prefill too, a timing difference that can tell a client its prompt hit a target.",
    )
    audit_prompts: bool = Field(False, description="Store prompt text in audit records.")
    audit_retention_days: float = Field(30.0, gt=0, description="Audit records older than this are deleted.")
    audit_buffer_mib: float = Field(
        64.0, gt=0, description="Memory for audit records waiting while the database is unreachable; past it the "
                                "oldest are dropped (`lethe_audit_dropped_total`).",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    log_json: bool = Field(True, description="Emit logs as one JSON object per line.")

    @field_validator("max_lora_rank", mode="before")
    @classmethod
    def _rank_from_text(cls, value: object) -> object:
        # Environment values arrive as text, and a Literal of ints does not coerce "128" to 128.
        return int(value) if isinstance(value, str) and value.strip().isdigit() else value

    @field_validator("admin_key")
    @classmethod
    def _long_admin_key(cls, value: str | None) -> str | None:
        # A short bearer key can be guessed; the admin API can erase, add and read every target.
        if value and len(value) < MIN_ADMIN_KEY_CHARS:
            raise ValueError(f"the admin key must have at least {MIN_ADMIN_KEY_CHARS} characters (it has "
                             f"{len(value)}): use a long random key, e.g. `openssl rand -hex 24`")
        return value

    @field_validator("admin_keys", mode="before")
    @classmethod
    def _named_keys(cls, value: object) -> object:
        # The messages never quote an entry: it holds a key.
        if not isinstance(value, str):
            return value
        keys: dict[str, str] = {}
        for position, entry in enumerate((e.strip() for e in value.split(",") if e.strip()), start=1):
            key_id, colon, key = entry.partition(":")
            if not colon or not re.fullmatch(ADMIN_KEY_ID, key_id.strip()):
                raise ValueError(f"entry {position} is not `id:key` with an id of letters, digits, `.`, `_` or `-`")
            if key_id.strip() in keys:
                raise ValueError(f"entry {position} repeats the key id `{key_id.strip()}`")
            keys[key_id.strip()] = key.strip()
        return keys

    @field_validator("admin_keys")
    @classmethod
    def _long_named_keys(cls, value: dict[str, str]) -> dict[str, str]:
        for key_id, key in value.items():
            if not re.fullmatch(ADMIN_KEY_ID, key_id):
                raise ValueError(f"the key id `{key_id[:40]}` is not letters, digits, `.`, `_` or `-`")
            if len(key) < MIN_ADMIN_KEY_CHARS:
                raise ValueError(f"the admin key `{key_id}` must have at least {MIN_ADMIN_KEY_CHARS} characters")
        return value

    @model_validator(mode="after")
    def _admin_key_ids_unique(self) -> Settings:
        if self.admin_key and DEFAULT_ADMIN_KEY_ID in self.admin_keys:
            raise ValueError(f"LETHE_ADMIN_KEYS names a key `{DEFAULT_ADMIN_KEY_ID}`, the id of LETHE_ADMIN_KEY: "
                             "rename it")
        return self

    @property
    def environment_admin_keys(self) -> dict[str, str]:
        """Every admin key the environment configures, by key id (LETHE_ADMIN_KEY as ``admin``)."""
        named = {DEFAULT_ADMIN_KEY_ID: self.admin_key} if self.admin_key else {}
        return {**named, **self.admin_keys}

    @model_validator(mode="after")
    def _admissible_limits(self) -> Settings:
        # A request within the per-request caps must be admissible on an idle server, and overload must meet the
        # 429 of the admission limit before uvicorn's 503.
        if self.max_sequences_in_flight < self.max_sequences_per_request:
            raise ValueError("LETHE_MAX_SEQUENCES_IN_FLIGHT must be at least LETHE_MAX_SEQUENCES_PER_REQUEST")
        if self.max_connections <= self.max_concurrent_requests:
            raise ValueError("LETHE_MAX_CONNECTIONS must be above LETHE_MAX_CONCURRENT_REQUESTS")
        return self

    @field_validator("engine_args", mode="before")
    @classmethod
    def _split_words(cls, value: object) -> object:
        return shlex.split(value) if isinstance(value, str) else value

    @field_validator("api_keys", "default_mechanisms", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @property
    def demo_models_dir(self) -> Path:
        return self.cache_dir / "demo-models"

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{self.data_dir / 'lethe.db'}"

    @property
    def resolved_artifacts_dir(self) -> Path:
        return self.artifacts_dir or self.data_dir / "artifacts"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()


def settings_table() -> str:
    """The settings table of ``docs/configuration.md``, generated from ``Settings`` so the documentation cannot drift
    from the code."""
    rows = ["| Variable | Default | Description |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        if field.default_factory is not None:
            default = {"api_keys": "empty", "admin_keys": "empty", "cache_dir": "`~/.cache/lethe`",
                       "data_dir": "`~/.local/share/lethe`",
                       "default_mechanisms": "`eco,guard`", "engine_args": "empty"}[name]
        elif field.default is None:
            default = "unset"
        else:
            default = f"`{field.default}`"
        rows.append(f"| `LETHE_{name.upper()}` | {default} | {field.description} |")
    return "\n".join(rows)

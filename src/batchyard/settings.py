"""One typed settings tree for every part of batchyard.

Values come from (highest first): keyword arguments, environment variables
(`BATCHYARD_` prefix, `__` between nested groups, e.g. `BATCHYARD_PROVIDER__API_KEY`),
the profile's env file (`profiles/<name>.env`, chosen with `--profile` or
`BATCHYARD_PROFILE`), a `.env` in the working directory, then the defaults below.

The defaults are the embedded, offline setup: no API key means the local Batch API server
runs in-process; no MongoDB URI means the persisted stand-in; Milvus Lite under the staging
root. Secrets are `SecretStr` and never leave this module unmasked except through
`reveal()` at the client that needs them.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from batchyard import settings_check
from batchyard.clients.realtime import RealtimeSettings
from batchyard.localapi.config import LocalApiConfig
from batchyard.pricing import PricingSettings

TOverLimit = Literal["truncate", "skip"]

PROFILE_DIR_ENV = "BATCHYARD_PROFILE_DIR"


class ProviderSettings(BaseModel):
    """Where batches go: OpenAI (or any compatible server) or the embedded local server."""

    api_key: SecretStr | None = Field(
        default=None,
        description="API key for the Batch API. Unset: start the local Batch API server in-process.",
    )
    base_url: str | None = Field(
        default=None,
        description="Base URL of an OpenAI-compatible API (e.g. `http://127.0.0.1:8765/v1`). "
        "Unset with a key: api.openai.com.",
    )
    organization: str | None = Field(default=None, description="OpenAI organization id.")
    completion_window: Literal["24h"] = Field(default="24h", description="Batch completion window.")
    poll_interval_s: float = Field(
        default=30.0, gt=0, le=3600, description="Seconds between status polls of live batches."
    )
    request_timeout_s: float = Field(
        default=120.0, gt=0, le=3600, description="HTTP timeout of one API call."
    )
    max_retries: int = Field(
        default=6, ge=0, le=20, description="Retries of one API call on 429/5xx/timeouts."
    )
    backoff_base_s: float = Field(
        default=1.0, gt=0, le=60, description="First backoff delay; doubles each retry, with jitter."
    )
    backoff_max_s: float = Field(default=60.0, gt=0, le=600, description="Longest backoff delay.")
    file_expires_after_s: int | None = Field(
        default=None,
        ge=3600,
        le=2_592_000,
        description="Expire uploaded input files after this many seconds (OpenAI default: 30 days).",
    )
    requeue_backoff_s: float = Field(
        default=30.0, ge=0, le=86_400,
        description="Wait before resubmitting unfinished work (expired/cancelled batch, provider "
        "token limit); doubles with each successive requeue of the same shard.",
    )
    requeue_backoff_max_s: float = Field(
        default=3_600.0, ge=0, le=86_400, description="Longest requeue backoff."
    )
    delete_remote_files: bool = Field(
        default=False,
        description="Delete remote input/output/error files once a run has loaded successfully.",
    )
    local: LocalApiConfig = Field(
        default_factory=LocalApiConfig,
        description="The embedded local Batch API server (used when no API key is set).",
    )

    @property
    def embedded(self) -> bool:
        """True when batchyard should start its own local Batch API server."""
        return self.api_key is None and self.base_url is None


class MongoFields(BaseModel):
    """Field names of a chunk document in the source collection."""

    chunk_id: str = Field(default="_id", description="Unique chunk id (the Milvus primary key).")
    company: str = Field(default="company_id", description="Company the chunk belongs to.")
    document: str = Field(default="document_id", description="Document the chunk belongs to.")
    chunk_index: str = Field(default="chunk_index", description="Position of the chunk in its document.")
    text: str = Field(default="text", description="The chunk text.")
    marks: str = Field(
        default="batchyard", description="Sub-document where batchyard writes its per-space marks."
    )
    updated_at: str | None = Field(
        default="updated_at",
        description="A change field the source sets whenever a chunk is written (a date or a number); "
        "runs then read only chunks changed since the last run (`corpus.*`). None or empty: the source has "
        "none, and every run scans the targeted chunks in full.",
    )


class MongoSettings(BaseModel):
    """The document store. Without a URI, a persisted pymongo-compatible stand-in is used."""

    uri: SecretStr | None = Field(
        default=None, description="MongoDB connection string. Unset: the local stand-in."
    )
    database: str = Field(default="batchyard", description="Database name.")
    chunks_collection: str = Field(default="chunks", description="Collection holding the chunks.")
    results_collection: str = Field(
        default="inference_results", description="Collection for inference results."
    )
    fields: MongoFields = Field(default_factory=MongoFields)
    page_size: int = Field(
        default=5_000, gt=0, le=100_000, description="Chunks per `_id`-range page when snapshotting."
    )
    standin_wait_s: float = Field(
        default=300.0, gt=0, le=86_400,
        description="How long a process waits for the MongoDB stand-in while another process holds it "
        "(two runs of one project directory take turns; a holder lets go between rounds).",
    )
    write_batch_size: int = Field(
        default=5_000, gt=0, le=100_000, description="Operations per unordered bulk_write."
    )
    server_selection_timeout_s: float = Field(
        default=10.0, gt=0, le=600,
        description="How long an operation waits for a reachable server before it fails "
        "(pymongo's serverSelectionTimeoutMS, 30 s by default): an unreachable MongoDB is "
        "reported after this. Raise it to ride out long replica-set elections.",
    )


class MilvusSettings(BaseModel):
    """The vector store. Without a URI, Milvus Lite at `<staging root>/milvus.db`."""

    uri: str | None = Field(default=None, description="Milvus URI or Milvus Lite path.")
    lite_mode: Literal["process", "thread"] = Field(
        default="process",
        description="Milvus Lite in a child process of its own (its memory stays out of the "
        "pipeline's) or in a thread of this process.",
    )
    token: SecretStr | None = Field(default=None, description="Milvus token (`user:password`).")
    db_name: str = Field(default="", description="Milvus database name.")
    collection_prefix: str = Field(default="chunks", description="Prefix of collection names.")
    index_type: str = Field(default="AUTOINDEX", description="Vector index type (FLAT in tests).")
    metric_type: Literal["COSINE", "IP", "L2"] = Field(default="COSINE", description="Metric.")
    upsert_batch_rows: int = Field(
        default=2_000, gt=0, le=100_000, description="Rows per upsert call (kept under 64 MB)."
    )
    max_request_bytes: int = Field(
        default=32 * 1024 * 1024, gt=0, le=64 * 1024 * 1024, description="Cap on one upsert's vector bytes."
    )
    bulk_import_min_rows: int | None = Field(
        default=None,
        gt=0,
        description="Server loads of at least this many rows use bulk import (files + import "
        "job) instead of upserts; None (default): always upsert, as bulk import was 4-9x slower "
        "than upserts into Milvus 2.3.5 at 100k-300k rows (benchmarks/README.md). Never used "
        "for Milvus Lite.",
    )
    bulk_storage: Literal["local", "s3"] = Field(
        default="local",
        description="Where the server reads import files: `local` (its own disk, e.g. the "
        "embedded server; files go to `bulk_local_dir`) or `s3` (its MinIO/S3 bucket).",
    )
    bulk_local_dir: str | None = Field(
        default=None,
        description="Directory for local import files, at the same absolute path for the "
        "server (default: a temporary directory).",
    )
    bulk_s3_bucket: str | None = Field(default=None, description="The server's MinIO/S3 bucket.")
    bulk_s3_endpoint_url: str | None = Field(
        default=None, description="MinIO/S3 endpoint of that bucket (e.g. `http://minio:9000`)."
    )
    bulk_s3_prefix: str = Field(default="batchyard-bulk", description="Key prefix of import files.")
    bulk_s3_access_key_id: SecretStr | None = Field(default=None, description="Its access key id.")
    bulk_s3_secret_access_key: SecretStr | None = Field(default=None, description="Its secret key.")
    bulk_import_timeout_s: float = Field(
        default=3_600.0, gt=0, le=86_400, description="Give up waiting for one bulk import after this."
    )


class StagingSettings(BaseModel):
    """Where runs are staged: a local directory or `s3://bucket/prefix`."""

    root: str = Field(default="./staging", description="Staging root (local path or s3:// URL).")
    s3_endpoint_url: str | None = Field(default=None, description="S3 endpoint (MinIO, moto).")
    s3_access_key_id: SecretStr | None = Field(default=None, description="S3 access key id.")
    s3_secret_access_key: SecretStr | None = Field(default=None, description="S3 secret key.")
    s3_region: str | None = Field(default=None, description="S3 region.")
    group: str | None = Field(
        default=None,
        description="Share local staging with this Unix group (name or number): folders 2750, files "
        "0640. Unset (default): owner-only, folders 0700, files 0600. Not used on S3.",
    )

    @field_validator("group")
    @classmethod
    def _group_exists(cls, group: str | None) -> str | None:
        from batchyard.storage.perms import Access

        Access.for_group(group)  # a group this machine does not have is a settings error
        return group


class EmbeddingSettings(BaseModel):
    """The embedding space: model plus dimensions. One Milvus collection per space."""

    model: str = Field(default="text-embedding-3-small", description="Embedding model.")
    dimensions: int | None = Field(
        default=256, gt=0, le=16_384, description="Output dimensions (None: the model's native size)."
    )
    pass_dimensions: bool = Field(
        default=True, description="Send `dimensions` in the request (text-embedding-3 and later)."
    )
    encoding: str | None = Field(
        default=None, description="Tokenizer encoding (default: derived from the model)."
    )

    @property
    def space(self) -> str:
        """Stable key of the embedding space, safe as a field name and a collection suffix."""
        dims = self.dimensions if self.dimensions is not None else "native"
        return re.sub(r"[^A-Za-z0-9_]", "_", f"{self.model}_{dims}")


class LimitsSettings(BaseModel):
    """Batch API limits (defaults from OpenAI) and planning knobs."""

    max_requests_per_batch: int = Field(default=50_000, gt=0, le=50_000, description="Requests per batch file.")
    max_bytes_per_batch: int = Field(
        default=200 * 1024 * 1024, gt=1024, le=200 * 1024 * 1024, description="Bytes per batch file."
    )
    safety_margin: float = Field(
        default=0.95, gt=0.1, le=1.0, description="Fraction of the byte limit actually used."
    )
    max_inputs_per_batch: int = Field(
        default=50_000, gt=0, le=50_000, description="Embedding inputs summed over one batch."
    )
    max_inputs_per_request: int = Field(
        default=2_048, gt=0, le=2_048, description="Embedding inputs packed into one request."
    )
    max_tokens_per_request: int = Field(
        default=300_000, gt=0, le=300_000, description="Embedding tokens summed over one request."
    )
    max_tokens_per_input: int = Field(
        default=8_192, gt=0, le=8_192, description="Tokens of one embedding input."
    )
    max_tokens_per_batch: int | None = Field(
        default=None, gt=0,
        description="Tokens per batch file (default: 24% of the enqueued-token budget, so four shards fill the "
        "provider's queue with room for its own token count).",
    )
    over_limit: TOverLimit = Field(
        default="truncate", description="Inputs over the token limit: truncate or skip (recorded)."
    )
    enqueued_token_budget: int = Field(
        default=3_000_000, gt=0, description="Tokens allowed in non-terminal batches per model."
    )
    enqueued_request_budget: int | None = Field(
        default=1_000_000, gt=0,
        description="Embeddings: requests allowed in non-terminal batches per model, across every run of the "
        "account (OpenAI: 1,000,000 enqueued requests). None: no cap.",
    )
    batches_per_hour: int = Field(default=2_000, gt=0, le=2_000, description="Batch creations per hour.")
    max_attempts: int = Field(
        default=3, ge=1, le=20, description="Attempts per request; expiry/cancel do not count."
    )
    max_requeues: int = Field(
        default=3, ge=0, le=100,
        description="Times a request may come back unfinished (expired, cancelled) before it "
        "fails as `requeue_limit`.",
    )
    token_limit_wait_s: float = Field(
        default=86_400.0, ge=0,
        description="How long a shard refused with `token_limit_exceeded` (a quota shared with "
        "other runs) keeps being retried, with backoff, before its units fail.",
    )
    max_live_batches: int = Field(default=500, gt=0, description="Non-terminal batches at once.")


class RunSettings(BaseModel):
    """How a run is split and driven."""

    partition_max_chunks: int = Field(
        default=100_000, gt=0, le=10_000_000,
        description="Most chunks in one partition (the unit of snapshot, plan, collect and load).",
    )
    partitions_per_driver: int | None = Field(
        default=None, gt=0,
        description="Most partitions one process drives at a time (None: all it can lease). Set it "
        "when several workers share a run, so each takes a share; the embedded MongoDB stand-in is "
        "then opened only for each load, so the processes can take turns with it.",
    )


class CorpusSettings(BaseModel):
    """The corpus across runs: change detection, claims between runs, pruning."""

    change_slack_s: float = Field(
        default=600.0, ge=0, le=30 * 86_400,
        description="Change queries start this long before the cursor, for late writers and clock skew.",
    )
    full_scan_every_s: float = Field(
        default=7 * 86_400.0, gt=0,
        description="A company is scanned in full (not only its changes) when its last full scan is older.",
    )
    claim_ttl_s: float = Field(
        default=3 * 86_400.0, gt=0,
        description="An open run with no activity for this long is abandoned: its claims are ignored.",
    )
    prune: bool = Field(
        default=True,
        description="Remove from the sinks what no longer exists in the source (`--keep-deleted` turns it off).",
    )
    full_scan: bool = Field(
        default=False,
        description="Read every targeted chunk, not only the changes since the last run (`--full-scan`).",
    )
    select_wait_s: float = Field(
        default=3_600.0, ge=0,
        description="How long a run waits for another run of its scope to finish selecting units.",
    )


class LaneSettings(BaseModel):
    """Which lane requests take: the Batch API (half price, up to 24 h) or real-time calls."""

    mode: Literal["batch", "realtime", "auto"] = Field(
        default="batch",
        description="batch: the Batch API. realtime: the synchronous endpoints, same request bodies. "
        "auto: real-time when the run's planned tokens are under `auto_max_tokens`, else batch, "
        "and a backfill's retry tail real-time once it is under `tail_max_tokens`.",
    )
    auto_max_tokens: int = Field(default=100_000, ge=0, description="auto: runs under this many tokens go real-time.")
    tail_max_tokens: int = Field(
        default=100_000, ge=0,
        description="auto: once the first pass of a batch run is settled, the remaining follow-ups "
        "(expired, cancelled, failed or requeue-limited requests) go real-time when they total "
        "fewer tokens than this.",
    )
    realtime: RealtimeSettings = Field(default_factory=RealtimeSettings,
                                       description="Rates, concurrency and retries of the real-time lane.")
    slice_requests: int = Field(
        default=100, gt=0, le=50_000,
        description="Real-time answers are staged every this many requests (and at most every window of the lane's "
        "tokens), so a crash re-sends at most one slice.",
    )


class OrchestrationSettings(BaseModel):
    """Where Prefect runs the CPU-heavy tasks (plan per partition, collect per shard attempt)."""

    task_runner: Literal["threads", "dask"] = Field(
        default="threads",
        description="threads: the flow's thread pool (default). dask: prefect-dask's DaskTaskRunner, on "
        "`dask_address` or a local cluster of `dask_workers` processes.",
    )
    dask_address: str | None = Field(default=None, description="Scheduler address of an existing Dask cluster.")
    dask_workers: int = Field(default=2, gt=0, le=512, description="Worker processes of a local Dask cluster.")


class InferenceSettings(BaseModel):
    """Defaults for inference tasks (each task may override)."""

    model: str = Field(default="gpt-4.1-mini", description="Chat/responses model.")
    endpoint: Literal["/v1/chat/completions", "/v1/responses"] | None = Field(
        default=None, description="Force an endpoint for every task (default: the task's own)."
    )
    temperature: float = Field(default=0.0, ge=0, le=2, description="Sampling temperature.")
    max_output_tokens: int = Field(default=1_024, gt=0, le=100_000, description="Output token cap.")
    document_token_budget: int = Field(
        default=6_000, gt=0, le=1_000_000, description="Tokens of chunk text per document unit."
    )
    on_deleted: Literal["flag", "remove"] = Field(
        default="flag",
        description="Results of units gone from the source: flag them (`deleted_at`) or remove them "
        "(a task may set its own).",
    )


class Settings(BaseSettings):
    """The root of batchyard's configuration."""

    model_config = SettingsConfigDict(
        env_prefix="BATCHYARD_",
        env_nested_delimiter="__",
        env_file=".env",
        extra="ignore",
        validate_default=True,
        hide_input_in_errors=True,  # str(ValidationError) never shows a value (they hold secrets)
    )

    profile: str | None = Field(default=None, description="The profile loaded (None: defaults, .env and environment).")
    provider: ProviderSettings = Field(default_factory=ProviderSettings)
    mongo: MongoSettings = Field(default_factory=MongoSettings)
    milvus: MilvusSettings = Field(default_factory=MilvusSettings)
    staging: StagingSettings = Field(default_factory=StagingSettings)
    embedding: EmbeddingSettings = Field(default_factory=EmbeddingSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    run: RunSettings = Field(default_factory=RunSettings)
    corpus: CorpusSettings = Field(default_factory=CorpusSettings)
    pricing: PricingSettings = Field(default_factory=PricingSettings)
    orchestration: OrchestrationSettings = Field(default_factory=OrchestrationSettings)
    lane: LaneSettings = Field(default_factory=LaneSettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    prompts_dir: str = Field(default="", description="Prompt templates (default: the packaged ones).")

    @model_validator(mode="after")
    def _check_limits(self) -> Settings:
        lim = self.limits
        if lim.max_inputs_per_request > lim.max_inputs_per_batch:
            raise ValueError("limits.max_inputs_per_request exceeds limits.max_inputs_per_batch")
        if lim.max_tokens_per_input > lim.max_tokens_per_request:
            raise ValueError("limits.max_tokens_per_input exceeds limits.max_tokens_per_request")
        return self

    def masked(self) -> dict[str, Any]:
        """The effective settings as plain data with every secret masked."""
        return self.model_dump(mode="json")  # SecretStr dumps as '**********'


def profile_dirs() -> list[Path]:
    """Where profiles are looked for, first match wins.

    `$BATCHYARD_PROFILE_DIR`, then `$BATCHYARD_HOME/profiles`, then `./profiles` in the working
    directory, then the profiles shipped inside the package (dev, test, prod).
    """
    dirs: list[Path] = []
    if os.environ.get(PROFILE_DIR_ENV):
        dirs.append(Path(os.environ[PROFILE_DIR_ENV]))
    if os.environ.get("BATCHYARD_HOME"):
        dirs.append(Path(os.environ["BATCHYARD_HOME"]) / "profiles")
    dirs.append(Path("profiles"))
    dirs.append(Path(__file__).parent / "profiles")
    return dirs


def profile_env_file(profile: str) -> Path:
    """The env file of a profile (`<dir>/<name>.env` in the first of `profile_dirs()` that has it).

    Raises:
        ConfigError: no such profile anywhere (the message lists where it looked).
    """
    from batchyard.errors import ConfigError

    if not re.fullmatch(r"[A-Za-z0-9_.-]+", profile):
        raise ConfigError(f"profile {profile!r}: a profile name is letters, digits, '.', '_' or '-'")
    for d in profile_dirs():
        path = d / f"{profile}.env"
        if path.is_file():
            return path
    looked = ", ".join(str(d / f"{profile}.env") for d in profile_dirs())
    raise ConfigError(f"profile {profile!r} not found (looked for {looked})")


def profile_source(profile: str | None = None) -> str | None:
    """The env file the given (or `BATCHYARD_PROFILE`) profile loads, for `config show`."""
    profile = profile or os.environ.get("BATCHYARD_PROFILE")
    return str(profile_env_file(profile).resolve()) if profile else None


def check_sources(env_files: list[Path], profile_file: Path | None = None) -> None:
    """Refuse unknown `BATCHYARD_` names and non-JSON list/dict values, in the environment and
    the env files, before pydantic-settings reads them (it would ignore the first and print a
    traceback for the second). Names only, never values.

    Raises:
        ConfigError: every problem, in one line.
    """
    from dotenv import dotenv_values

    from batchyard.errors import ConfigError

    names = setting_names()
    problems = settings_check.check_source(
        names, {k: v for k, v in os.environ.items() if settings_check.is_batchyard_name(k)}, "the environment")
    for path in env_files:
        if path.is_file():
            problems += settings_check.check_source(
                names, dotenv_values(path), str(path), only_prefixed=path != profile_file)
    if problems:
        raise ConfigError("; ".join(problems))


@functools.cache
def setting_names() -> settings_check.SettingNames:
    """The environment names of the settings tree."""
    return settings_check.setting_names(Settings)


def load_settings(profile: str | None = None, **overrides: Any) -> Settings:
    """Build settings for a profile: the profile's env file, then `.env`, then the environment.

    Raises:
        ConfigError: a profile was named but no env file for it exists; a `BATCHYARD_` name is
            not a setting, or a list/dict value is not JSON (`check_sources`); a value is
            invalid (one line naming the setting, never the value: pydantic's own error holds
            every input, secrets included, so it is not chained).
    """
    from batchyard.errors import ConfigError

    profile = profile or os.environ.get("BATCHYARD_PROFILE")
    env_files: list[Path] = []
    profile_file = None
    if profile:
        profile_file = profile_env_file(profile)
        env_files.append(profile_file)
        overrides.setdefault("profile", profile)
    env_files.append(Path(".env"))
    check_sources(env_files, profile_file)
    message = None
    try:
        return Settings(_env_file=tuple(env_files), **overrides)  # type: ignore[call-arg]
    except ValidationError as exc:
        message = settings_check.describe(exc, setting_names())
    except SettingsError as exc:  # a value pydantic-settings could not decode (not the value)
        message = str(exc).splitlines()[0] if str(exc).strip() else "a setting could not be decoded"
    raise ConfigError(message)  # outside the except blocks: no chained error carries the input

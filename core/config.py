"""Settings: read once from the environment and `.env` into one typed object.

Every setting has a type, a default where one makes sense and a one-line description
(the `description` of its field); `.env.example` lists exactly these. Secrets are
`SecretStr`, so they are masked in every `repr`, `str` and error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from core.ids import describe_key_problem
from core.store.interface import StoreError
from core.store.url import StoreURL, parse_database_url
from core.types import KNOWN_MODELS as KNOWN_MODELS

CsvList = Annotated[list[str], NoDecode]
IntList = Annotated[list[int], NoDecode]
StarPacks = Annotated[dict[int, float], NoDecode]


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class SettingsError(Exception):
    """A setting has a wrong value; the message names it and the expected form."""


class Settings(BaseSettings):
    """Everything imgbot can be told, with its default."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False
    )

    # --- the image API -------------------------------------------------------------
    openai_base_url: str = Field(
        "https://api.openai.com/v1",
        description="Root of the OpenAI-compatible API, with or without a trailing /v1",
    )
    openai_api_key: SecretStr = Field(SecretStr(""), description="API key sent as a Bearer token")
    response_format: Literal["b64_json", "url", "none"] = Field(
        "none",
        description="response_format to send: b64_json, url, or none (official OpenAI refuses it)",
    )
    request_timeout: float = Field(600.0, gt=0, description="Seconds to wait for one image answer")
    connect_timeout: float = Field(5.0, gt=0, description="Seconds to wait for a connection")
    max_retries: int = Field(2, ge=0, le=10, description="Retries of calls that cannot have billed")
    retry_after_cap: float = Field(120.0, ge=0, description="Longest Retry-After honoured, seconds")
    retry_read_timeout: bool = Field(
        False, description="Also retry after a read timeout (may bill twice upstream)"
    )
    max_download_bytes: int = Field(
        64 * 1024 * 1024, gt=0, description="Cap on an image downloaded from a url result"
    )
    max_reference_bytes: int = Field(
        50 * 1024 * 1024, gt=0, description="Cap on one reference image"
    )
    previews: Literal["on", "off"] = Field(
        "on",
        description="Show the image forming while it is drawn (single images; each preview costs ~100 output tokens)",
    )
    preview_count: int = Field(
        2, ge=1, le=3, description="Previews per image when PREVIEWS=on (1-3)"
    )

    # --- defaults of the command language --------------------------------------------
    default_model: str = Field("gpt-image-2", description="Model used when none is named")
    default_tier: Literal["1K", "2K", "4K"] = Field("1K", description="Resolution tier by default")
    default_quality: Literal["low", "medium", "high", "auto"] = Field(
        "auto", description="Quality by default"
    )
    default_n: int = Field(1, ge=1, le=10, description="Images per request by default")
    max_n: int = Field(4, ge=1, le=10, description="Most images one request may ask for")
    model_aliases: dict[str, str] = Field(
        default_factory=dict,
        description='Extra model names as JSON, e.g. {"v2": "gpt-image-2"}',
    )

    # --- pricing (the seed's formula) -------------------------------------------------
    price_text_input: float = Field(5.0, ge=0, description="USD per million input text tokens")
    price_image_input: float = Field(10.0, ge=0, description="USD per million input image tokens")
    price_image_output: float = Field(
        40.0, ge=0, description="USD per million output image tokens"
    )
    cny_per_usd: float = Field(7.1, gt=0, description="Exchange rate used by the formula")
    credits_per_cny: float = Field(10000.0, gt=0, description="Credits per yuan")
    model_prices: dict[str, tuple[float, float, float]] = Field(
        default_factory=dict,
        description='Per-model USD prices as JSON, e.g. {"gpt-image-1.5": [5, 8, 32]}',
    )

    # --- the ledger and limits (credits; 0 = unlimited) ------------------------------
    database_url: str = Field(
        "sqlite:///./data/imgbot.db",
        description="Where the ledger lives: sqlite:///path or postgresql://user:pass@host/db",
    )
    database_pool_size: int = Field(
        10, ge=1, le=200, description="PostgreSQL connections per process"
    )
    data_dir: str = Field(
        "",
        description="Folder for the heartbeat and kept result files (empty = beside the SQLite file, or ./data)",
    )
    user_daily_limit: float = Field(0, ge=0, description="Credits one user may spend per day")
    user_monthly_limit: float = Field(0, ge=0, description="Credits one user may spend per month")
    chat_daily_limit: float = Field(0, ge=0, description="Credits one chat/server may spend per day")
    global_daily_limit: float = Field(0, ge=0, description="Credits the whole bot may spend per day")
    job_lease: float = Field(
        30.0, ge=1, le=3600,
        description="Seconds a dead process's jobs wait before a live one takes them over",
    )
    delivery_attempts: int = Field(
        5, ge=1, le=20, description="Tries to deliver a result before it is undelivered"
    )
    delivery_retry_delay: float = Field(
        2.0, ge=0, le=600, description="Seconds before the second try; doubled each time"
    )
    keep_results: Literal["auto", "ledger", "files"] = Field(
        "auto",
        description="Where drawn results wait for delivery: ledger, files (DATA_DIR/results), auto (ledger on PostgreSQL, files on SQLite)",
    )
    result_retention_hours: float = Field(
        24.0, ge=0, description="Hours delivered results stay kept (0 = none)"
    )

    # --- billing: caps only, or prepaid credits (Telegram Stars, admin grants) -----------
    billing: Literal["limits", "prepaid"] = Field(
        "limits",
        description="limits: spend is only capped; prepaid: each job is paid from the user's credit balance",
    )
    welcome_credits: float = Field(
        0, ge=0, description="Credits a new user gets once when BILLING=prepaid (0 = none)"
    )
    star_packs: StarPacks = Field(
        default_factory=dict,
        description="Telegram Stars packs for /buy as stars:credits, e.g. 50:20000,250:110000",
    )

    # --- access, concurrency, language ------------------------------------------------
    admins: CsvList = Field(
        default_factory=list, description="Admins as platform:id, comma-separated"
    )
    allowed_users: CsvList = Field(
        default_factory=list, description="If set, only these platform:id users may draw"
    )
    allowed_chats: CsvList = Field(
        default_factory=list, description="If set, only these platform:id chats/servers may draw"
    )
    alert_chats: CsvList = Field(
        default_factory=list,
        description="Chats that get operator alerts, e.g. telegram:-100123,discord:456 (empty = admins' DMs)",
    )
    alert_failure_run: int = Field(
        5, ge=1, le=1000, description="Upstream failures in a row that raise an alert"
    )
    silent_refusals_in_groups: bool = Field(
        True, description="In groups, ignore strangers instead of answering them"
    )
    max_jobs_in_flight: int = Field(8, ge=1, description="Jobs drawing at once, all users")
    max_jobs_per_user: int = Field(1, ge=1, description="Jobs drawing at once for one user")
    max_queued_per_user: int = Field(3, ge=1, description="Jobs one user may have waiting")
    rate_limit_per_minute: int = Field(6, ge=0, description="Requests per user per minute (0 = off)")
    progress_interval: float = Field(5.0, gt=0, description="Seconds between progress updates")
    default_language: Literal["en", "zh"] = Field("en", description="Language when unknown")

    # --- Telegram ---------------------------------------------------------------------
    telegram_bot_token: SecretStr = Field(SecretStr(""), description="Token from @BotFather")
    telegram_api_base_url: str = Field(
        "https://api.telegram.org", description="Bot API server root (self-hosted lifts limits)"
    )
    telegram_webhook_url: str = Field(
        "", description="Public HTTPS URL for webhook mode (empty = long polling)"
    )
    telegram_webhook_secret: SecretStr = Field(
        SecretStr(""), description="Secret token Telegram sends with each webhook call"
    )
    telegram_webhook_listen: str = Field("0.0.0.0", description="Address the webhook server binds")
    telegram_webhook_port: int = Field(8443, ge=1, le=65535, description="Webhook server port")
    telegram_send_original: Literal["auto", "always", "never"] = Field(
        "auto", description="Also send the lossless file: auto (2K/4K), always, never"
    )
    album_debounce: float = Field(1.0, gt=0, description="Seconds to wait for album items")
    confirm_above: float = Field(
        10000,
        ge=0,
        description="Ask (Draw / Cancel) before a job estimated above this many credits (0 = never)",
    )

    # --- Discord ----------------------------------------------------------------------
    discord_bot_token: SecretStr = Field(SecretStr(""), description="Bot token from the portal")
    discord_guild_ids: CsvList = Field(
        default_factory=list, description="Guild ids for fast command sync (empty = global)"
    )
    discord_shard_count: int = Field(
        0, ge=0, le=10000,
        description="Gateway shards in all (0 = as replicas already agreed, else Discord's advice)",
    )
    discord_shard_ids: IntList = Field(
        default_factory=list,
        description="This process's shards, e.g. 0,1 (empty = take free ones through the ledger)",
    )

    # --- the web door (OpenAI-compatible API) ------------------------------------------
    web_listen: str = Field("127.0.0.1", description="Address the web door (API) binds")
    web_port: int = Field(
        8080, ge=0, le=65535, description="Port of the web door (0 = off)"
    )
    web_public_url: str = Field(
        "", description="Public root URL of the web door, for url results (empty = its address)"
    )
    web_max_body_bytes: int = Field(
        64 * 1024 * 1024, gt=0, description="Largest request body the web door reads"
    )

    # --- running ----------------------------------------------------------------------
    shutdown_grace: float = Field(60.0, ge=0, description="Seconds jobs may finish on shutdown")
    startup_retries: int = Field(
        5,
        ge=0,
        le=100,
        description="Retries when a platform cannot be reached at start-up (1, 2, 4… s apart, at most 30)",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log level"
    )
    log_json: bool = Field(False, description="Write logs as JSON lines")

    _split = field_validator(
        "admins", "allowed_users", "allowed_chats", "alert_chats", "discord_guild_ids",
        "discord_shard_ids", mode="before",
    )(_split_csv)

    @field_validator("star_packs", mode="before")
    @classmethod
    def _parse_packs(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        packs: dict[int, float] = {}
        for part in (p.strip() for p in value.split(",")):
            if not part:
                continue
            stars, sep, credits = part.partition(":")
            try:
                count, amount = int(stars), float(credits)
            except ValueError:
                raise ValueError(f"{part!r} is not stars:credits (e.g. 50:20000)") from None
            if not sep or not 1 <= count <= 10000 or not 0 < amount < 1e12:
                raise ValueError(
                    f"{part!r}: stars must be 1-10000 and credits a positive number"
                )
            packs[count] = amount
        return packs

    @field_validator("alert_chats")
    @classmethod
    def _check_alert_chats(cls, value: list[str]) -> list[str]:
        for entry in value:
            platform, _, chat_id = entry.partition(":")
            if platform not in ("telegram", "discord") or not chat_id.lstrip("-").isdigit():
                raise ValueError(
                    f"{entry!r}: expected telegram:<chat id> or discord:<channel id>"
                )
        return value

    @field_validator("admins")
    @classmethod
    def _check_admins(cls, value: list[str]) -> list[str]:
        # An admin entry that matches nobody would leave the operator locked out unawares.
        for entry in value:
            problem = describe_key_problem(entry)
            if problem is not None:
                raise ValueError(problem)
        return value

    @field_validator("openai_base_url", "telegram_api_base_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")) or len(value) < 10:
            raise ValueError("must be an http(s) URL such as https://api.openai.com/v1")
        return value.rstrip("/")

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        try:
            parse_database_url(value)
        except StoreError as err:
            # The message never holds the URL itself: it may carry a password.
            raise ValueError(str(err).removeprefix("DATABASE_URL: ")) from None
        return value.strip()

    @field_validator("previews", mode="before")
    @classmethod
    def _lower_previews(cls, value: object) -> object:
        if isinstance(value, bool):
            return "on" if value else "off"
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_models(self) -> Settings:
        for alias, target in self.model_aliases.items():
            if target not in KNOWN_MODELS:
                raise ValueError(
                    f"MODEL_ALIASES: {alias!r} points to unknown model {target!r}; "
                    f"expected one of {', '.join(KNOWN_MODELS)}"
                )
        if self.resolve_model(self.default_model) is None:
            raise ValueError(
                f"DEFAULT_MODEL: unknown model {self.default_model!r}; "
                f"expected one of {', '.join(KNOWN_MODELS)}"
            )
        for model in self.model_prices:
            if model not in KNOWN_MODELS:
                raise ValueError(f"MODEL_PRICES: unknown model {model!r}")
        if self.default_n > self.max_n:
            raise ValueError("DEFAULT_N must not be larger than MAX_N")
        self._check_shards()
        return self

    def _check_shards(self) -> None:
        ids = self.discord_shard_ids
        if not ids:
            return
        if self.discord_shard_count <= 0:
            raise ValueError(
                "DISCORD_SHARD_IDS needs DISCORD_SHARD_COUNT (the shards of all replicas together)"
            )
        if len(set(ids)) != len(ids):
            raise ValueError("DISCORD_SHARD_IDS: a shard is named twice")
        wrong = [i for i in ids if not 0 <= i < self.discord_shard_count]
        if wrong:
            raise ValueError(
                f"DISCORD_SHARD_IDS: {', '.join(map(str, wrong))} outside 0-"
                f"{self.discord_shard_count - 1} (DISCORD_SHARD_COUNT={self.discord_shard_count})"
            )

    def resolve_model(self, name: str) -> str | None:
        """Return the canonical model for a name or alias, or None."""
        low = name.strip().lower()
        if low in KNOWN_MODELS:
            return low
        aliases = {k.lower(): v for k, v in self.model_aliases.items()}
        return aliases.get(low)

    def id_warnings(self) -> list[str]:
        """Name each malformed entry of ADMINS, ALLOWED_USERS and ALLOWED_CHATS.

        A malformed allow-list entry matches nobody: it only shuts someone out, so it is
        a warning (logged at start-up, shown by `imgbot doctor`), not a refusal to start.
        """
        found = []
        for name in ("admins", "allowed_users", "allowed_chats"):
            for entry in getattr(self, name):
                problem = describe_key_problem(entry)
                if problem is not None:
                    found.append(f"{name.upper()}: {problem}")
        return found

    @property
    def prepaid(self) -> bool:
        """Say whether jobs are paid from credit balances (BILLING=prepaid)."""
        return self.billing == "prepaid"

    def alert_targets(self, platform: str) -> list[str]:
        """Return where `platform`'s alerts go: its ALERT_CHATS ids, else its admins' ids
        (when ALERT_CHATS is set, only the chats it lists are told)."""
        source = self.alert_chats or self.admins
        return [e.partition(":")[2] for e in source if e.partition(":")[0] == platform]

    def is_admin(self, platform: str, user_id: str) -> bool:
        """Say whether platform:user_id is a configured admin."""
        return f"{platform}:{user_id}" in self.admins

    @property
    def web_api_url(self) -> str:
        """Return the web API's root as a client should be pointed at it (…/v1).

        WEB_PUBLIC_URL when set (behind a proxy), else the address it listens on.
        """
        root = self.web_public_url.rstrip("/")
        if not root:
            host = self.web_listen
            host = f"[{host}]" if ":" in host else host
            root = f"http://{host}:{self.web_port}"
        return f"{root}/v1"

    @property
    def store_url(self) -> StoreURL:
        """Return DATABASE_URL parsed: which backend, and where."""
        try:
            return parse_database_url(self.database_url)
        except StoreError as err:
            raise SettingsError(str(err)) from None

    @property
    def database_path(self) -> str:
        """Return the SQLite file path from DATABASE_URL (SettingsError for PostgreSQL)."""
        where = self.store_url
        if where.kind != "sqlite":
            raise SettingsError("DATABASE_URL: this needs a SQLite ledger (sqlite:///path)")
        return where.path

    @property
    def data_path(self) -> Path:
        """Return the folder for the process's own files (heartbeat, kept result files)."""
        if self.data_dir:
            return Path(self.data_dir)
        where = self.store_url
        if where.kind == "sqlite" and where.path != ":memory:":
            return Path(where.path).parent
        return Path("./data")


def load_settings(**overrides: object) -> Settings:
    """Build the settings once; a wrong value raises SettingsError naming the setting."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as err:
        lines = []
        for problem in err.errors():
            name = ".".join(str(p) for p in problem["loc"]).upper() or "settings"
            lines.append(f"{name}: {problem['msg']}")
        raise SettingsError("Invalid settings:\n  " + "\n  ".join(lines)) from None

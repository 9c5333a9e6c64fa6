"""Configuration from the environment and `.env`, validated once at start-up.

A missing or invalid setting that the chosen mode needs is reported as one line
naming the variable (exit 2), never as a traceback: see `SettingsError`.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from commands.base import DEFAULT_APP_ROLES, ROLES, LeapsIdentity, Thresholds
from commands.incidents.lifecycle import Severity, SlaTargets

SLACK_DEFAULT_API_URL = "https://slack.com/api/"


class Visibility(enum.StrEnum):
    EPHEMERAL = "ephemeral"
    IN_CHANNEL = "in_channel"


class RemedyPolicy(BaseModel):
    approver_role: str | None = None
    approvers: int | None = Field(default=None, ge=1, le=5)

    @field_validator("approver_role")
    @classmethod
    def _role(cls, value: str | None) -> str | None:
        if value is not None and value.upper() not in ROLES:
            raise ValueError(f"unknown role {value!r}")
        return value.upper() if value else value


class SettingsError(Exception):
    """One line for the operator: which variable, and what is wrong with it."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        env_nested_delimiter="__",
        extra="ignore",
    )

    slack_bot_token: str | None = None
    slack_app_token: str | None = None
    slack_signing_secret: str | None = None
    slack_api_url: str = SLACK_DEFAULT_API_URL

    database_url: str | None = None
    admin_database_url: str | None = None
    state_database_url: str | None = None

    port: int = Field(default=3000, ge=1, le=65535)
    web_concurrency: int = Field(default=1, ge=1, le=64)  # HTTP worker processes
    log_level: str = "INFO"

    # Replies go in channel where an incident is being worked, ephemeral elsewhere.
    reply_visibility: Visibility = Visibility.EPHEMERAL
    incident_channels: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # The target gateway: pool size and per-check limits.
    pool_max_size: int = Field(default=4, ge=1, le=50)
    connect_timeout_s: float = Field(default=3.0, gt=0, le=60)
    check_timeout_ms: int = Field(default=5000, ge=10)
    lock_timeout_ms: int = Field(default=1000, ge=10)
    # Identical diagnostics asked within this window share one run (a burst of
    # `/db health` during an incident must not pile load on a sick database).
    coalesce_s: float = Field(default=2.0, ge=0)

    thresholds: Thresholds = Field(default_factory=Thresholds)

    # Who may do what. ROLE_MAP is JSON: {"U0123": "ADMIN"}; it wins over the LEAPS
    # `users.role` found through the Slack profile e-mail. Unknown users are PARTICIPANT.
    role_map: dict[str, str] = Field(default_factory=dict)
    # Slack user groups (ids) -> role, e.g. {"S0ONCALL": "ADMIN"}: checked after ROLE_MAP and
    # before LEAPS; a member of several groups gets the highest of their roles.
    role_groups: dict[str, str] = Field(default_factory=dict)
    role_cache_ttl_s: float = Field(default=300.0, ge=0)
    # When the role cannot be looked up now (target or Slack down), the last role resolved
    # within this many seconds still counts for diagnostics (never for requesting or approving).
    role_stale_max_s: float = Field(default=86_400.0, ge=0)
    diagnostics_role: str = "REVIEWER"
    # Channels the bot answers in (ids, comma-separated); empty means every channel.
    allowed_channels: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Per remedy: {"kill-idle": {"approver_role": "ADMIN", "approvers": 2}} (JSON).
    remedy_policies: dict[str, RemedyPolicy] = Field(default_factory=dict)
    approval_ttl_s: float = Field(default=900.0, gt=0)
    allow_superuser_kill: bool = False
    remedy_statement_timeout_ms: int = Field(default=60_000, ge=100)
    remedy_lock_timeout_ms: int = Field(default=2_000, ge=10)
    # Before an approval opens, a row-writing remedy is tried and rolled back (DESIGN.md
    # rule 10), with CHECK_TIMEOUT_MS / LOCK_TIMEOUT_MS; a bigger change is tried on a
    # sample of this many of its rows.
    preflight_max_rows: int = Field(default=1000, ge=1)
    # Who a remedy acts as in LEAPS when the approver has no LEAPS account with a staff
    # role (matched by Slack e-mail): a LEAPS users.id, and the app.user_role it sets.
    remedy_service_user_id: str | None = None
    remedy_service_role: str = "ADMIN"
    # Approvals left `executing` by a dead process: checked at start-up and this often,
    # once older than the remedy statement timeout plus the margin.
    sweep_interval_s: float = Field(default=60.0, gt=0)
    sweep_margin_s: float = Field(default=30.0, ge=0)
    verify_timeout_s: float = Field(default=10.0, gt=0)  # a remedy's read-only verification
    # /db recover's baseline: the target's row counts every this many seconds (0: never),
    # kept this many days in the state store.
    baseline_interval_s: float = Field(default=3600.0, ge=0)
    baseline_keep_days: float = Field(default=7.0, gt=0)
    # No baseline within this many seconds after an incident recovered (the data may still
    # settle): the last one from before it stays what a recovery is measured by.
    baseline_quiet_s: float = Field(default=3600.0, ge=0)
    # Incidents: the operators' SLA targets in seconds from detection (SLA__RESPONSE_S=1800,
    # SLA__REMIND_AT=0.8 …) and how often reminders and headers are checked.
    sla: SlaTargets = Field(default_factory=SlaTargets)
    incident_tick_s: float = Field(default=30.0, gt=0)
    # The watchdog: `health` every this many seconds on one leader (0: off); a check that
    # turns critical (and its recovery) is posted to OPS_CHANNEL, and with
    # WATCHDOG_OPENS_INCIDENT an incident of this severity opens there.
    watchdog_interval_s: float = Field(default=60.0, ge=0)
    ops_channel: str | None = None
    watchdog_opens_incident: bool = False
    watchdog_incident_severity: Severity = "sev2"
    # A directory whose user.md.j2 / tech.md.j2 replace the incident templates shipped.
    template_dir: Path | None = None
    # Query text from pg_stat_activity shows string literals as '…' unless this is on.
    show_query_literals: bool = False
    # Emergency recovery (the guide's chapter). The application's database roles, whose
    # writes `freeze-writes` stops (comma-separated; the Supabase API roles by default,
    # those that exist); the commander is reminded this often while a freeze lasts.
    app_roles: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_APP_ROLES)
    )
    freeze_remind_s: float = Field(default=1800.0, gt=0)
    # A database restored from a backup or to a point in time (a Supabase restore into a
    # new project, a pg_basebackup with a recovery target): `restore-from-copy` reads the
    # lost rows from it, never writes it, and refuses production itself.
    recovery_database_url: str | None = None
    # `/db recover --runbook`: each step may change this many percent more rows than its
    # dry run estimated before the run stops there.
    runbook_tolerance_pct: float = Field(default=10.0, ge=0)

    @field_validator("app_roles", mode="before")
    @classmethod
    def _split_roles(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("role_map", "role_groups")
    @classmethod
    def _known_roles(cls, value: dict[str, str]) -> dict[str, str]:
        for user, role in value.items():
            if role.upper() not in ROLES:
                raise ValueError(f"{user}: unknown role {role!r} (one of {', '.join(ROLES)})")
        return {user: role.upper() for user, role in value.items()}

    @field_validator("diagnostics_role", "remedy_service_role")
    @classmethod
    def _known_role(cls, value: str) -> str:
        if value.upper() not in ROLES:
            raise ValueError(f"unknown role {value!r} (one of {', '.join(ROLES)})")
        return value.upper()

    @field_validator("incident_channels", "allowed_channels", mode="before")
    @classmethod
    def _split_channels(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("slack_api_url")
    @classmethod
    def _trailing_slash(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL")
        return value if value.endswith("/") else value + "/"

    @model_validator(mode="after")
    def _literals_into_thresholds(self) -> Settings:
        """Commands read their limits from Thresholds only; the flag has its own plain name."""
        if self.show_query_literals:
            self.thresholds = self.thresholds.model_copy(update={"show_query_literals": True})
        return self

    def require(self, *names: str) -> None:
        """Fail with the first missing variable the chosen mode needs."""
        for name in names:
            if not getattr(self, name):
                raise SettingsError(f"{name.upper()} is not set (needed for this mode)")

    @property
    def service_identity(self) -> LeapsIdentity | None:
        """The configured LEAPS identity remedies fall back to, or None."""
        if not self.remedy_service_user_id:
            return None
        return LeapsIdentity(
            self.remedy_service_user_id,
            self.remedy_service_role,
            "service identity REMEDY_SERVICE_USER_ID",
        )

    @property
    def has_socket_mode(self) -> bool:
        return bool(self.slack_bot_token and self.slack_app_token)

    @property
    def has_http_mode(self) -> bool:
        return bool(self.slack_bot_token and self.slack_signing_secret)


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, with a one-line SettingsError instead of a traceback."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        name = "__".join(str(part) for part in first["loc"]).upper() or "settings"
        raise SettingsError(f"{name} is invalid: {first['msg']}") from None

"""Configuration from the environment and `.env`, validated once at start-up.

A missing or invalid setting that the chosen mode needs is reported as one line
naming the variable (exit 2), never as a traceback: see `SettingsError`.
"""

from __future__ import annotations

import enum
from typing import Annotated

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from commands.base import Thresholds

SLACK_DEFAULT_API_URL = "https://slack.com/api/"


class Visibility(enum.StrEnum):
    EPHEMERAL = "ephemeral"
    IN_CHANNEL = "in_channel"


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

    @field_validator("incident_channels", mode="before")
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

    def require(self, *names: str) -> None:
        """Fail with the first missing variable the chosen mode needs."""
        for name in names:
            if not getattr(self, name):
                raise SettingsError(f"{name.upper()} is not set (needed for this mode)")

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

"""KUBERNETES.CONTROLLER: how the controller follows the step jobs."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ControllerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    STEP_TIMEOUT_S: float = Field(
        7 * 24 * 3600.0, gt=0, description="Give up on a step that has not finished after this long."
    )
    WATCH_TIMEOUT_S: int = Field(
        300,
        ge=1,
        description="Server-side timeout of one watch request; the controller then re-lists and watches again.",
    )
    REQUEST_TIMEOUT_S: float = Field(
        30.0,
        gt=0,
        description="Client-side timeout of one API call; a watch may stay silent this much longer than WATCH_TIMEOUT_S.",
    )
    BACKOFF_INITIAL_S: float = Field(
        0.5, gt=0, description="First wait before retrying a 429/5xx answer or a dropped connection."
    )
    BACKOFF_MAX_S: float = Field(
        15.0, gt=0, description="Longest wait between two retries (the wait doubles up to this)."
    )
    RETRY_TIMEOUT_S: float = Field(
        300.0,
        gt=0,
        description="Give up when the API server keeps failing (429/5xx, unreachable) for this long in a row.",
    )
    LOG_TAIL_LINES: int = Field(
        50, ge=0, description="Lines of the master pod's log printed when a step fails."
    )
    MAX_EVENTS: int = Field(
        20, ge=0, description="Most recent warning events of the step's pods printed when a step fails."
    )
    SAVE_LOGS: bool = Field(
        True, description="Save each step's pod logs to <root>/logs/<step>/<pod>.log when the step ends."
    )
    VERIFY_OUTPUTS: bool = Field(
        True,
        description="After a step's job Succeeded, require its _SUCCESS.json in storage before starting the next step.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> ControllerConfig:
        if self.BACKOFF_MAX_S < self.BACKOFF_INITIAL_S:
            raise ValueError(
                f"BACKOFF_MAX_S ({self.BACKOFF_MAX_S}) must be at least BACKOFF_INITIAL_S ({self.BACKOFF_INITIAL_S})"
            )
        return self

"""KUBERNETES.CONTROLLER: how the controller follows the step jobs."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ControllerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    STEP_TIMEOUT_S: float = Field(7 * 24 * 3600.0, gt=0, description="Give up on a step that has not finished after this long.")

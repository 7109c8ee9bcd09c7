"""The KUBERNETES section of the experiment config: how each step runs as a PyTorchJob."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from clusterfit.kube.controller_config import ControllerConfig


class KubernetesConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    NAMESPACE: str = Field("default", description="Namespace the step jobs run in.")
    IMAGE: str = Field("ghcr.io/clusterfit/clusterfit:0.1.0", description="Step image with torch (pretrain, extract, train, evaluate).")
    CLUSTER_IMAGE: str = Field("ghcr.io/clusterfit/clusterfit-cluster:0.1.0", description="Step image for cluster (no torch).")
    S3_SECRET_NAME: str = Field("", description="Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, passed by reference only.")
    CONTROLLER: ControllerConfig = Field(default_factory=ControllerConfig, description="How the controller follows the step jobs.")

"""Operator settings from the environment (prefix EDGEMODEL_), documented field by field."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from edgemodel_operator.builders import Images


class OperatorSettings(BaseSettings):
    """How the operator runs; every field can be set as EDGEMODEL_<FIELD> (upper case)."""

    model_config = SettingsConfigDict(env_prefix="EDGEMODEL_", frozen=True)

    namespaces: list[str] = Field(default_factory=list, description="Namespaces to watch; empty means cluster-wide.")
    image_cpu: str = Field(default=Images.cpu, description="Runtime image for CPU classes.")
    image_cuda: str = Field(default=Images.cuda, description="Runtime image for x86 NVIDIA classes.")
    image_jetson: str = Field(default=Images.jetson, description="Runtime image for Jetson classes.")
    registry: str = Field(default=Images.registry, description="OCI registry and path prefix for engine artifacts.")
    builder_version: str = Field(default=Images.builder_version, description="Part of every cache key.")
    resync_seconds: float = Field(default=5.0, gt=0, description="How often each EdgeModel is reconciled anyway.")
    health_host: str = Field(default="0.0.0.0", description="Address of the liveness endpoint (/healthz).")  # noqa: S104 - in a pod
    health_port: int = Field(default=8081, description="Port of the liveness endpoint (/healthz).")
    metrics_host: str = Field(default="0.0.0.0", description="Address of the Prometheus metrics endpoint.")  # noqa: S104 - in a pod
    metrics_port: int = Field(default=8082, description="Port of the Prometheus metrics endpoint (/metrics).")
    peering: str | None = Field(default=None, description="kopf peering name for more than one replica.")

    def images(self) -> Images:
        return Images(
            cpu=self.image_cpu,
            cuda=self.image_cuda,
            jetson=self.image_jetson,
            registry=self.registry,
            builder_version=self.builder_version,
        )

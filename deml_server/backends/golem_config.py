"""Typed configuration of the Golem backend: environment defaults, CLI flags override (no yapapi import here)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from deml_server.envvars import env_bool, env_float, env_int, env_str
from deml_server.errors import FailedPrecondition, InvalidArgument

# Providers refuse agreements that expire sooner than about 5 minutes.
MIN_HORIZON_HOURS = 0.1
# yapapi turns on mid-agreement payments from 5 h and providers require them from 10 h: both work; a month is
# only a guard against a typo.
MAX_HORIZON_HOURS = 24.0 * 31
# Deploy times: a CPU image of ~1 GB takes minutes; Golem's docs put a 7 GB GPU image at ~10 min on a good link.
DEFAULT_DEPLOY_SECONDS_CPU = 20 * 60.0
DEFAULT_DEPLOY_SECONDS_GPU = 60 * 60.0
# The only payment network with GPU providers.
GPU_NETWORK = "polygon"


@dataclass
class GolemConfig:
    """Everything the Golem backend needs; each field names the environment variable it defaults from."""

    # yagna's REST API and the requestor app key (`yagna app-key create requestor`).
    app_key: str = field(default_factory=lambda: env_str("YAGNA_APPKEY"))
    api_url: str = field(default_factory=lambda: env_str("YAGNA_API_URL", "http://127.0.0.1:7465"))
    subnet: str = field(default_factory=lambda: env_str("DEML_GOLEM_SUBNET", "public"))
    payment_driver: str = field(default_factory=lambda: env_str("DEML_GOLEM_PAYMENT_DRIVER", "erc20"))
    # hoodi is the testnet yagna 0.17 funds with `yagna payment fund`; polygon is mainnet GLM.
    payment_network: str = field(default_factory=lambda: env_str("DEML_GOLEM_PAYMENT_NETWORK", "hoodi"))
    # The most this server spends in GLM (one allocation for the server's lifetime).
    budget_glm: float = field(default_factory=lambda: env_float("DEML_GOLEM_BUDGET", 1.0))
    # The VM image: a hash (sha3-224 of the .gvmi), a registry tag, or a URL together with its hash.
    image_hash: str = field(default_factory=lambda: env_str("DEML_GOLEM_IMAGE_HASH"))
    image_tag: str = field(default_factory=lambda: env_str("DEML_GOLEM_IMAGE_TAG"))
    image_url: str = field(default_factory=lambda: env_str("DEML_GOLEM_IMAGE_URL"))
    registry_url: str = field(default_factory=lambda: env_str("DEML_GOLEM_REGISTRY", "https://registry.golem.network"))
    min_mem_gib: float = field(default_factory=lambda: env_float("DEML_GOLEM_MIN_MEM_GIB", 2.0))
    min_storage_gib: float = field(default_factory=lambda: env_float("DEML_GOLEM_MIN_STORAGE_GIB", 4.0))
    min_cpu_threads: int = field(default_factory=lambda: env_int("DEML_GOLEM_MIN_CPU_THREADS", 1))
    # Ask for providers with an NVIDIA GPU passed through (runtime vm-nvidia, capability !exp:gpu).
    gpu: bool = field(default_factory=lambda: env_bool("DEML_GOLEM_GPU", False))
    # Providers (activities) working at once.
    max_workers: int = field(default_factory=lambda: env_int("DEML_GOLEM_MAX_WORKERS", 4))
    # How long agreements (and so each provider's VM and its cache) may last: set it above the longest job.
    horizon_hours: float = field(default_factory=lambda: env_float("DEML_GOLEM_HORIZON_HOURS", 24.0))
    # How long a task waits for a provider to sign an agreement (offers, negotiation) before the job fails.
    provider_wait_seconds: float = field(default_factory=lambda: env_float("DEML_GOLEM_PROVIDER_WAIT", 300.0))
    # How long a provider may take to download and start the VM image; 0: 20 min for CPU images, 60 min for GPU.
    deploy_timeout_seconds: float = field(default_factory=lambda: env_float("DEML_GOLEM_DEPLOY_TIMEOUT", 0.0))
    # Price caps (GLM): the most an offer may ask to start, per CPU hour and per hour of duration.
    max_start_price_glm: float = field(default_factory=lambda: env_float("DEML_GOLEM_MAX_START_PRICE", 0.01))
    max_cpu_price_glm_per_hour: float = field(default_factory=lambda: env_float("DEML_GOLEM_MAX_CPU_PRICE", 0.5))
    max_duration_price_glm_per_hour: float = field(
        default_factory=lambda: env_float("DEML_GOLEM_MAX_DURATION_PRICE", 0.5)
    )
    # How often yapapi may hand one task to a provider (it reschedules failed tasks without limit).
    max_handouts: int = field(default_factory=lambda: env_int("DEML_GOLEM_MAX_HANDOUTS", 1))
    # A provider that fails this many tasks is not used again by this server.
    max_provider_failures: int = field(default_factory=lambda: env_int("DEML_GOLEM_MAX_PROVIDER_FAILURES", 2))

    @property
    def horizon_seconds(self) -> float:
        """How long agreements last, in seconds."""
        return self.horizon_hours * 3600.0

    @property
    def deploy_seconds(self) -> float:
        """The deploy timeout: as set, or the default for CPU or GPU images."""
        if self.deploy_timeout_seconds > 0:
            return self.deploy_timeout_seconds
        return DEFAULT_DEPLOY_SECONDS_GPU if self.gpu else DEFAULT_DEPLOY_SECONDS_CPU

    def validate(self) -> GolemConfig:
        """Fail fast, naming the setting that is missing or wrong."""
        if not self.app_key:
            raise FailedPrecondition(
                "the golem backend needs a yagna app key: set YAGNA_APPKEY "
                "(create one with `yagna app-key create requestor`)"
            )
        if not self.api_url.startswith(("http://", "https://")):
            raise InvalidArgument(f"YAGNA_API_URL must be an http(s) URL (got {self.api_url!r})")
        if not math.isfinite(self.budget_glm) or self.budget_glm <= 0:
            raise InvalidArgument(f"the Golem budget must be a positive number of GLM (got {self.budget_glm})")
        if not (self.image_hash or self.image_tag):
            raise FailedPrecondition(
                "the golem backend needs a VM image: set DEML_GOLEM_IMAGE_HASH or DEML_GOLEM_IMAGE_TAG "
                "(build it from provider_runtime/Dockerfile, see docs/golem.md)"
            )
        if self.image_url and not self.image_hash:
            raise InvalidArgument("DEML_GOLEM_IMAGE_URL needs DEML_GOLEM_IMAGE_HASH too (the runtime checks the hash)")
        if self.image_url and self.image_tag:
            raise InvalidArgument("give either DEML_GOLEM_IMAGE_TAG or DEML_GOLEM_IMAGE_URL, not both")
        if self.gpu and self.payment_network != GPU_NETWORK:
            raise FailedPrecondition(
                f"GPU providers are only on Polygon mainnet, not on {self.payment_network!r}: a GPU demand there "
                "never gets an offer. Switch with DEML_GOLEM_PAYMENT_NETWORK=polygon (--golem-payment-network "
                "polygon), fund the requestor with GLM and POL, and run `yagna payment init --sender "
                "--network=polygon` (docs/golem.md, troubleshooting: 'GPU demand on a testnet')"
            )
        if not MIN_HORIZON_HOURS <= self.horizon_hours <= MAX_HORIZON_HOURS:
            raise InvalidArgument(
                f"DEML_GOLEM_HORIZON_HOURS must be between {MIN_HORIZON_HOURS:g} and {MAX_HORIZON_HOURS:g} "
                f"(providers refuse agreements shorter than 5 minutes; got {self.horizon_hours:g})"
            )
        for name in ("min_mem_gib", "min_storage_gib", "provider_wait_seconds"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise InvalidArgument(f"{name} must be a positive number (got {value})")
        for name in (
            "deploy_timeout_seconds",
            "max_start_price_glm",
            "max_cpu_price_glm_per_hour",
            "max_duration_price_glm_per_hour",
        ):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise InvalidArgument(f"{name} must be a number of at least 0 (got {value})")
        for name in ("min_cpu_threads", "max_workers", "max_handouts", "max_provider_failures"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"{name} must be at least 1 (got {getattr(self, name)})")
        return self

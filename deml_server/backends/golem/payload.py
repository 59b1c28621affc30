"""The demand's payload: which VM image, runtime, capabilities and machine size providers must offer."""

from __future__ import annotations

from dataclasses import dataclass

from yapapi.payload import Payload
from yapapi.payload.package import resolve_package_url
from yapapi.props import inf
from yapapi.props.base import constraint, prop

from deml_server.backends.golem_config import GolemConfig
from deml_server.errors import Unavailable

# The runtime and capability Golem's GPU providers offer (golem-js and ray-on-golem ask for them the same way).
GPU_RUNTIME = "vm-nvidia"
GPU_CAPABILITY = "!exp:gpu"


@dataclass
class VmPayload(Payload):  # type: ignore[misc,unused-ignore]  # Payload is Any where yapapi is not installed
    """A gvmkit-squash VM image; with `runtime="vm-nvidia"` and capability `!exp:gpu` it asks for a GPU."""

    package_url: str = prop("golem.srv.comp.task_package")
    package_format: str = prop("golem.srv.comp.vm.package_format", default="gvmkit-squash")
    runtime: str = constraint(inf.INF_RUNTIME_NAME, default=inf.RUNTIME_VM)
    min_mem_gib: float = constraint(inf.INF_MEM, operator=">=", default=2.0)
    min_storage_gib: float = constraint(inf.INF_STORAGE, operator=">=", default=4.0)
    min_cpu_threads: int = constraint(inf.INF_THREADS, operator=">=", default=1)
    # yapapi's documented way to declare a demand constraint is a dataclass field built by constraint().
    capabilities: list[str] = constraint("golem.runtime.capabilities", default_factory=list)  # noqa: RUF009


async def build_payload(config: GolemConfig) -> VmPayload:
    """The demand's payload; an image URL is used as given, a hash or tag alone is resolved by the registry."""
    if config.image_url:
        package_url = f"hash:sha3:{config.image_hash}:{config.image_url}"
    else:
        try:
            package_url = await resolve_package_url(
                config.registry_url,
                image_hash=config.image_hash or None,
                image_tag=config.image_tag or None,
            )
        except Exception as exc:
            image = config.image_tag or config.image_hash
            raise Unavailable(
                f"the Golem image registry {config.registry_url} cannot resolve {image}: {exc} "
                "(docs/golem.md, troubleshooting: 'the registry cannot resolve the image')"
            ) from exc
    return VmPayload(
        package_url=package_url,
        runtime=GPU_RUNTIME if config.gpu else inf.RUNTIME_VM,
        min_mem_gib=config.min_mem_gib,
        min_storage_gib=config.min_storage_gib,
        min_cpu_threads=config.min_cpu_threads,
        capabilities=[GPU_CAPABILITY] if config.gpu else [],
    )

"""Golem backend: the same task bundle on provider VMs through yapapi (only this package imports yapapi).

- `payload`: the demand (image, runtime, capabilities, machine size)
- `market`: price caps, the provider filter, the real yapapi Golem
- `script`: what the VM runs (content-addressed uploads, the shell script, the result unpacked)
- `ledger`: GLM spent per task, round and job
- `providers`: failures per provider and who is blocked
- `messages`: errors pointing at docs/golem.md's troubleshooting table
- `backend`: sessions, the yapapi worker, stages and failures
"""

from deml_server.backends.golem.backend import GolemBackend, GolemLike, ProviderDropped, provider_label
from deml_server.backends.golem.ledger import CostLedger, TaskKey
from deml_server.backends.golem.market import market_strategy, price_caps, real_golem
from deml_server.backends.golem.payload import VmPayload, build_payload
from deml_server.backends.golem.providers import ProviderBook
from deml_server.backends.golem.script import Upload, plan_uploads, unpack_result, vm_command

__all__ = [
    "CostLedger",
    "GolemBackend",
    "GolemLike",
    "ProviderBook",
    "ProviderDropped",
    "TaskKey",
    "Upload",
    "VmPayload",
    "build_payload",
    "market_strategy",
    "plan_uploads",
    "price_caps",
    "provider_label",
    "real_golem",
    "unpack_result",
    "vm_command",
]

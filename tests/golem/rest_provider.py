"""A provider that exists only as REST calls to yagna's market API (tests only).

No provider agent or exe-unit can be installed here (GOLEM.md), so a second yagna identity offers a VM, counters
every proposal and approves agreements. That is enough for real negotiation up to an agreement and an
activity; the VM never starts (there is no exe-unit), which the requestor sees as a failed deploy.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RestProvider:
    """Offers a VM on `subnet` for the identity behind `app_key`, from a background thread."""

    api_url: str
    app_key: str
    identity: str
    subnet: str
    network: str = "hoodi"
    agreements: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    activities: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def offer(self) -> dict[str, Any]:
        token = "tglm" if self.network != "polygon" else "glm"
        return {
            "properties": {
                "golem.node.id.name": "deml-rest-provider",
                "golem.node.debug.subnet": self.subnet,
                "golem.runtime.name": "vm",
                "golem.runtime.version": "0.4.0",
                "golem.inf.mem.gib": 8.0,
                "golem.inf.storage.gib": 40.0,
                "golem.inf.cpu.threads": 4,
                "golem.inf.cpu.cores": 4,
                "golem.com.scheme": "payu",
                "golem.com.scheme.payu.payment-timeout-sec?": 120,
                "golem.com.payment.debit-notes.accept-timeout?": 240,
                f"golem.com.payment.platform.erc20-{self.network}-{token}.address": self.identity,
                "golem.com.payment.protocol.version": 3,
                "golem.com.pricing.model": "linear",
                "golem.com.pricing.model.linear.coeffs": [0.00001, 0.00002, 0.0],
                "golem.com.usage.vector": ["golem.usage.duration_sec", "golem.usage.cpu_sec"],
                "golem.srv.caps.multi-activity": True,
                "golem.activity.caps.transfer.protocol": ["gftp", "http", "https"],
            },
            "constraints": "(golem.srv.comp.expiration>0)",
        }

    def call(self, method: str, path: str, body: Any = None, timeout: float = 30.0) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.api_url + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self.app_key}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as reply:  # loopback only
            raw = reply.read()
        return json.loads(raw) if raw else None

    def start(self) -> RestProvider:
        self._subscription = str(self.call("POST", "/market-api/v1/offers", self.offer()))
        self._thread = threading.Thread(target=self._loop, name="rest-provider", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        countered: set[str] = set()
        while not self._stop.is_set():
            try:
                path = f"/market-api/v1/offers/{self._subscription}/events?timeout=2&maxEvents=10"
                for event in self.call("GET", path, timeout=10) or []:
                    self.events.append(str(event.get("eventType")))
                    proposal = event.get("proposal") or {}
                    agreement = event.get("agreement") or {}
                    if proposal.get("proposalId") and proposal["proposalId"] not in countered:
                        countered.add(proposal["proposalId"])
                        proposals = f"/market-api/v1/offers/{self._subscription}/proposals"
                        self.call("POST", f"{proposals}/{proposal['proposalId']}", self.offer())
                    if agreement.get("agreementId") and agreement["agreementId"] not in self.agreements:
                        self.agreements.append(agreement["agreementId"])
                        self.call("POST", f"/market-api/v1/agreements/{agreement['agreementId']}/approve?timeout=5")
                # Polling the provider's activity events is what a provider agent does; yagna hands the
                # CreateActivity event to it here.
                path = "/activity-api/v1/events?afterTimestamp=1970-01-01T00%3A00%3A00Z&timeout=1&maxEvents=10"
                for event in self.call("GET", path, timeout=10) or []:
                    kind = event.get("eventType")
                    self.events.append(f"activity:{kind}")
                    activity = str(event.get("activityId") or "")
                    if isinstance(kind, dict) and "CreateActivity" in kind and activity not in self.activities:
                        # What an exe-unit reports once its VM is up; without it, creation times out.
                        state = {"state": ["Initialized", None]}
                        self.call("PUT", f"/activity-api/v1/activity/{activity}/state", state)
                        self.activities.append(activity)
            except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
                self._stop.wait(0.5)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)

"""GLM spent, per task attempt, keyed by the work item's structured fields (no yapapi here)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TaskKey:
    """Which task an attempt belongs to: the job, the training round (0 outside rounds) and its label."""

    job_id: str
    server_round: int
    label: str


@dataclass
class _TaskCost:
    activity: str
    seconds: float
    usage_glm: float


@dataclass
class CostLedger:
    """GLM spent: per task from activity usage, replaced by the agreement's invoice once it arrives.

    An invoice covers an agreement, which may have run several tasks; it is shared among them by run time.
    """

    tasks: list[tuple[TaskKey, _TaskCost]] = field(default_factory=list)
    agreement_of: dict[str, str] = field(default_factory=dict)
    invoiced: dict[str, float] = field(default_factory=dict)

    def record_task(self, key: TaskKey, activity: str, seconds: float, usage_glm: float) -> None:
        """One finished attempt of a task and what its activity's usage counters said it cost."""
        self.tasks.append((key, _TaskCost(activity, seconds, usage_glm)))

    def record_activity(self, activity: str, agreement: str) -> None:
        """Which agreement an activity belongs to (from ActivityCreated)."""
        self.agreement_of[activity] = agreement

    def record_invoice(self, agreement: str, amount_glm: float) -> None:
        """An invoice received for an agreement."""
        self.invoiced[agreement] = amount_glm

    def usage_of(self, activity: str) -> float:
        """Usage already booked on one activity (get_cost() reports a running total)."""
        return sum(cost.usage_glm for _, cost in self.tasks if cost.activity == activity)

    def per_task(self) -> dict[TaskKey, float]:
        """GLM per task."""
        by_agreement: dict[str, list[tuple[TaskKey, _TaskCost]]] = {}
        result: dict[TaskKey, float] = {}
        for key, cost in self.tasks:
            agreement = self.agreement_of.get(cost.activity, "")
            if agreement in self.invoiced:
                by_agreement.setdefault(agreement, []).append((key, cost))
            else:
                result[key] = result.get(key, 0.0) + cost.usage_glm
        for agreement, entries in by_agreement.items():
            seconds = sum(cost.seconds for _, cost in entries)
            for key, cost in entries:
                share = cost.seconds / seconds if seconds > 0 else 1.0 / len(entries)
                result[key] = result.get(key, 0.0) + self.invoiced[agreement] * share
        return result

    @property
    def total(self) -> float:
        """Everything spent so far: invoices, plus usage of tasks whose invoice has not come yet."""
        unbilled = sum(c.usage_glm for _, c in self.tasks if self.agreement_of.get(c.activity, "") not in self.invoiced)
        return sum(self.invoiced.values()) + unbilled

    def per_job(self, job_id: str) -> float:
        """GLM spent on one job's tasks."""
        return sum(value for key, value in self.per_task().items() if key.job_id == job_id)

    def per_round(self, job_id: str) -> dict[int, float]:
        """GLM spent on each training round of one job (tasks outside rounds are left out)."""
        rounds: dict[int, float] = {}
        for key, value in self.per_task().items():
            if key.job_id == job_id and key.server_round > 0:
                rounds[key.server_round] = rounds.get(key.server_round, 0.0) + value
        return rounds

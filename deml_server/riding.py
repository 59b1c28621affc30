"""A round's evaluation riding in the next round's first batch of partitions (TaskDoc.evaluate_first)."""

from __future__ import annotations

import asyncio

from deml_server.bundle import TaskBundle, TaskResult
from provider_runtime.contract import BatchPart

# The longest a batch carrying an evaluation is expected to take (the round before's seconds per partition times
# its partitions): the round's commit waits for the batch, so a long batch would hold the commit back.
RIDE_SECONDS = 1.0


class RidingEvaluation:
    """Round r's evaluation, offered to round r + 1's first batch.

    The batch evaluates the weights it trains from (r's aggregate, the file the evaluate task would get) before its
    partitions, as the evaluate task would (the same bits): the task's own bundle, dispatch and module import are
    saved, and so is the worker it held up at the round's start. The outcome comes back with the batch's, so the
    commit of r waits for the batch: it rides only in a batch expected to take at most RIDE_SECONDS. Otherwise, and
    whenever no batch brings its result back (none rode, the batch failed or was cancelled), the commit sends the
    evaluate task on its own.
    """

    def __init__(self, bundle: TaskBundle, server_round: int) -> None:
        # The evaluate task it stands for: its partition and seed ride; its attempt is recorded as this round's.
        self.bundle = bundle
        self.round = server_round
        self._outcome: asyncio.Future[TaskResult | None] = asyncio.get_running_loop().create_future()

    @property
    def part(self) -> BatchPart:
        """What the carrying batch's task.json says of it (TaskDoc.evaluate_first)."""
        return BatchPart(self.bundle.partition_index, self.bundle.task_seed)

    @staticmethod
    def fits(partitions: int, seconds_per_partition: float | None) -> bool:
        """Whether a batch of `partitions` can carry it: more than one, and short enough at the round before's pace.

        A bundle of one partition is no batch; `seconds_per_partition` None: the pace is not known yet.
        """
        if partitions < 2 or seconds_per_partition is None:
            return False
        return partitions * seconds_per_partition <= RIDE_SECONDS

    def arrived(self, result: TaskResult | None) -> None:
        """The carrying batch's evaluation (None: none came back); the first word is the one that counts."""
        if not self._outcome.done():
            self._outcome.set_result(result)

    async def result(self) -> TaskResult | None:
        """The evaluation that rode, once its batch is back; None when the commit must send the task itself."""
        return await self._outcome

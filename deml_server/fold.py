"""A round's results checked and folded into the aggregate as they arrive, in partition order."""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

from deml_server import weights as wio
from deml_server.bundle import TaskResult
from deml_server.errors import DemlError, InvalidArgument
from deml_server.strategy.aggregate import (
    Run,
    RunningMean,
    SumsMemory,
    check_finite_chunks,
    check_layout,
    finite_runs,
    validate_update,
)
from deml_server.strategy.base import FitResult, Strategy, Weights, is_float
from provider_runtime import compression as codec


class Fold:
    """A round's results, checked and folded in as they arrive.

    They are folded in partition order, so that the sum (and the aggregate) is bit for bit an uninterrupted run's
    whatever order the tasks finish in.
    For a strategy that needs only the weighted mean, each update is added to a running float64 sum and dropped:
    memory O(model) rather than O(partitions x model). Reading and checking run in a thread, when the result's turn
    comes: results that arrive before their predecessors wait for them as files. A whole update is checked (copied,
    its layout and values read) up to CHECK_AHEAD turns early, beside the fold of the one before: at a round's end,
    when the last two partitions finish together and the workers wait for the aggregate, the second is checked
    while the first is folded.
    """

    # Whole updates checked ahead of their turn at most (each a private copy on disk until it is folded).
    CHECK_AHEAD = 2

    def __init__(
        self,
        current: Weights,
        running_mean: bool,
        order: Sequence[int],
        compression: str = "none",
        base: Weights | None = None,
        memory: SumsMemory | None = None,
    ) -> None:
        self.current = current
        self.compression = compression
        # What a compressed update is a delta from: the weights as the workers received them.
        self.base = current if base is None else base
        # Weights files the workers sent and their bytes, for the round's bytes_received_per_worker metric.
        self.files_read = 0
        self.bytes_received = 0
        # `memory`: the running sum's buffer, reused from the round before when the mean is all it was read for.
        self.mean = RunningMean(current, memory) if running_mean else None
        self.results: list[FitResult] = []
        self.problems: list[tuple[int, str]] = []
        self.user_errors: list[tuple[int, str]] = []
        # Partitions whose weights were refused, with why (the dashboard's task table marks their attempts).
        self.rejected: list[tuple[int, str]] = []
        # The round's sampled partitions, in the order they are folded in.
        self._order = tuple(order)
        self._waiting: dict[int, TaskResult | None] = {}
        self._next = 0
        self._lock = asyncio.Lock()
        # Whole updates being checked (or checked) ahead of their turn, by partition.
        self._checking: dict[int, asyncio.Task[wio.UpdateFile]] = {}
        # The base's tensors' largest magnitudes (_base_peak), by name.
        self._peaks: dict[str, float] = {}
        # Small updates' layouts (RunningMean.runs), by header (wio.layout_key): checked once a round.
        self._runs: dict[tuple[int, bytes], tuple[Run, ...]] = {}

    async def arrive(self, index: int, result: TaskResult | None, problem: str) -> None:
        """Note one partition's outcome, then fold in every result whose turn has come."""
        await self.arrive_all({index: (result, problem)})

    async def arrive_all(self, outcomes: Mapping[int, tuple[TaskResult | None, str]]) -> None:
        """Note several partitions' outcomes (a batch's), then fold in every result whose turn has come.

        Noted together, a batch's small updates are checked and folded in one trip to a thread, not one each.
        """
        for index, (result, problem) in outcomes.items():
            self._waiting[index] = self._usable(index, result, problem)
        # Noted before the lock (held while an earlier result is folded), so that their checks can start now.
        self._check_ahead()
        async with self._lock:
            await self._drain()

    def _usable(self, index: int, result: TaskResult | None, problem: str) -> TaskResult | None:
        """The result, when it has an update to check; else None, with the problem noted."""
        if result is None:
            self.problems.append((index, problem))
        elif not result.ok:
            self.user_errors.append((index, result.error))
        elif result.num_examples <= 0:
            self._reject(index, f"it reported {result.num_examples} training examples")
        elif result.update is None:
            self._reject(index, "its batch's result.json gives it no update")
        else:
            return result
        return None

    async def skip(self, indices: Collection[int]) -> None:
        """Give up on partitions that will not arrive (dropped at the round deadline): fold in those after them."""
        async with self._lock:
            for index in indices:
                self._waiting.setdefault(index, None)
            await self._drain()

    async def _drain(self) -> None:
        while self._next < len(self._order) and self._order[self._next] in self._waiting:
            small = self._small_run()
            if small:
                # Small whole updates in turn (a batch's, say): checked and folded one after another in one thread.
                for index, result, control, reason in await asyncio.to_thread(self._check_and_fold_all, small):
                    if reason is not None:
                        self._reject(index, reason)
                        continue
                    self.results.append(
                        FitResult(f"partition-{index}", {}, result.num_examples, result.metrics, index, control)
                    )
                continue
            if self._next == len(self._order) or self._order[self._next] not in self._waiting:
                continue  # the run took every result that had arrived
            index = self._order[self._next]
            waiting = self._waiting.pop(index)
            self._next += 1
            if waiting is None:
                continue
            # Read only now, in turn: a result that arrived early waits as a file, not as a model in memory.
            if self.mean is not None:
                await self._fold_in_pieces(index, waiting)
                continue
            try:
                update = await asyncio.to_thread(self._read, waiting)
                control = await self._control_of(waiting)
            except DemlError as exc:
                self._reject(index, exc.reason)
                continue
            self.results.append(
                FitResult(f"partition-{index}", update, waiting.num_examples, waiting.metrics, index, control)
            )
            del update

    async def _fold_in_pieces(self, index: int, waiting: TaskResult) -> None:
        """Fold one update into the running mean, never whole in memory; refused by name if it does not check.

        A whole update is checked, then folded, a piece at a time (from its private copy); a compressed one
        restored a piece at a time.
        """
        try:
            if self._in_pieces:
                checking = self._checking.pop(index, None) or self._start_check(waiting)
                # The next results' checks run while this one is folded.
                self._check_ahead()
                try:
                    checked = await asyncio.shield(checking)
                except asyncio.CancelledError:
                    # The round is given up: discard() still closes (and removes) the copy being made.
                    self._checking[index] = checking
                    raise
                await asyncio.to_thread(self._fold_checked, checked, waiting)
                control = await self._control_of(waiting)
            else:
                # Read first: a result whose control variates are refused must not be in the sum.
                control = await self._control_of(waiting)
                await asyncio.to_thread(self._fold_restoring, waiting)
        except DemlError as exc:
            self._reject(index, exc.reason)
            return
        self.results.append(FitResult(f"partition-{index}", {}, waiting.num_examples, waiting.metrics, index, control))

    def _small(self, result: TaskResult) -> bool:
        """Whether a whole update is checked and folded from a private copy in memory (wio.IN_MEMORY_BYTES)."""
        update = result.update
        try:
            return self._in_pieces and update is not None and update.length() <= wio.IN_MEMORY_BYTES
        except DemlError:
            return False  # unreadable: refused by the one-at-a-time path, by name

    def _small_run(self) -> list[tuple[int, TaskResult]]:
        """The results in turn from here whose updates are small, taken off the queue (skipped ones too)."""
        run: list[tuple[int, TaskResult]] = []
        while self._next < len(self._order):
            index = self._order[self._next]
            if index not in self._waiting or index in self._checking:
                break
            waiting = self._waiting[index]
            if waiting is not None and not self._small(waiting):
                break
            del self._waiting[index]
            self._next += 1
            if waiting is not None:
                run.append((index, waiting))
        return run

    def _check_and_fold_all(
        self, run: list[tuple[int, TaskResult]]
    ) -> list[tuple[int, TaskResult, Weights, str | None]]:
        """Check and fold each small update in turn: (index, result, control variates, why it was refused)."""
        done: list[tuple[int, TaskResult, Weights, str | None]] = []
        for index, result in run:
            try:
                self._check_and_fold_small(result)
                done.append((index, result, self._control(result), None))
            except DemlError as exc:
                done.append((index, result, {}, exc.reason))
        return done

    def _check_and_fold_small(self, result: TaskResult) -> None:
        """Check and fold a small whole update from one read of its bytes.

        The first update with a given header goes through _checked (every check, each naming what is wrong), and its
        layout is kept as runs (RunningMean.runs) by the header's exact bytes: the next update with the same header
        and size has the same layout, so only its values are checked, and it is folded a run at a time. One whose
        values are not all finite goes the first way, to be refused by name.
        """
        assert self.mean is not None and result.update is not None
        data = result.update.read()
        key = wio.layout_key(data)
        runs = self._runs.get(key) if key is not None else None
        if runs is None or not finite_runs(runs, data):
            update = self._checked(result, data)
            update.close()
            runs = self.mean.runs(update.entries)
            if key is not None:
                self._runs[key] = runs
        self.files_read += 1
        self.bytes_received += len(data)
        self.mean.add_runs(runs, data, result.num_examples)

    def _reject(self, index: int, reason: str) -> None:
        self.rejected.append((index, reason))
        self.problems.append((index, f"worker {index}: weights rejected: {reason}"))

    def _read(self, result: TaskResult) -> Weights:
        source = result.update
        assert source is not None
        update = wio.read_update(source, self.base, self.compression)
        self.files_read += 1
        self.bytes_received += source.length()
        validate_update(self.current, update)
        return update

    def _fold_restoring(self, result: TaskResult) -> None:
        """Check a compressed update (validate_update's checks, on its values as restored), then add it to the sum.

        Restored a piece at a time, to check (where a bound does not already show its values finite) and to fold:
        cheaper than one whole copy of the model.
        """
        assert self.mean is not None and result.update is not None
        update = wio.read_restoring(result.update, self.base, self.compression)
        self.files_read += 1
        self.bytes_received += result.update.length()
        check_layout(self.current, update.layout())
        for name, ref in self.current.items():
            if is_float(ref) and not update.surely_finite(name, self._base_peak(name)):
                check_finite_chunks(name, update.pieces(name))
        self.mean.add_chunks(update.pieces, result.num_examples)

    def _base_peak(self, name: str) -> float:
        """The largest magnitude in the base's tensor (NaN if it holds one), once a round."""
        if name not in self._peaks:
            self._peaks[name] = codec.peak(self.base[name])
        return self._peaks[name]

    @property
    def _in_pieces(self) -> bool:
        """Whether whole updates are checked and folded a piece at a time (a running mean of uncompressed ones)."""
        return self.mean is not None and self.compression == "none"

    def _start_check(self, result: TaskResult) -> asyncio.Task[wio.UpdateFile]:
        return asyncio.create_task(asyncio.to_thread(self._checked, result))

    def _check_ahead(self) -> None:
        """Start checking the results that have arrived among the next CHECK_AHEAD turns (each in a thread)."""
        if not self._in_pieces:
            return
        for index in self._order[self._next : self._next + self.CHECK_AHEAD]:
            waiting = self._waiting.get(index)
            if waiting is not None and index not in self._checking and not self._small(waiting):
                self._checking[index] = self._start_check(waiting)

    def _checked(self, result: TaskResult, data: bytes | None = None) -> wio.UpdateFile:
        """A whole update's private copy, its layout and values checked (reading it a piece at a time).

        `data`: the update's bytes, read already (a small update's copy).
        """
        source = result.update
        assert source is not None
        copy = source.path.with_name(f"{source.path.name}.{source.offset}.checked")
        update = wio.UpdateFile(source, copy, data)
        try:
            if update.metadata.get(codec.SCHEME_KEY, "none") != "none":
                raise InvalidArgument(f"{update.what} is compressed, but the job asks for whole weights")
            check_layout(self.current, update.shapes())
            for name, ref in self.current.items():
                if is_float(ref):
                    check_finite_chunks(name, update.chunks(name))
        except BaseException:
            update.close()
            raise
        return update

    def _fold_checked(self, update: wio.UpdateFile, result: TaskResult) -> None:
        """Add a checked whole update to the running sum, a piece at a time; its copy is removed."""
        assert self.mean is not None
        try:
            self.files_read += 1
            self.bytes_received += update.size
            self.mean.add_chunks(update.chunks, result.num_examples)
        finally:
            update.close()

    async def discard(self) -> None:
        """Let go of updates checked ahead but never folded (a round given up): their copies are removed."""
        checking, self._checking = list(self._checking.values()), {}
        for done in await asyncio.gather(*checking, return_exceptions=True):
            if isinstance(done, wio.UpdateFile):
                done.close()

    @classmethod
    async def _control_of(cls, result: TaskResult) -> Weights:
        """_control in a thread, unless the result is a batch's partition (which has none: no thread need look)."""
        return {} if result.batched else await asyncio.to_thread(cls._control, result)

    @staticmethod
    def _control(result: TaskResult) -> Weights:
        """The control variates a SCAFFOLD worker returned (the strategy checks them); {} when none.

        A batch's partitions have none (a task with control variates goes alone).
        """
        path = result.directory / "control.safetensors"
        return wio.read(path) if not result.batched and path.is_file() else {}

    def aggregate_into(self, strategy: Strategy, server_round: int, path: Path) -> None:
        """Write the new global weights to `path` (read-only: task bundles link it); the sums are let go."""
        if self.mean is not None and strategy.mean_is_aggregate:
            # The mean is the aggregate: written from the sums a piece at a time (memory: the sums, no more).
            mean, self.mean = self.mean, None
            mean.require_results()
            layout = {name: (ref.dtype, ref.shape) for name, ref in self.current.items()}
            try:
                wio.write_read_only(path, lambda out: wio.write_chunked(out, layout, mean.mean_chunks))
            finally:
                # Only new arrays were made from the sums (mean_chunks): their buffer can serve the next round.
                mean.release()
        else:
            aggregated = self.aggregate(strategy, server_round)
            wio.write_read_only(path, lambda out: wio.write(aggregated, out))

    def aggregate(self, strategy: Strategy, server_round: int) -> Weights:
        """The new global weights (in a thread: seconds of numpy work for a big model); the sums are let go."""
        if self.mean is not None:
            mean, self.mean = self.mean, None
            return strategy.aggregate_mean(server_round, self.current, mean.mean64())
        return strategy.aggregate_fit(server_round, self.current, self.results)

"""deml.v1.TrainingService: unpack, call JobService, pack."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from deml.v1 import training_pb2, training_pb2_grpc
from deml_server.auth import current_principal
from deml_server.convert import FILE_KIND_FROM_PB, event_to_pb, job_to_pb, round_to_pb, spec_from_pb, state_from_pb
from deml_server.errors import InvalidArgument
from deml_server.jobs import JobService
from deml_server.ownership import scope_of

Context = grpc.aio.ServicerContext[Any, Any]
# GetJob's rounds when the request does not say.
GET_JOB_ROUNDS = 100


class TrainingServicer(training_pb2_grpc.TrainingServiceServicer):
    """Adapter from the wire to JobService."""

    def __init__(self, jobs: JobService) -> None:
        self._jobs = jobs

    async def SubmitJob(
        self, request_iterator: AsyncIterator[training_pb2.SubmitJobRequest], context: Context
    ) -> training_pb2.SubmitJobResponse:
        """Receive the spec, then the files, then start the job."""
        upload = self._jobs.begin_upload()
        spec: training_pb2.JobSpec | None = None
        try:
            async for message in request_iterator:
                if message.HasField("spec"):
                    if spec is not None:
                        raise InvalidArgument("the submission carries more than one spec")
                    spec = message.spec
                elif message.HasField("chunk"):
                    kind = FILE_KIND_FROM_PB.get(message.chunk.kind)
                    if kind is None:
                        raise InvalidArgument(f"a chunk has no valid file kind ({message.chunk.kind})")
                    upload.add(kind, message.chunk.data)
            if spec is None:
                raise InvalidArgument("the submission has no spec message")
            files = upload.finish()
        except BaseException:
            upload.abort()
            raise
        principal = current_principal()
        job = await self._jobs.submit(spec_from_pb(spec), files, owner=principal.owner if principal else None)
        return training_pb2.SubmitJobResponse(job=job_to_pb(job))

    async def GetJob(self, request: training_pb2.GetJobRequest, context: Context) -> training_pb2.GetJobResponse:
        """One job."""
        latest = request.rounds_limit if request.HasField("rounds_limit") else GET_JOB_ROUNDS
        job = self._jobs.get(request.job_id, scope_of(current_principal()), latest_rounds=latest)
        return training_pb2.GetJobResponse(job=job_to_pb(job))

    async def ListJobs(self, request: training_pb2.ListJobsRequest, context: Context) -> training_pb2.ListJobsResponse:
        """Jobs, newest first."""
        jobs = self._jobs.list(state_from_pb(request.state), request.limit, scope_of(current_principal()))
        return training_pb2.ListJobsResponse(jobs=[job_to_pb(j) for j in jobs])

    async def WatchJob(
        self, request: training_pb2.WatchJobRequest, context: Context
    ) -> AsyncIterator[training_pb2.WatchJobResponse]:
        """Replay, then follow, a job's events."""
        scope = scope_of(current_principal())
        async for event in self._jobs.watch(request.job_id, scope, from_round=request.replay_from_round):
            yield event_to_pb(event)

    async def CancelJob(
        self, request: training_pb2.CancelJobRequest, context: Context
    ) -> training_pb2.CancelJobResponse:
        """Cancel a job."""
        job = await self._jobs.cancel(request.job_id, scope_of(current_principal()))
        return training_pb2.CancelJobResponse(job=job_to_pb(job))

    async def ResumeJob(
        self, request: training_pb2.ResumeJobRequest, context: Context
    ) -> training_pb2.ResumeJobResponse:
        """Resume a failed job."""
        job = await self._jobs.resume(request.job_id, scope_of(current_principal()))
        return training_pb2.ResumeJobResponse(job=job_to_pb(job))

    async def ListRounds(
        self, request: training_pb2.ListRoundsRequest, context: Context
    ) -> training_pb2.ListRoundsResponse:
        """A range of a job's committed rounds."""
        page = self._jobs.rounds(
            request.job_id, start=request.start_round, limit=request.limit, scope=scope_of(current_principal())
        )
        return training_pb2.ListRoundsResponse(
            rounds=[round_to_pb(r) for r in page.rounds], next_start_round=page.next_start
        )

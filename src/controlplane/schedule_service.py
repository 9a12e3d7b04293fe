"""gRPC handlers of ScheduleService: authenticate, convert at the edge, call the scheduler."""

from __future__ import annotations

import itertools

import grpc

from taskrun import convert
from taskrun.controlplane.auth import Authenticator
from taskrun.controlplane.pages import page_token, token_field
from taskrun.controlplane.scheduler import USER_FIELDS, Scheduler
from taskrun.controlplane.services import domain_errors
from taskrun.controlplane.sizing import fitting
from taskrun.core import errors
from taskrun.core.access import Scope
from taskrun.core.schedule import MAX_PREVIEW, Schedule, validate_rule
from taskrun.core.text import quoted
from taskrun.v1 import schedules_pb2, schedules_pb2_grpc

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
DEFAULT_PREVIEW = 5

_UPDATE_PATHS = convert.SCHEDULE_UPDATE_PATHS
assert set(_UPDATE_PATHS.values()) == USER_FIELDS
_NOT_UPDATABLE = {
    "name": "a schedule cannot be renamed; create a new one and delete this one",
    "paused": "use PauseSchedule or ResumeSchedule",
}


class ScheduleService(schedules_pb2_grpc.ScheduleServiceServicer):
    def __init__(self, scheduler: Scheduler, auth: Authenticator) -> None:
        self.scheduler = scheduler
        self.auth = auth

    def _from_pb(
        self,
        request: schedules_pb2.CreateScheduleRequest | schedules_pb2.UpdateScheduleRequest,
    ) -> Schedule:
        if not request.HasField("schedule"):
            raise errors.InvalidArgument("must be given", field="schedule")
        default_attempts = self.scheduler.engine.config.default_max_attempts
        return convert.schedule_from_pb(request.schedule, default_attempts, "schedule.")

    @domain_errors
    async def CreateSchedule(
        self, request: schedules_pb2.CreateScheduleRequest, context: grpc.aio.ServicerContext
    ) -> schedules_pb2.Schedule:
        await self.auth.operator(context, Scope.SUBMIT)
        created = await self.scheduler.create(self._from_pb(request), prefix="schedule.")
        return convert.schedule_to_pb(created)

    @domain_errors
    async def GetSchedule(
        self, request: schedules_pb2.GetScheduleRequest, context: grpc.aio.ServicerContext
    ) -> schedules_pb2.Schedule:
        await self.auth.operator(context, Scope.READ)
        return convert.schedule_to_pb(self.scheduler.get(request.name))

    @domain_errors
    async def ListSchedules(
        self, request: schedules_pb2.ListSchedulesRequest, context: grpc.aio.ServicerContext
    ) -> schedules_pb2.ListSchedulesResponse:
        await self.auth.operator(context, Scope.READ)
        size = request.page_size or DEFAULT_PAGE_SIZE
        if not 1 <= size <= MAX_PAGE_SIZE:
            raise errors.InvalidArgument(
                f"must be between 1 and {MAX_PAGE_SIZE}", field="page_size"
            )
        after = token_field(request.page_token, "ListSchedules")
        schedules = [s for s in self.scheduler.list_schedules() if s.name > after]
        listed, cut = fitting(  # large inputs: cut short, the rest on the next page
            (convert.schedule_to_pb(s) for s in schedules[:size]),
            self.scheduler.engine.config.max_message_bytes,
        )
        more = cut or len(schedules) > size
        return schedules_pb2.ListSchedulesResponse(
            schedules=listed,
            next_page_token=page_token(listed[-1].name) if more else "",
        )

    @domain_errors
    async def UpdateSchedule(
        self, request: schedules_pb2.UpdateScheduleRequest, context: grpc.aio.ServicerContext
    ) -> schedules_pb2.Schedule:
        await self.auth.operator(context, Scope.SUBMIT)
        submitted = self._from_pb(request)
        fields: set[str] = set()
        for path in request.update_mask.paths:
            if path in _NOT_UPDATABLE:
                raise errors.InvalidArgument(
                    f"{quoted(path)} cannot be updated: {_NOT_UPDATABLE[path]}", field="update_mask"
                )
            if path not in _UPDATE_PATHS:
                raise errors.InvalidArgument(
                    f"unknown path {quoted(path)} (updatable: {', '.join(_UPDATE_PATHS)})",
                    field="update_mask",
                )
            fields.add(_UPDATE_PATHS[path])
        updated = await self.scheduler.update(submitted, fields or USER_FIELDS, prefix="schedule.")
        return convert.schedule_to_pb(updated)

    @domain_errors
    async def PauseSchedule(
        self, request: schedules_pb2.PauseScheduleRequest, context: grpc.aio.ServicerContext
    ) -> schedules_pb2.Schedule:
        await self.auth.operator(context, Scope.SUBMIT)
        return convert.schedule_to_pb(await self.scheduler.pause(request.name))

    @domain_errors
    async def ResumeSchedule(
        self, request: schedules_pb2.ResumeScheduleRequest, context: grpc.aio.ServicerContext
    ) -> schedules_pb2.Schedule:
        await self.auth.operator(context, Scope.SUBMIT)
        return convert.schedule_to_pb(await self.scheduler.resume(request.name))

    @domain_errors
    async def DeleteSchedule(
        self, request: schedules_pb2.DeleteScheduleRequest, context: grpc.aio.ServicerContext
    ) -> schedules_pb2.DeleteScheduleResponse:
        await self.auth.operator(context, Scope.SUBMIT)
        await self.scheduler.delete(request.name)
        return schedules_pb2.DeleteScheduleResponse()

    @domain_errors
    async def TriggerSchedule(
        self, request: schedules_pb2.TriggerScheduleRequest, context: grpc.aio.ServicerContext
    ) -> schedules_pb2.TriggerScheduleResponse:
        await self.auth.operator(context, Scope.SUBMIT)
        schedule, task = await self.scheduler.trigger(request.name)
        return schedules_pb2.TriggerScheduleResponse(
            schedule=convert.schedule_to_pb(schedule), task=convert.task_to_pb(task)
        )

    @domain_errors
    async def PreviewSchedule(
        self, request: schedules_pb2.PreviewScheduleRequest, context: grpc.aio.ServicerContext
    ) -> schedules_pb2.PreviewScheduleResponse:
        await self.auth.operator(context, Scope.READ)
        count = request.count or DEFAULT_PREVIEW
        if not 1 <= count <= MAX_PREVIEW:
            raise errors.InvalidArgument(f"must be between 1 and {MAX_PREVIEW}", field="count")
        now = self.scheduler.clock()
        after = convert.ts_from_pb(request, "after") or now
        if request.name:
            rule = self.scheduler.rule(request.name)
        elif request.HasField("schedule"):
            m = request.schedule
            _, _, rule = validate_rule(m.cron, m.rrule, m.timezone, now, "schedule.")
        else:
            raise errors.InvalidArgument(
                "give the name of a schedule, or a schedule with a rule to try", field="name"
            )
        times = list(itertools.islice(rule.occurrences(after), count))
        return schedules_pb2.PreviewScheduleResponse(
            timezone=rule.zone.key,
            fire_times=[convert.fire_time_to_pb(t, rule.zone) for t in times],
        )

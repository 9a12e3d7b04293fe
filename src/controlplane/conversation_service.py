"""gRPC handlers of ConversationService: authenticate, validate, convert at the edge, and call the
engine. A turn is a task, so following a turn's answer is following its task."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import structlog

from taskrun import convert
from taskrun.controlplane.auth import Authenticator
from taskrun.controlplane.engine import Engine
from taskrun.controlplane.guard import status_code
from taskrun.controlplane.pages import page_token, token_field
from taskrun.controlplane.services import TaskService, domain_errors
from taskrun.controlplane.sizing import fitting
from taskrun.controlplane.waiting import check_known_agent, check_offered
from taskrun.core import errors
from taskrun.core.access import Scope
from taskrun.core.ids import ConversationId
from taskrun.core.models import Conversation, TaskPolicy, Turn, asked_model
from taskrun.core.store import ConversationQuery
from taskrun.core.validation import (
    MAX_INPUT_BYTES,
    validate_agent_name,
    validate_input,
    validate_labels,
    validate_policy,
)
from taskrun.v1 import conversations_pb2, conversations_pb2_grpc, tasks_pb2

log = structlog.get_logger(__name__)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_TITLE = 200


def _conversation_id(value: str) -> ConversationId:
    if not value:
        raise errors.InvalidArgument("must not be empty", field="conversation_id")
    if len(value) > 64:
        raise errors.InvalidArgument("is too long to be a conversation id", field="conversation_id")
    return ConversationId(value)


def _message(value: str) -> str:
    if not value.strip():
        raise errors.InvalidArgument("must not be empty", field="message")
    if len(value.encode()) > MAX_INPUT_BYTES:
        raise errors.InvalidArgument(
            f"is over the limit of {MAX_INPUT_BYTES} bytes", field="message"
        )
    return value


class ConversationService(conversations_pb2_grpc.ConversationServiceServicer):
    def __init__(self, engine: Engine, auth: Authenticator, tasks: TaskService) -> None:
        self.engine = engine
        self.auth = auth
        self.tasks = tasks  # follows a turn's task

    def _with_live_state(self, turns: list[Turn]) -> list[Turn]:
        """Turns as stored, with an unfinished one's status taken from its task."""
        for turn in turns:
            if not turn.status.terminal:
                task = self.engine.tasks.get(turn.task_id)
                if task is not None:
                    turn.status = task.status
        return turns

    @domain_errors
    async def CreateConversation(
        self,
        request: conversations_pb2.CreateConversationRequest,
        context: grpc.aio.ServicerContext,
    ) -> conversations_pb2.Conversation:
        principal = await self.auth.operator(context, Scope.SUBMIT)
        agent = validate_agent_name(request.agent)
        message = _message(request.message)
        if len(request.title) > MAX_TITLE:
            raise errors.InvalidArgument(f"must be at most {MAX_TITLE} characters", field="title")
        text, options = validate_input(request.input_json)
        if "prompt" in options:
            raise errors.InvalidArgument(
                'must not hold "prompt": each turn\'s prompt is its message', field="input_json"
            )
        policy = TaskPolicy()
        if request.HasField("policy"):
            default_attempts = self.engine.config.default_max_attempts
            policy = convert.policy_from_pb(request.policy, default_attempts)
        else:
            policy.max_attempts = self.engine.config.default_max_attempts
        policy = validate_policy(policy)
        if policy.idempotency_key:
            raise errors.InvalidArgument(
                "must be empty: each turn is a new task", field="policy.idempotency_key"
            )
        if not request.allow_unknown_agent:
            check_known_agent(agent, self.engine.catalog.names())
            check_offered(
                agent,
                policy.required_provider,
                asked_model(policy.required_model, text),
                self.engine.workers.values(),
                model_field="policy.required_model"
                if policy.required_model
                else "input_json.model",
            )
        self.engine.catalog.check_input(agent, {**options, "prompt": message}, "input_json")
        conversation, turn, _ = await self.engine.create_conversation(
            agent,
            message,
            title=request.title,
            labels=validate_labels(dict(request.labels)),
            options=text,
            policy=policy,
        )
        log.info(
            "conversation created by operator", conversation_id=conversation.id, by=str(principal)
        )
        return convert.conversation_to_pb(conversation, [turn])

    async def SendMessage(
        self, request: conversations_pb2.SendMessageRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[conversations_pb2.ConversationEvent]:
        caller = await self.auth.operator(context, Scope.SUBMIT)
        try:
            conversation_id = _conversation_id(request.conversation_id)
            message = _message(request.message)
            _, turn, task = await self.engine.send_message(conversation_id, message)
        except errors.TaskRunError as exc:
            await context.abort(status_code(exc), str(exc))
        event = conversations_pb2.ConversationEvent()
        convert.turn_to_pb(turn, event.turn)
        yield event
        sub = self.engine.hub.subscribe(task.id)
        follow = tasks_pb2.FollowTaskRequest(task_id=task.id, follow=True, include_events=True)
        try:
            async for update in self.tasks._follow(task.id, follow, sub, caller, context):
                yield conversations_pb2.ConversationEvent(update=update)
        finally:
            self.engine.hub.unsubscribe(sub)
        ended = [
            t for t in await self.engine.store.list_turns(conversation_id) if t.index == turn.index
        ]
        if ended:
            event = conversations_pb2.ConversationEvent()
            convert.turn_to_pb(ended[0], event.turn)
            yield event

    @domain_errors
    async def GetConversation(
        self, request: conversations_pb2.GetConversationRequest, context: grpc.aio.ServicerContext
    ) -> conversations_pb2.Conversation:
        await self.auth.operator(context, Scope.READ)
        conversation_id = _conversation_id(request.conversation_id)
        store = self.engine.store
        conversation = await store.get_conversation(conversation_id)
        if conversation is None:
            raise errors.NotFound(f"no conversation {conversation_id!r}", field="conversation_id")
        if request.before_turn < 0:
            raise errors.InvalidArgument(
                "must be a turn's index, or 0 for up to the latest", field="before_turn"
            )
        turns = self._with_live_state(await store.list_turns(conversation_id))
        if request.before_turn:
            turns = [t for t in turns if t.index < request.before_turn]
        reply = convert.conversation_to_pb(conversation)
        newest_first, _ = fitting(
            (_turn_pb(t) for t in reversed(turns)),
            self.engine.config.max_message_bytes - reply.ByteSize(),
        )
        reply.turns.extend(reversed(newest_first))
        reply.earlier_turns = len(turns) - len(newest_first)
        return reply

    @domain_errors
    async def ListConversations(
        self,
        request: conversations_pb2.ListConversationsRequest,
        context: grpc.aio.ServicerContext,
    ) -> conversations_pb2.ListConversationsResponse:
        await self.auth.operator(context, Scope.READ)
        size = request.page_size or DEFAULT_PAGE_SIZE
        if not 1 <= size <= MAX_PAGE_SIZE:
            raise errors.InvalidArgument(
                f"must be between 1 and {MAX_PAGE_SIZE}", field="page_size"
            )
        if request.agent:
            validate_agent_name(request.agent)
        labels = validate_labels(dict(request.labels))
        page: list[Conversation] = await self.engine.store.list_conversations(
            ConversationQuery(
                agent=request.agent,
                labels=tuple(sorted(labels.items())),
                limit=size + 1,
                before=ConversationId(token_field(request.page_token, "ListConversations")) or None,
            )
        )
        more = len(page) > size
        listed, cut = fitting(  # large inputs: cut short
            (convert.conversation_to_pb(c) for c in page[:size]),
            self.engine.config.max_message_bytes,
        )
        more = more or cut
        token = page_token(listed[-1].id) if more else ""
        return conversations_pb2.ListConversationsResponse(
            conversations=listed, next_page_token=token
        )

    @domain_errors
    async def DeleteConversation(
        self,
        request: conversations_pb2.DeleteConversationRequest,
        context: grpc.aio.ServicerContext,
    ) -> conversations_pb2.DeleteConversationResponse:
        principal = await self.auth.operator(context, Scope.SUBMIT)
        conversation_id = _conversation_id(request.conversation_id)
        await self.engine.delete_conversation(conversation_id)
        log.info(
            "conversation deleted by operator", conversation_id=conversation_id, by=str(principal)
        )
        return conversations_pb2.DeleteConversationResponse()


__all__ = ["ConversationService"]


def _turn_pb(turn: Turn) -> conversations_pb2.Turn:
    out = conversations_pb2.Turn()
    convert.turn_to_pb(turn, out)
    return out

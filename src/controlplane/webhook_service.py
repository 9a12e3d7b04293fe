"""gRPC handlers of WebhookService: authenticate, validate, call the webhook dispatcher."""

from __future__ import annotations

import grpc
import structlog

from taskrun import convert
from taskrun.controlplane.auth import Authenticator
from taskrun.controlplane.services import domain_errors
from taskrun.controlplane.webhooks import WebhookDispatcher
from taskrun.core import errors
from taskrun.core.access import Scope
from taskrun.v1 import webhooks_pb2, webhooks_pb2_grpc

log = structlog.get_logger(__name__)

DEFAULT_DELIVERIES = 50
MAX_DELIVERIES = 1000


class WebhookService(webhooks_pb2_grpc.WebhookServiceServicer):
    def __init__(self, webhooks: WebhookDispatcher, auth: Authenticator) -> None:
        self.webhooks = webhooks
        self.auth = auth

    @domain_errors
    async def CreateWebhook(
        self, request: webhooks_pb2.CreateWebhookRequest, context: grpc.aio.ServicerContext
    ) -> webhooks_pb2.CreateWebhookResponse:
        # admin: a webhook makes the control plane send requests to a URL of the caller's choice
        caller = await self.auth.operator(context, Scope.ADMIN)
        webhook = await self.webhooks.create(
            url=request.url,
            events=list(request.events),
            labels=dict(request.labels),
            agent=request.agent,
            schedule=request.schedule,
            description=request.description,
            secret=request.secret,
            created_by=str(caller),
        )
        return webhooks_pb2.CreateWebhookResponse(
            webhook=convert.webhook_to_pb(webhook), secret=webhook.secret
        )

    @domain_errors
    async def ListWebhooks(
        self, request: webhooks_pb2.ListWebhooksRequest, context: grpc.aio.ServicerContext
    ) -> webhooks_pb2.ListWebhooksResponse:
        await self.auth.operator(context, Scope.READ)
        hooks = sorted(self.webhooks.hooks.values(), key=lambda w: (w.created_at, w.id))
        return webhooks_pb2.ListWebhooksResponse(webhooks=[convert.webhook_to_pb(w) for w in hooks])

    @domain_errors
    async def DeleteWebhook(
        self, request: webhooks_pb2.DeleteWebhookRequest, context: grpc.aio.ServicerContext
    ) -> webhooks_pb2.DeleteWebhookResponse:
        caller = await self.auth.operator(context, Scope.ADMIN)
        if not request.webhook_id:
            raise errors.InvalidArgument("must not be empty", field="webhook_id")
        await self.webhooks.delete(request.webhook_id)
        log.info("webhook deleted by operator", webhook_id=request.webhook_id, by=str(caller))
        return webhooks_pb2.DeleteWebhookResponse()

    @domain_errors
    async def ListWebhookDeliveries(
        self,
        request: webhooks_pb2.ListWebhookDeliveriesRequest,
        context: grpc.aio.ServicerContext,
    ) -> webhooks_pb2.ListWebhookDeliveriesResponse:
        await self.auth.operator(context, Scope.READ)
        if not request.webhook_id:
            raise errors.InvalidArgument("must not be empty", field="webhook_id")
        limit = request.limit or DEFAULT_DELIVERIES
        if not 1 <= limit <= MAX_DELIVERIES:
            raise errors.InvalidArgument(f"must be between 1 and {MAX_DELIVERIES}", field="limit")
        found = await self.webhooks.deliveries(request.webhook_id, limit)
        return webhooks_pb2.ListWebhookDeliveriesResponse(
            deliveries=[convert.delivery_to_pb(d) for d in found]
        )

    @domain_errors
    async def TestWebhook(
        self, request: webhooks_pb2.TestWebhookRequest, context: grpc.aio.ServicerContext
    ) -> webhooks_pb2.WebhookDelivery:
        caller = await self.auth.operator(context, Scope.ADMIN)
        if not request.webhook_id:
            raise errors.InvalidArgument("must not be empty", field="webhook_id")
        delivery = await self.webhooks.send_test(request.webhook_id, str(caller))
        return convert.delivery_to_pb(delivery)

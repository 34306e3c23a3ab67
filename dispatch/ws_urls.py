"""WebSocket URL patterns (named so they are not mistaken for request routing)."""

from django.urls import path

from dispatch.web.consumers import DispatchConsumer

websocket_urlpatterns = [
    path("ws/dispatch/", DispatchConsumer.as_asgi()),
]

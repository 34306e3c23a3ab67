"""ASGI entry point: HTTP for the API, the page and the admin; WebSocket for the live UI."""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hal0web.settings")

from django.core.asgi import get_asgi_application

# Set Django up before importing anything that touches models (the Channels tutorial order).
django_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from dispatch.api.runtime import Hal0Application, api_asgi_application  # noqa: E402
from dispatch.web.ws_origin import SameOriginValidator  # noqa: E402
from dispatch.web.ws_paused import PausedWhileDatabaseAway  # noqa: E402
from dispatch.ws_urls import websocket_urlpatterns  # noqa: E402

application = Hal0Application(
    ProtocolTypeRouter(
        {
            "http": django_app,
            # The feed opens only from the server's own origin (scheme, host and port) or a
            # CSRF-trusted one: dispatch/web/ws_origin.py says why the host alone is not enough.
            # With the database away the session cannot be read: paused (4503), not a 500.
            "websocket": SameOriginValidator(
                PausedWhileDatabaseAway(AuthMiddlewareStack(URLRouter(websocket_urlpatterns)))
            ),
        }
    ),
    api=api_asgi_application(),
)

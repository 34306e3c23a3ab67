from django.contrib import admin
from django.urls import include, path, re_path

from dispatch.api import guard, health, metrics_view
from dispatch.api.views import VIEWS
from dispatch.routing.endpoints import API_PREFIXES, ENDPOINTS

urlpatterns = [
    # Every API path, from the endpoint table (dispatch/routing/endpoints.py).
    *(
        path(p, VIEWS[ep.name], name=f"api-{ep.name}" if i == 0 else None)
        for ep in ENDPOINTS
        for i, p in enumerate(ep.paths)
    ),
    # The rest of each API prefix (/v1/, Ollama's /api/): a 404 its clients parse.
    *(
        re_path(rf"^{prefix[1:]}(?P<path>.*)$", guard.not_found, {"protocol": protocol})
        for prefix, protocol in API_PREFIXES.items()
    ),
    path("healthz", health.healthz, name="healthz"),
    path("metrics", metrics_view.view, name="metrics"),
    path("admin/", admin.site.urls),
    path("", include("dispatch.urls")),
]

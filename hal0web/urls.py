from django.contrib import admin
from django.urls import include, path, re_path

from dispatch.api import views as api
from dispatch.observability import metrics
from dispatch.routing.endpoints import ENDPOINTS

urlpatterns = [
    # Every API path, from the endpoint table (dispatch/routing/endpoints.py).
    *(
        path(p, api.VIEWS[ep.name], name=f"api-{ep.name}" if i == 0 else None)
        for ep in ENDPOINTS
        for i, p in enumerate(ep.paths)
    ),
    re_path(r"^v1/(?P<path>.*)$", api.not_found),
    path("healthz", api.healthz, name="healthz"),
    path("metrics", metrics.view, name="metrics"),
    path("admin/", admin.site.urls),
    path("", include("dispatch.urls")),
]

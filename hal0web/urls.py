from django.contrib import admin
from django.urls import include, path, re_path

from dispatch import api, metrics

urlpatterns = [
    path("v1/chat/completions", api.chat_completions, name="v1-chat"),
    path("v1/completions", api.completions, name="v1-completions"),
    path("v1/embeddings", api.embeddings, name="v1-embeddings"),
    path("v1/models", api.models, name="v1-models"),
    re_path(r"^v1/models/(?P<model_id>.+)$", api.model_detail, name="v1-model"),
    re_path(r"^v1/(?P<path>.*)$", api.not_found),
    path("healthz", api.healthz, name="healthz"),
    path("metrics", metrics.view, name="metrics"),
    path("admin/", admin.site.urls),
    path("", include("dispatch.urls")),
]

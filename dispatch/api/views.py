"""Each endpoint of the table, its view (``hal0web/urls.py`` routes its paths to it)."""

from __future__ import annotations

from dispatch.api import models_list, ollama_models
from dispatch.api.guard import View, serves
from dispatch.api.pipeline import proxy_view
from dispatch.routing.endpoints import ENDPOINTS, Endpoint

# The endpoints hal0web answers itself (GET and HEAD: the server sends HEAD's headers
# without the body).
_OWN: dict[str, View] = {
    "models": models_list.models,
    "models/{id}": models_list.model_detail,
    "api/tags": ollama_models.tags,
    "api/ps": ollama_models.ps,
    "api/version": ollama_models.version,
    "api/show": ollama_models.show,
}


def _own_view(ep: Endpoint) -> View:
    return serves(ep.methods, _OWN[ep.name], ep.label, ep.protocol)


VIEWS: dict[str, View] = {
    ep.name: (_own_view(ep) if ep.model_in == "none" else proxy_view(ep)) for ep in ENDPOINTS
}

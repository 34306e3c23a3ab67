"""The page's staff buttons (drain, undrain; load, unload, pin, unpin a model): one small
JSON endpoint over ``dispatch.lifecycle.control``, as the admin and ``manage.py slots``.

``POST /control/`` with ``{"action": ..., "slot": NAME, "model": ID}`` (``model`` for the
model actions) answers ``{"ok": true, "message": ...}``, or ``{"error": {"code", "message"}}``
with its status: 403 for anyone but staff and for a failed CSRF check, 400 for a body that is
not one action, 409 when the control refuses (the reason in its words), 405 for another
method. Every answer is JSON — the page calls it with ``fetch`` and shows the message — never
a redirect to the login page nor Django's HTML error pages.
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse, QueryDict
from django.middleware.csrf import CsrfViewMiddleware
from django.views.decorators.csrf import csrf_exempt

from dispatch.lib.json_reader import MAX_DEPTH, TooDeep, loads
from dispatch.lifecycle import control


def _no_view(request: HttpRequest) -> HttpResponseBase:
    # Never called: the middleware is used for its check alone (process_view).
    raise AssertionError("not a view")


_csrf = CsrfViewMiddleware(_no_view)


def _error(status: int, code: str, message: str) -> JsonResponse:
    return JsonResponse({"error": {"code": code, "message": message}}, status=status)


def _asked(request: HttpRequest) -> tuple[str, str, str | None] | JsonResponse:
    """The action, slot and model the body names, or the 400 that says what is wrong."""
    try:
        body: Any = loads(request.body or b"")
    except TooDeep:
        return _error(
            400, "json_too_deep", f"The body nests deeper than {MAX_DEPTH} levels: send one action."
        )
    except ValueError:
        return _error(400, "invalid_request", "The body must be JSON: {action, slot, model}.")
    if not isinstance(body, dict):
        return _error(400, "invalid_request", "The body must be a JSON object.")
    action, slot, model = body.get("action"), body.get("slot"), body.get("model")
    if action not in control.ACTIONS:
        return _error(
            400, "invalid_request", f"action must be one of: {', '.join(control.ACTIONS)}."
        )
    if not isinstance(slot, str) or not slot:
        return _error(400, "invalid_request", "slot must be a slot's name.")
    takes_model = control.ACTIONS[action][1]
    if takes_model and (not isinstance(model, str) or not model):
        return _error(400, "invalid_request", f"{action} needs a model: a model id of the slot.")
    return action, slot, model if takes_model else None


@csrf_exempt  # checked below, so that a failure is answered in JSON like everything else
def act(request: HttpRequest) -> HttpResponse:
    if request.method != "POST":
        refused = _error(405, "method_not_allowed", "Only POST.")
        refused["Allow"] = "POST"
        return refused
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated or not user.is_staff:
        return _error(403, "staff_only", "Only staff may drain slots or load and pin models.")
    # The token comes in the X-CSRFToken header only: the body is JSON, never read as a form.
    request.POST = QueryDict()
    if _csrf.process_view(request, _no_view, (), {}) is not None:
        return _error(403, "csrf_failed", "CSRF check failed; reload the page.")
    asked = _asked(request)
    if isinstance(asked, JsonResponse):
        return asked
    try:
        message = control.act(*asked)
    except control.ControlError as exc:
        return _error(409, "refused", str(exc))
    return JsonResponse({"ok": True, "message": message})

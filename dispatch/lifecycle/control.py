"""The operator's hands on a slot's models and traffic: load, unload, pin, drain, undrain.

Sync, and written to the database only: the admin, ``manage.py slots`` and the page's staff
buttons all call these, from whichever process they run in, and every process converges on
the change as on any other (``dispatch.coordination.sync``). The leading process's loader
(``dispatch.lifecycle.loader``) acts on a wanted load or unload through the same queue as a
request's, and clears the wish once done.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.db import transaction
from django.utils import timezone

from dispatch.routing import states

if TYPE_CHECKING:
    from dispatch.models import Slot, SlotModel

LOAD = "load"
UNLOAD = "unload"


class ControlError(ValueError):
    """The action cannot be taken; the message says why, in the operator's words."""


def _slot(name: str) -> Slot:
    from dispatch.models import Slot

    slot = Slot.objects.select_for_update().filter(name=name).first()
    if slot is None:
        raise ControlError(f"no slot named {name!r}")
    return slot


def _model(slot_name: str, model_id: str) -> tuple[Slot, SlotModel]:
    slot = _slot(slot_name)
    row = slot.models.filter(model_id=model_id).first()
    if row is None:
        known = ", ".join(slot.models.values_list("model_id", flat=True)) or "none"
        raise ControlError(f"slot {slot_name!r} has no model {model_id!r} (it has: {known})")
    return slot, row


def ask(slot_name: str, model_id: str, what: str) -> None:
    """Ask the loader to load or unload one model of a slot whose server can be asked."""
    if what not in (LOAD, UNLOAD):
        raise ControlError(f"{what!r} is neither {LOAD} nor {UNLOAD}")
    with transaction.atomic():
        slot, row = _model(slot_name, model_id)
        if not slot.enabled:
            raise ControlError(f"slot {slot_name!r} is disabled")
        if not slot.loads_models:
            raise ControlError(
                f"slot {slot_name!r} does not load or unload models when asked "
                "(its server keeps what it serves loaded)"
            )
        if what == UNLOAD and row.pinned:
            raise ControlError(f"{model_id!r} is pinned; unpin it first")
        row.wanted = what
        row.save(update_fields=["wanted"])


def pin(slot_name: str, model_id: str, pinned: bool = True) -> None:
    """Pin a model (never unloaded by hal0web to make room, nor when idle) or unpin it."""
    with transaction.atomic():
        _slot_row, row = _model(slot_name, model_id)
        # An alias is the same model on the server: pin every row that names it.
        for same in _slot_row.models.filter(upstream_model=row.upstream_model):
            same.pinned = pinned
            same.save(update_fields=["pinned"])


def drain(slot_name: str) -> None:
    """No new requests; those in flight finish. Undone by :func:`undrain`."""
    with transaction.atomic():
        slot = _slot(slot_name)
        if slot.state != states.DRAINING:
            slot.state, slot.state_changed_at = states.DRAINING, timezone.now()
            slot.save(update_fields=["state", "state_changed_at"])


def undrain(slot_name: str) -> None:
    """Take requests again: the slot is probed afresh (``unknown`` until then, with no error
    of a probe made before)."""
    with transaction.atomic():
        slot = _slot(slot_name)
        if slot.state == states.DRAINING:
            slot.state, slot.state_changed_at = states.UNKNOWN, timezone.now()
            slot.last_error = ""
            slot.save(update_fields=["state", "state_changed_at", "last_error"])


# The actions by name, as `manage.py slots` and the page's staff buttons take them: name ->
# (what it does, whether it names a model).
ACTIONS: dict[str, tuple[str, bool]] = {
    "drain": ("take no new requests; those in flight finish", False),
    "undrain": ("take requests again (the slot is probed afresh)", False),
    LOAD: ("ask the slot's server to load MODEL (through hal0web's loader)", True),
    UNLOAD: ("ask the slot's server to unload MODEL", True),
    "pin": ("never unload MODEL to make room or when idle", True),
    "unpin": ("let MODEL be unloaded again", True),
}


def act(action: str, slot_name: str, model_id: str | None = None) -> str:
    """One of :data:`ACTIONS` by name; what is now so, in a line. ControlError if refused."""
    if action not in ACTIONS:
        raise ControlError(f"no action {action!r}; the actions: {', '.join(ACTIONS)}")
    if action == "drain":
        drain(slot_name)
        return f"slot {slot_name} is draining: no new requests, those in flight finish"
    if action == "undrain":
        undrain(slot_name)
        return f"slot {slot_name} takes requests again (probed afresh)"
    if not model_id:
        raise ControlError(f"{action} needs a model")
    if action in ("pin", "unpin"):
        pin(slot_name, model_id, action == "pin")
        return f"{model_id} on {slot_name} {action}ned"
    ask(slot_name, model_id, action)
    return f"asked slot {slot_name} to {action} {model_id}"

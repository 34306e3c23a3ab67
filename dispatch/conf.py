"""Settings as the request path reads them: each read from Django's settings once, then kept
until a setting changes.

A read of ``django.conf.settings.X`` costs ~3,200 instructions under Django 5.2 (its
``LazyObject.__getattribute__`` looks for ``_mask_wrapped`` on every value read, raising and
clearing an AttributeError for each int or str), and a /v1 request read a dozen: about 3 % of
a chat request's instructions (bench/served.py). ``conf.X`` is an attribute of a plain
object. Settings do not change while a process serves; a test's ``override_settings`` (and
pytest-django's ``settings`` fixture) does change them, and sends ``setting_changed``, on
which ``forget`` drops every kept value (connected in ``dispatch.apps``).
"""

from __future__ import annotations

from typing import Any

from django.conf import settings


class _Kept:
    def __getattr__(self, name: str) -> Any:
        # Only for a name not kept yet: once kept, it is found in the instance's dict.
        value = getattr(settings, name)
        self.__dict__[name] = value
        return value

    def forget(self, **kwargs: Any) -> None:
        self.__dict__.clear()


conf = _Kept()

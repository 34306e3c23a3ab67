"""dispatch.conf: settings as the request path reads them, kept, and never stale."""

from __future__ import annotations

from typing import Any

import pytest
from django.conf import settings
from django.test import override_settings

from dispatch.conf import conf


def test_a_kept_setting_is_djangos_and_follows_every_change() -> None:
    assert conf.HAL0_QUEUE_WAIT_S == settings.HAL0_QUEUE_WAIT_S
    assert "HAL0_QUEUE_WAIT_S" in vars(conf)  # kept: the next read is an attribute's
    before = settings.HAL0_QUEUE_WAIT_S
    with override_settings(HAL0_QUEUE_WAIT_S=before + 7):
        assert before + 7 == conf.HAL0_QUEUE_WAIT_S
    assert before == conf.HAL0_QUEUE_WAIT_S


def test_the_settings_fixture_is_followed_too(settings: Any) -> None:
    conf.HAL0_API_AUTH  # noqa: B018 (kept before the change)
    settings.HAL0_API_AUTH = "required"
    assert conf.HAL0_API_AUTH == "required"


def test_a_setting_that_does_not_exist_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError):
        conf.NO_SUCH_SETTING  # noqa: B018

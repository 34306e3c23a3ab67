"""`manage.py slots import|export|list`: the command-line face of the manifests."""

from __future__ import annotations

import os
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from dispatch.models import Slot, SlotModel
from tests.conftest import add_slot

REPO = Path(__file__).resolve().parent.parent
SLOTS = REPO / "slots"

pytestmark = pytest.mark.django_db


def run(*args: str) -> str:
    out = StringIO()
    call_command("slots", *args, stdout=out)
    return out.getvalue()


def snapshot() -> list[tuple]:
    return sorted(
        (s.name, s.url, s.is_default, s.enabled, tuple(sorted(m.model_id for m in s.models.all())))
        for s in Slot.objects.prefetch_related("models")
    )


def test_import_the_shipped_slots():
    out = run("import", str(SLOTS))
    assert "create slot primary" in out and "create slot agent-hermes" in out
    primary = Slot.objects.get(name="primary")
    assert (primary.url, primary.is_default, primary.kind) == (
        "http://127.0.0.1:8001/v1",
        True,
        "llamacpp",
    )
    assert primary.default_model.model_id == "smollm2-135m-instruct"
    hermes = Slot.objects.get(name="agent-hermes")
    assert hermes.url == "http://127.0.0.1:8002/v1" and not hermes.is_default
    rows = {m.model_id: (m.source, m.upstream_model, m.is_default) for m in hermes.models.all()}
    assert rows == {
        "gemma3-270m": ("manifest", "gemma3-270m", True),
        "hermes": ("alias", "gemma3-270m", False),
    }
    again = run("import", str(SLOTS))
    assert "0 created, 0 updated, 0 deleted, 2 unchanged" in again


def test_import_updates_by_name_and_reports_changes(tmp_path):
    run("import", str(SLOTS))
    text = (SLOTS / "agent-hermes.toml").read_text().replace("8002", "8012")
    (tmp_path / "agent-hermes.toml").write_text(text)
    out = run("import", str(tmp_path / "agent-hermes.toml"))
    assert (
        "update slot agent-hermes: url 'http://127.0.0.1:8002/v1' → 'http://127.0.0.1:8012/v1'"
        in out
    )
    assert Slot.objects.get(name="agent-hermes").url == "http://127.0.0.1:8012/v1"
    assert Slot.objects.filter(name="primary").exists()  # no --prune: others stay


def test_bad_manifest_imports_nothing(tmp_path):
    (tmp_path / "good.toml").write_text('name = "good"\nport = 9001\n')
    (tmp_path / "x.toml").write_text('name = "Bad_Name"\nurl = "gopher://h"\n')
    with pytest.raises(CommandError) as exc:
        run("import", str(tmp_path))
    message = str(exc.value)
    assert f"{tmp_path}/x.toml: name: must match ^[a-z0-9]" in message
    assert f"{tmp_path}/x.toml: url: must be an http:// or https://" in message
    assert "nothing imported" in message
    assert Slot.objects.count() == 0


def test_database_level_error_rolls_back_the_whole_import(tmp_path):
    add_slot("keeper", "http://127.0.0.1:1/v1", ["k"], is_default=True)
    (tmp_path / "a.toml").write_text('name = "a"\nport = 9001\n')
    (tmp_path / "b.toml").write_text('name = "b"\nport = 9002\ndefault = true\n')
    before = snapshot()
    with pytest.raises(
        CommandError, match=r"b\.toml: default: slot 'keeper' is already the default"
    ):
        run("import", str(tmp_path))
    assert snapshot() == before  # `a` was written before `b` failed: rolled back


def test_prune_deletes_slots_not_in_the_files(tmp_path):
    run("import", str(SLOTS))
    add_slot("stray", "http://127.0.0.1:9/v1", ["s"])
    out = run("import", str(SLOTS / "primary.toml"), "--prune")
    assert "delete slot stray" in out and "delete slot agent-hermes" in out
    assert list(Slot.objects.values_list("name", flat=True)) == ["primary"]
    assert not SlotModel.objects.filter(slot__name="stray").exists()


def test_without_prune_nothing_is_deleted():
    add_slot("stray", "http://127.0.0.1:9/v1", ["s"])
    run("import", str(SLOTS))
    assert Slot.objects.filter(name="stray").exists()


def test_dry_run_prints_and_changes_nothing(tmp_path):
    add_slot("stray", "http://127.0.0.1:9/v1", ["s"])
    add_slot("primary", "http://127.0.0.1:7/v1", ["old-model"])
    before = snapshot()
    out = run("import", str(SLOTS), "--prune", "--dry-run")
    assert "would create slot agent-hermes" in out
    assert "would delete slot stray" in out
    assert (
        "would update slot primary: url 'http://127.0.0.1:7/v1' → 'http://127.0.0.1:8001/v1'" in out
    )
    assert "model old-model removed" in out and "model smollm2-135m-instruct added" in out
    assert "dry run: nothing was changed" in out
    assert snapshot() == before


def test_dry_run_still_validates(tmp_path):
    (tmp_path / "x.toml").write_text('name = "x"\n')
    with pytest.raises(CommandError, match=r"x\.toml: url: required"):
        run("import", str(tmp_path), "--dry-run")


def test_export_import_export_is_byte_identical(tmp_path):
    run("import", str(SLOTS))
    slot = Slot.objects.get(name="agent-hermes")
    slot.extra = {"runtime": "container", "server": {"host": "0.0.0.0"}, "model": {"ctx": 8192}}
    slot.save()
    first, second = tmp_path / "first", tmp_path / "second"
    out = run("export", str(first))
    assert f"wrote {first}/agent-hermes.toml" in out
    assert sorted(p.name for p in first.iterdir()) == ["agent-hermes.toml", "primary.toml"]
    Slot.objects.all().delete()
    run("import", str(first))
    run("export", str(second))
    for name in ("agent-hermes.toml", "primary.toml"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    text = (first / "agent-hermes.toml").read_text()
    assert 'runtime = "container"' in text and "[server]" in text and "ctx = 8192" in text


def test_list_shows_a_table():
    run("import", str(SLOTS))
    Slot.objects.filter(name="agent-hermes").update(state="ready")
    lines = run("list").splitlines()
    assert lines[0].split() == ["NAME", "URL", "TYPE", "STATE", "DEFAULT", "MODEL", "MODELS"]
    hermes = next(line for line in lines if line.startswith("agent-hermes"))
    assert hermes.split()[:5] == [
        "agent-hermes",
        "http://127.0.0.1:8002/v1",
        "llm",
        "ready",
        "gemma3-270m",
    ]
    assert "hermes→gemma3-270m" in hermes
    primary = next(line for line in lines if line.startswith("primary"))
    assert "primary *" in primary and "smollm2-135m-instruct" in primary


def test_bad_manifest_exits_non_zero_from_the_shell(tmp_path):
    (tmp_path / "x.toml").write_text('name = "x"\nport = 1\n[model]\nmodels = ["a"]\n')
    env = {
        **os.environ,
        "HAL0_DATA_DIR": str(tmp_path / "data"),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "HAL0_ENV_FILE": "/nonexistent",
    }
    migrate = subprocess.run(
        [sys.executable, "manage.py", "migrate", "-v0"], cwd=REPO, env=env, capture_output=True
    )
    assert migrate.returncode == 0, migrate.stderr
    bad = subprocess.run(
        [sys.executable, "manage.py", "slots", "import", str(tmp_path / "x.toml")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1
    assert f"{tmp_path}/x.toml: model.default: required when model.models is given" in bad.stderr


def test_export_refuses_extra_keys_toml_cannot_carry(tmp_path):
    run("import", str(SLOTS))
    Slot.objects.filter(name="primary").update(extra={"server": {"host": None}})
    with pytest.raises(CommandError, match=r"primary: extra\.server\.host: TOML has no null"):
        run("export", str(tmp_path / "out"))
    assert not (tmp_path / "out" / "agent-hermes.toml").exists()  # all or nothing


# --- the operator's hands: drain, undrain, load, unload, pin, unpin --------------------------


@pytest.fixture
def router_slot():
    """A slot whose server loads and unloads models when asked (llama.cpp's router, say)."""
    slot = add_slot(
        "router", "http://127.0.0.1:9/v1", ["gemma3", "smollm2"], aliases={"g": "gemma3"}
    )
    Slot.objects.filter(pk=slot.pk).update(loads_models=True, model_limit=1, state="ready")
    return slot


def test_drain_and_undrain(router_slot):
    out = run("drain", "router")
    assert out == "slot router is draining: no new requests, those in flight finish\n"
    slot = Slot.objects.get(name="router")
    assert slot.state == "draining" and slot.state_changed_at is not None
    run("drain", "router")  # again: still draining, no error
    assert Slot.objects.get(name="router").state == "draining"
    assert run("undrain", "router") == "slot router takes requests again (probed afresh)\n"
    assert Slot.objects.get(name="router").state == "unknown"


def test_load_and_unload_are_asked_of_the_loader(router_slot):
    assert run("load", "router", "smollm2") == "asked slot router to load smollm2\n"
    assert SlotModel.objects.get(slot=router_slot, model_id="smollm2").wanted == "load"
    run("unload", "router", "gemma3")
    assert SlotModel.objects.get(slot=router_slot, model_id="gemma3").wanted == "unload"


def test_pin_and_unpin_every_row_of_the_same_model(router_slot):
    assert run("pin", "router", "g") == "g on router pinned\n"
    rows = dict(SlotModel.objects.filter(slot=router_slot).values_list("model_id", "pinned"))
    assert rows == {"gemma3": True, "g": True, "smollm2": False}  # the alias is the same model
    with pytest.raises(CommandError, match="'gemma3' is pinned; unpin it first"):
        run("unload", "router", "gemma3")
    assert run("unpin", "router", "gemma3") == "gemma3 on router unpinned\n"
    assert not SlotModel.objects.filter(slot=router_slot, pinned=True).exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("drain", "nope"), "no slot named 'nope'"),
        (
            ("load", "router", "nope"),
            "slot 'router' has no model 'nope' (it has: gemma3, g, smollm2)",
        ),
        (("pin", "nope", "gemma3"), "no slot named 'nope'"),
    ],
)
def test_control_errors_are_command_errors(router_slot, args, message):
    with pytest.raises(CommandError) as exc:
        run(*args)
    assert str(exc.value) == message
    assert exc.value.returncode == 1


def test_a_slot_that_does_not_load_models_refuses_a_load():
    add_slot("plain", "http://127.0.0.1:9/v1", ["m"])
    with pytest.raises(CommandError, match="slot 'plain' does not load or unload models"):
        run("load", "plain", "m")
    assert SlotModel.objects.get(model_id="m").wanted == ""


def test_list_shows_each_models_load_state(router_slot):
    models = SlotModel.objects.filter(slot=router_slot)
    models.filter(model_id="gemma3").update(load_state="loading", load_progress=0.4, pinned=True)
    models.filter(model_id="smollm2").update(
        load_state="failed",
        load_error="out of\nmemory at http://user:pw@10.0.0.7:1/",
        wanted="load",
    )
    line = next(line for line in run("list").splitlines() if line.startswith("router"))
    assert "gemma3 [loading 40 %, pinned]" in line
    assert "smollm2 [failed: out of memory at http://***@10.0.0.7:1/, asked: load]" in line
    assert "g→gemma3" in line


def test_a_control_error_exits_1_without_a_traceback_from_the_shell(tmp_path):
    env = {
        **os.environ,
        "HAL0_DATA_DIR": str(tmp_path / "data"),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "HAL0_ENV_FILE": "/nonexistent",
    }
    migrate = subprocess.run(
        [sys.executable, "manage.py", "migrate", "-v0"], cwd=REPO, env=env, capture_output=True
    )
    assert migrate.returncode == 0, migrate.stderr
    bad = subprocess.run(
        [sys.executable, "manage.py", "slots", "drain", "nope"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1
    assert bad.stderr.strip() == "CommandError: no slot named 'nope'"

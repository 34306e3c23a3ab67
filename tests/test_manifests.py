"""hal0 slot manifests: parsing, the canonical writer, and applying them to the database."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dispatch.manifests.apply import apply
from dispatch.manifests.export import dumps, from_slot
from dispatch.manifests.parse import load, parse
from dispatch.manifests.shape import TOP_KEYS, Manifest, ManifestErrors, sorted_json
from dispatch.models import Slot, SlotModel
from tests.conftest import add_slot

REPO = Path(__file__).resolve().parent.parent

HERMES = """\
name = "agent-hermes"
url = "http://127.0.0.1:8002/v1"
kind = "llamacpp"
type = "llm"
device = "gpu-rocm"
enabled = true
default = false
priority = 3
api_key_env = "HERMES_KEY"

[model]
default = "qwen3-coder-reap-25b-a3b-q5km"
models = ["qwen3-coder-reap-25b-a3b-q5km", "qwen3-8b"]
aliases = { hermes = "qwen3-coder-reap-25b-a3b-q5km" }

[limits]
max_concurrency = 4
connect_timeout_s = 2.5
first_byte_timeout_s = 60
"""

# A hal0 manifest: `port` instead of `url`, and keys hal0web does not model.
HAL0_STYLE = """\
name = "brain"
type = "llm"
device = "gpu-vulkan"
runtime = "container"
profile = "brain"
port = 8089
n_gpu_layers = -1
threads = 0
idle_timeout_s = 600

[model]
default = "MiniCPM5-1B-Agentic-Tooluse"
context_size = 65536

[model.defaults]
extra_args = ["-fa", "on"]

[limits]
max_concurrency = 2
burst = 3

[server]
host = "0.0.0.0"
"weird key" = "tab\\there \\"quoted\\" é"

[[hooks]]
run = "warm"
when = { state = "ready" }

[[hooks]]
run = "notify"
"""


def errors_of(text: str, path: str = "slots/x.toml") -> list[str]:
    with pytest.raises(ManifestErrors) as exc:
        parse(text, path)
    return [str(e) for e in exc.value.errors]


# --- parsing ---------------------------------------------------------------------------------


def test_parse_full_manifest():
    m = parse(HERMES, "slots/agent-hermes.toml")
    assert (m.name, m.url, m.kind, m.type, m.device) == (
        "agent-hermes",
        "http://127.0.0.1:8002/v1",
        "llamacpp",
        "llm",
        "gpu-rocm",
    )
    assert (m.enabled, m.is_default, m.priority, m.api_key_env) == (True, False, 3, "HERMES_KEY")
    assert m.default_model == "qwen3-coder-reap-25b-a3b-q5km"
    assert m.models == ("qwen3-8b", "qwen3-coder-reap-25b-a3b-q5km")
    assert m.aliases == (("hermes", "qwen3-coder-reap-25b-a3b-q5km"),)
    assert (m.max_concurrency, m.connect_timeout_s, m.first_byte_timeout_s) == (4, 2.5, 60.0)
    assert m.idle_timeout_s == 120.0  # not given: the default
    assert m.extra == {}


def test_default_model_is_always_declared():
    m = parse('name = "a"\nport = 9000\n[model]\ndefault = "x"\nmodels = ["y"]\n', "a.toml")
    assert m.models == ("x", "y")


def test_port_means_local_url_and_is_kept():
    m = parse(HAL0_STYLE, "slots/brain.toml")
    assert m.url == "http://127.0.0.1:8089/v1"
    assert m.extra["port"] == 8089
    assert m.extra["runtime"] == "container"
    assert m.unload_idle_s == 600  # hal0's own key, not [limits]: unload a model idle this long
    assert "idle_timeout_s" not in m.extra
    assert m.idle_timeout_s == 120.0
    assert m.extra["model"] == {"context_size": 65536, "defaults": {"extra_args": ["-fa", "on"]}}
    assert m.extra["limits"] == {"burst": 3}
    assert m.max_concurrency == 2
    assert m.extra["server"]["weird key"] == 'tab\there "quoted" é'
    assert m.extra["hooks"] == [{"run": "warm", "when": {"state": "ready"}}, {"run": "notify"}]


def test_model_less_hal0_slot_is_fine():
    m = parse('name = "agent"\nport = 8081\n[model]\ncontext_size = 65536\n', "agent.toml")
    assert m.default_model is None and m.models == () and m.aliases == ()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('name = "Bad Name"\nport = 1\n', "slots/x.toml: name: must match ^[a-z0-9]"),
        ("port = 1\n", "slots/x.toml: name: required"),
        ('name = "a"\n', "slots/x.toml: url: required"),
        ('name = "a"\nurl = "ftp://h/v1"\n', "slots/x.toml: url: must be an http:// or https://"),
        ('name = "a"\nport = 70000\n', "slots/x.toml: port: must be an integer between 1 and"),
        ('name = "a"\nport = 1\nkind = "tgi"\n', "slots/x.toml: kind: Value 'tgi' is not a valid"),
        (
            'name = "a"\nport = 1\ntype = "video"\n',
            "slots/x.toml: type: Value 'video' is not a valid",
        ),
        ('name = "a"\nport = 1\nenabled = "yes"\n', "slots/x.toml: enabled: must be a boolean"),
        ('name = "a"\nport = 1\npriority = 1.5\n', "slots/x.toml: priority: must be an integer"),
        ('name = "a"\nport = 1\napi_key_env = "my key"\n', "slots/x.toml: api_key_env: must be"),
        ('name = "a"\nport = 1\nmodel = "x"\n', "slots/x.toml: model: must be a table"),
        (
            'name = "a"\nport = 1\n[model]\nmodels = ["m"]\n',
            "slots/x.toml: model.default: required",
        ),
        ('name = "a"\nport = 1\n[model]\nmodels = [1]\n', "slots/x.toml: model.models[0]: must be"),
        (
            'name = "a"\nport = 1\n[model]\ndefault = "m"\naliases = { m = "n" }\n',
            "slots/x.toml: model.aliases.m: is also a declared model",
        ),
        (
            'name = "a"\nport = 1\n[model]\naliases = { h = "h" }\n',
            "slots/x.toml: model.aliases.h: an alias must name a different model",
        ),
        (
            'name = "a"\nport = 1\n[model]\ndefault = " m"\n',
            "slots/x.toml: model.default: ' m': must be a non-empty id",
        ),
        (
            'name = "a"\nport = 1\n[limits]\nidle_timeout_s = 0\n',
            "slots/x.toml: limits.idle_timeout_s: must be a finite number > 0",
        ),
        (
            'name = "a"\nport = 1\n[limits]\nmax_concurrency = -1\n',
            "slots/x.toml: limits.max_concurrency: must be >= 0",
        ),
        (
            'name = "a"\nport = 1\n[limits]\nmax_duration_s = -1\n',
            "slots/x.toml: limits.max_duration_s: must be a finite number >= 0 (0 = off)",
        ),
        (
            'name = "a"\nport = 1\nborn = 2024-01-01\n',
            "slots/x.toml: born: dates and times cannot be kept",
        ),
        ('name = "a"\nurl = = 1\n', "slots/x.toml: line 2, column 7: invalid TOML"),
    ],
)
def test_bad_manifest_names_file_and_field(text, expected):
    errors = errors_of(text)
    assert any(e.startswith(expected) for e in errors), errors


def test_every_problem_of_a_file_is_reported_in_file_order():
    errors = errors_of(
        'name = "Bad"\nurl = "x"\nkind = "zz"\n[model]\nmodels = ["a"]\n'
        "[limits]\nconnect_timeout_s = -1\n"
    )
    fields = [e.split(": ")[1] for e in errors]
    assert fields == ["name", "url", "kind", "model.default", "limits.connect_timeout_s"]


# --- the writer ------------------------------------------------------------------------------


def test_dumps_is_canonical_toml():
    m = parse(HERMES, "slots/agent-hermes.toml")
    text = dumps(m)
    assert text == (
        'name = "agent-hermes"\n'
        'url = "http://127.0.0.1:8002/v1"\n'
        'kind = "llamacpp"\n'
        'type = "llm"\n'
        'device = "gpu-rocm"\n'
        "enabled = true\n"
        "default = false\n"
        "priority = 3\n"
        'api_key_env = "HERMES_KEY"\n'
        "\n"
        "[model]\n"
        'default = "qwen3-coder-reap-25b-a3b-q5km"\n'
        'models = ["qwen3-8b", "qwen3-coder-reap-25b-a3b-q5km"]\n'
        'aliases = { hermes = "qwen3-coder-reap-25b-a3b-q5km" }\n'
        "\n"
        "[limits]\n"
        "max_concurrency = 4\n"
        "connect_timeout_s = 2.5\n"
        "first_byte_timeout_s = 60\n"
    )
    assert parse(text, "again.toml") == parse(HERMES, "again.toml")


def test_dumps_keeps_hal0_keys_and_port():
    m = parse(HAL0_STYLE, "brain.toml")
    text = dumps(m)
    assert "port = 8089\n" in text and "url =" not in text
    assert tomllib.loads(text)["server"]["weird key"] == 'tab\there "quoted" é'
    again = parse(text, "brain.toml")
    assert again == m
    assert dumps(again) == text


def test_dumps_writes_url_once_it_no_longer_matches_port():
    m = parse(HAL0_STYLE, "brain.toml")
    moved = Manifest(**{**m.__dict__, "url": "http://gpu-box:8089/v1"})
    doc = tomllib.loads(dumps(moved))
    assert doc["url"] == "http://gpu-box:8089/v1"
    assert doc["port"] == 8089  # hal0's key, still kept verbatim


def test_quoted_alias_keys():
    text = 'name = "a"\nport = 1\n[model]\ndefault = "Qwen/Qwen3-8B"\naliases = { "qwen:8b" = "Qwen/Qwen3-8B" }\n'
    m = parse(text, "a.toml")
    assert parse(dumps(m), "a.toml") == m
    assert 'aliases = { "qwen:8b" = "Qwen/Qwen3-8B" }' in dumps(m)


_keys = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=8)
_scalars = (
    st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_keys, inner, max_size=3),
    max_leaves=12,
)
_extras = st.dictionaries(
    _keys.filter(lambda k: k not in (*TOP_KEYS, "model", "limits")), _values, max_size=4
)


@settings(max_examples=150, deadline=None)
@given(extra=_extras)
@example(extra={"0\n": {}})  # a key ending in a newline is not a bare key
@example(extra={"0\n": [{}]})
def test_writer_round_trips_any_unknown_keys(extra):
    m = Manifest(path="p.toml", name="p", url="http://h/v1", extra=extra)
    text = dumps(m)
    back = parse(text, "p.toml")
    assert back.extra == sorted_json(extra)
    assert dumps(back) == text


# --- applying --------------------------------------------------------------------------------


def write(dir_: Path, name: str, text: str) -> Path:
    p = dir_ / name
    p.write_text(text)
    return p


@pytest.mark.django_db
def test_apply_creates_slot_models_and_aliases():
    report = apply([parse(HERMES, "agent-hermes.toml")])
    assert report.created == ["agent-hermes"]
    slot = Slot.objects.get(name="agent-hermes")
    assert (slot.priority, slot.max_concurrency, slot.connect_timeout_s) == (3, 4, 2.5)
    rows = {m.model_id: (m.upstream_model, m.source, m.is_default) for m in slot.models.all()}
    assert rows == {
        "qwen3-coder-reap-25b-a3b-q5km": ("qwen3-coder-reap-25b-a3b-q5km", "manifest", True),
        "qwen3-8b": ("qwen3-8b", "manifest", False),
        "hermes": ("qwen3-coder-reap-25b-a3b-q5km", "alias", False),
    }


@pytest.mark.django_db
def test_reimport_keeps_discovered_models_and_runtime_fields():
    apply([parse(HERMES, "agent-hermes.toml")])
    slot = Slot.objects.get(name="agent-hermes")
    SlotModel.objects.create(slot=slot, model_id="found-by-probe", source="discovered")
    Slot.objects.filter(pk=slot.pk).update(
        state="ready", last_error="old", drift=["qwen3-8b"], state_changed_at="2026-01-01T00:00Z"
    )
    changed = HERMES.replace('models = ["qwen3-coder-reap-25b-a3b-q5km", "qwen3-8b"]\n', "")
    changed = changed.replace("hermes = ", "herm = ")
    report = apply([parse(changed, "agent-hermes.toml")])
    assert list(report.updated) == ["agent-hermes"]
    slot.refresh_from_db()
    assert (slot.state, slot.last_error, slot.drift) == ("ready", "old", ["qwen3-8b"])
    assert slot.state_changed_at is not None
    ids = {m.model_id: m.source for m in slot.models.all()}
    assert ids == {
        "qwen3-coder-reap-25b-a3b-q5km": "manifest",
        "herm": "alias",
        "found-by-probe": "discovered",
    }


@pytest.mark.django_db
def test_declaring_a_discovered_model_takes_over_its_row():
    slot = add_slot("s", "http://127.0.0.1:9/v1")
    SlotModel.objects.create(slot=slot, model_id="m1", source="discovered", is_default=True)
    SlotModel.objects.create(slot=slot, model_id="m2", source="discovered")
    apply([parse('name = "s"\nport = 9\n[model]\ndefault = "m2"\n', "s.toml")])
    rows = {m.model_id: (m.source, m.is_default) for m in slot.models.all()}
    assert rows == {"m1": ("discovered", False), "m2": ("manifest", True)}


@pytest.mark.django_db
def test_moving_the_default_slot_between_slots():
    add_slot("a", "http://127.0.0.1:1/v1", ["x"], is_default=True)
    add_slot("b", "http://127.0.0.1:2/v1", ["y"])
    a = 'name = "a"\nport = 1\ndefault = false\n[model]\ndefault = "x"\n'
    b = 'name = "b"\nport = 2\ndefault = true\n[model]\ndefault = "y"\n'
    # b comes first in the list; the importer still clears a's flag before setting b's.
    apply([parse(b, "b.toml"), parse(a, "a.toml")])
    assert list(Slot.objects.filter(is_default=True).values_list("name", flat=True)) == ["b"]


@pytest.mark.django_db
def test_a_second_default_slot_is_an_error_and_imports_nothing():
    add_slot("a", "http://127.0.0.1:1/v1", ["x"], is_default=True)
    b = 'name = "b"\nport = 2\ndefault = true\n[model]\ndefault = "y"\n'
    new = 'name = "c"\nport = 3\n'
    with pytest.raises(ManifestErrors) as exc:
        apply([parse(new, "c.toml"), parse(b, "b.toml")])
    assert any(
        str(e).startswith("b.toml: default: slot 'a' is already the default llm slot")
        for e in exc.value.errors
    ), exc.value.errors
    assert sorted(Slot.objects.values_list("name", flat=True)) == ["a"]


@pytest.mark.django_db
def test_load_reports_duplicates_and_missing_paths(tmp_path):
    write(tmp_path, "one.toml", 'name = "same"\nport = 1\n')
    write(tmp_path, "two.toml", 'name = "same"\nport = 2\n')
    with pytest.raises(ManifestErrors) as exc:
        load([tmp_path, tmp_path / "nope.toml"])
    shown = [str(e) for e in exc.value.errors]
    assert f"{tmp_path}/two.toml: name: 'same' is also defined in {tmp_path}/one.toml" in shown
    assert f"{tmp_path}/nope.toml: no such file or directory" in shown


@pytest.mark.django_db
def test_export_import_export_is_byte_identical_with_extra_keys(tmp_path):
    apply(
        [
            parse(HERMES, "agent-hermes.toml"),
            parse(HAL0_STYLE, "brain.toml"),
            *load([REPO / "slots" / "primary.toml"]),
        ]
    )
    first = {s.name: dumps(from_slot(s)) for s in Slot.objects.prefetch_related("models")}
    assert set(first) == {"agent-hermes", "brain", "primary"}
    paths = [write(tmp_path, f"{n}.toml", t) for n, t in first.items()]
    report = apply(load(paths))
    assert report.unchanged == ["agent-hermes", "brain", "primary"]
    second = {s.name: dumps(from_slot(s)) for s in Slot.objects.prefetch_related("models")}
    assert second == first
    assert "context_size = 65536" in first["brain"] and "[[hooks]]" in first["brain"]


@pytest.mark.django_db
def test_a_database_refusal_is_reported_and_rolls_back():
    from django.db import connection

    if connection.vendor != "sqlite":
        pytest.skip("the refusing trigger is written for SQLite")
    with connection.cursor() as cur:
        # Stands in for a concurrent writer: the database says no after validation passed.
        cur.execute(
            "CREATE TRIGGER refuse_boom BEFORE INSERT ON dispatch_slot WHEN NEW.name = 'boom' "
            "BEGIN SELECT RAISE(ABORT, 'refused by trigger'); END"
        )
    fine = parse('name = "a-fine-one"\nport = 1\n', "a.toml")
    boom = parse('name = "boom"\nport = 2\n', "boom.toml")
    with pytest.raises(ManifestErrors) as exc:
        apply([fine, boom])
    assert "the database refused the import" in str(exc.value)
    assert "refused by trigger" in str(exc.value)
    assert not Slot.objects.exists()


def test_max_duration_is_a_limit_off_by_default_and_round_trips():
    assert parse('name = "a"\nport = 1\n', "a.toml").max_duration_s == 0.0
    m = parse('name = "a"\nport = 1\n[limits]\nmax_duration_s = 600\n', "a.toml")
    assert m.max_duration_s == 600.0 and "limits" not in m.extra
    assert "[limits]\nmax_duration_s = 600\n" in dumps(m)
    assert parse(dumps(m), "a.toml") == m
    assert "max_duration_s" not in dumps(parse('name = "a"\nport = 1\n', "a.toml"))


# --- issue 15: which endpoints a slot serves ------------------------------------------------


def test_endpoints_are_listed_by_their_v1_names_and_default_by_type():
    assert parse('name = "a"\nport = 1\n', "a.toml").endpoints == ()  # the type's defaults
    m = parse(
        'name = "a"\nport = 1\ntype = "llm"\nendpoints = ["embeddings", "chat/completions"]\n',
        "a.toml",
    )
    assert m.endpoints == ("chat/completions", "embeddings")  # the table's order
    text = dumps(m)
    assert 'type = "llm"\nendpoints = ["chat/completions", "embeddings"]\n' in text
    assert parse(text, "a.toml") == m
    assert "endpoints" not in dumps(parse('name = "a"\nport = 1\n', "a.toml"))
    for t in ("transcription", "tts", "image", "reranking"):  # hal0's slot types
        assert parse(f'name = "a"\nport = 1\ntype = "{t}"\n', "a.toml").type == t


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            'name = "a"\nport = 1\nendpoints = ["chat/completions", "video"]\n',
            "slots/x.toml: endpoints[1]: unknown endpoint 'video'; known: chat/completions,",
        ),
        ('name = "a"\nport = 1\nendpoints = [1]\n', "slots/x.toml: endpoints[0]: must be a string"),
        (
            'name = "a"\nport = 1\nendpoints = "rerank"\n',
            "slots/x.toml: endpoints: must be an array",
        ),
        (
            'name = "a"\nport = 1\nendpoints = []\n',
            "slots/x.toml: endpoints: must name at least one",
        ),
    ],
)
def test_bad_endpoints_are_manifest_errors(text, expected):
    errors = errors_of(text)
    assert any(e.startswith(expected) for e in errors), errors


@pytest.mark.django_db
def test_endpoints_are_imported_exported_and_reach_the_table():
    from dispatch.coordination.store import load_table

    text = 'name = "a"\nport = 1\ntype = "llm"\nendpoints = ["rerank", "chat/completions"]\n'
    apply([parse(text, "a.toml")])
    slot = Slot.objects.get(name="a")
    assert slot.endpoints == ["chat/completions", "rerank"]
    assert dumps(from_slot(slot)) == dumps(parse(text, "a.toml"))
    entry = load_table(1).slots["a"]
    assert entry.endpoints == {"chat/completions", "rerank"} and entry.endpoints_listed
    apply([parse('name = "a"\nport = 1\ntype = "tts"\n', "a.toml")])
    entry = load_table(2).slots["a"]
    assert entry.endpoints == {"audio/speech"} and not entry.endpoints_listed


# --- alias patterns --------------------------------------------------------------------------

CLAUDE = """\
name = "local"
port = 8001

[model]
default = "qwen3-30b"
models = ["gemma3-270m", "qwen3-30b"]
aliases = { "claude-*" = "qwen3-30b", "claude-haiku-*" = "gemma3-270m", fast = "gemma3-270m" }
"""


@pytest.mark.django_db
def test_alias_patterns_are_imported_exported_and_reach_the_table(tmp_path):
    from dispatch.coordination.store import load_table

    m = parse(CLAUDE, "local.toml")
    assert m.aliases == (
        ("claude-*", "qwen3-30b"),
        ("claude-haiku-*", "gemma3-270m"),
        ("fast", "gemma3-270m"),
    )
    report = apply([m])
    assert report.created == ["local"]
    rows = {r.model_id: (r.upstream_model, r.source) for r in Slot.objects.get().models.all()}
    assert rows["claude-haiku-*"] == ("gemma3-270m", "alias")
    # Out as written in, byte for byte, and again through a file.
    text = dumps(from_slot(Slot.objects.get(name="local")))
    assert 'aliases = { "claude-*" = "qwen3-30b", "claude-haiku-*" = "gemma3-270m", ' in text
    assert parse(text, "local.toml") == m
    report = apply(load([write(tmp_path, "local.toml", text)]))
    assert report.unchanged == ["local"]
    table = load_table(1)
    assert table.by_pattern == {"claude-*": ("local",), "claude-haiku-*": ("local",)}
    assert "claude-*" not in table.by_model and "fast" in table.by_model


@pytest.mark.parametrize(
    ("model_table", "expected"),
    [
        (
            'default = "m"\naliases = { "claude-[haiku-*" = "m" }',
            "slots/x.toml: model.aliases.claude-[haiku-*: the pattern 'claude-[haiku-*' "
            "opens a '[' it never closes",
        ),
        (
            'default = "m"\naliases = { "*" = "m" }',
            "slots/x.toml: model.aliases.*: the pattern '*' has no literal character",
        ),
        (
            'default = "m"\naliases = { "claude-*" = "gemma*" }',
            "slots/x.toml: model.aliases.claude-*: an alias pattern stands for one model",
        ),
        (
            'default = "m"\nmodels = ["m", "claude-*"]',
            "slots/x.toml: model.models: 'claude-*': is a pattern (it has *, ? or [): "
            "only an alias may be one",
        ),
    ],
)
def test_a_bad_pattern_is_a_manifest_error(model_table, expected):
    errors = errors_of(f'name = "a"\nport = 1\n[model]\n{model_table}\n')
    assert any(e.startswith(expected) for e in errors), errors

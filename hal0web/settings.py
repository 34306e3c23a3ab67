"""hal0web settings: every environment variable is read here, once, and validated loudly.

Nothing else in the project reads ``os.environ`` for configuration; code that needs a value
reads ``django.conf.settings`` at call time, never at import time.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import secrets
import sys
from pathlib import Path
from typing import Any

import environ
from csp.constants import NONE, SELF
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
# An optional .env beside manage.py; real environment variables win over it.
_env_file = Path(os.environ.get("HAL0_ENV_FILE", BASE_DIR / ".env"))
if _env_file.is_file():
    env.read_env(str(_env_file), overwrite=False)


def _read(name: str, cast: Any, default: Any) -> Any:
    """Read one variable, turning any parse failure into an error that names it."""
    try:
        return cast(name, default=default)
    except ImproperlyConfigured:
        raise
    except (ValueError, TypeError) as exc:
        raw = os.environ.get(name)
        raise ImproperlyConfigured(f"{name}={raw!r} is not valid: {exc}") from exc


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _strict_bool(name: str, default: bool) -> bool:
    # environ.Env.bool() reads any unknown word as False; "DEBUG=maybe" must stop start-up.
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ImproperlyConfigured(
        f"{name}={raw!r} is not a boolean (use one of 1/0, true/false, yes/no, on/off)"
    )


def _positive(name: str, cast: Any, default: float, *, allow_zero: bool = False) -> Any:
    value = _read(name, cast, default)
    if value < 0 or (value == 0 and not allow_zero):
        raise ImproperlyConfigured(f"{name}={value!r} must be {'>= 0' if allow_zero else '> 0'}")
    return value


# --- data directory and secrets ------------------------------------------------------------
DATA_DIR = Path(_read("HAL0_DATA_DIR", env.str, str(BASE_DIR / "var"))).resolve()
DATA_DIR.mkdir(parents=True, exist_ok=True)


def _secret_key() -> str:
    given = os.environ.get("SECRET_KEY")
    if given:
        return given
    # Generated once and kept in the data directory, so sessions survive restarts and no key
    # is ever hard-coded in the source.
    key_file = DATA_DIR / "secret_key"
    if key_file.is_file():
        return key_file.read_text().strip()
    key = secrets.token_urlsafe(50)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key)
    return key


SECRET_KEY = _secret_key()
DEBUG = _strict_bool("DEBUG", False)
ALLOWED_HOSTS: list[str] = _read("ALLOWED_HOSTS", env.list, ["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS: list[str] = _read("CSRF_TRUSTED_ORIGINS", env.list, [])

# --- database and channel layer --------------------------------------------------------------
_default_db = f"sqlite:///{DATA_DIR / 'hal0web.sqlite3'}"
_db_url = os.environ.get("DATABASE_URL", _default_db)
try:
    _db = environ.Env.db_url_config(_db_url)
except Exception as exc:  # environ raises bare exceptions of several kinds for bad URLs
    raise ImproperlyConfigured(
        f"DATABASE_URL={_db_url!r} is not a valid database URL: {exc}"
    ) from exc
# django-environ passes an unknown scheme through as the engine name; Django would then fail
# later, far from the variable.
if not _db.get("ENGINE") or _db_url.split(":", 1)[0] not in environ.Env.DB_SCHEMES:
    raise ImproperlyConfigured(
        f"DATABASE_URL={_db_url!r} names no known database engine (e.g. sqlite:///PATH, "
        "postgres://USER@HOST:PORT/NAME)"
    )
if _db["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets the watcher write slot state while requests read; the timeout rides out the
    # brief write locks instead of failing with "database is locked". IMMEDIATE takes the
    # write lock when a transaction begins: a deferred one that reads first and then writes
    # (the watcher's apply, the admin's change form) gets "database is locked" at once when
    # another writer committed in between, and the busy timeout never applies to that case
    # (issue 11: 100s of errors a second from three writers; none with IMMEDIATE).
    _db.setdefault("OPTIONS", {}).update(
        {
            "timeout": 20,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
    if _db_url.startswith("sqlite:///") and _db.get("NAME") not in ("", ":memory:"):
        Path(_db["NAME"]).parent.mkdir(parents=True, exist_ok=True)
DATABASES = {"default": _db}

REDIS_URL: str | None = os.environ.get("REDIS_URL") or None
if REDIS_URL:
    if not re.match(r"^rediss?://", REDIS_URL):
        raise ImproperlyConfigured(f"REDIS_URL={REDIS_URL!r} must start with redis:// or rediss://")
    CHANNEL_LAYERS = {
        "default": {
            # channels-redis's layer with a pool that makes a burst wait for a connection
            # instead of failing (dispatch/coordination/channel_layer.py). Measured against
            # its pub/sub layer with 500 pages (bench/crowds.py, issue 24): no better, and it
            # drops whatever is published while a subscriber reconnects; this one's drops
            # (a full channel) are found and counted like any other loss.
            "BACKEND": "dispatch.coordination.channel_layer.RedisChannelLayer",
            "CONFIG": {
                "hosts": [
                    {
                        "address": REDIS_URL,
                        # redis-py 8 reads with a 5 s socket timeout by default, and
                        # channels-redis blocks 5 s in BZPOPMIN waiting for a message: the
                        # two raced, and an idle page's socket died every 5-9 s with "Timeout
                        # reading from" (issue 12). Reads may take three blocking periods
                        # before they count as a dead connection.
                        "socket_timeout": 15,
                        "socket_connect_timeout": 5,
                        # Per process. Pages use none of their own (one channel per process
                        # hears their groups), so a process uses a few: one blocking read,
                        # the batches, the processes' messages; a burst past the bound waits
                        # up to `timeout` s for one.
                        "max_connections": 32,
                        "timeout": 5,
                    }
                ],
                # Messages one process's channels may hold in Redis (all its channels share
                # one list). Batches come a few a second from each process: this is minutes
                # of a process's stall before anything is dropped (and counted).
                "capacity": 1000,
                # Unread messages older than this go (a process stalled this long hears
                # the gap, and its pages are told).
                "expiry": 60,
                # A channel not rejoined within this leaves its groups: every process joins
                # its groups again hourly (dispatch.coordination.events.REJOIN_S), so a
                # killed process's channel stops being sent to within 4 h, not a day.
                "group_expiry": 4 * 3600,
            },
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# --- routing behaviour -----------------------------------------------------------------------
HAL0_FALLBACK_SLOT: str | None = os.environ.get("HAL0_FALLBACK_SLOT") or None
HAL0_MAX_BODY_MB: float = _positive("HAL0_MAX_BODY_MB", env.float, 32)
# The most of an upstream's non-streamed answer (decoded) held in memory; past it, 502.
HAL0_MAX_RESPONSE_MB: float = _positive("HAL0_MAX_RESPONSE_MB", env.float, 64)
HAL0_PROBE_INTERVAL_S: float = _positive("HAL0_PROBE_INTERVAL_S", env.float, 5)
HAL0_COLD_PROBE_S: float = _positive("HAL0_COLD_PROBE_S", env.float, 2, allow_zero=True)
HAL0_SWAP_WAIT_S: float = _positive("HAL0_SWAP_WAIT_S", env.float, 30, allow_zero=True)
# Before a slot at its limit of loaded models swaps one out for another, the requests still in
# flight (or queued) on the model it would unload are served first, for at most this long
# (fewer swaps under interleaved load; nothing starves). 0: swap at once.
HAL0_SWAP_HOLD_S: float = _positive("HAL0_SWAP_HOLD_S", env.float, 10, allow_zero=True)
HAL0_QUEUE_WAIT_S: float = _positive("HAL0_QUEUE_WAIT_S", env.float, 30, allow_zero=True)
# How long hal0web remembers which slot made a Responses API response (dispatch/coordination/affinity.py).
HAL0_RESPONSE_RETENTION_DAYS: float = _positive("HAL0_RESPONSE_RETENTION_DAYS", env.float, 30)
# /v1/models lists aliases and slot/model ids too, not only each model once (?all=true).
HAL0_MODELS_LIST_ALL: bool = _strict_bool("HAL0_MODELS_LIST_ALL", False)
# Outlier ejection (dispatch/upstream/outliers.py): how long a slot whose probes pass but whose
# requests fail is out of rotation, doubled per repeat; 0 turns ejection off.
HAL0_OUTLIER_BACKOFF_S: float = _positive("HAL0_OUTLIER_BACKOFF_S", env.float, 30, allow_zero=True)
# The watcher runs inside the server process unless a deployment runs `manage.py watch`.
HAL0_WATCHER: bool = _strict_bool("HAL0_WATCHER", True)
# /v1 authentication: `auto` requires a key (or a logged-in page session) once any API key
# exists, `required` always, `off` never (a trusted loopback-only setup).
HAL0_API_AUTH: str = _read("HAL0_API_AUTH", env.str, "auto").strip().lower()
if HAL0_API_AUTH not in {"auto", "required", "off"}:
    raise ImproperlyConfigured(f"HAL0_API_AUTH={HAL0_API_AUTH!r} must be auto, required or off")


def _origins(name: str) -> frozenset[str]:
    """Browser origins (scheme://host[:port]), lowercase; a path or a bare host is an error,
    and so is "*": every origin allowed is a decision to name, one by one."""
    out: set[str] = set()
    for raw in _read(name, env.list, []):
        origin = raw.strip().lower().rstrip("/")
        if not re.fullmatch(r"https?://(\[[0-9a-f:]+\]|[a-z0-9.\-]+)(:\d{1,5})?", origin):
            raise ImproperlyConfigured(
                f"{name}: {raw!r} is not an origin (scheme://host[:port], e.g. "
                "http://localhost:5173; no path, no wildcard)"
            )
        out.add(origin)
    return frozenset(out)


# Browser origins allowed to call /v1 (CORS); none by default.
HAL0_CORS_ORIGINS: frozenset[str] = _origins("HAL0_CORS_ORIGINS")
HAL0_BIND: str = _read("HAL0_BIND", env.str, "127.0.0.1:8000")
if not re.match(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]+):\d{1,5}$", HAL0_BIND):
    raise ImproperlyConfigured(f"HAL0_BIND={HAL0_BIND!r} must be HOST:PORT")

# --- the server's connections and its stop (hal0web/server.py, dispatch/api/drain.py) ---------
# On SIGTERM, how long the requests in flight may go on; then a stream still running ends
# with a `shutting_down` error event and a request still waiting gets 503. Uvicorn's own
# --timeout-graceful-shutdown (hal0web.server sets it above this) and systemd's
# TimeoutStopSec (deploy/hal0web.service) must leave it room.
HAL0_DRAIN_S: float = _positive("HAL0_DRAIN_S", env.float, 20, allow_zero=True)
# A connection must send a request's whole header within this long of opening (or, kept
# alive, of the request's first byte); otherwise it is closed. Uvicorn has no such bound of
# its own: a client sending a header a byte at a time would hold its connection for ever.
HAL0_HEADER_TIMEOUT_S: float = _positive("HAL0_HEADER_TIMEOUT_S", env.float, 10)

# --- seeing the traffic: metrics and the request log ----------------------------------------
# /metrics (Prometheus text format) and its counters, histograms and gauges.
HAL0_METRICS: bool = _strict_bool("HAL0_METRICS", True)
# Anyone may read /metrics when true; otherwise a staff session or an API key is needed.
HAL0_METRICS_PUBLIC: bool = _strict_bool("HAL0_METRICS_PUBLIC", False)
# One database row per /v1 request, written in batches by a thread of its own.
HAL0_REQUEST_LOG: bool = _strict_bool("HAL0_REQUEST_LOG", True)
HAL0_LOG_RETENTION_DAYS: float = _positive("HAL0_LOG_RETENTION_DAYS", env.float, 14)
# Rows waiting for the writer; past this a row is dropped (and counted), never waited for.
HAL0_LOG_QUEUE_SIZE: int = _positive("HAL0_LOG_QUEUE_SIZE", env.int, 10_000)
# Prompts are not stored unless the operator asks; then each body is cut at the cap.
HAL0_LOG_BODIES: bool = _strict_bool("HAL0_LOG_BODIES", False)
HAL0_LOG_BODY_MAX_BYTES: int = _positive("HAL0_LOG_BODY_MAX_KB", env.int, 16) * 1024

# --- `manage.py serve` (what `make run` runs) ---------------------------------------------------
# The first run creates an `admin` superuser with this password (generated and printed once
# when unset); the password is never stored anywhere but as Django's hash.
HAL0_ADMIN_PASSWORD: str | None = os.environ.get("HAL0_ADMIN_PASSWORD") or None
# The demo: two tiny GGUF models served by llama.cpp's llama-server as the slots `primary`
# (a router holding both, one loaded at a time) and `agent-hermes` (Gemma). Off (0) serves
# only the manifests in slots/ (your own servers).
HAL0_DEMO: bool = _strict_bool("HAL0_DEMO", True)
# The llama-server binary the demo runs: where `make run` installs it (tools/llama_build.py),
# unless named. Checked when the demo starts, so HAL0_DEMO=0 never needs it.
HAL0_LLAMA_SERVER: str = os.environ.get("HAL0_LLAMA_SERVER") or str(
    Path(sys.prefix) / "bin" / "llama-server"
)
# Which ASGI server `make run` starts: Uvicorn (httptools + uvloop: about half the CPU per
# request, see docs/performance.md; and back-pressure: a slow reader's stream waits for it,
# where Daphne buffers all of it in memory, 80 MB a stream in tests/test_faults.py) or Daphne.
HAL0_SERVER: str = _read("HAL0_SERVER", env.str, "uvicorn").strip().lower()
if HAL0_SERVER not in {"daphne", "uvicorn"}:
    raise ImproperlyConfigured(f"HAL0_SERVER={HAL0_SERVER!r} must be daphne or uvicorn")


def _port(name: str, default: int) -> int:
    value: int = _read(name, env.int, default)
    if not 1 <= value <= 65535:
        raise ImproperlyConfigured(f"{name}={value!r} must be a TCP port (1-65535)")
    return value


HAL0_DEMO_PRIMARY_PORT: int = _port("HAL0_DEMO_PRIMARY_PORT", 8001)
HAL0_DEMO_HERMES_PORT: int = _port("HAL0_DEMO_HERMES_PORT", 8002)
if HAL0_DEMO_PRIMARY_PORT == HAL0_DEMO_HERMES_PORT:
    raise ImproperlyConfigured(
        f"HAL0_DEMO_PRIMARY_PORT and HAL0_DEMO_HERMES_PORT are both {HAL0_DEMO_PRIMARY_PORT}: "
        "the two demo model servers need different ports"
    )

_max_body = int(HAL0_MAX_BODY_MB * 1024 * 1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = _max_body
FILE_UPLOAD_MAX_MEMORY_SIZE = _max_body

# --- hardening (issue 14) --------------------------------------------------------------------
# Guessing is slow: after HAL0_LOGIN_FAILURES failed logins (the admin's or the page's) a
# username is locked from every address, and an address for every username, until
# HAL0_LOGIN_LOCKOUT_MIN minutes pass (django-axes, attempts kept in the database).
HAL0_LOGIN_FAILURES: int = _positive("HAL0_LOGIN_FAILURES", env.int, 5)
HAL0_LOGIN_LOCKOUT_MIN: float = _positive("HAL0_LOGIN_LOCKOUT_MIN", env.float, 15)
AXES_FAILURE_LIMIT = HAL0_LOGIN_FAILURES
AXES_COOLOFF_TIME = dt.timedelta(minutes=HAL0_LOGIN_LOCKOUT_MIN)
# Two criteria, either of which locks: per user (across addresses) and per address (across
# users). Not the username+address pair, which an attacker escapes by changing either.
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]
# Attempts during a lockout do not extend it: an attacker who keeps guessing still gets
# HAL0_LOGIN_FAILURES tries per period, and the locked-out owner gets back in after it.
AXES_RESET_COOL_OFF_ON_FAILURE_DURING_LOCKOUT = False
AXES_LOCKOUT_TEMPLATE = "registration/locked_out.html"
# Successful logins are not written down (a row each, kept forever); failures are.
AXES_DISABLE_ACCESS_LOG = True

# HAL0_HTTPS=true: hal0web is reached over HTTPS (behind a TLS proxy that sets
# X-Forwarded-Proto). Browsers are told to keep to HTTPS (HSTS, a year; subdomains are not
# ours to promise) and cookies never travel in clear. No redirect to HTTPS here: the proxy in
# front owns port 80, and a proxy that forgot the header would loop.
HAL0_HTTPS: bool = _strict_bool("HAL0_HTTPS", False)
if HAL0_HTTPS:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_HSTS_SECONDS = 365 * 24 * 3600
    SECURE_HSTS_INCLUDE_SUBDOMAINS = False
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
SECURE_SSL_REDIRECT = False
# Every page, the admin included, runs only scripts and styles served from here: no inline
# script, no eval, no third-party origin (the vendored libraries are static files). The
# WebSocket and /v1 are 'self' too ('self' covers ws:/wss: to the same host and port).
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [SELF],
        "script-src": [SELF],
        "style-src": [SELF],
        "connect-src": [SELF],
        "object-src": [NONE],
        "base-uri": [NONE],
        "form-action": [SELF],
        "frame-ancestors": [NONE],
    }
}

# --- Django ----------------------------------------------------------------------------------
# Not "daphne": it only adds a runserver and would load Twisted (+26 MB) into every process,
# Uvicorn's too. `make run` starts Daphne itself.
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "channels",
    "axes",
    "csp",
    "dispatch",
]

# This stack serves the admin and the chat page only. /v1 is served by a handler with no
# middleware at all (see hal0web/asgi.py): each sync middleware costs a thread hop there.
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "csp.middleware.CSPMiddleware",
    # Last, as django-axes asks: it turns a locked-out login into the lockout page.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "hal0web.urls"
ASGI_APPLICATION = "hal0web.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# Django's whole set: `password` and `12345678` are refused (common, numeric), and so is a
# password too close to the username. Also applied to HAL0_ADMIN_PASSWORD (manage.py serve).
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
# django-axes first: it refuses a locked-out login before any password is checked.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "chat"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"
STATIC_ROOT.mkdir(exist_ok=True)  # whitenoise warns (an error under the test suite) without it
# Hashed, compressed static files once `collectstatic` has run (make run does); before that
# (tests, a first `daphne` by hand) plain files straight from the app folders.
_manifest = (STATIC_ROOT / "staticfiles.json").is_file()
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": (
            "whitenoise.storage.CompressedManifestStaticFilesStorage"
            if _manifest and not DEBUG
            else "django.contrib.staticfiles.storage.StaticFilesStorage"
        )
    },
}
# Serve straight from the app folders when collectstatic has not run (tests, first start).
WHITENOISE_USE_FINDERS = True
WHITENOISE_MANIFEST_STRICT = False

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LOG_LEVEL: str = _read("HAL0_LOG_LEVEL", env.str, "INFO").upper()
if LOG_LEVEL not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
    raise ImproperlyConfigured(
        f"HAL0_LOG_LEVEL={LOG_LEVEL!r} must be DEBUG, INFO, WARNING or ERROR"
    )
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {
            "()": "dispatch.observability.log_handlers.OneLineFormatter",
            "fmt": "%(asctime)s %(levelname)s %(name)s %(message)s",
        }
    },
    # One line per request: written by a thread of its own, never by the event loop.
    "handlers": {
        "console": {
            "()": "dispatch.observability.log_handlers.BackgroundStreamHandler",
            "formatter": "plain",
        }
    },
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {
        "hal0": {"handlers": ["console"], "level": LOG_LEVEL, "propagate": False},
        "django": {"handlers": ["console"], "level": "WARNING", "propagate": False},
    },
}

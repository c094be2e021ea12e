"""A Django app as an organisation runs one behind poort: the admin with Django's own CSRF and
Origin checks on, and (with COMPAT_SSO=1) single sign-on from poort's X-Poort-User header.

The only settings a gateway in front needs are the ones any TLS proxy needs: the host names
it serves (ALLOWED_HOSTS) and where to learn that the browser used https
(SECURE_PROXY_SSL_HEADER, from the X-Forwarded-Proto poort sets)."""
import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("COMPAT_DATA", BASE_DIR))

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "compat-suite-only-not-a-secret")
DEBUG = False
ALLOWED_HOSTS = ["django.localhost", "localhost"]
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
CSRF_COOKIE_SECURE = True
SESSION_COOKIE_SECURE = True

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "notes",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
# Single sign-on from poort's X-Poort-User (COMPAT_SSO=1): Django's RemoteUserMiddleware.
if os.environ.get("COMPAT_SSO") == "1":
    MIDDLEWARE.insert(MIDDLEWARE.index("django.contrib.auth.middleware.AuthenticationMiddleware") + 1, "notes.sso.PoortUserMiddleware")

AUTHENTICATION_BACKENDS = [
    "django.contrib.auth.backends.ModelBackend",
    "django.contrib.auth.backends.RemoteUserBackend",
]

ROOT_URLCONF = "site_conf.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": DATA / "db.sqlite3"}}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
STATIC_URL = "static/"

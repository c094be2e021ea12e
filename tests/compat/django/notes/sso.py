from django.contrib.auth.middleware import PersistentRemoteUserMiddleware


class PoortUserMiddleware(PersistentRemoteUserMiddleware):
    """Signs in the user poort names in X-Poort-User (Django's RemoteUserMiddleware, reading
    poort's header). Persistent: a page without the header keeps a session made otherwise,
    such as the admin's own sign-in."""

    header = "HTTP_X_POORT_USER"

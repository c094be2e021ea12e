import time

from django.http import HttpResponse, StreamingHttpResponse


def whoami(request):
    """Who Django thinks the user is."""
    user = request.user.username if request.user.is_authenticated else "(anonymous)"
    return HttpResponse(user, content_type="text/plain")


def events(request):
    """Server-sent events: one now, the next only after a pause."""

    def stream():
        for i in range(3):
            yield f"data: event {i}\n\n"
            time.sleep(0.5)

    resp = StreamingHttpResponse(stream(), content_type="text/event-stream")
    resp["Cache-Control"] = "no-cache"
    return resp


def poll(request):
    """A long poll: the answer comes after a wait."""
    time.sleep(float(request.GET.get("wait", "3")))
    return HttpResponse("changed", content_type="text/plain")

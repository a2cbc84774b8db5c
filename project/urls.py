from django.conf import settings
from django.contrib import admin
from django.urls import URLPattern, URLResolver, include, path

from project import views

# The example project has no site of its own to view: admin's "View site" link goes.
admin.site.site_url = None

urlpatterns: list[URLPattern | URLResolver] = [
    path("admin/", admin.site.urls),
    path("tokens/", include("tokens.urls")),
]

# The example views make outbound calls with a real token: only in development, or on request.
if settings.DEBUG or settings.EXAMPLE_VIEWS:
    urlpatterns += [
        path("example/call-api/", views.call_api, name="example-call-api"),
        path("example/call-api-async/", views.call_api_async, name="example-call-api-async"),
    ]

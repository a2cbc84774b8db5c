from django.contrib import admin
from django.urls import include, path

from project import views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("tokens/", include("tokens.urls")),
    path("example/call-api/", views.call_api, name="example-call-api"),
    path("example/call-api-async/", views.call_api_async, name="example-call-api-async"),
]

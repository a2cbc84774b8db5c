from django.urls import path
from django.views.generic import RedirectView

from tokens import views

app_name = "tokens"
urlpatterns = [
    path("health/", views.health, name="health"),
    path("metrics", views.prometheus_metrics, name="metrics"),
    # One form of each URL; the other redirects to it.
    path("health", RedirectView.as_view(pattern_name="tokens:health", query_string=True)),
    path("metrics/", RedirectView.as_view(pattern_name="tokens:metrics", query_string=True)),
    path("connect/callback/", views.connect_callback, name="connect_callback"),
]

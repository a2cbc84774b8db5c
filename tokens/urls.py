from django.urls import path

from tokens import views

app_name = "tokens"
urlpatterns = [
    path("health/", views.health, name="health"),
    path("metrics", views.prometheus_metrics, name="metrics"),
    path("connect/callback/", views.connect_callback, name="connect_callback"),
]

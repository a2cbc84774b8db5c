# --- tokens: add to your urls.py (health, metrics, and Connect's callback) ------------------
from django.urls import include, path

urlpatterns += [path("tokens/", include("tokens.urls"))]

# --- tokens: add to your urls.py (health, metrics, and Connect's callback) -----------------
urlpatterns += [path("tokens/", include("tokens.urls"))]

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
application = get_asgi_application()

# tokens' start-up checks (keys, SECRET_KEY, stored rows): refuse to serve what cannot work.
from tokens.checks import refuse_to_start  # noqa: E402 - needs the app registry

refuse_to_start()

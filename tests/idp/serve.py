"""Run the test IdP: ``python -m tests.idp.serve --port N [--setup]`` (see tests.idp.start_idp).

With ``--setup`` it first creates its database's tables, the user, and the Application that
IDP_DIR/idp.json describes (again on a restart: nothing is created twice). Then it serves on
127.0.0.1 with a threaded WSGI server and prints ``IdP ready on http://127.0.0.1:PORT``
(``--port 0`` takes a free port). It exits when its parent does: a killed test run leaves no IdP.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import django

from tests.idp import CONFIG_FILE


class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class ShortLogHandler(WSGIRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # Method, path and status only: no query strings (codes, states) in the log.
        print(f"{self.command} {self.path.split('?', 1)[0]} {code}", flush=True)


def setup() -> None:
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from oauth2_provider.models import get_application_model

    config = json.loads((Path(os.environ["IDP_DIR"]) / CONFIG_FILE).read_text())
    call_command("migrate", verbosity=0, interactive=False, run_syncdb=True)
    user_model = get_user_model()
    user = user_model.objects.filter(username=config["username"]).first()
    if user is None:
        user = user_model.objects.create_user(config["username"], password=config["password"])
    application = get_application_model()
    confidential = config["confidential"]
    application.objects.update_or_create(
        client_id=config["client_id"],
        defaults={
            "name": "tokens test client",
            "user": user,
            "client_type": (
                application.CLIENT_CONFIDENTIAL if confidential else application.CLIENT_PUBLIC
            ),
            "authorization_grant_type": application.GRANT_AUTHORIZATION_CODE,
            # DOT hashes a confidential client's secret on save (its default); the plaintext
            # stays with the test, in idp.json. A public client has none.
            "client_secret": config["client_secret"],
            "hash_client_secret": confidential,
            "redirect_uris": " ".join(config["redirect_uris"]),
            "skip_authorization": config["skip_authorization"],
            "algorithm": application.NO_ALGORITHM,
        },
    )


def exit_with_parent() -> None:
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        print("parent gone: IdP exits", flush=True)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--setup", action="store_true")
    args = parser.parse_args()
    exit_with_parent()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.idp.settings")
    django.setup()
    if args.setup:
        setup()
    from django.core.wsgi import get_wsgi_application

    server = make_server(
        "127.0.0.1",
        args.port,
        get_wsgi_application(),
        server_class=ThreadingWSGIServer,
        handler_class=ShortLogHandler,
    )
    print(f"IdP ready on http://127.0.0.1:{server.server_port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()

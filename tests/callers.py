"""Many callers of get_token() in one process, released together: the cold-burst test and the
benchmark's figure 4 each start a few of these processes.

    python -m tests.callers NAME THREADS GO_KEY [TIMEOUT [SECONDS]]

Sets Django up, starts THREADS threads that wait until the Redis key GO_KEY exists (the caller
sets it once every process is ready), then call get_token(NAME) at once (a barrier), and prints
one JSON line: {"results": [tokens...], "errors": [reprs...]}. With SECONDS, each thread calls
again and again for that long (a few milliseconds apart) and "results" holds each distinct
token once, with "calls" the number of calls.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time


def main(argv: list[str]) -> int:
    name, threads, go_key = argv[0], int(argv[1]), argv[2]
    timeout = float(argv[3]) if len(argv) > 3 else 20.0
    seconds = float(argv[4]) if len(argv) > 4 else 0.0
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    import django

    django.setup()
    import redis
    from django.conf import settings

    from tokens import get_token

    client = redis.Redis.from_url(settings.REDIS_URL)
    results: list[str] = []
    errors: list[str] = []
    barrier = threading.Barrier(threads)

    calls = [0]

    def call() -> None:
        barrier.wait()
        until = time.monotonic() + seconds
        while True:
            calls[0] += 1
            try:
                token = get_token(name, timeout=timeout)
                if not seconds or token not in results:
                    results.append(token)
            except Exception as error:
                errors.append(repr(error))
            if time.monotonic() >= until:
                return
            time.sleep(0.005)

    while not client.get(go_key):
        time.sleep(0.005)
    workers = [threading.Thread(target=call) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    print(json.dumps({"results": results, "errors": errors, "calls": calls[0]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""A token endpoint is an outside party: the oauth2 kind against hostile endpoints that the test
serves itself on real sockets (tests/hostile.py). Each costs at most TOKENS_HTTP_TIMEOUT and
TOKENS_HTTP_MAX_BODY, and gets nothing it should not."""

from __future__ import annotations

import json
import time
from pathlib import Path
from urllib.parse import parse_qs

import pytest

from tests.factories import SECRET, oauth2_config
from tests.hostile import (
    HostileEndpoint,
    gzip_bomb,
    respond,
    self_signed,
    token_body,
    trickle,
)
from tests.processes import run_script
from tokens.exceptions import GeneratorError
from tokens.generators import get_generator
from tokens.models import Provider

GENERATOR = get_generator("oauth2_client_credentials")


def provider_for(url: str, **config: object) -> Provider:
    return Provider(
        name="api", kind="oauth2_client_credentials", config=oauth2_config(url, **config)
    )


def generate(url: str, **config: object) -> object:
    provider = provider_for(url, **config)
    provider.secret = SECRET
    return GENERATOR.generate(provider)


@pytest.fixture
def timeout_1s(settings) -> float:
    settings.TOKENS_HTTP_TIMEOUT = 1.0
    return 1.0


@pytest.mark.parametrize("phase", ["headers", "body"])
def test_http__a_trickling_endpoint_costs_the_whole_deadline_not_more(
    timeout_1s: float, phase: str
) -> None:
    # A byte every 0.2 s: no single read ever waits a second, so a per-read timeout never fires.
    with HostileEndpoint(trickle(0.2, phase=phase)) as endpoint:
        started = time.monotonic()
        with pytest.raises(GeneratorError) as caught:
            generate(endpoint.url)
        took = time.monotonic() - started
    assert caught.value.transient
    assert "did not answer within 1s" in str(caught.value)
    assert timeout_1s <= took < timeout_1s + 0.5


def test_http__a_gzip_bomb_is_refused_in_bounded_memory_and_time(tmp_path: Path) -> None:
    bomb = gzip_bomb()  # about 1 MB on the wire, 1 GiB inflated
    assert len(bomb) <= 1024 * 1024
    with HostileEndpoint(respond(body=bomb, headers={"Content-Encoding": "gzip"})) as endpoint:
        # In a process of its own, to measure its peak memory.
        result = run_script(
            "import resource, time\n"
            "from tokens.generators import get_generator\n"
            "from tokens.models import Provider\n"
            "from tokens.exceptions import GeneratorError\n"
            f"p = Provider(name='b', kind='oauth2_client_credentials', secret='s',"
            f" config={{'token_url': '{endpoint.url}', 'client_id': 'c'}})\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "started = time.monotonic()\n"
            "try:\n"
            "    get_generator(p.kind).generate(p)\n"
            "except GeneratorError as error:\n"
            "    print('ERROR', error)\n"
            "print('TOOK', time.monotonic() - started)\n"
            "print('GREW_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
        )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert "decodes to more than 1048576 bytes (TOKENS_HTTP_MAX_BODY)" in lines["ERROR"]
    assert float(lines["TOOK"]) < 2.0
    assert int(lines["GREW_KB"]) < 64 * 1024  # far from the 1 GiB (or 3 GB) of inflating it


def test_http__a_body_over_the_cap_is_refused_while_streaming(settings) -> None:
    settings.TOKENS_HTTP_MAX_BODY = 4096
    big = b'{"access_token": "t", "padding": "' + b"x" * 100_000 + b'"}'
    # No Content-Length: the cap holds while the body streams in.
    unsized = {"Content-Length": None, "Connection": "close"}
    with (
        HostileEndpoint(respond(body=big, headers=unsized)) as endpoint,
        pytest.raises(GeneratorError, match="larger than 4096 bytes"),
    ):
        generate(endpoint.url)
    with (
        HostileEndpoint(respond(body=big)) as endpoint,  # declared too large: not read
        pytest.raises(GeneratorError, match="larger than 4096 bytes"),
    ):
        generate(endpoint.url)


def test_http__an_unknown_content_encoding_is_refused() -> None:
    with (
        HostileEndpoint(respond(body=b"xx", headers={"Content-Encoding": "br"})) as endpoint,
        pytest.raises(GeneratorError, match="unsupported content encoding"),
    ):
        generate(endpoint.url)


def test_http__gzip_and_deflate_answers_within_the_cap_are_read() -> None:
    import gzip
    import zlib

    for encoding, body in (
        ("gzip", gzip.compress(token_body("zipped-1"))),
        ("deflate", zlib.compress(token_body("zipped-2"))),
    ):
        with HostileEndpoint(
            respond(body=body, headers={"Content-Encoding": encoding})
        ) as endpoint:
            assert generate(endpoint.url).access_token.startswith("zipped-")  # type: ignore[attr-defined]


def test_http__a_redirect_whose_body_looks_like_a_token_is_not_a_token() -> None:
    answer = respond("302 Found", token_body("redirected"), {"Location": "https://evil.example/"})
    with HostileEndpoint(answer) as endpoint, pytest.raises(GeneratorError) as caught:
        generate(endpoint.url)
        assert len(endpoint.requests) == 1  # and it was not followed
    assert not caught.value.transient
    assert "HTTP 302, a redirect" in str(caught.value)


@pytest.mark.parametrize(
    "token",
    ["tok\r\nX-Injected: 1", "tok en", "tok\x00en", "tok\ten", "t\u00f6ken", "tok\x7f"],
)
def test_http__a_token_outside_the_header_syntax_is_refused(token: str) -> None:
    with (
        HostileEndpoint(respond(body=json.dumps({"access_token": token}).encode())) as endpoint,
        pytest.raises(GeneratorError, match="characters a token may not have") as caught,
    ):
        generate(endpoint.url)
    assert not caught.value.transient


def test_http__a_token_type_outside_the_scheme_syntax_is_refused() -> None:
    body = json.dumps({"access_token": "t", "token_type": "Bearer evil"}).encode()
    with (
        HostileEndpoint(respond(body=body)) as endpoint,
        pytest.raises(GeneratorError, match="invalid token_type"),
    ):
        generate(endpoint.url)


def test_http__a_lifetime_below_the_floor_is_refused(settings) -> None:
    settings.TOKENS_MIN_LIFETIME = 10
    with (
        HostileEndpoint(respond(body=token_body(expires_in=0.001))) as endpoint,
        pytest.raises(GeneratorError, match="less than TOKENS_MIN_LIFETIME") as caught,
    ):
        generate(endpoint.url)
    assert not caught.value.transient


def test_http__extra_params_are_form_fields_and_nothing_else() -> None:
    fields = {"verify": "false", "method": "GET", "body": "x", "timeout": "999", "resource": "r1"}
    with HostileEndpoint(respond(body=token_body())) as endpoint:
        generate(endpoint.url, extra_params=fields)
    head, _, body = endpoint.requests[0].partition(b"\r\n\r\n")
    assert head.startswith(b"POST /token HTTP/1.1")
    form = parse_qs(body.decode())
    assert {name: form[name] for name in fields} == {k: [v] for k, v in fields.items()}
    assert form["grant_type"] == ["client_credentials"]


def test_http__tls_is_verified_whatever_the_config_says(tmp_path: Path) -> None:
    """An impostor with a self-signed certificate gets no request (so no secret), even when
    extra_params asks for ``verify: ""``; trusting its CA in ``ca_certs`` is the one way in."""
    certificate = self_signed(tmp_path)
    with HostileEndpoint(respond(body=token_body()), tls=certificate.server_context()) as impostor:
        with pytest.raises(GeneratorError, match="TLS certificate does not verify") as caught:
            generate(impostor.url, extra_params={"verify": ""})
        assert caught.value.transient
        assert impostor.requests == []  # the handshake failed: nothing was sent
        token = generate(impostor.url, ca_certs=certificate.cert_pem)
        assert token.access_token == "hostile-token-1"  # type: ignore[attr-defined]
        assert len(impostor.requests) == 1


def test_http__an_unreachable_endpoint_is_transient() -> None:
    from project.embedded_redis import free_port

    with pytest.raises(GeneratorError, match="cannot reach the token endpoint") as caught:
        generate(f"http://127.0.0.1:{free_port()}/token")
    assert caught.value.transient


def test_http__works_from_a_thread_that_runs_an_event_loop() -> None:
    import asyncio

    async def inside_a_loop() -> str:
        with HostileEndpoint(respond(body=token_body("from-async"))) as endpoint:
            return generate(endpoint.url).access_token  # type: ignore[attr-defined,no-any-return]

    assert asyncio.run(inside_a_loop()) == "from-async"


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"token_url": "https://user:pw@auth.example/t"}, "must not contain a user name"),
        ({"token_url": "https://auth.example/t#x"}, "must not have a fragment"),
        ({"token_url": "https://auth.example/t x"}, "ASCII URL without spaces"),
        ({"ca_certs": "not a pem"}, "ca_certs: must be PEM text"),
        (
            {"ca_certs": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"},
            "ca_certs: does not hold a readable PEM certificate",
        ),
        ({"extra_params": {"scope": "x"}}, "extra_params: may not set scope"),
        ({"extra_params": {"client_assertion": "x"}}, "may not set client_assertion"),
        ({"extra_params": {"bad name": "x"}}, "field names are"),
        ({"extra_params": {f"p{i}": "x" for i in range(21)}}, "at most 20 form fields"),
    ],
)
def test_validate__request_shaping_config_is_refused(
    config: dict[str, object], fragment: str
) -> None:
    full = {"token_url": "https://auth.example/t", "client_id": "c", **config}
    errors = GENERATOR.validate(full, SECRET)
    assert any(fragment in message for message in errors.get("config", [])), errors

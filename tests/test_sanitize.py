"""The scrubber: no form of a secret, and no piece of one FRAGMENT long, survives it, however an
issuer encodes or cuts what it echoes, and whatever length the stored text is cut to after."""

from __future__ import annotations

import base64
import json
import os
from urllib.parse import quote, quote_plus

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.leaks import leaked
from tokens.sanitize import FRAGMENT, MAX_ERROR_LENGTH, REDACTED, echoes, scrub

EXAMPLES = int(os.environ.get("HYPOTHESIS_EXAMPLES", 300))
SECRET = "s3cr3t-client-secret-VALUE-9f8e7d"

ENCODINGS = {
    "plain": lambda cid, s: s,
    "basic": lambda cid, s: "Basic " + base64.b64encode(f"{cid}:{s}".encode()).decode(),
    "basic-urlsafe": lambda cid, s: base64.urlsafe_b64encode(f"{cid}:{s}".encode()).decode(),
    "form": lambda cid, s: f"client_id={quote_plus(cid)}&client_secret={quote_plus(s)}",
    "form-every-byte": lambda cid, s: "".join(f"%{b:02X}" for b in s.encode()),
    "json": lambda cid, s: json.dumps({"client_secret": s}),
    "b64-of-form": lambda cid, s: base64.b64encode(
        f"client_secret={quote(s, safe='')}".encode()
    ).decode(),
}


def test_scrub__the_cases_seen_in_the_wild() -> None:
    basic = base64.b64encode(f"client-1:{SECRET}".encode()).decode()
    # An IdP that echoes the Authorization header.
    assert leaked(scrub(f"bad client: Basic {basic}", [SECRET]), SECRET) == set()
    # An echo across the old 120-character cut: 24 of the 26 characters used to survive.
    text = "x" * 100 + " " + SECRET[:24]
    assert leaked(scrub(text, [SECRET]), SECRET) == set()
    assert SECRET[:FRAGMENT] not in scrub(text, [SECRET])
    # The secret form-encoded, JSON-escaped and HTML-escaped.
    odd = 'p&ss "word" <x> ü/+='
    for echo in (quote_plus(odd), json.dumps(odd), "p&amp;ss &quot;word&quot; &lt;x&gt;"):
        assert odd[:FRAGMENT] not in scrub(echo, [odd]), echo
        assert "&quot;word&quot;" not in scrub(echo, [odd])
    # What is not the secret is kept.
    assert scrub("invalid_client: unknown client-1", [SECRET]) == (
        "invalid_client: unknown client-1"
    )


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    secret=st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF), min_size=12, max_size=48),
    client_id=st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=20),
    encoding=st.sampled_from(sorted(ENCODINGS)),
    before=st.text(max_size=400),
    after=st.text(max_size=50),
    cut=st.integers(min_value=0, max_value=600),
    limit=st.sampled_from([60, 120, MAX_ERROR_LENGTH]),
)
def test_scrub__no_piece_of_the_secret_survives_any_encoding_or_cut(
    secret: str,
    client_id: str,
    encoding: str,
    before: str,
    after: str,
    cut: int,
    limit: int,
) -> None:
    echoed = before + ENCODINGS[encoding](client_id, secret) + after
    for text in (echoed, echoed[:cut]):  # the issuer may cut its own echo anywhere
        output = scrub(text, [secret], limit=limit)
        assert len(output) <= limit
        assert leaked(output.replace(REDACTED, "\x00"), secret) == set(), (encoding, output)


def test_scrub__a_long_text_is_scrubbed_before_it_is_cut() -> None:
    # The secret straddles every window the scrubber could cut at.
    for position in range(0, 20_000, 997):
        text = "y" * position + SECRET + "z" * 50
        assert leaked(scrub(text, [SECRET], limit=100_000), SECRET) == set(), position


RANDOM_SECRET = "Zq8Xw3Lr9Tn2Vb6Kp4Hs7Dm1"  # what real client secrets look like


@pytest.mark.parametrize(
    "echo",
    [
        RANDOM_SECRET.upper(),
        RANDOM_SECRET.lower(),
        RANDOM_SECRET.encode().hex(),
        RANDOM_SECRET.encode().hex().upper(),
        quote(quote(RANDOM_SECRET + "/+=", safe=""), safe=""),  # URL-encoded twice
        "".join(f"&#{ord(c)};" for c in RANDOM_SECRET),  # numeric HTML entities
        base64.b64encode(
            b"Basic " + base64.b64encode(f"client:{RANDOM_SECRET}".encode())
        ).decode(),  # base64 of the Basic header
        f"{RANDOM_SECRET[:7]}****{RANDOM_SECRET[-7:]}",  # masked but for each end
    ],
)
def test_echoes__an_issuer_text_holding_the_secret_in_an_unforeseen_form_is_detected(
    echo: str,
) -> None:
    """What redaction cannot find, detection does: the issuer's description is then withheld."""
    assert echoes(f"invalid client ({echo})", [RANDOM_SECRET])


def test_echoes__ordinary_descriptions_are_kept() -> None:
    for text in (
        "The client credentials are invalid",
        "client_id 3f2a1b6c-0d4e-4c8f-9a7b-1e2d3c4b5a69 is unknown",
        "scope payments:write is not allowed for this client",
        "",
    ):
        assert not echoes(text, [RANDOM_SECRET]), text

"""The scrubber: no form of a secret, and no piece of one FRAGMENT long, survives it, however an
issuer encodes or cuts what it echoes, and whatever length the stored text is cut to after."""

from __future__ import annotations

import base64
import json
import os
from urllib.parse import quote, quote_plus

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.leaks import leaked
from tokens.sanitize import FRAGMENT, MAX_ERROR_LENGTH, REDACTED, scrub

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

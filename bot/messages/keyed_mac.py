"""The MAC on values the bot hands to Slack and reads back from a button click.

A button's value comes back in a payload Slack signed, but its content is whatever the
message carried, and a hand-made payload may carry anything. One HMAC-SHA256, under a key
derived per purpose from the one configured secret, so a MAC made for one kind of button
never passes for another (domain separation). Comparison is constant-time on bytes: a
tampered value may hold non-ASCII text or lone surrogates (JSON `\\ud800`), which
`hmac.compare_digest` refuses as `str` and UTF-8 refuses to encode.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

# One purpose per kind of signed value; never reuse one for another kind of message.
APPROVAL_BUTTON = "dbops-approval"
FULL_TABLE_BUTTON = "dbops-full-table"


def button_secret(signing_secret: str | None, bot_token: str | None) -> str:
    """The secret the button keys derive from: Slack's signing secret, else the bot token
    (Socket Mode has no signing secret), else a constant (the console signs for itself)."""
    return signing_secret or bot_token or "dbops"


@dataclass(frozen=True, repr=False)  # repr=False: the key stays out of logs
class KeyedMac:
    key: bytes
    hex_chars: int  # how much of the hex digest a value carries (values are kept short)

    @classmethod
    def for_purpose(cls, purpose: str, secret: str, hex_chars: int) -> KeyedMac:
        # "purpose:secret" is unambiguous only while a purpose holds no ":".
        if not purpose or ":" in purpose:
            raise ValueError(f"a MAC purpose is a plain name, not {purpose!r}")
        if not 16 <= hex_chars <= 64:
            raise ValueError("a MAC keeps 16 to 64 hex characters")
        # the same derivation the signers used before: buttons already posted stay valid
        return cls(hashlib.sha256(_bytes(f"{purpose}:{secret}")).digest(), hex_chars)

    def sign(self, message: str) -> str:
        return hmac.new(self.key, _bytes(message), "sha256").hexdigest()[: self.hex_chars]

    def matches(self, message: str, mac: str) -> bool:
        """Whether `mac` is this key's MAC of `message`; any text is an answer, never an error."""
        return bool(mac) and hmac.compare_digest(_bytes(self.sign(message)), _bytes(mac))


def _bytes(text: str) -> bytes:
    """UTF-8 that also takes lone surrogates, one-to-one, so distinct texts stay distinct."""
    return text.encode("utf-8", "surrogatepass")

"""What can go wrong when delivering a sample, as one small tree (mapped at the sink's boundary).

    DeliveryError
     ├── TransientError     connection refused/reset, timeout, 5xx, a 200 that is not the API's JSON:
     │                      retry with backoff (or after `retry_after` seconds, for 429)
     ├── AuthError          401/403: retrying will not help; pause the sink and raise the alarm
     └── RejectedError      other 4xx: this sample will never be accepted; dead-letter it

Messages never contain the API key: sinks build them from redacted text only, and raise them
`from None` so no HTTP library exception (whose text may hold the URL) is chained behind them.
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["AuthError", "DeliveryError", "RejectedError", "TransientError", "Redactor"]


class DeliveryError(Exception):
    def __init__(self, message: str, *, status: int | None = None, step: str = "",
                 answer: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.step = step
        #: The destination's answer (redacted, truncated), kept beside a dead letter.
        self.answer = answer

    def as_dict(self) -> dict[str, Any]:
        return {"error": str(self), "status": self.status, "step": self.step, "answer": self.answer}


class TransientError(DeliveryError):
    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class AuthError(DeliveryError):
    pass


class RejectedError(DeliveryError):
    pass


_PERCENT_HEX = re.compile(r"%[0-9A-F]{2}")


class Redactor:
    """Replaces secrets with `***` in any text: verbatim, in the URL encodings HTTP libraries use
    (which differ on characters such as `/`, and in the case of their hex digits), as JSON escapes
    them, and any `api_key=` query value whatever its encoding."""

    _QUERY_KEY = re.compile(r"(api_key=)[^&\s\"'#<>]*", re.IGNORECASE)

    def __init__(self, secrets: list[str]) -> None:
        from urllib.parse import quote, quote_plus

        forms: set[str] = set()
        for secret in secrets:
            if secret:
                forms.add(secret)
                escaped = json.dumps(secret)[1:-1]  # as a JSON answer may write it: "\u00e9", and "\/"
                forms.update({escaped, escaped.replace("/", "\\/")})
                for safe in ("", "/", "/:@", "/?:@-._~!$'()*,;="):
                    for encoded in (quote(secret, safe=safe), quote_plus(secret, safe=safe)):
                        forms.update({encoded, _PERCENT_HEX.sub(lambda m: m.group(0).lower(), encoded)})
        self._forms = sorted(forms, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        text = self._QUERY_KEY.sub(r"\1***", text)
        for form in self._forms:
            text = text.replace(form, "***")
        return text

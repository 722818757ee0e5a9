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


class Redactor:
    """Replaces secrets (and their URL-encoded forms) with `***` in any text."""

    def __init__(self, secrets: list[str]) -> None:
        from urllib.parse import quote, quote_plus

        forms: set[str] = set()
        for secret in secrets:
            if secret:
                forms.update({secret, quote(secret, safe=""), quote_plus(secret)})
        self._forms = sorted(forms, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for form in self._forms:
            text = text.replace(form, "***")
        return text

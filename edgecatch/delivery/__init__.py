"""Durable, asynchronous delivery of selected samples: prepare, spool, upload.

```
Collector.submit() ─▶ bounded queue ─▶ prepare (decode, orient, resize, JPEG, scale boxes)
                                         ─▶ Spool (on disk, crash-safe, bounded)
                                              ─▶ Uploader workers ─▶ Sink (roboflow | directory)
```
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Delivery", "DeliveryConfig", "State"]

if TYPE_CHECKING:
    from .config import DeliveryConfig
    from .service import Delivery, State


def __getattr__(name: str) -> Any:
    # Lazily: `edgecatch.config` imports `edgecatch.delivery.config`, and must not pay for PIL/httpx.
    if name in ("Delivery", "State"):
        from . import service

        return getattr(service, name)
    if name == "DeliveryConfig":
        from .config import DeliveryConfig

        return DeliveryConfig
    raise AttributeError(name)

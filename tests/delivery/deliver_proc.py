"""A delivering process for the crash tests: deliver the spool to the Upload API, exit when it is empty.

    python deliver_proc.py SPOOL_DIR BASE_URL DATASET     (the key in $TEST_ROBOFLOW_KEY)
"""

from __future__ import annotations

import sys
import time

from prometheus_client import CollectorRegistry

from edgecatch.delivery import Delivery
from edgecatch.delivery.config import DeliveryConfig
from edgecatch.metrics import Metrics


def main() -> int:
    spool_dir, base_url, dataset = sys.argv[1:4]
    config = DeliveryConfig.model_validate({
        "spool_dir": spool_dir, "concurrency": 4, "poll_seconds": 0.05,
        "retry": {"initial_seconds": 0.02, "max_seconds": 0.2},
        "sink": {"type": "roboflow", "base_url": base_url, "dataset": dataset,
                 "api_key_env": "TEST_ROBOFLOW_KEY", "timeout_seconds": 30}})
    delivery = Delivery(config, metrics=Metrics(CollectorRegistry()))
    delivery.start()
    print("started", flush=True)
    assert delivery.spool is not None
    while True:
        delivery.spool.scan()
        if len(delivery.spool) == 0:
            break
        time.sleep(0.05)
    delivery.stop()
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""schemathesis hooks of the black-box API fuzz (``deploy.local.fuzz``), loaded by the
schemathesis process through ``SCHEMATHESIS_HOOKS``, never imported by the product.

One constraint of the report posts cannot be written in JSON Schema: a report's ``ts``
must lie within FLEETPULSE_MAX_AGE_S behind and FLEETPULSE_MAX_FUTURE_S ahead of the
server's clock (the route's description says so; outside it the answer is a documented
422 naming ``ts``). So a schema-valid (positive) report is sent with the current time as
its ``ts``; everything else about it is as generated. Negative cases go as generated.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import schemathesis


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    """A positive report (or batch of them) gets a ``ts`` of now."""
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return
    body = case.body
    now = datetime.now(UTC).isoformat()
    for item in body if isinstance(body, list) else [body]:
        if isinstance(item, dict) and isinstance(item.get("ts"), str):
            item["ts"] = now

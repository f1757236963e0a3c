"""gRPC metadata keys of the broker's contract with its clients (the sidecar, the CLI).

Errors carry their stable code in the trailer ``credbroker-error-code`` (clients map
errors by it, never by message text) and, when known, ``credbroker-retry-after``
(seconds); a decision travels in ``credbroker-decision-bin`` (a serialized
``credbroker.v1.Decision``) whether the request was allowed or denied.
"""

from __future__ import annotations

ERROR_CODE_MD_KEY = "credbroker-error-code"
RETRY_AFTER_MD_KEY = "credbroker-retry-after"
DECISION_MD_KEY = "credbroker-decision-bin"
REQUEST_ID_MD_KEY = "credbroker-request-id"

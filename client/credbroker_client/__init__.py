"""credbroker-client: what an agent needs to get short-lived, scoped credentials from its
credbroker sidecar (HTTP/JSON on a unix socket). Depends only on httpx.

    from credbroker_client import Client

    with Client() as sidecar:                      # $CREDBROKER_SIDECAR_SOCKET
        with sidecar.lease("enrichment", target="evil.example",
                           initiating_event={"source": "splunk", "id": "NOTABLE-4242"},
                           justification="enrich the alert") as cred:
            ...  # cred.token: a Vault token; handed back on exit
"""

from credbroker_client._codes import *  # noqa: F403 - one exception class per error code
from credbroker_client._codes import ERROR_CLASSES
from credbroker_client._codes import __all__ as _CODE_CLASSES
from credbroker_client._core import SOCKET_ENV, RetryPolicy, socket_from_env
from credbroker_client.client import AsyncClient, Client
from credbroker_client.errors import (
    ApprovalRequired,
    ApprovalTimeout,
    CredbrokerError,
    ProtocolError,
    SidecarUnreachableError,
)
from credbroker_client.models import (
    Credential,
    Decision,
    HandBack,
    InitiatingEvent,
    PendingApproval,
)
from credbroker_client.tools import (
    ActionSpec,
    arguments_digest,
    current_incident,
    incident,
    requires_action,
    using_approval,
)

__version__ = "0.1.0"

__all__ = [
    "Client", "AsyncClient", "RetryPolicy", "SOCKET_ENV", "socket_from_env",
    "Credential", "PendingApproval", "Decision", "HandBack", "InitiatingEvent",
    "CredbrokerError", "ApprovalRequired", "ApprovalTimeout", "SidecarUnreachableError",
    "ProtocolError", "ERROR_CLASSES",
    "requires_action", "incident", "current_incident", "using_approval", "arguments_digest",
    "ActionSpec",
    *_CODE_CLASSES,
]

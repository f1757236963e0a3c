import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTCOME_UNSPECIFIED: _ClassVar[Outcome]
    OUTCOME_ALLOW: _ClassVar[Outcome]
    OUTCOME_DENY: _ClassVar[Outcome]
    OUTCOME_NEEDS_APPROVAL: _ClassVar[Outcome]
OUTCOME_UNSPECIFIED: Outcome
OUTCOME_ALLOW: Outcome
OUTCOME_DENY: Outcome
OUTCOME_NEEDS_APPROVAL: Outcome

class InitiatingEvent(_message.Message):
    __slots__ = ("source", "id", "summary")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    source: str
    id: str
    summary: str
    def __init__(self, source: _Optional[str] = ..., id: _Optional[str] = ..., summary: _Optional[str] = ...) -> None: ...

class IssueCredentialRequest(_message.Message):
    __slots__ = ("action_class", "target", "initiating_event", "justification", "ttl_seconds", "request_id", "approval_id", "break_glass", "environment")
    ACTION_CLASS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    INITIATING_EVENT_FIELD_NUMBER: _ClassVar[int]
    JUSTIFICATION_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_ID_FIELD_NUMBER: _ClassVar[int]
    BREAK_GLASS_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    action_class: str
    target: str
    initiating_event: InitiatingEvent
    justification: str
    ttl_seconds: int
    request_id: str
    approval_id: str
    break_glass: bool
    environment: str
    def __init__(self, action_class: _Optional[str] = ..., target: _Optional[str] = ..., initiating_event: _Optional[_Union[InitiatingEvent, _Mapping]] = ..., justification: _Optional[str] = ..., ttl_seconds: _Optional[int] = ..., request_id: _Optional[str] = ..., approval_id: _Optional[str] = ..., break_glass: _Optional[bool] = ..., environment: _Optional[str] = ...) -> None: ...

class Credential(_message.Message):
    __slots__ = ("credential_id", "token", "expires_at", "policies", "ttl_seconds", "environment")
    CREDENTIAL_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    credential_id: str
    token: str
    expires_at: _timestamp_pb2.Timestamp
    policies: _containers.RepeatedScalarFieldContainer[str]
    ttl_seconds: int
    environment: str
    def __init__(self, credential_id: _Optional[str] = ..., token: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., policies: _Optional[_Iterable[str]] = ..., ttl_seconds: _Optional[int] = ..., environment: _Optional[str] = ...) -> None: ...

class Owner(_message.Message):
    __slots__ = ("team", "contact")
    TEAM_FIELD_NUMBER: _ClassVar[int]
    CONTACT_FIELD_NUMBER: _ClassVar[int]
    team: str
    contact: str
    def __init__(self, team: _Optional[str] = ..., contact: _Optional[str] = ...) -> None: ...

class Decision(_message.Message):
    __slots__ = ("outcome", "action_class", "rule", "reasons", "owner", "escalation", "scope_map_version", "source", "risk", "spiffe_id", "not_reusable")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    ACTION_CLASS_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    ESCALATION_FIELD_NUMBER: _ClassVar[int]
    SCOPE_MAP_VERSION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    RISK_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    NOT_REUSABLE_FIELD_NUMBER: _ClassVar[int]
    outcome: Outcome
    action_class: str
    rule: str
    reasons: _containers.RepeatedScalarFieldContainer[str]
    owner: Owner
    escalation: _containers.RepeatedScalarFieldContainer[str]
    scope_map_version: str
    source: str
    risk: str
    spiffe_id: str
    not_reusable: bool
    def __init__(self, outcome: _Optional[_Union[Outcome, str]] = ..., action_class: _Optional[str] = ..., rule: _Optional[str] = ..., reasons: _Optional[_Iterable[str]] = ..., owner: _Optional[_Union[Owner, _Mapping]] = ..., escalation: _Optional[_Iterable[str]] = ..., scope_map_version: _Optional[str] = ..., source: _Optional[str] = ..., risk: _Optional[str] = ..., spiffe_id: _Optional[str] = ..., not_reusable: _Optional[bool] = ...) -> None: ...

class IssueCredentialResponse(_message.Message):
    __slots__ = ("request_id", "credential", "decision", "approval")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    credential: Credential
    decision: Decision
    approval: ApprovalInfo
    def __init__(self, request_id: _Optional[str] = ..., credential: _Optional[_Union[Credential, _Mapping]] = ..., decision: _Optional[_Union[Decision, _Mapping]] = ..., approval: _Optional[_Union[ApprovalInfo, _Mapping]] = ...) -> None: ...

class ApprovalVote(_message.Message):
    __slots__ = ("subject", "reason", "at", "via")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    VIA_FIELD_NUMBER: _ClassVar[int]
    subject: str
    reason: str
    at: _timestamp_pb2.Timestamp
    via: str
    def __init__(self, subject: _Optional[str] = ..., reason: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., via: _Optional[str] = ...) -> None: ...

class ApprovalInfo(_message.Message):
    __slots__ = ("id", "state", "spiffe_id", "action_class", "request", "request_hash", "approvers", "approvals_required", "votes", "denial", "created_at", "expires_at", "escalated", "escalation", "review", "credential_id", "owner_team")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_CLASS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    REQUEST_HASH_FIELD_NUMBER: _ClassVar[int]
    APPROVERS_FIELD_NUMBER: _ClassVar[int]
    APPROVALS_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    VOTES_FIELD_NUMBER: _ClassVar[int]
    DENIAL_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    ESCALATED_FIELD_NUMBER: _ClassVar[int]
    ESCALATION_FIELD_NUMBER: _ClassVar[int]
    REVIEW_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_TEAM_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: str
    spiffe_id: str
    action_class: str
    request: IssueCredentialRequest
    request_hash: str
    approvers: _containers.RepeatedScalarFieldContainer[str]
    approvals_required: int
    votes: _containers.RepeatedCompositeFieldContainer[ApprovalVote]
    denial: ApprovalVote
    created_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    escalated: int
    escalation: _containers.RepeatedScalarFieldContainer[str]
    review: ApprovalVote
    credential_id: str
    owner_team: str
    def __init__(self, id: _Optional[str] = ..., state: _Optional[str] = ..., spiffe_id: _Optional[str] = ..., action_class: _Optional[str] = ..., request: _Optional[_Union[IssueCredentialRequest, _Mapping]] = ..., request_hash: _Optional[str] = ..., approvers: _Optional[_Iterable[str]] = ..., approvals_required: _Optional[int] = ..., votes: _Optional[_Iterable[_Union[ApprovalVote, _Mapping]]] = ..., denial: _Optional[_Union[ApprovalVote, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., escalated: _Optional[int] = ..., escalation: _Optional[_Iterable[str]] = ..., review: _Optional[_Union[ApprovalVote, _Mapping]] = ..., credential_id: _Optional[str] = ..., owner_team: _Optional[str] = ...) -> None: ...

class AwaitApprovalRequest(_message.Message):
    __slots__ = ("approval_id", "wait_seconds")
    APPROVAL_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    approval_id: str
    wait_seconds: int
    def __init__(self, approval_id: _Optional[str] = ..., wait_seconds: _Optional[int] = ...) -> None: ...

class ListApprovalsRequest(_message.Message):
    __slots__ = ("review",)
    REVIEW_FIELD_NUMBER: _ClassVar[int]
    review: bool
    def __init__(self, review: _Optional[bool] = ...) -> None: ...

class ListApprovalsResponse(_message.Message):
    __slots__ = ("approvals",)
    APPROVALS_FIELD_NUMBER: _ClassVar[int]
    approvals: _containers.RepeatedCompositeFieldContainer[ApprovalInfo]
    def __init__(self, approvals: _Optional[_Iterable[_Union[ApprovalInfo, _Mapping]]] = ...) -> None: ...

class ApprovalDecisionRequest(_message.Message):
    __slots__ = ("approval_id", "reason", "id_token")
    APPROVAL_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ID_TOKEN_FIELD_NUMBER: _ClassVar[int]
    approval_id: str
    reason: str
    id_token: str
    def __init__(self, approval_id: _Optional[str] = ..., reason: _Optional[str] = ..., id_token: _Optional[str] = ...) -> None: ...

class RevokeCredentialRequest(_message.Message):
    __slots__ = ("credential_id", "reason")
    CREDENTIAL_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    credential_id: str
    reason: str
    def __init__(self, credential_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RevokeCredentialResponse(_message.Message):
    __slots__ = ("credential_id", "already_dead")
    CREDENTIAL_ID_FIELD_NUMBER: _ClassVar[int]
    ALREADY_DEAD_FIELD_NUMBER: _ClassVar[int]
    credential_id: str
    already_dead: bool
    def __init__(self, credential_id: _Optional[str] = ..., already_dead: _Optional[bool] = ...) -> None: ...

class Selector(_message.Message):
    __slots__ = ("spiffe_id", "action_class", "target", "since", "until", "credential_ids", "all", "environment")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_CLASS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_IDS_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    action_class: str
    target: str
    since: _timestamp_pb2.Timestamp
    until: _timestamp_pb2.Timestamp
    credential_ids: _containers.RepeatedScalarFieldContainer[str]
    all: bool
    environment: str
    def __init__(self, spiffe_id: _Optional[str] = ..., action_class: _Optional[str] = ..., target: _Optional[str] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., credential_ids: _Optional[_Iterable[str]] = ..., all: _Optional[bool] = ..., environment: _Optional[str] = ...) -> None: ...

class CacheHit(_message.Message):
    __slots__ = ("credential_id", "request_id", "request", "served_at")
    CREDENTIAL_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    SERVED_AT_FIELD_NUMBER: _ClassVar[int]
    credential_id: str
    request_id: str
    request: IssueCredentialRequest
    served_at: _timestamp_pb2.Timestamp
    def __init__(self, credential_id: _Optional[str] = ..., request_id: _Optional[str] = ..., request: _Optional[_Union[IssueCredentialRequest, _Mapping]] = ..., served_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ReportCacheHitsRequest(_message.Message):
    __slots__ = ("hits",)
    HITS_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[CacheHit]
    def __init__(self, hits: _Optional[_Iterable[_Union[CacheHit, _Mapping]]] = ...) -> None: ...

class RejectedCacheHit(_message.Message):
    __slots__ = ("index", "reason")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    index: int
    reason: str
    def __init__(self, index: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class ReportCacheHitsResponse(_message.Message):
    __slots__ = ("recorded", "duplicates", "rejected")
    RECORDED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    recorded: int
    duplicates: int
    rejected: _containers.RepeatedCompositeFieldContainer[RejectedCacheHit]
    def __init__(self, recorded: _Optional[int] = ..., duplicates: _Optional[int] = ..., rejected: _Optional[_Iterable[_Union[RejectedCacheHit, _Mapping]]] = ...) -> None: ...

class CredentialInfo(_message.Message):
    __slots__ = ("credential_id", "spiffe_id", "action_class", "target", "request_id", "issued_at", "expires_at", "state", "initiating_event", "environment")
    CREDENTIAL_ID_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_CLASS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    INITIATING_EVENT_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    credential_id: str
    spiffe_id: str
    action_class: str
    target: str
    request_id: str
    issued_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    state: str
    initiating_event: InitiatingEvent
    environment: str
    def __init__(self, credential_id: _Optional[str] = ..., spiffe_id: _Optional[str] = ..., action_class: _Optional[str] = ..., target: _Optional[str] = ..., request_id: _Optional[str] = ..., issued_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., state: _Optional[str] = ..., initiating_event: _Optional[_Union[InitiatingEvent, _Mapping]] = ..., environment: _Optional[str] = ...) -> None: ...

class ListCredentialsResponse(_message.Message):
    __slots__ = ("credentials",)
    CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    credentials: _containers.RepeatedCompositeFieldContainer[CredentialInfo]
    def __init__(self, credentials: _Optional[_Iterable[_Union[CredentialInfo, _Mapping]]] = ...) -> None: ...

class RevokeCredentialsRequest(_message.Message):
    __slots__ = ("selector", "reason")
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    selector: Selector
    reason: str
    def __init__(self, selector: _Optional[_Union[Selector, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class RevokeSummary(_message.Message):
    __slots__ = ("revoked", "already_dead", "failed", "failed_ids", "pending")
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    ALREADY_DEAD_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    FAILED_IDS_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    revoked: int
    already_dead: int
    failed: int
    failed_ids: _containers.RepeatedScalarFieldContainer[str]
    pending: int
    def __init__(self, revoked: _Optional[int] = ..., already_dead: _Optional[int] = ..., failed: _Optional[int] = ..., failed_ids: _Optional[_Iterable[str]] = ..., pending: _Optional[int] = ...) -> None: ...

class RevokeProgress(_message.Message):
    __slots__ = ("done", "total", "credential_id", "result", "error", "summary")
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    done: int
    total: int
    credential_id: str
    result: str
    error: str
    summary: RevokeSummary
    def __init__(self, done: _Optional[int] = ..., total: _Optional[int] = ..., credential_id: _Optional[str] = ..., result: _Optional[str] = ..., error: _Optional[str] = ..., summary: _Optional[_Union[RevokeSummary, _Mapping]] = ...) -> None: ...

class FreezeInfo(_message.Message):
    __slots__ = ("id", "kind", "pattern", "reason", "by", "created_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PATTERN_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    BY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: str
    pattern: str
    reason: str
    by: str
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[str] = ..., pattern: _Optional[str] = ..., reason: _Optional[str] = ..., by: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class FreezeRequest(_message.Message):
    __slots__ = ("spiffe_id", "action_class", "reason")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_CLASS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    action_class: str
    reason: str
    def __init__(self, spiffe_id: _Optional[str] = ..., action_class: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class FreezeResponse(_message.Message):
    __slots__ = ("freeze", "credentials_matched", "vault_entities_disabled", "vault_policy_frozen", "vault_enforced_ms", "vault_pending", "vault_error")
    FREEZE_FIELD_NUMBER: _ClassVar[int]
    CREDENTIALS_MATCHED_FIELD_NUMBER: _ClassVar[int]
    VAULT_ENTITIES_DISABLED_FIELD_NUMBER: _ClassVar[int]
    VAULT_POLICY_FROZEN_FIELD_NUMBER: _ClassVar[int]
    VAULT_ENFORCED_MS_FIELD_NUMBER: _ClassVar[int]
    VAULT_PENDING_FIELD_NUMBER: _ClassVar[int]
    VAULT_ERROR_FIELD_NUMBER: _ClassVar[int]
    freeze: FreezeInfo
    credentials_matched: int
    vault_entities_disabled: int
    vault_policy_frozen: bool
    vault_enforced_ms: float
    vault_pending: bool
    vault_error: str
    def __init__(self, freeze: _Optional[_Union[FreezeInfo, _Mapping]] = ..., credentials_matched: _Optional[int] = ..., vault_entities_disabled: _Optional[int] = ..., vault_policy_frozen: _Optional[bool] = ..., vault_enforced_ms: _Optional[float] = ..., vault_pending: _Optional[bool] = ..., vault_error: _Optional[str] = ...) -> None: ...

class FreezeSelfRequest(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class UnfreezeRequest(_message.Message):
    __slots__ = ("spiffe_id", "action_class", "reason")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_CLASS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    action_class: str
    reason: str
    def __init__(self, spiffe_id: _Optional[str] = ..., action_class: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class UnfreezeResponse(_message.Message):
    __slots__ = ("lifted",)
    LIFTED_FIELD_NUMBER: _ClassVar[int]
    lifted: _containers.RepeatedCompositeFieldContainer[FreezeInfo]
    def __init__(self, lifted: _Optional[_Iterable[_Union[FreezeInfo, _Mapping]]] = ...) -> None: ...

class ListFreezesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListFreezesResponse(_message.Message):
    __slots__ = ("freezes",)
    FREEZES_FIELD_NUMBER: _ClassVar[int]
    freezes: _containers.RepeatedCompositeFieldContainer[FreezeInfo]
    def __init__(self, freezes: _Optional[_Iterable[_Union[FreezeInfo, _Mapping]]] = ...) -> None: ...

class WatchRevocationsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RevocationEvent(_message.Message):
    __slots__ = ("sync", "revoked", "frozen", "scope_map")
    class Sync(_message.Message):
        __slots__ = ("live_credential_ids", "frozen", "reason", "scope_map_version")
        LIVE_CREDENTIAL_IDS_FIELD_NUMBER: _ClassVar[int]
        FROZEN_FIELD_NUMBER: _ClassVar[int]
        REASON_FIELD_NUMBER: _ClassVar[int]
        SCOPE_MAP_VERSION_FIELD_NUMBER: _ClassVar[int]
        live_credential_ids: _containers.RepeatedScalarFieldContainer[str]
        frozen: bool
        reason: str
        scope_map_version: str
        def __init__(self, live_credential_ids: _Optional[_Iterable[str]] = ..., frozen: _Optional[bool] = ..., reason: _Optional[str] = ..., scope_map_version: _Optional[str] = ...) -> None: ...
    class Revoked(_message.Message):
        __slots__ = ("credential_ids",)
        CREDENTIAL_IDS_FIELD_NUMBER: _ClassVar[int]
        credential_ids: _containers.RepeatedScalarFieldContainer[str]
        def __init__(self, credential_ids: _Optional[_Iterable[str]] = ...) -> None: ...
    class Frozen(_message.Message):
        __slots__ = ("action_class", "identity", "reason", "by")
        ACTION_CLASS_FIELD_NUMBER: _ClassVar[int]
        IDENTITY_FIELD_NUMBER: _ClassVar[int]
        REASON_FIELD_NUMBER: _ClassVar[int]
        BY_FIELD_NUMBER: _ClassVar[int]
        action_class: str
        identity: bool
        reason: str
        by: str
        def __init__(self, action_class: _Optional[str] = ..., identity: _Optional[bool] = ..., reason: _Optional[str] = ..., by: _Optional[str] = ...) -> None: ...
    class ScopeMapInForce(_message.Message):
        __slots__ = ("version",)
        VERSION_FIELD_NUMBER: _ClassVar[int]
        version: str
        def __init__(self, version: _Optional[str] = ...) -> None: ...
    SYNC_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    FROZEN_FIELD_NUMBER: _ClassVar[int]
    SCOPE_MAP_FIELD_NUMBER: _ClassVar[int]
    sync: RevocationEvent.Sync
    revoked: RevocationEvent.Revoked
    frozen: RevocationEvent.Frozen
    scope_map: RevocationEvent.ScopeMapInForce
    def __init__(self, sync: _Optional[_Union[RevocationEvent.Sync, _Mapping]] = ..., revoked: _Optional[_Union[RevocationEvent.Revoked, _Mapping]] = ..., frozen: _Optional[_Union[RevocationEvent.Frozen, _Mapping]] = ..., scope_map: _Optional[_Union[RevocationEvent.ScopeMapInForce, _Mapping]] = ...) -> None: ...

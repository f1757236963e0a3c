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
    __slots__ = ("action_class", "target", "initiating_event", "justification", "ttl_seconds", "request_id")
    ACTION_CLASS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    INITIATING_EVENT_FIELD_NUMBER: _ClassVar[int]
    JUSTIFICATION_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    action_class: str
    target: str
    initiating_event: InitiatingEvent
    justification: str
    ttl_seconds: int
    request_id: str
    def __init__(self, action_class: _Optional[str] = ..., target: _Optional[str] = ..., initiating_event: _Optional[_Union[InitiatingEvent, _Mapping]] = ..., justification: _Optional[str] = ..., ttl_seconds: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class Credential(_message.Message):
    __slots__ = ("credential_id", "token", "expires_at", "policies", "ttl_seconds")
    CREDENTIAL_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    credential_id: str
    token: str
    expires_at: _timestamp_pb2.Timestamp
    policies: _containers.RepeatedScalarFieldContainer[str]
    ttl_seconds: int
    def __init__(self, credential_id: _Optional[str] = ..., token: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., policies: _Optional[_Iterable[str]] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class Owner(_message.Message):
    __slots__ = ("team", "contact")
    TEAM_FIELD_NUMBER: _ClassVar[int]
    CONTACT_FIELD_NUMBER: _ClassVar[int]
    team: str
    contact: str
    def __init__(self, team: _Optional[str] = ..., contact: _Optional[str] = ...) -> None: ...

class Decision(_message.Message):
    __slots__ = ("outcome", "action_class", "rule", "reasons", "owner", "escalation", "scope_map_version", "source", "risk", "spiffe_id")
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
    def __init__(self, outcome: _Optional[_Union[Outcome, str]] = ..., action_class: _Optional[str] = ..., rule: _Optional[str] = ..., reasons: _Optional[_Iterable[str]] = ..., owner: _Optional[_Union[Owner, _Mapping]] = ..., escalation: _Optional[_Iterable[str]] = ..., scope_map_version: _Optional[str] = ..., source: _Optional[str] = ..., risk: _Optional[str] = ..., spiffe_id: _Optional[str] = ...) -> None: ...

class IssueCredentialResponse(_message.Message):
    __slots__ = ("request_id", "credential", "decision")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    credential: Credential
    decision: Decision
    def __init__(self, request_id: _Optional[str] = ..., credential: _Optional[_Union[Credential, _Mapping]] = ..., decision: _Optional[_Union[Decision, _Mapping]] = ...) -> None: ...

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

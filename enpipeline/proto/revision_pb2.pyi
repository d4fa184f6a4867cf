from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RevisionToken(_message.Message):
    __slots__ = ("kid", "data")
    KID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    kid: str
    data: bytes
    def __init__(self, kid: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class RevisionTokenData(_message.Message):
    __slots__ = ("revisableKeys",)
    REVISABLEKEYS_FIELD_NUMBER: _ClassVar[int]
    revisableKeys: _containers.RepeatedCompositeFieldContainer[RevisableKey]
    def __init__(self, revisableKeys: _Optional[_Iterable[_Union[RevisableKey, _Mapping]]] = ...) -> None: ...

class RevisableKey(_message.Message):
    __slots__ = ("temporaryExposureKey", "intervalNumber", "intervalCount")
    TEMPORARYEXPOSUREKEY_FIELD_NUMBER: _ClassVar[int]
    INTERVALNUMBER_FIELD_NUMBER: _ClassVar[int]
    INTERVALCOUNT_FIELD_NUMBER: _ClassVar[int]
    temporaryExposureKey: bytes
    intervalNumber: int
    intervalCount: int
    def __init__(self, temporaryExposureKey: _Optional[bytes] = ..., intervalNumber: _Optional[int] = ..., intervalCount: _Optional[int] = ...) -> None: ...

from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FederationFetchRequest(_message.Message):
    __slots__ = ("includeRegions", "excludeRegions", "onlyTravelers", "onlyLocalProvenance", "maxExposureKeys", "state")
    INCLUDEREGIONS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDEREGIONS_FIELD_NUMBER: _ClassVar[int]
    ONLYTRAVELERS_FIELD_NUMBER: _ClassVar[int]
    ONLYLOCALPROVENANCE_FIELD_NUMBER: _ClassVar[int]
    MAXEXPOSUREKEYS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    includeRegions: _containers.RepeatedScalarFieldContainer[str]
    excludeRegions: _containers.RepeatedScalarFieldContainer[str]
    onlyTravelers: bool
    onlyLocalProvenance: bool
    maxExposureKeys: int
    state: FetchState
    def __init__(self, includeRegions: _Optional[_Iterable[str]] = ..., excludeRegions: _Optional[_Iterable[str]] = ..., onlyTravelers: _Optional[bool] = ..., onlyLocalProvenance: _Optional[bool] = ..., maxExposureKeys: _Optional[int] = ..., state: _Optional[_Union[FetchState, _Mapping]] = ...) -> None: ...

class FederationFetchResponse(_message.Message):
    __slots__ = ("keys", "revisedKeys", "partialResponse", "nextFetchState")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    REVISEDKEYS_FIELD_NUMBER: _ClassVar[int]
    PARTIALRESPONSE_FIELD_NUMBER: _ClassVar[int]
    NEXTFETCHSTATE_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[ExposureKey]
    revisedKeys: _containers.RepeatedCompositeFieldContainer[ExposureKey]
    partialResponse: bool
    nextFetchState: FetchState
    def __init__(self, keys: _Optional[_Iterable[_Union[ExposureKey, _Mapping]]] = ..., revisedKeys: _Optional[_Iterable[_Union[ExposureKey, _Mapping]]] = ..., partialResponse: _Optional[bool] = ..., nextFetchState: _Optional[_Union[FetchState, _Mapping]] = ...) -> None: ...

class FetchState(_message.Message):
    __slots__ = ("keyCursor", "revisedKeyCursor")
    KEYCURSOR_FIELD_NUMBER: _ClassVar[int]
    REVISEDKEYCURSOR_FIELD_NUMBER: _ClassVar[int]
    keyCursor: Cursor
    revisedKeyCursor: Cursor
    def __init__(self, keyCursor: _Optional[_Union[Cursor, _Mapping]] = ..., revisedKeyCursor: _Optional[_Union[Cursor, _Mapping]] = ...) -> None: ...

class Cursor(_message.Message):
    __slots__ = ("timestamp", "nextToken")
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    NEXTTOKEN_FIELD_NUMBER: _ClassVar[int]
    timestamp: int
    nextToken: str
    def __init__(self, timestamp: _Optional[int] = ..., nextToken: _Optional[str] = ...) -> None: ...

class ExposureKey(_message.Message):
    __slots__ = ("exposureKey", "transmissionRisk", "intervalNumber", "intervalCount", "reportType", "daysSinceOnsetOfSymptoms", "hasSymptomOnset", "traveler", "regions")
    class ReportType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        UNKNOWN: _ClassVar[ExposureKey.ReportType]
        CONFIRMED_TEST: _ClassVar[ExposureKey.ReportType]
        CONFIRMED_CLINICAL_DIAGNOSIS: _ClassVar[ExposureKey.ReportType]
        SELF_REPORT: _ClassVar[ExposureKey.ReportType]
        RECURSIVE: _ClassVar[ExposureKey.ReportType]
        REVOKED: _ClassVar[ExposureKey.ReportType]
    UNKNOWN: ExposureKey.ReportType
    CONFIRMED_TEST: ExposureKey.ReportType
    CONFIRMED_CLINICAL_DIAGNOSIS: ExposureKey.ReportType
    SELF_REPORT: ExposureKey.ReportType
    RECURSIVE: ExposureKey.ReportType
    REVOKED: ExposureKey.ReportType
    EXPOSUREKEY_FIELD_NUMBER: _ClassVar[int]
    TRANSMISSIONRISK_FIELD_NUMBER: _ClassVar[int]
    INTERVALNUMBER_FIELD_NUMBER: _ClassVar[int]
    INTERVALCOUNT_FIELD_NUMBER: _ClassVar[int]
    REPORTTYPE_FIELD_NUMBER: _ClassVar[int]
    DAYSSINCEONSETOFSYMPTOMS_FIELD_NUMBER: _ClassVar[int]
    HASSYMPTOMONSET_FIELD_NUMBER: _ClassVar[int]
    TRAVELER_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    exposureKey: bytes
    transmissionRisk: int
    intervalNumber: int
    intervalCount: int
    reportType: ExposureKey.ReportType
    daysSinceOnsetOfSymptoms: int
    hasSymptomOnset: bool
    traveler: bool
    regions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, exposureKey: _Optional[bytes] = ..., transmissionRisk: _Optional[int] = ..., intervalNumber: _Optional[int] = ..., intervalCount: _Optional[int] = ..., reportType: _Optional[_Union[ExposureKey.ReportType, str]] = ..., daysSinceOnsetOfSymptoms: _Optional[int] = ..., hasSymptomOnset: _Optional[bool] = ..., traveler: _Optional[bool] = ..., regions: _Optional[_Iterable[str]] = ...) -> None: ...

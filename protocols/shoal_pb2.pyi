from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODING_UNSPECIFIED: _ClassVar[Encoding]
    RAW: _ClassVar[Encoding]
    FP16: _ClassVar[Encoding]
    BF16: _ClassVar[Encoding]
    INT8_BLOCKWISE: _ClassVar[Encoding]
    FP8_E4M3: _ClassVar[Encoding]
ENCODING_UNSPECIFIED: Encoding
RAW: Encoding
FP16: Encoding
BF16: Encoding
INT8_BLOCKWISE: Encoding
FP8_E4M3: Encoding

class Certificate(_message.Message):
    __slots__ = ("peer_public_key", "peer_id", "swarm_id", "not_before", "not_after", "role", "serial")
    PEER_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    SWARM_ID_FIELD_NUMBER: _ClassVar[int]
    NOT_BEFORE_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    peer_public_key: bytes
    peer_id: str
    swarm_id: str
    not_before: float
    not_after: float
    role: str
    serial: int
    def __init__(self, peer_public_key: _Optional[bytes] = ..., peer_id: _Optional[str] = ..., swarm_id: _Optional[str] = ..., not_before: _Optional[float] = ..., not_after: _Optional[float] = ..., role: _Optional[str] = ..., serial: _Optional[int] = ...) -> None: ...

class SignedCertificate(_message.Message):
    __slots__ = ("certificate", "signature")
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    certificate: bytes
    signature: bytes
    def __init__(self, certificate: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class Benchmark(_message.Message):
    __slots__ = ("samples_per_s", "bandwidth_mbps", "device", "memory_bytes", "declared", "memory_available_bytes")
    SAMPLES_PER_S_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_MBPS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    DECLARED_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    samples_per_s: float
    bandwidth_mbps: float
    device: str
    memory_bytes: int
    declared: bool
    memory_available_bytes: int
    def __init__(self, samples_per_s: _Optional[float] = ..., bandwidth_mbps: _Optional[float] = ..., device: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., declared: _Optional[bool] = ..., memory_available_bytes: _Optional[int] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("public_key", "token_proof", "timestamp", "benchmark", "address", "stage_hint", "step_hint", "version", "tls_csr", "relay", "data_fingerprint")
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    TOKEN_PROOF_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    BENCHMARK_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STAGE_HINT_FIELD_NUMBER: _ClassVar[int]
    STEP_HINT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TLS_CSR_FIELD_NUMBER: _ClassVar[int]
    RELAY_FIELD_NUMBER: _ClassVar[int]
    DATA_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    public_key: bytes
    token_proof: bytes
    timestamp: float
    benchmark: Benchmark
    address: str
    stage_hint: int
    step_hint: int
    version: str
    tls_csr: bytes
    relay: bool
    data_fingerprint: str
    def __init__(self, public_key: _Optional[bytes] = ..., token_proof: _Optional[bytes] = ..., timestamp: _Optional[float] = ..., benchmark: _Optional[_Union[Benchmark, _Mapping]] = ..., address: _Optional[str] = ..., stage_hint: _Optional[int] = ..., step_hint: _Optional[int] = ..., version: _Optional[str] = ..., tls_csr: _Optional[bytes] = ..., relay: _Optional[bool] = ..., data_fingerprint: _Optional[str] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("certificate", "coordinator_public_key", "run_spec_toml", "stage", "epoch", "lease_seconds", "heartbeat_interval", "view", "swarm_id", "tls_certificate", "tls_ca", "address")
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    RUN_SPEC_TOML_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    SWARM_ID_FIELD_NUMBER: _ClassVar[int]
    TLS_CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    TLS_CA_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    certificate: SignedCertificate
    coordinator_public_key: bytes
    run_spec_toml: str
    stage: int
    epoch: int
    lease_seconds: float
    heartbeat_interval: float
    view: SwarmView
    swarm_id: str
    tls_certificate: bytes
    tls_ca: bytes
    address: str
    def __init__(self, certificate: _Optional[_Union[SignedCertificate, _Mapping]] = ..., coordinator_public_key: _Optional[bytes] = ..., run_spec_toml: _Optional[str] = ..., stage: _Optional[int] = ..., epoch: _Optional[int] = ..., lease_seconds: _Optional[float] = ..., heartbeat_interval: _Optional[float] = ..., view: _Optional[_Union[SwarmView, _Mapping]] = ..., swarm_id: _Optional[str] = ..., tls_certificate: _Optional[bytes] = ..., tls_ca: _Optional[bytes] = ..., address: _Optional[str] = ...) -> None: ...

class PeerStats(_message.Message):
    __slots__ = ("state", "samples_per_s", "queue", "bytes_sent", "bytes_received", "loss", "step", "tokens_per_s", "dropped_microbatches", "grad_norm", "state_hash", "bytes_by_kind", "microbatches_done", "held_stage")
    class BytesByKindEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    STATE_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_S_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    DROPPED_MICROBATCHES_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    STATE_HASH_FIELD_NUMBER: _ClassVar[int]
    BYTES_BY_KIND_FIELD_NUMBER: _ClassVar[int]
    MICROBATCHES_DONE_FIELD_NUMBER: _ClassVar[int]
    HELD_STAGE_FIELD_NUMBER: _ClassVar[int]
    state: str
    samples_per_s: float
    queue: int
    bytes_sent: int
    bytes_received: int
    loss: float
    step: int
    tokens_per_s: float
    dropped_microbatches: int
    grad_norm: float
    state_hash: str
    bytes_by_kind: _containers.ScalarMap[str, int]
    microbatches_done: int
    held_stage: int
    def __init__(self, state: _Optional[str] = ..., samples_per_s: _Optional[float] = ..., queue: _Optional[int] = ..., bytes_sent: _Optional[int] = ..., bytes_received: _Optional[int] = ..., loss: _Optional[float] = ..., step: _Optional[int] = ..., tokens_per_s: _Optional[float] = ..., dropped_microbatches: _Optional[int] = ..., grad_norm: _Optional[float] = ..., state_hash: _Optional[str] = ..., bytes_by_kind: _Optional[_Mapping[str, int]] = ..., microbatches_done: _Optional[int] = ..., held_stage: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("stats", "known_epoch", "address", "relayed_by", "view_deltas", "unreachable")
    STATS_FIELD_NUMBER: _ClassVar[int]
    KNOWN_EPOCH_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    RELAYED_BY_FIELD_NUMBER: _ClassVar[int]
    VIEW_DELTAS_FIELD_NUMBER: _ClassVar[int]
    UNREACHABLE_FIELD_NUMBER: _ClassVar[int]
    stats: PeerStats
    known_epoch: int
    address: str
    relayed_by: str
    view_deltas: bool
    unreachable: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, stats: _Optional[_Union[PeerStats, _Mapping]] = ..., known_epoch: _Optional[int] = ..., address: _Optional[str] = ..., relayed_by: _Optional[str] = ..., view_deltas: _Optional[bool] = ..., unreachable: _Optional[_Iterable[str]] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("epoch", "lease_expires", "renewed", "stage", "view", "action", "reach", "relay", "heartbeat_interval", "lease_seconds")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_FIELD_NUMBER: _ClassVar[int]
    RENEWED_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    REACH_FIELD_NUMBER: _ClassVar[int]
    RELAY_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    lease_expires: float
    renewed: SignedCertificate
    stage: int
    view: SwarmView
    action: str
    reach: str
    relay: str
    heartbeat_interval: float
    lease_seconds: float
    def __init__(self, epoch: _Optional[int] = ..., lease_expires: _Optional[float] = ..., renewed: _Optional[_Union[SignedCertificate, _Mapping]] = ..., stage: _Optional[int] = ..., view: _Optional[_Union[SwarmView, _Mapping]] = ..., action: _Optional[str] = ..., reach: _Optional[str] = ..., relay: _Optional[str] = ..., heartbeat_interval: _Optional[float] = ..., lease_seconds: _Optional[float] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SwarmViewRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PeerInfo(_message.Message):
    __slots__ = ("peer_id", "public_key", "address", "stage", "state", "benchmark", "stats", "lease_expires", "joined_at", "reach", "relay")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    BENCHMARK_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_FIELD_NUMBER: _ClassVar[int]
    JOINED_AT_FIELD_NUMBER: _ClassVar[int]
    REACH_FIELD_NUMBER: _ClassVar[int]
    RELAY_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    public_key: bytes
    address: str
    stage: int
    state: str
    benchmark: Benchmark
    stats: PeerStats
    lease_expires: float
    joined_at: float
    reach: str
    relay: bool
    def __init__(self, peer_id: _Optional[str] = ..., public_key: _Optional[bytes] = ..., address: _Optional[str] = ..., stage: _Optional[int] = ..., state: _Optional[str] = ..., benchmark: _Optional[_Union[Benchmark, _Mapping]] = ..., stats: _Optional[_Union[PeerStats, _Mapping]] = ..., lease_expires: _Optional[float] = ..., joined_at: _Optional[float] = ..., reach: _Optional[str] = ..., relay: _Optional[bool] = ...) -> None: ...

class StageInfo(_message.Message):
    __slots__ = ("stage", "replicas", "throughput", "grad_norm", "step", "rebuild", "attested_hash", "attested_step")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    REBUILD_FIELD_NUMBER: _ClassVar[int]
    ATTESTED_HASH_FIELD_NUMBER: _ClassVar[int]
    ATTESTED_STEP_FIELD_NUMBER: _ClassVar[int]
    stage: int
    replicas: _containers.RepeatedScalarFieldContainer[str]
    throughput: float
    grad_norm: float
    step: int
    rebuild: str
    attested_hash: str
    attested_step: int
    def __init__(self, stage: _Optional[int] = ..., replicas: _Optional[_Iterable[str]] = ..., throughput: _Optional[float] = ..., grad_norm: _Optional[float] = ..., step: _Optional[int] = ..., rebuild: _Optional[str] = ..., attested_hash: _Optional[str] = ..., attested_step: _Optional[int] = ...) -> None: ...

class SwarmView(_message.Message):
    __slots__ = ("epoch", "swarm_id", "peers", "stages", "revoked", "delta_from", "removed")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SWARM_ID_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    DELTA_FROM_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    swarm_id: str
    peers: _containers.RepeatedCompositeFieldContainer[PeerInfo]
    stages: _containers.RepeatedCompositeFieldContainer[StageInfo]
    revoked: _containers.RepeatedScalarFieldContainer[str]
    delta_from: int
    removed: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, epoch: _Optional[int] = ..., swarm_id: _Optional[str] = ..., peers: _Optional[_Iterable[_Union[PeerInfo, _Mapping]]] = ..., stages: _Optional[_Iterable[_Union[StageInfo, _Mapping]]] = ..., revoked: _Optional[_Iterable[str]] = ..., delta_from: _Optional[int] = ..., removed: _Optional[_Iterable[str]] = ...) -> None: ...

class TensorHeader(_message.Message):
    __slots__ = ("name", "dtype", "shape", "encoding", "payload_bytes", "block_size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    encoding: Encoding
    payload_bytes: int
    block_size: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., payload_bytes: _Optional[int] = ..., block_size: _Optional[int] = ...) -> None: ...

class CallHeader(_message.Message):
    __slots__ = ("kind", "microbatch_id", "step", "stage", "path", "hop", "sender", "tensors", "total_bytes", "sha256", "meta", "sent_at", "digest")
    class MetaEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    KIND_FIELD_NUMBER: _ClassVar[int]
    MICROBATCH_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    HOP_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    kind: str
    microbatch_id: str
    step: int
    stage: int
    path: _containers.RepeatedScalarFieldContainer[int]
    hop: int
    sender: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorHeader]
    total_bytes: int
    sha256: bytes
    meta: _containers.ScalarMap[str, str]
    sent_at: float
    digest: str
    def __init__(self, kind: _Optional[str] = ..., microbatch_id: _Optional[str] = ..., step: _Optional[int] = ..., stage: _Optional[int] = ..., path: _Optional[_Iterable[int]] = ..., hop: _Optional[int] = ..., sender: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorHeader, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[bytes] = ..., meta: _Optional[_Mapping[str, str]] = ..., sent_at: _Optional[float] = ..., digest: _Optional[str] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: CallHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[CallHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class StateRequest(_message.Message):
    __slots__ = ("stage", "include_optimizer", "min_step", "ledger_snapshot", "accept_dataplane", "accept_digests")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    MIN_STEP_FIELD_NUMBER: _ClassVar[int]
    LEDGER_SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_DATAPLANE_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    stage: int
    include_optimizer: bool
    min_step: int
    ledger_snapshot: bool
    accept_dataplane: bool
    accept_digests: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, stage: _Optional[int] = ..., include_optimizer: _Optional[bool] = ..., min_step: _Optional[int] = ..., ledger_snapshot: _Optional[bool] = ..., accept_dataplane: _Optional[bool] = ..., accept_digests: _Optional[_Iterable[str]] = ...) -> None: ...

class StepEnd(_message.Message):
    __slots__ = ("step", "sender", "microbatches", "samples", "stage0_replicas", "stage_replicas", "spsa", "spsa_check_step", "spsa_check_hash")
    STEP_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    MICROBATCHES_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    STAGE0_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    STAGE_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    SPSA_FIELD_NUMBER: _ClassVar[int]
    SPSA_CHECK_STEP_FIELD_NUMBER: _ClassVar[int]
    SPSA_CHECK_HASH_FIELD_NUMBER: _ClassVar[int]
    step: int
    sender: str
    microbatches: int
    samples: int
    stage0_replicas: _containers.RepeatedScalarFieldContainer[str]
    stage_replicas: _containers.RepeatedScalarFieldContainer[str]
    spsa: SpsaCodes
    spsa_check_step: int
    spsa_check_hash: bytes
    def __init__(self, step: _Optional[int] = ..., sender: _Optional[str] = ..., microbatches: _Optional[int] = ..., samples: _Optional[int] = ..., stage0_replicas: _Optional[_Iterable[str]] = ..., stage_replicas: _Optional[_Iterable[str]] = ..., spsa: _Optional[_Union[SpsaCodes, _Mapping]] = ..., spsa_check_step: _Optional[int] = ..., spsa_check_hash: _Optional[bytes] = ...) -> None: ...

class StepDone(_message.Message):
    __slots__ = ("step", "stage", "included", "state_hash", "grad_norm", "stepped", "detail", "server_s")
    STEP_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    INCLUDED_FIELD_NUMBER: _ClassVar[int]
    STATE_HASH_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    STEPPED_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    SERVER_S_FIELD_NUMBER: _ClassVar[int]
    step: int
    stage: int
    included: int
    state_hash: str
    grad_norm: float
    stepped: bool
    detail: str
    server_s: float
    def __init__(self, step: _Optional[int] = ..., stage: _Optional[int] = ..., included: _Optional[int] = ..., state_hash: _Optional[str] = ..., grad_norm: _Optional[float] = ..., stepped: _Optional[bool] = ..., detail: _Optional[str] = ..., server_s: _Optional[float] = ...) -> None: ...

class Delivered(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SpsaCodes(_message.Message):
    __slots__ = ("codes",)
    CODES_FIELD_NUMBER: _ClassVar[int]
    codes: bytes
    def __init__(self, codes: _Optional[bytes] = ...) -> None: ...

class SpsaPost(_message.Message):
    __slots__ = ("step", "codes", "expect", "shard", "shards", "checks")
    STEP_FIELD_NUMBER: _ClassVar[int]
    CODES_FIELD_NUMBER: _ClassVar[int]
    EXPECT_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    CHECKS_FIELD_NUMBER: _ClassVar[int]
    step: int
    codes: bytes
    expect: _containers.RepeatedScalarFieldContainer[str]
    shard: int
    shards: int
    checks: _containers.RepeatedCompositeFieldContainer[SpsaCheck]
    def __init__(self, step: _Optional[int] = ..., codes: _Optional[bytes] = ..., expect: _Optional[_Iterable[str]] = ..., shard: _Optional[int] = ..., shards: _Optional[int] = ..., checks: _Optional[_Iterable[_Union[SpsaCheck, _Mapping]]] = ...) -> None: ...

class SpsaCheck(_message.Message):
    __slots__ = ("peer", "codes", "shard", "shards")
    PEER_FIELD_NUMBER: _ClassVar[int]
    CODES_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    peer: str
    codes: bytes
    shard: int
    shards: int
    def __init__(self, peer: _Optional[str] = ..., codes: _Optional[bytes] = ..., shard: _Optional[int] = ..., shards: _Optional[int] = ...) -> None: ...

class SpsaLedgerRequest(_message.Message):
    __slots__ = ("from_step", "to_step")
    FROM_STEP_FIELD_NUMBER: _ClassVar[int]
    TO_STEP_FIELD_NUMBER: _ClassVar[int]
    from_step: int
    to_step: int
    def __init__(self, from_step: _Optional[int] = ..., to_step: _Optional[int] = ...) -> None: ...

class SpsaLedgerStep(_message.Message):
    __slots__ = ("step", "peers", "codes", "flagged")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    CODES_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_FIELD_NUMBER: _ClassVar[int]
    step: int
    peers: _containers.RepeatedScalarFieldContainer[str]
    codes: SpsaCodes
    flagged: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, step: _Optional[int] = ..., peers: _Optional[_Iterable[str]] = ..., codes: _Optional[_Union[SpsaCodes, _Mapping]] = ..., flagged: _Optional[_Iterable[str]] = ...) -> None: ...

class SpsaLedgerReply(_message.Message):
    __slots__ = ("steps", "next_step", "base_step", "check_step", "check_peers")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    NEXT_STEP_FIELD_NUMBER: _ClassVar[int]
    BASE_STEP_FIELD_NUMBER: _ClassVar[int]
    CHECK_STEP_FIELD_NUMBER: _ClassVar[int]
    CHECK_PEERS_FIELD_NUMBER: _ClassVar[int]
    steps: _containers.RepeatedCompositeFieldContainer[SpsaLedgerStep]
    next_step: int
    base_step: int
    check_step: int
    check_peers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, steps: _Optional[_Iterable[_Union[SpsaLedgerStep, _Mapping]]] = ..., next_step: _Optional[int] = ..., base_step: _Optional[int] = ..., check_step: _Optional[int] = ..., check_peers: _Optional[_Iterable[str]] = ...) -> None: ...

class ReachPing(_message.Message):
    __slots__ = ("nonce", "peer_id")
    NONCE_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    peer_id: str
    def __init__(self, nonce: _Optional[bytes] = ..., peer_id: _Optional[str] = ...) -> None: ...

class ReachPong(_message.Message):
    __slots__ = ("nonce", "signature")
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    signature: bytes
    def __init__(self, nonce: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class RelayFrame(_message.Message):
    __slots__ = ("conn", "data", "open", "close", "keepalive", "address", "error")
    CONN_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    KEEPALIVE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    conn: int
    data: bytes
    open: bool
    close: bool
    keepalive: bool
    address: str
    error: str
    def __init__(self, conn: _Optional[int] = ..., data: _Optional[bytes] = ..., open: _Optional[bool] = ..., close: _Optional[bool] = ..., keepalive: _Optional[bool] = ..., address: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class CheckpointChunk(_message.Message):
    __slots__ = ("step", "stage", "sha256", "size", "spec_hash", "data")
    STEP_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SPEC_HASH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    step: int
    stage: int
    sha256: str
    size: int
    spec_hash: str
    data: bytes
    def __init__(self, step: _Optional[int] = ..., stage: _Optional[int] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ..., spec_hash: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class CheckpointAck(_message.Message):
    __slots__ = ("stored", "detail", "complete_step")
    STORED_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_STEP_FIELD_NUMBER: _ClassVar[int]
    stored: bool
    detail: str
    complete_step: int
    def __init__(self, stored: _Optional[bool] = ..., detail: _Optional[str] = ..., complete_step: _Optional[int] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ("stage",)
    STAGE_FIELD_NUMBER: _ClassVar[int]
    stage: int
    def __init__(self, stage: _Optional[int] = ...) -> None: ...

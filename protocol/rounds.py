"""Federated personalization runs: the invitation devices see and the manifest of a run.

A *run* is one Flower run of several rounds over a cohort of devices of one group. The
:class:`RoundManifest` records how it was configured and what it produced; an adapter
bundle's provenance names it by the :func:`protocol.bundle.canonical_json` hash of its
manifest. A :class:`RoundInvitation` is an MQTT hint, like a release announcement: the
trust lies in SuperNode authentication to the SuperLink, never in the invitation.

Invariants enforced on parse:

- ``min_nodes <= cohort_size``; SecAgg+ needs ``min_nodes >= 3`` and
  ``2 <= reconstruction_threshold <= num_shares <= cohort_size``, ``modulus_range`` a power
  of two with ``cohort_size * quantization_range < modulus_range`` (the masked sum does not
  wrap);
- ``finished_at >= started_at``; a ``result_sha256`` only on a finished run;
- an invitation closes after it opens.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal, Self

from pydantic import Field, model_validator

from protocol._types import Identifier, Message, Sha256Hex, StrictModel, Timestamp, TopicSegment

MAX_COHORT: Final = 100_000
MAX_ROUNDS: Final = 10_000


class FedAvg(StrictModel):
    """Plain federated averaging: the server sees each device's clipped, noised update."""

    kind: Literal["fedavg"]


class SecAggPlus(StrictModel):
    """Secure aggregation (SecAgg+): the server sees only the sum of the updates."""

    kind: Literal["secaggplus"]
    num_shares: int = Field(ge=3, le=MAX_COHORT)
    """Number of secret shares each device splits its key into."""
    reconstruction_threshold: int = Field(ge=2, le=MAX_COHORT)
    """Shares needed to reconstruct a dropped device's mask."""
    clipping_range: float = Field(gt=0, le=1e6)
    """Update values are clipped to ``[-clipping_range, clipping_range]`` before quantizing."""
    quantization_range: int = Field(ge=2, le=2**31)
    """Clipped values are quantized to integers in ``[0, quantization_range]``."""
    modulus_range: int = Field(ge=2**8, le=2**62)
    """Masked values and their sum are taken mod ``modulus_range``, a power of two above
    ``quantization_range`` (devices send them in the narrowest unsigned dtype it divides)."""

    @model_validator(mode="after")
    def _threshold_fits(self) -> Self:
        if self.reconstruction_threshold > self.num_shares:
            raise ValueError(
                f"reconstruction_threshold ({self.reconstruction_threshold}) exceeds "
                f"num_shares ({self.num_shares})"
            )
        if self.modulus_range & (self.modulus_range - 1):
            raise ValueError(f"modulus_range ({self.modulus_range}) is not a power of two")
        if self.modulus_range <= self.quantization_range:
            raise ValueError(
                f"modulus_range ({self.modulus_range}) must exceed quantization_range "
                f"({self.quantization_range})"
            )
        return self


Aggregation = Annotated[FedAvg | SecAggPlus, Field(discriminator="kind")]


class Privacy(StrictModel):
    """Differential privacy of a run: per-update clipping and Gaussian noise."""

    clip_norm: float = Field(gt=0, le=1e6)
    """L2 norm each device update is clipped to."""
    noise_multiplier: float = Field(ge=0, le=1000)
    """Noise standard deviation as a multiple of ``clip_norm``."""
    epsilon: float | None = Field(gt=0, le=1000)
    """Budget spent by the run, once accounted; ``None`` before."""
    delta: float = Field(ge=0, lt=1)


class RoundManifest(Message):
    """How a federated run was configured and what it produced."""

    round_id: Identifier
    group: TopicSegment
    rounds: int = Field(ge=1, le=MAX_ROUNDS)
    cohort_size: int = Field(ge=1, le=MAX_COHORT)
    """Devices sampled per round."""
    min_nodes: int = Field(ge=1, le=MAX_COHORT)
    """Fewest devices that must reply for a round to count."""
    adapter_rank: int = Field(ge=1, le=64)
    aggregation: Aggregation
    privacy: Privacy | None
    """``None`` means the run had no differential privacy."""
    base_bundle_sha256: Sha256Hex
    """:func:`protocol.bundle.bundle_hash` of the base model every participant runs."""
    result_sha256: Sha256Hex | None = None
    """SHA-256 of the aggregated adapter weights; set when the run produced them."""
    started_at: Timestamp
    finished_at: Timestamp | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.min_nodes > self.cohort_size:
            raise ValueError(
                f"min_nodes ({self.min_nodes}) exceeds cohort_size ({self.cohort_size})"
            )
        if isinstance(self.aggregation, SecAggPlus):
            if self.min_nodes < 3:
                raise ValueError(f"secaggplus needs min_nodes >= 3, got {self.min_nodes}")
            if self.aggregation.num_shares > self.cohort_size:
                raise ValueError(
                    f"aggregation.num_shares ({self.aggregation.num_shares}) exceeds "
                    f"cohort_size ({self.cohort_size})"
                )
            agg = self.aggregation
            if self.cohort_size * agg.quantization_range >= agg.modulus_range:
                raise ValueError(
                    f"the sum of {self.cohort_size} devices' values in "
                    f"[0, {agg.quantization_range}] overflows modulus_range "
                    f"({agg.modulus_range})"
                )
        if self.finished_at is not None and self.finished_at < self.started_at:
            raise ValueError("finished_at is before started_at")
        if self.result_sha256 is not None and self.finished_at is None:
            raise ValueError("result_sha256 is set but finished_at is not")
        return self


class RoundInvitation(Message):
    """A hint to a group's devices that a run is open: retained on the group's round topic.

    An eligible device (idle, inside its training window, with enough local examples) that
    runs the named base starts its Flower SuperNode against the SuperLink it was provisioned
    with; ``superlink`` must match that address.
    """

    round_id: Identifier
    group: TopicSegment
    base_bundle_sha256: Sha256Hex
    adapter_rank: int = Field(ge=1, le=64)
    superlink: Annotated[str, Field(pattern=r"^[A-Za-z0-9.-]{1,253}:[0-9]{1,5}$")]
    """``host:port`` of the Fleet API."""
    min_examples: int = Field(ge=1, le=1_000_000)
    """Fewest local training examples a device needs to take part."""
    opens_at: Timestamp
    closes_at: Timestamp

    @model_validator(mode="after")
    def _window(self) -> Self:
        if self.closes_at <= self.opens_at:
            raise ValueError("closes_at must be after opens_at")
        return self

"""Flower's transport in one process: a :class:`flwr.server.Grid` over in-process ClientApps.

The ServerApp's workflow (``DefaultWorkflow``, ``SecAggPlusWorkflow``, the strategy) talks
to a Grid; this one hands each message to a ClientApp object per node instead of a
SuperLink. It keeps what the workflows depend on and nothing else:

- messages and node contexts cross the "wire" as protobuf (``message_to_proto``,
  ``context_to_proto``), so no object is shared between server and node, as with real
  processes (the SecAgg+ setup message, for one, is a single object sent to every node);
- each node has a :class:`~flwr.app.Context` with its ``node_config`` and a ``state``
  RecordDict kept between messages (SecAgg+'s client state lives there from stage to
  stage); the state is stored back only when the ClientApp returns, as the SuperNode does;
- a ClientApp that raises is answered by the node with ``CLIENT_APP_RAISED_EXCEPTION``,
  as ``flwr-clientapp`` does;
- a node told to :class:`Drop` dies at the first message that matches: that message and
  every later one is answered by the link with ``NODE_UNAVAILABLE`` (what the SuperLink
  returns for a node whose heartbeat stopped), or never answered (``silent``).

Replies carry the reply metadata the ClientApp builds (``Message(..., reply_to=...)``:
``src_node_id`` the node, ``reply_to_message_id`` the instruction). Delivery is
synchronous, in the order the workflow pushed; ``timeout`` is ignored. This is the pure
core of the Flower transport for fast tests; ``tests/integration/test_federated.py`` with
real processes is the end-to-end proof.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict, UserConfig
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
)
from flwr.server import Grid
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

__all__ = [
    "Delivery",
    "Drop",
    "InProcessGrid",
    "at_secagg_stage",
    "at_type",
    "secagg_stage",
    "serverapp_identity",
]

MessageFilter = Callable[[Message], bool]


@contextmanager
def serverapp_identity(run_id: int) -> Iterator[None]:
    """The ServerApp process's identity, which Flower stamps on every instruction it builds
    (``flwr-serverapp`` sets it at start); restored afterwards."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def secagg_stage(msg: Message) -> str | None:
    """The SecAgg+ stage a train message carries (``setup``, ``share_keys``,
    ``collect_masked_vectors``, ``unmask``), None for a message outside SecAgg+."""
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.has_content() else None
    stage = configs.get(Key.STAGE) if configs is not None else None
    return stage if isinstance(stage, str) else None


def at_secagg_stage(stage: str) -> MessageFilter:
    """Matches the instruction of one SecAgg+ stage."""
    return lambda msg: secagg_stage(msg) == stage


def at_type(message_type: str) -> MessageFilter:
    """Matches instructions of one message type (``train``, ``evaluate``)."""
    return lambda msg: msg.metadata.message_type == message_type


@dataclass(frozen=True)
class Drop:
    """The node dies at the first instruction ``when`` matches (before running it)."""

    when: MessageFilter
    #: True: no reply at all (the message times out); False: the link's NODE_UNAVAILABLE.
    silent: bool = False


@dataclass(frozen=True)
class Delivery:
    """One instruction and what became of it (the log a test reads)."""

    node_id: int
    message_type: str
    stage: str | None
    outcome: str  # "ok", "raised", "dropped"


@dataclass
class _Node:
    app: ClientApp
    context: Context
    drop: Drop | None = None
    dead: bool = False


@dataclass
class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp objects called in this process.

    ``apps`` maps node IDs to the ClientApp each node runs and ``node_configs`` to their
    node config; ``drops`` names the nodes that die mid-run. ``unlist_dead`` removes a dead
    node from :meth:`get_node_ids` (the SuperLink does so once its heartbeat is overdue);
    by default it stays listed, as during the heartbeat patience.
    """

    apps: Mapping[int, ClientApp]
    node_configs: Mapping[int, UserConfig]
    drops: Mapping[int, Drop] = field(default_factory=dict)
    run_id: int = 1
    unlist_dead: bool = False
    log: list[Delivery] = field(default_factory=list)
    #: Every reply the workflow got, as it got it.
    replies: list[Message] = field(default_factory=list)
    #: The SecAgg+ setup parameters the workflow last sent (clipping range, quantization
    #: "target" range, modulus range...), for tolerances derived from what actually ran.
    secagg_setup: dict[str, Any] = field(default_factory=dict)
    _nodes: dict[int, _Node] = field(init=False)
    _pending: dict[str, Message | None] = field(init=False, default_factory=dict)
    _run: Run = field(init=False)

    def __post_init__(self) -> None:
        self._run = Run.create_empty(self.run_id)
        self._nodes = {
            nid: _Node(
                app=app,
                context=Context(
                    run_id=self.run_id,
                    node_id=nid,
                    node_config=dict(self.node_configs[nid]),
                    state=RecordDict(),
                    run_config={},
                ),
                drop=self.drops.get(nid),
            )
            for nid, app in self.apps.items()
        }

    def secagg_quantum(self) -> float:
        """One step of SecAgg+'s quantization grid in the last setup the workflow sent:
        ``2 * clipping_range / quantization_range``. Each device's stochastic rounding
        moves a value by less than one step, so the unmasked mean is within one step."""
        setup = self.secagg_setup
        return 2 * float(setup[Key.CLIPPING_RANGE]) / int(setup[Key.TARGET_RANGE])

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return [nid for nid, node in self._nodes.items() if not (node.dead and self.unlist_dead)]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            self._pending[msg.metadata.message_id] = self._deliver(msg)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = [self._pending.pop(mid, None) for mid in message_ids]
        return [reply for reply in replies if reply is not None]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return list(self.pull_messages(list(self.push_messages(messages))))

    def _deliver(self, sent: Message) -> Message | None:
        node = self._nodes[sent.metadata.dst_node_id]
        # The wire: the node gets its own copy of the message, decoded from protobuf.
        msg = message_from_proto(message_to_proto(sent))
        stage = secagg_stage(msg)
        if stage == Stage.SETUP:
            self.secagg_setup = dict(msg.content.config_records[RECORD_KEY_CONFIGS])
        if node.drop is not None and not node.dead and node.drop.when(msg):
            node.dead = True
        if node.dead:
            self.log.append(
                Delivery(node.context.node_id, msg.metadata.message_type, stage, "dropped")
            )
            if node.drop is not None and node.drop.silent:
                return None
            reply = create_message_error_unavailable_res_message(sent.metadata, "node_unavail")
        else:
            context = context_from_proto(context_to_proto(node.context))
            try:
                reply = node.app(message=msg, context=context)
                node.context = context
                outcome = "ok"
            except Exception as exc:
                reason = f"{type(exc)}:<'{exc}'>"
                reply = Message(
                    Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                    reply_to=msg,
                )
                outcome = "raised"
            self.log.append(
                Delivery(node.context.node_id, msg.metadata.message_type, stage, outcome)
            )
            reply.metadata.__dict__["_message_id"] = str(uuid4())
        wire = message_to_proto(reply)
        # The workflow consumes the reply's arrays; the log keeps its own copy.
        self.replies.append(message_from_proto(wire))
        return message_from_proto(wire)

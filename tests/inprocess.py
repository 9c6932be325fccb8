"""An in-process Flower grid for strategy tests: messages go straight to the real ClientApp.

The deployment and simulation tests run real SuperLinks and SuperNodes; this grid only
replaces the network so that one round of a strategy (Flower's own round loop, fedldt's
ClientApp and library) runs in a unit test.
"""

from __future__ import annotations

import itertools
import time
from typing import Iterable

from flwr.app import Context, Message, Metadata, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


class InProcessGrid(Grid):
    """Delivers each message to ``app(message, context_of_its_node)`` and returns the replies.

    Args:
        app: the ClientApp (``clients.client_app.app``).
        node_configs: SuperNode id -> node config (e.g. ``{"partition-id": 0}``). Each node keeps
            one :class:`Context` (with its ``state``) for the whole run, as a SuperNode does.
    """

    def __init__(self, app, node_configs: dict[int, dict]) -> None:
        self.app = app
        # a ServerApp process knows its run; Message() reads it (Flower sets it when it starts one)
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        self.contexts = {n: Context(run_id=1, node_id=n, node_config=dict(c), state=RecordDict(), run_config={})
                         for n, c in node_configs.items()}
        self._ids = itertools.count()
        self.sent: list[Message] = []
        self.replies: list[Message] = []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = self.stamp(messages)
        replies = [self.app(msg, self.contexts[int(msg.metadata.dst_node_id)]) for msg in messages]
        self.sent += messages
        self.replies += replies
        return replies

    def stamp(self, messages: Iterable[Message]) -> list[Message]:
        """The messages as a real grid delivers them: with the message id, creation time and TTL a
        SuperLink gives them, each rebuilt with Flower's public ``Metadata`` and ``Message``
        constructors (its other metadata and its content unchanged).

        A strategy matches replies to the messages it sent by id, so when ``messages`` is a list (the
        list a strategy's ``configure_train``/``configure_evaluate`` returned and keeps), its items are
        replaced by the stamped messages in place; the stamped messages are also returned.
        """
        stamped = []
        for msg in messages:
            md = msg.metadata
            stamped.append(Message(msg.content, metadata=Metadata(
                run_id=md.run_id, message_id=f"msg-{next(self._ids)}", src_node_id=md.src_node_id,
                dst_node_id=md.dst_node_id, reply_to_message_id=md.reply_to_message_id, group_id=md.group_id,
                created_at=time.time(), ttl=3600.0, message_type=md.message_type, src_task_id=md.src_task_id,
                dst_task_id=md.dst_task_id)))
        if isinstance(messages, list):
            messages[:] = stamped
        return stamped

    # not needed by the strategies' round loop
    def create_message(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError

    def set_run(self, run_id):  # pragma: no cover
        raise NotImplementedError

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

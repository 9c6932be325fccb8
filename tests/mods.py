"""Test-only Flower mods that a test attaches to the territory's ClientApp
(:func:`clients.client_app.build_app`), never part of the production app.

In-process tests build the app directly (``build_app([fail_in_round_mod])``); a real
deployment ships them in a test app written by :func:`tests.apps.write_test_app`, which copies
this file into the app as ``fedldt_test_mods.py``; so this module imports nothing from
``tests`` or ``fedldt``.

Mods here run inside the egress mod: what they raise becomes a coded error reply
(``"<ExceptionType> [fedldt-100]"``) and their text stays in the territory's ``errors.log``.
"""

from __future__ import annotations

from flwr.app import Context, Message, MessageType


class InjectedFailure(RuntimeError):
    """Raised by :func:`fail_in_round_mod`."""


def fail_in_round_mod(msg: Message, context: Context, call_next) -> Message:
    """Fail this territory's training in one round, to exercise failure handling.

    A SuperNode whose node config has ``fail-in-round=<r>`` raises :class:`InjectedFailure`
    instead of training in round ``r`` (``server-round`` of the train message); every other
    message goes to the handler unchanged.

    Raises:
        InjectedFailure: a train message of round ``node_config["fail-in-round"]``.
    """
    fail = context.node_config.get("fail-in-round")
    if fail is not None and msg.metadata.message_type == MessageType.TRAIN:
        server_round = int(msg.content["config"]["server-round"])
        if int(fail) == server_round:
            raise InjectedFailure(f"test-only failure injected by node config fail-in-round={fail} (round {server_round})")
    return call_next(msg, context)


#: Mods a test app may add, by name (:func:`tests.apps.write_test_app`).
MODS = {"fail_in_round_mod": fail_in_round_mod}

"""Test-only Flower mods that a test attaches to the territory's ClientApp
(:func:`clients.client_app.build_app`), never part of the production app.

In-process tests build the app directly (``build_app([fail_in_round_mod])``); a real
deployment ships them in a test app written by :func:`tests.apps.write_test_app`, which copies
this file into the app as ``fedldt_test_mods.py``; so this module imports nothing from
``tests`` or ``fedldt`` (only Flower, numpy and the app's own ``clients``).

:func:`poison_mod` turns one territory into an attacker that sends corrupted parameters (the
poisoning pilot ``conf/pilot/los_loop_4_poisoned.yaml``, ``scripts/poisoning.py``).

Mods here run inside the egress mod: what they raise becomes a coded error reply
(``"<ExceptionType> [fedldt-100]"``) and their text stays in the territory's ``errors.log``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType

from clients.territory import territory_index


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


def sign_flip(global_array: np.ndarray, local_array: np.ndarray, scale: float) -> np.ndarray:
    """A sign-flipped, scaled update: ``global + scale * (local - global)`` (``scale = -10``: the
    territory's update reversed and made 10 times longer), in ``local_array``'s dtype.

    Args:
        global_array: the global model's array the server sent, any shape.
        local_array: the territory's trained array, same shape.
        scale: the factor of the update (``-10.0`` in the poisoning pilot).

    Raises:
        ValueError: the shapes differ.
    """
    if global_array.shape != local_array.shape:
        raise ValueError(f"sign_flip: global shape {global_array.shape} != local shape {local_array.shape}")
    g = global_array.astype(np.float64)
    return (g + scale * (local_array.astype(np.float64) - g)).astype(local_array.dtype)


def gaussian_noise(local_array: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The trained array plus Gaussian noise of its own scale: ``local + N(0, std(local)^2)``
    elementwise, with ``std`` the (population) standard deviation of the whole array (0 for a
    one-element array: it is returned unchanged), in ``local_array``'s dtype."""
    x = local_array.astype(np.float64)
    return (x + rng.normal(0.0, float(x.std()), size=x.shape)).astype(local_array.dtype)


#: Attacks of :func:`poison_mod`.
ATTACKS = ("sign_flip", "gaussian_noise")


def poison_mod(attack: str, attacker: int, scale: float = -10.0, seed: int = 0) -> Callable[..., Message]:
    """A mod that makes territory ``attacker`` send corrupted parameters in its train replies.

    The territory trains as usual; its reply's arrays are then replaced, per float array
    (integer arrays are sent unchanged):

    * ``sign_flip``: :func:`sign_flip` with ``scale`` against the global model of the train
      message (``-10``: the update reversed and 10 times longer);
    * ``gaussian_noise``: :func:`gaussian_noise`, seeded by ``(seed, server-round, attacker)``
      (the same run gives the same noise).

    Every other territory, every query/evaluate message and every error reply pass unchanged.
    The territory is its node config's ``territory`` (deployment) or ``partition-id``
    (simulation), as :func:`clients.territory.territory_index` reads it.

    Raises:
        ValueError: an unknown ``attack``, a negative ``attacker`` or a ``scale`` that is not a finite number.
    """
    if attack not in ATTACKS:
        raise ValueError(f"poison_mod: attack={attack!r} must be one of {ATTACKS}")
    if int(attacker) < 0:
        raise ValueError(f"poison_mod: attacker={attacker} must be a territory index >= 0")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not np.isfinite(scale):
        raise ValueError(f"poison_mod: scale={scale!r} must be a finite number (a NaN update is refused by the server, "
                         "not a poisoning attack)")

    def mod(msg: Message, context: Context, call_next) -> Message:
        reply = call_next(msg, context)
        if (msg.metadata.message_type != MessageType.TRAIN or reply.has_error()
                or territory_index(context.node_config) != int(attacker)):
            return reply
        server_round = int(msg.content["config"]["server-round"])
        sent, trained = msg.content["arrays"], reply.content["arrays"]
        rng = np.random.default_rng([int(seed), server_round, int(attacker)])
        out = {}
        for key in trained.keys():
            arr = trained[key].numpy()
            if not np.issubdtype(arr.dtype, np.floating):
                out[key] = trained[key]
            elif attack == "sign_flip":
                out[key] = Array(np.ascontiguousarray(sign_flip(sent[key].numpy(), arr, float(scale))))
            else:
                out[key] = Array(np.ascontiguousarray(gaussian_noise(arr, rng)))
        reply.content["arrays"] = ArrayRecord(out)
        return reply

    mod.__name__ = f"poison_mod_{attack}_t{int(attacker)}"
    return mod


#: Mods a test app may add, by name (:func:`tests.apps.write_test_app`).
MODS = {"fail_in_round_mod": fail_in_round_mod}

#: Mods a test app may build with arguments, by name: ``[name, {argument: value}]`` in a spec.
MOD_FACTORIES = {"poison_mod": poison_mod}


def resolve_mods(spec: Sequence[Any]) -> list[Callable[..., Message]]:
    """The mods of a test app's spec, in order: each item is a name of :data:`MODS` or a pair
    ``[name, {argument: value}]`` of :data:`MOD_FACTORIES` (e.g.
    ``["poison_mod", {"attack": "sign_flip", "attacker": 3}]``).

    Raises:
        ValueError: an unknown name or a malformed item.
    """
    mods = []
    for item in spec:
        if isinstance(item, str) and item in MODS:
            mods.append(MODS[item])
        elif (isinstance(item, (list, tuple)) and len(item) == 2 and item[0] in MOD_FACTORIES
              and isinstance(item[1], dict)):
            mods.append(MOD_FACTORIES[item[0]](**item[1]))
        else:
            raise ValueError(f"unknown test mods: {item!r}; known: names {sorted(MODS)} or "
                             f"[name, {{arguments}}] with name in {sorted(MOD_FACTORIES)}")
    return mods

"""Flower glue: the territory client logic, the FedAvg subclass, the server loop and the
simulation launcher. The apps in ``clients/`` and ``server/`` only call into here."""

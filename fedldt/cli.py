"""The ``fedldt`` command: deliver a trained model to a pilot.

    fedldt export RUN_DIR --territory ID --out DIR [--timezone TZ] [--dataset-path P] [--territory-dir D] [--no-onnx] [--force]
                  [--sign-key KEY]
    fedldt predict PACKAGE_DIR --input FILE [--output FILE] [--format csv|json|ngsi-ld] [--allow-missing] [--force]
                   [--verify-key KEY.pub] [--invalid error|mask]
    fedldt serve PACKAGE_DIR [--host 127.0.0.1] [--port 8000] [--engine torch|onnx] [--verify-key KEY.pub]
                 [--invalid error|mask] [--allowed-hosts H,H] [--max-body-bytes N] [--max-sensors N] [--max-steps N]
    fedldt keygen --out KEY
    fedldt gateway --listen HOST:PORT --superlink 127.0.0.1:PORT --ca CA --cert CERT --key KEY  (docs/deploy.md)
    fedldt certs ca --out DIR [--san ADDR ...] [--days N] [--force]  |  fedldt certs territory-key --out KEY [--force]
    fedldt validate PACKAGE_DIR [--json] [--window N] [--horizon N]  (a territory data package, docs/data-format.md)
    fedldt partition --pilot NAME --out DIR [--timezone TZ] [--force] [OVERRIDE ...]  (one package per territory)

Exit status: 0 on success, 1 when the run, package or input is wrong (the message on stderr
names the file, field or sensor and the fix), 2 for command-line usage errors. See
``docs/deploy_model.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

FORMATS = ("csv", "json", "ngsi-ld")
SUFFIX_FORMATS = {".csv": "csv", ".json": "json", ".jsonld": "ngsi-ld"}
INVALID_HELP = ("what to do with implausible observations in the window (not a number, a boolean, infinite, beyond "
                "float32's range, outside the package's valid range): 'error' refuses them (default), 'mask' feeds "
                "them to the model as missing entries and reports how many per sensor")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedldt", description="Deliver fedldt models to pilots: export, predict, serve.")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("export", help="write one territory's model package from a finished run",
                       description="Write one territory's model package (weights, scaler, sensors, graph, ONNX, "
                                   "model card) from a finished run. Runs where the territory's data is.")
    e.add_argument("run_dir", type=Path, help="run folder of scripts/simulate.py (summary.json, model.pt, ...)")
    e.add_argument("--territory", required=True, help="territory id, e.g. t0 (see the run's summary.json)")
    e.add_argument("--out", required=True, type=Path, help="package folder to create")
    e.add_argument("--timezone", default=None,
                   help="IANA time zone of the data's timestamps (e.g. America/Los_Angeles); default: not recorded")
    e.add_argument("--dataset-path", type=Path, default=None,
                   help="this territory's copy of the dataset, if not at the run's dataset.path")
    e.add_argument("--territory-dir", type=Path, default=None,
                   help="personalization=finetune|ditto runs: this territory's own folder (its SuperNode's out-dir), "
                        "where it kept its personal model; the package carries that model")
    e.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    e.add_argument("--force", action="store_true",
                   help="replace an existing package at --out (only a valid, unchanged fedldt package)")
    e.add_argument("--sign-key", type=Path, default=None,
                   help="Ed25519 private key (from fedldt keygen): also write package.sig, a signature of the package")

    r = sub.add_parser("predict", help="forecast from the latest observations with a model package",
                       description="Forecast every sensor of the package's territory from the latest observations.")
    r.add_argument("package", type=Path, help="model package folder (from fedldt export)")
    r.add_argument("--input", required=True, type=Path,
                   help="CSV (a timestamp column + one column per sensor id) or JSON (timestamps + sensors, "
                        "or NGSI-LD TrafficFlowObserved entities)")
    r.add_argument("--output", type=Path, default=None,
                   help="output file (default: standard output); an existing file is refused unless --force")
    r.add_argument("--force", action="store_true",
                   help="replace an existing --output file, only if it is a forecast fedldt predict wrote")
    r.add_argument("--format", choices=FORMATS, default=None,
                   help="output format (default: from --output's suffix .csv/.json/.jsonld, else like the input)")
    r.add_argument("--time-column", default="timestamp", help="time column of a CSV input (default: timestamp)")
    r.add_argument("--allow-missing", action="store_true",
                   help="feed missing (empty/NaN) values to the model as masked entries instead of refusing them")
    r.add_argument("--engine", choices=("torch", "onnx"), default="torch", help="inference engine (default torch)")
    r.add_argument("--verify-key", type=Path, default=None,
                   help="Ed25519 public key (KEY.pub): refuse a package not signed with its private key")
    r.add_argument("--invalid", choices=("error", "mask"), default="error", help=INVALID_HELP)

    s = sub.add_parser("serve", help="run the forecast HTTP service of a model package",
                       description="Run the forecast service (POST /forecast, GET /model, GET /health) with uvicorn.")
    s.add_argument("package", type=Path, help="model package folder (from fedldt export)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.add_argument("--engine", choices=("torch", "onnx"), default="torch", help="inference engine (default torch)")
    s.add_argument("--verify-key", type=Path, default=None,
                   help="Ed25519 public key (KEY.pub): refuse a package not signed with its private key")
    s.add_argument("--invalid", choices=("error", "mask"), default="error", help=INVALID_HELP)
    s.add_argument("--allowed-hosts", default="localhost,127.0.0.1",
                   help="comma-separated Host header values served, e.g. forecast.example.org (default "
                        "localhost,127.0.0.1; others get 400)")
    s.add_argument("--max-body-bytes", type=_positive, default=1_000_000,
                   help="largest request body in bytes (default 1000000; larger get 413)")
    s.add_argument("--max-sensors", type=_positive, default=5000, help="most sensors per request (default 5000)")
    s.add_argument("--max-steps", type=_positive, default=2016, help="most time steps per request (default 2016)")

    k = sub.add_parser("keygen", help="make an Ed25519 key pair for signing model packages",
                       description="Write an Ed25519 private key (PEM, mode 0600) to --out and its public key to "
                                   "OUT.pub; never overwrites a file.")
    k.add_argument("--out", required=True, type=Path, help="private key file to create; the public key goes to OUT.pub")

    v = sub.add_parser("validate", help="check a territory data package before joining a federation",
                       description="Load a territory data package (docs/data-format.md) and report its problems: "
                                   "gaps, duplicates, missing and out-of-range values (masked and counted), all-zero "
                                   "and constant sensors, sensors without coordinates or edges, sensor sets that "
                                   "differ, too little history. Exit status 0 when usable, 1 when not.")
    v.add_argument("package_dir", type=Path, help="folder holding territory.yaml")
    v.add_argument("--json", action="store_true", help="print the report as JSON (usable, num_sensors, num_steps, "
                   "interval, coverage, problems)")
    v.add_argument("--window", type=_positive, default=12, help="input steps of one window (default 12)")
    v.add_argument("--horizon", type=_positive, default=12, help="forecast steps of one window (default 12)")
    v.add_argument("--split", type=float, nargs=3, default=(0.7, 0.1, 0.2), metavar=("TRAIN", "VAL", "TEST"),
                   help="chronological train/validation/test fractions, as the training config's split.ratios "
                        "(default 0.7 0.1 0.2)")

    pt = sub.add_parser("partition", help="write one territory data package per territory of a pilot",
                        description="Load a pilot's whole-network dataset with its built-in loader, partition it as the "
                                    "pilot does and write one territory data package per territory (docs/data-format.md) "
                                    "into OUT/<territory>/, and OUT/partition.json. Reports the graph edges dropped at "
                                    "territory borders. Run the pilot on them with dataset=packages dataset.path=OUT.")
    pt.add_argument("--pilot", required=True, help="pilot name (conf/pilot/<name>.yaml), e.g. los_loop_3")
    pt.add_argument("--out", required=True, type=Path, help="new or empty folder to write the packages into")
    pt.add_argument("--timezone", default=None,
                    help="IANA time zone in which the dataset's time stamps are local time (Los-loop: "
                         "America/Los_Angeles); default: the zone a dataset read from a package declares "
                         "(montevideo_bus_4), else UTC, which keeps them as the built-in loader gives them")
    pt.add_argument("--force", action="store_true",
                    help="replace an earlier `fedldt partition` output in --out (only the files it wrote)")
    pt.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. paths.data_root=/abs/shared/data")

    from fedldt.launch import certs, gateway  # the coordinator's gateway and certificates (docs/deploy.md)
    certs.add_arguments(sub.add_parser("certs", help="the federation's CA, SuperLink certificate and territory keys",
                                       description=certs.__doc__.split("\n\n")[0]))
    gateway.add_arguments(sub.add_parser("gateway", help="Fleet-only TLS gateway in front of a loopback SuperLink",
                                         description=gateway.__doc__.split("\n\n")[0]))
    return p


def _export(args: argparse.Namespace) -> int:
    from fedldt.delivery.export import export_package

    pkg = export_package(args.run_dir, args.territory, args.out, dataset_path=args.dataset_path,
                         timezone=args.timezone, onnx=not args.no_onnx, overwrite=args.force,
                         sign_key=args.sign_key, territory_dir=args.territory_dir)
    onnx = pkg.manifest["onnx"]
    print(f"package of territory {pkg.territory} ({len(pkg.node_ids)} sensors) written to {args.out}")
    print(f"graph hash {pkg.manifest['graph_hash']}")
    print(f"package digest {pkg.manifest['digest']}" + (f" (signed with {args.sign_key})" if args.sign_key else ""))
    if onnx:
        print(f"ONNX parity: max |ONNX Runtime - PyTorch| = {onnx['parity_max_abs_err']:.2e} {pkg.units[0]} "
              f"on {onnx['parity_windows']} test windows")
    return 0


def _load_package(path: Path, **options):
    """``ForecastPackage.load(path, **options)``; any failure to load it is a PackageError naming the folder."""
    from fedldt.delivery.package import ForecastPackage, PackageError

    from fedldt.delivery.signing import SignatureError
    from fedldt.data.package import TerritoryPackageError
    from fedldt.data.package_writer import PartitionError
    from fedldt.schema import ConfigError

    try:
        return ForecastPackage.load(path, **options)
    except (PackageError, SignatureError):
        raise
    except Exception as e:  # a damaged or foreign folder: a message, not a traceback
        raise PackageError(f"{path}: not a loadable fedldt model package ({type(e).__name__}: {str(e)[:200]}); "
                           "re-export it with `fedldt export`") from None


def check_output_file(path: Path, force: bool) -> None:
    """Refuse an ``--output`` that fedldt must not write: a folder, a missing parent folder, a
    symbolic link, or an existing file unless ``force`` and it is a forecast ``fedldt predict``
    wrote (CSV starting ``timestamp,horizon_step``; JSON with ``forecasts`` and ``issued_after``;
    NGSI-LD entities whose ids are fedldt forecasts). Never deletes or overwrites anything else.

    Raises:
        InputError: names the path and the fix.
    """
    from fedldt.delivery.observations import InputError

    if path.is_symlink():
        raise InputError(f"--output {path}: is a symbolic link; name a plain file")
    if path.is_dir():
        raise InputError(f"--output {path}: is a folder; name a file")
    if not path.parent.is_dir():
        raise InputError(f"--output {path}: folder {path.parent} does not exist; create it first")
    if not path.exists():
        return
    if not force:
        raise InputError(f"--output {path}: exists; choose a new file, or add --force to replace a forecast "
                         "fedldt predict wrote")
    if not path.is_file() or not _is_forecast_output(path):
        raise InputError(f"--output {path}: exists and is not a forecast fedldt predict wrote; refusing to replace it")


def _is_forecast_output(path: Path) -> bool:
    """Whether ``path`` holds what ``fedldt predict`` writes (CSV, JSON or NGSI-LD forecast)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 20)
        text = head.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    if text.startswith("timestamp,horizon_step"):
        return True
    try:
        doc = json.loads(text)
    except ValueError:
        return False
    if isinstance(doc, dict):
        return "forecasts" in doc and "issued_after" in doc
    return (isinstance(doc, list) and bool(doc) and all(
        isinstance(e, dict) and str(e.get("id", "")).startswith("urn:ngsi-ld:TrafficFlowObserved:fedldt-forecast:")
        for e in doc))


def _predict(args: argparse.Namespace) -> int:
    from fedldt.delivery.observations import InputError, load_json, read_csv_table
    from fedldt.delivery.schemas import ForecastRequest, answer, forecast_ngsi

    suffix = args.input.suffix.lower()
    if suffix not in (".csv", ".json", ".jsonld"):
        raise InputError(f"{args.input}: unknown input type {suffix!r}; use a .csv or .json/.jsonld file")
    if args.output is not None:
        check_output_file(args.output, args.force)
    pkg = _load_package(args.package, verify_key=args.verify_key)
    fmt = args.format or SUFFIX_FORMATS.get(args.output.suffix.lower() if args.output else "")
    if suffix == ".csv":
        table = read_csv_table(args.input, args.time_column)
        fc = pkg.forecast(table, allow_missing=args.allow_missing, engine=args.engine, invalid=args.invalid)
        fmt = fmt or "csv"
        body = forecast_ngsi(pkg, fc) if fmt == "ngsi-ld" else fc.to_json()
    else:
        try:
            raw = args.input.read_bytes()
        except OSError as e:
            raise InputError(f"cannot read JSON input {args.input}: {e.strerror}") from None
        req = ForecastRequest.parse(load_json(raw, str(args.input)), where=str(args.input))
        if args.allow_missing:
            req.allow_missing = True
        if fmt is None:
            fmt = req.output if "output" in req.model_fields_set else ("ngsi-ld" if req.entities is not None else "json")
        body, fc = answer(pkg, req, engine=args.engine, output="ngsi-ld" if fmt == "ngsi-ld" else "json",
                          invalid=args.invalid)
    if fmt == "csv":
        text = fc.to_frame().to_csv(index=False)
    else:
        text = json.dumps(body, indent=1, allow_nan=False) + "\n"
    if args.output:
        try:
            check_output_file(args.output, args.force)  # again: the file may have appeared meanwhile
            tmp = args.output.with_name(f".{args.output.name}.fedldt-tmp")
            tmp.write_text(text)
            tmp.replace(args.output)
        except OSError as e:
            raise InputError(f"cannot write --output {args.output}: {e.strerror}") from None
    else:
        sys.stdout.write(text)
    for what, counts in (("missing", fc.missing_inputs), ("invalid", fc.invalid_inputs)):
        if counts:
            print(f"fedldt predict: warning: {sum(counts.values())} {what} input value(s) of {len(counts)} sensor(s) "
                  f"({', '.join(list(counts)[:8])}{' ...' if len(counts) > 8 else ''}) were fed to the model as "
                  "masked entries", file=sys.stderr)
    for sensor, why in list(fc.unavailable.items())[:8]:
        print(f"fedldt predict: warning: no forecast of sensor {sensor}: {why}", file=sys.stderr)
    if len(fc.unavailable) > 8:
        print(f"fedldt predict: warning: and {len(fc.unavailable) - 8} more sensor(s) without forecast", file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from fedldt.delivery.observations import InputError
    from fedldt.delivery.package import PackageError
    from fedldt.delivery.schemas import RequestLimits
    from fedldt.delivery.service import create_app

    hosts = [h.strip() for h in args.allowed_hosts.split(",") if h.strip()]
    pkg = _load_package(args.package, verify_key=args.verify_key)
    try:
        app = create_app(pkg, engine=args.engine, invalid=args.invalid, max_body_bytes=args.max_body_bytes,
                         limits=RequestLimits(args.max_sensors, args.max_steps), allowed_hosts=hosts)
    except PackageError:
        raise
    except ValueError as e:
        raise InputError(f"--allowed-hosts: {e}" if "allowed hosts" in str(e) else str(e)) from None
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"fedldt serve: warning: listening on {args.host}: the service has no authentication", file=sys.stderr)
        if args.host not in hosts and "*" not in hosts:
            print(f"fedldt serve: warning: Host headers other than {', '.join(hosts)} get 400; name the service's "
                  "host names with --allowed-hosts", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port)
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from fedldt.delivery.signing import fingerprint, generate_keypair, load_public_key

    private, public = generate_keypair(args.out)
    print(f"private key {private} (mode 0600: keep it with whoever exports packages)")
    print(f"public key  {public} ({fingerprint(load_public_key(public))}: give it to whoever runs predict/serve)")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from fedldt.data.package import format_report, validate_package

    from fedldt.data.windows import split_bounds

    try:
        split_bounds(100, tuple(args.split))
    except ValueError as e:  # not three positive fractions summing to 1
        print(f"fedldt validate: --split: {e}", file=sys.stderr)
        return 2
    report = validate_package(args.package_dir, window=args.window, horizon=args.horizon, split=tuple(args.split))
    print(json.dumps(report, indent=1, allow_nan=False) if args.json else format_report(report))
    return 0 if report["usable"] else 1


def _partition(args: argparse.Namespace) -> int:
    from fedldt.data.package_writer import REPORT, format_partition, partition_pilot

    report = partition_pilot(args.pilot, args.out, timezone=args.timezone, overrides=args.overrides, force=args.force)
    print(format_partition(report))
    print(f"written to {args.out} (report: {args.out / REPORT})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedldt`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    from fedldt.delivery.export import ExportError
    from fedldt.delivery.observations import InputError
    from fedldt.delivery.package import PackageError
    from fedldt.delivery.signing import SignatureError
    from fedldt.data.package import TerritoryPackageError
    from fedldt.data.package_writer import PartitionError
    from fedldt.schema import ConfigError

    try:
        if args.command == "gateway":
            from fedldt.launch.gateway import run as _gateway
            return _gateway(args)
        if args.command == "certs":
            from fedldt.launch.certs import run as _certs
            return _certs(args)
        return {"export": _export, "predict": _predict, "serve": _serve, "keygen": _keygen,
                "validate": _validate, "partition": _partition}[args.command](args)
    except (ExportError, InputError, PackageError, SignatureError, PartitionError, ConfigError,
            TerritoryPackageError) as e:
        print(f"fedldt {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

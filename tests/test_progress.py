"""Progress display (issue 11 item 6): the round line's parser, the plain renderer's exact output
off a terminal, the rich display on a (forced) terminal. Times come from a given clock: no timing asserts."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from fedldt.launch.progress import RoundUpdate, RunProgress, parse_round_line, round_line, run_slot, run_title

SERVER_LINE = ("[fedldt] round 3/10  train loss 0.1234  val MAE 4.123 (h12 5.017)  "
               "per territory: metr-la-0=3.900  metr-la-1=n/a")


@pytest.mark.parametrize("line, expected", [
    (SERVER_LINE, RoundUpdate(3, 10, 4.123, "")),
    (SERVER_LINE + "\n", RoundUpdate(3, 10, 4.123, "")),
    # a round where no territory had a valid validation target
    ("[fedldt] round 1/2  train loss 0.5000  val MAE n/a (h12 n/a)  per territory: a=n/a", RoundUpdate(1, 2, None, "")),
    ("[fedldt] local metr-la-2 round 2/5  train loss 0.2345  val MAE 12.5", RoundUpdate(2, 5, 12.5, "local metr-la-2")),
    ("[fedldt] centralized round 5/5  train loss n/a  val MAE 1e-3", RoundUpdate(5, 5, 0.001, "centralized")),
    ("[fedldt] round 4/4  train loss 0.1", RoundUpdate(4, 4, None, "")),  # no MAE on the line
])
def test_parse_round_line_known_lines(line, expected):
    assert parse_round_line(line) == expected


@pytest.mark.parametrize("line", [
    "[fedldt] 3 territories: a (10 nodes), b (12 nodes)",
    "[fedldt] results written to /tmp/run",
    "[fedldt] round 0/10  train loss 0.1",       # rounds are 1-based
    "[fedldt] round 11/10  train loss 0.1",      # past the total
    "round 3/10  train loss 0.1",                # not fedldt's
    "INFO :      [ROUND 3]",                     # Flower's own log
    "[fedldt] round 3/10x  val MAE 1.0",
])
def test_parse_round_line_refuses_other_lines(line):
    assert parse_round_line(line) is None


def test_round_line_round_trips_through_the_parser():
    line = round_line(7, 9, 0.25, 3.14159, "local x", extra="  per territory: x=3.142")
    assert line == "[fedldt] local x round 7/9  train loss 0.2500  val MAE 3.142  per territory: x=3.142"
    assert parse_round_line(line) == RoundUpdate(7, 9, 3.142, "local x")
    assert parse_round_line(round_line(1, 1, None, None)) == RoundUpdate(1, 1, None, "")


def _clock(*times):
    it = iter(times)
    return lambda: next(it)


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    console = Console(file=out, width=300)  # a StringIO is no terminal
    # display opens at t=0; rounds end at 10, 16 and 23 s
    with RunProgress("federated", console=console, clock=_clock(0.0, 10.0, 16.0, 23.0)) as p:
        assert not p.live
        for line in ["[fedldt] 2 territories: a (3 nodes), b (4 nodes)",
                     "[fedldt] round 1/3  train loss 0.9000  val MAE 6.000 (h3 7.000)  per territory: a=6.000  b=n/a",
                     "INFO :      aggregate_train: Received 2 results and 0 failures",
                     "[fedldt] round 2/3  train loss 0.8000  val MAE n/a (h3 n/a)  per territory: a=n/a  b=n/a",
                     "[fedldt] round 3/3  train loss 0.7000  val MAE 4.500 (h3 5.000)  per territory: a=4.000  b=5.000"]:
            p.feed(line)
    assert out.getvalue() == (
        # left after round 1: round 1's time x 2 rounds; then the mean time per round since round 1
        "[fedldt] progress federated: round 1/3  elapsed 0:00:10  left 0:00:20  val MAE 6.000\n"
        "[fedldt] progress federated: round 2/3  elapsed 0:00:16  left 0:00:06  val MAE n/a\n"
        "[fedldt] progress federated: round 3/3  elapsed 0:00:23  left 0:00:00  val MAE 4.500\n"
    )
    assert p.last == RoundUpdate(3, 3, 4.5, "")


def test_plain_lines_name_the_run_of_how_many():
    out = io.StringIO()
    with run_slot(3, 3, "local"):
        with RunProgress("local metr-la-1", console=Console(file=out, width=300), clock=_clock(0.0, 4.0)) as p:
            p.feed(round_line(1, 2, 0.5, 2.25, "local metr-la-1"))
    assert out.getvalue() == "[fedldt] progress run 3/3 local metr-la-1: round 1/2  elapsed 0:00:04  left 0:00:04  val MAE 2.250\n"


def test_run_title():
    assert run_title("federated") == "federated"
    assert run_title("") == "run"
    with run_slot(1, 4, "dcrnn-fedavg-none"):
        assert run_title("federated") == "run 1/4 dcrnn-fedavg-none federated"
        with run_slot(2, 3, "centralized"):
            assert run_title("centralized") == "run 2/3 centralized"
        assert run_title("federated") == "run 1/4 dcrnn-fedavg-none federated"
    assert run_title("federated") == "federated"


def test_rich_display_on_a_terminal_shows_rounds_and_mae():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160)
    with run_slot(2, 3, "federated"):
        with RunProgress("federated", console=console, clock=_clock(0.0, 30.0, 50.0)) as p:
            assert p.live
            p.feed("[fedldt] round 1/4  train loss 0.9000  val MAE 6.000 (h3 7.000)  per territory: a=6.000")
            p.feed("[fedldt] round 2/4  train loss 0.8000  val MAE 5.432 (h3 6.000)  per territory: a=5.432")
    text = out.getvalue()
    assert "\x1b[" in text  # rendered with terminal control codes, not plain lines
    assert "[fedldt] progress" not in text
    assert "run 2/3 federated" in text
    assert "2/4" in text
    assert "val MAE 5.432" in text
    assert "left 0:00:40" in text  # 20 s per round since round 1, 2 rounds left


def test_time_left_when_the_first_round_seen_is_not_round_1():
    out = io.StringIO()
    # display opens at t=0; the log is joined late: round 3 ends at 30 s, round 4 at 38 s
    with RunProgress("federated", console=Console(file=out, width=300), clock=_clock(0.0, 30.0, 38.0)) as p:
        p.update(RoundUpdate(3, 6, 2.0))
        p.update(RoundUpdate(4, 6, 1.5))
    assert out.getvalue() == (
        "[fedldt] progress federated: round 3/6  elapsed 0:00:30  left 0:00:30  val MAE 2.000\n"  # 10 s/round x 3
        "[fedldt] progress federated: round 4/6  elapsed 0:00:38  left 0:00:16  val MAE 1.500\n"  # 8 s/round x 2
    )

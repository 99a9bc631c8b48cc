"""The TOML config file (mimbox.ops.configfile) and `mimbox check-config`: every error with its key and
line, unknown keys refused, secrets only by path, flags over the file, what a reload may change."""
from __future__ import annotations

import textwrap

import pytest

from mimbox.config import changes
from mimbox.ops import configfile
from mimbox.ops.cli import main
from mimbox.ops.flags import build_parser, config_from_args


def write(tmp_path, text: str, name: str = "mimbox.toml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text).lstrip())
    return str(p)


def run_config(argv: list[str]):
    a = build_parser().parse_args(["run", *argv])
    return config_from_args(a, vars(build_parser(only_given=True).parse_args(["run", *argv])))


def test_a_file_mirrors_the_dataclasses(tmp_path):
    path = write(tmp_path, """
        workers = 2
        metrics = "127.0.0.1:9100"
        [listener]
        port = 7100
        mode = "static"
        upstream = "192.0.2.1:80"
        intercept_ports = [80, 443]
        [buffers]
        pipe_size = "128K"
        client_rcvbuf = 200000
        [safety]
        allow_clients = ["10.1.0.0/16"]
        deny_dst = ["198.51.100.0/24:80"]
        idle_timeout = 60
        """)
    cfg = configfile.check(path)
    assert cfg.workers == 2 and cfg.metrics == "127.0.0.1:9100"
    assert cfg.listener.port == 7100 and cfg.listener.upstream == ("192.0.2.1", 80)
    assert cfg.listener.intercept_ports == (80, 443)
    assert cfg.buffers.pipe_size == 128 << 10 and cfg.buffers.client_rcvbuf == 200000
    assert cfg.safety.allow_clients == ("10.1.0.0/16",) and cfg.safety.idle_timeout == 60.0
    assert cfg.listener.mode == "static" and cfg.buffers.engine == "auto"     # defaults kept


def test_every_error_is_reported_with_its_key_and_line(tmp_path):
    path = write(tmp_path, """
        bogus = 1
        [listener]
        mode = "static"
        port = "x"
        upstream = "192.0.2.1:80"
        [safety]
        deny_dst = ["10.0.0.0/33"]
        idle_timeout = -1
        tiemout = 3
        [nope]
        a = 1
        """)
    with pytest.raises(configfile.ConfigError) as e:
        configfile.check(path)
    got = {(key, line) for key, line, _ in e.value.errors}
    assert got == {("bogus", 1), ("listener.port", 4), ("safety.deny_dst", 7), ("safety.idle_timeout", 8),
                   ("safety.tiemout", 9), ("nope", 10)}, e.value.errors
    text = str(e.value)
    assert f"{path}:9: safety.tiemout: unknown key" in text and "expected an integer" in text


def test_semantic_errors_name_their_key(tmp_path):
    path = write(tmp_path, """
        [listener]
        mode = "static"
        """)
    with pytest.raises(configfile.ConfigError) as e:
        configfile.check(path)
    assert [(k, msg.split(" ")[0]) for k, _, msg in e.value.errors] == [("listener.upstream", "static")]


def test_not_toml_and_missing_file(tmp_path):
    with pytest.raises(configfile.ConfigError, match="not TOML"):
        configfile.check(write(tmp_path, "a = [\n"))
    with pytest.raises(configfile.ConfigError, match="cannot read"):
        configfile.check(str(tmp_path / "absent.toml"))


def test_the_cookie_is_read_from_a_file_never_written_in_it(tmp_path):
    cookie = tmp_path / "cookie"
    cookie.write_text("s3cret\n")
    cfg = configfile.check(write(tmp_path, f"""
        [listener]
        mode = "convert"
        convert_cookie_file = "{cookie}"
        """))
    assert cfg.listener.convert_cookie == b"s3cret"
    with pytest.raises(configfile.ConfigError, match="convert_cookie_file = PATH"):
        configfile.check(write(tmp_path, '[listener]\nconvert_cookie = "s3cret"\n', "b.toml"))


def test_flags_override_the_file(tmp_path):
    path = write(tmp_path, """
        workers = 3
        [listener]
        port = 7100
        mode = "static"
        upstream = "192.0.2.1:80"
        [safety]
        idle_timeout = 60
        """)
    cfg = run_config(["--config", path, "--idle-timeout", "5", "--listen", "127.0.0.1:7200"])
    assert cfg.safety.idle_timeout == 5.0 and cfg.listener.port == 7200 and cfg.listener.addr == "127.0.0.1"
    assert cfg.workers == 3 and cfg.listener.upstream == ("192.0.2.1", 80)      # from the file
    assert cfg.stats_path == "/run/mimbox/7200.sock"
    # without a file, flags and defaults as before
    plain = run_config(["--mode", "static", "--upstream", "192.0.2.1:80"])
    assert plain.listener.port == 7000 and plain.safety.idle_timeout == 300.0


def test_run_refuses_a_bad_file_naming_the_key(tmp_path, capsys):
    path = write(tmp_path, "[listener]\nmode = \"sideways\"\n")
    assert main(["run", "--config", path]) == 2
    err = capsys.readouterr().err
    assert "listener.mode" in err and f"{path}:2" in err


def test_check_config_exit_codes(tmp_path, capsys):
    good = write(tmp_path, '[listener]\nmode = "static"\nupstream = "192.0.2.1:80"\n')
    assert main(["check-config", good]) == 0
    assert "OK" in capsys.readouterr().out
    bad = write(tmp_path, "[listener]\nmod = 1\n", "bad.toml")
    assert main(["check-config", bad]) == 1
    assert "listener.mod: unknown key" in capsys.readouterr().err


def test_what_a_reload_may_change(tmp_path):
    old = configfile.build({"listener.mode": "static", "listener.upstream": ("192.0.2.1", 80)})
    new = configfile.build({"listener.mode": "static", "listener.upstream": ("192.0.2.1", 80),
                            "safety.deny_dst": ("198.51.100.0/24",), "log_level": "debug",
                            "listener.pending_limit": 10})
    assert changes(old, new) == (["listener.pending_limit", "log_level", "safety.deny_dst"], [])
    moved = configfile.build({"listener.mode": "static", "listener.upstream": ("192.0.2.1", 80),
                              "listener.port": 7001, "workers": 4})
    assert changes(old, moved) == ([], ["listener.port", "workers"])


def test_the_shipped_example_is_valid():
    from mimbox.paths import PACKAGE
    cfg = configfile.check(str(PACKAGE / "examples" / "mimbox.toml"))
    assert cfg.listener.mode == "explicit" and cfg.metrics == "127.0.0.1:9100"


def test_the_dashboard_asks_only_for_metrics_that_exist():
    import json
    import re

    from mimbox.converter import metrics
    from mimbox.paths import PACKAGE
    names = {f"mimbox_{k}_total" for k in metrics.COUNTERS} | {f"mimbox_{k}" for k in metrics.GAUGES}
    names |= {"mimbox_refused_total", "mimbox_errors_total", "mimbox_worker_up"}
    names |= {f"mimbox_{h}_{s}" for h in ("server_connect_seconds", "connection_duration_seconds")
              for s in ("bucket", "sum", "count")}
    board = json.loads((PACKAGE / "examples" / "grafana-dashboard.json").read_text())
    asked = {m for p in board["panels"] for t in p["targets"] for m in re.findall(r"mimbox_[a-z_]+", t["expr"])}
    assert asked and asked <= names, asked - names


def test_the_uring_pool_size_is_checked_where_it_is_given(tmp_path):
    """The uring engine's pool (a power of two, 8..32768): a file's value and the flag alike, each
    refused with its key before a worker makes a ring."""
    path = write(tmp_path, """
        [buffers]
        engine = "uring"
        uring_buffers = 1000
        """)
    with pytest.raises(configfile.ConfigError) as e:
        configfile.check(path)
    assert [k for k, _, _ in e.value.errors] == ["buffers.uring_buffers"]
    assert "power of two" in str(e.value)
    assert run_config(["--engine", "uring", "--uring-buffers", "64"]).buffers.uring_buffers == 64
    with pytest.raises(ValueError, match="power of two"):
        run_config(["--uring-buffers", "3"])


@pytest.mark.parametrize("table, key, value, says", [
    ("safety", "handshake_timeout", "nan", "finite"),
    ("safety", "handshake_timeout", "inf", "finite"),
    ("safety", "idle_timeout", "inf", "finite"),
    ("listener", "pending_limit", str(2 ** 32), "outside"),
    ("listener", "pending_per_prefix", str(2 ** 31), "outside"),
    ("safety", "max_connections", str(2 ** 64), "outside"),
])
def test_numbers_are_finite_and_fit_the_field_they_land_in(tmp_path, table, key, value, says):
    """Issue 36 finding 5: `handshake_timeout = nan` (waiting clients never expire) and
    `pending_limit = 2**32` (wrapped to 0 in the core's 32-bit field: every client refused) were
    accepted. Each is refused naming its key; the width comes from the generated layout."""
    with pytest.raises(configfile.ConfigError) as e:
        configfile.check(write(tmp_path, f"[{table}]\n{key} = {value}\n"))
    assert any(k == f"{table}.{key}" and says in msg for k, _, msg in e.value.errors), e.value.errors


def test_a_secret_comes_only_from_a_small_regular_file(tmp_path):
    """Issue 36 finding 5: a FIFO as the cookie file blocked the supervisor. A FIFO, a directory and
    an oversized file are refused at once, by name."""
    import os
    import time
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big"
    big.write_bytes(b"x" * (configfile.SECRET_MAX + 1))
    for path, says in ((fifo, "not a regular file"), (tmp_path, "not a regular file"), (big, "at most")):
        t0 = time.monotonic()
        with pytest.raises(ValueError, match=says):
            configfile.read_cookie(str(path))
        assert time.monotonic() - t0 < 1.0

"""The converter's config file: TOML, one table per concern mirroring mimbox.config's dataclasses.

    # /etc/mimbox/mimbox.toml
    workers = 2
    metrics = "127.0.0.1:9100"
    [listener]
    addr = "0.0.0.0"
    port = 7000
    mode = "explicit"
    [safety]
    allow_clients = ["10.0.0.0/8"]
    deny_dst = ["203.0.113.0/24"]

A key is a field of the dataclass its table mirrors (top-level keys: the fields of Config itself);
values have the field's type, sizes may be written "64K", an address and port "HOST:PORT".
Unknown tables and keys are errors, never ignored. Secrets are never in the file: the Convert
cookie is `listener.convert_cookie_file`, a path. Flags given to `mimbox run` override the file.

`mimbox check-config FILE` reports every error with its key and line; SIGHUP re-reads the file
(RELOADABLE says what may change in place; anything else is refused, naming the key).
"""
from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from pathlib import Path

from mimbox.config import TABLES, Config, parse_hostport, parse_size
from mimbox.converter.validation import problems

TOP = tuple(f.name for f in dataclasses.fields(Config) if f.name not in TABLES)
SIZES = {"buffers.client_rcvbuf", "buffers.client_sndbuf", "buffers.server_rcvbuf", "buffers.server_sndbuf",
         "buffers.pipe_size", "safety.memory_budget"}
FILE_ONLY = {"listener.convert_cookie_file"}     # in the file instead of the secret itself
NOT_IN_FILE = {"listener.convert_cookie": "listener.convert_cookie_file = PATH (a secret is not written here)"}

class ConfigError(ValueError):
    """A config file's errors, every one: [(key, line or None, message)]."""

    def __init__(self, path: str, errors: list[tuple[str, int | None, str]]):
        self.path, self.errors = path, errors
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        return [f"{self.path}:{line or '?'}: {key}: {msg}" if key else f"{self.path}:{line or '?'}: {msg}"
                for key, line, msg in self.errors]


def _locate(text: str) -> dict[str, int]:
    """'table.key' (or 'key' at the top) -> the line it is set on (the tables and keys this format
    writes: `[table]` headers and `key = value` lines)."""
    where, table = {}, ""
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        m = re.match(r"^\[\s*([A-Za-z0-9_.-]+)\s*\]", s)
        if m:
            table = m.group(1)
            where.setdefault(table, n)
            continue
        m = re.match(r'^([A-Za-z0-9_-]+|"[^"]*")\s*=', s)
        if m:
            key = m.group(1).strip('"')
            where.setdefault(f"{table}.{key}" if table else key, n)
    return where


def _keys(table: str) -> list[str]:
    """The keys a file may set in [table] (a secret's path instead of the secret)."""
    names = {f.name for f in dataclasses.fields(TABLES[table])}
    return sorted({n + "_file" if f"{table}.{n}" in NOT_IN_FILE else n for n in names})


def _convert(key: str, kind: str, v):
    """A TOML value -> the dataclass field's value; ValueError saying what was expected."""
    def need(ok: bool, what: str):
        if not ok:
            raise ValueError(f"expected {what}, got {type(v).__name__} {v!r}")
    optional = kind.endswith(" | None")
    base = kind.removesuffix(" | None")
    if key in SIZES:
        need(isinstance(v, (int, str)) and not isinstance(v, bool), 'a size (bytes, or "64K", "1M", "2G")')
        try:
            return parse_size(v)
        except ValueError:
            raise ValueError(f"{v!r} is not a size (bytes, or \"64K\", \"1M\", \"2G\")") from None
    if base == "bool":
        need(isinstance(v, bool), "true or false")
        return v
    if base == "int":
        need(isinstance(v, int) and not isinstance(v, bool), "an integer")
        return v
    if base == "float":
        need(isinstance(v, (int, float)) and not isinstance(v, bool), "a number")
        return float(v)
    if base == "str":
        need(isinstance(v, str), "a string")
        return v
    if base == "tuple[str, ...]":
        need(isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings")
        return tuple(v)
    if base == "tuple[int, ...]":
        need(isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v),
             "a list of integers")
        return tuple(v)
    if base == "tuple[str, int]":
        need(isinstance(v, str), 'a "HOST:PORT" string')
        return parse_hostport(v)
    raise ValueError(f"cannot be set here ({kind}{', optional' if optional else ''})")


SECRET_MAX = 4096     # bytes a secret's file may hold (a cookie is at most a TLV's 1,020 bytes)


def read_cookie(path: str) -> bytes:
    """The Convert cookie: the first line of the file at `path`, a regular file of at most
    SECRET_MAX bytes (a FIFO or a device would block or never end: refused before it is opened
    for reading, and opened without blocking)."""
    import stat
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise ValueError(f"convert cookie file {path}: cannot read a cookie ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"convert cookie file {path}: not a regular file")
        if st.st_size > SECRET_MAX:
            raise ValueError(f"convert cookie file {path}: {st.st_size} bytes (a secret's file holds at most {SECRET_MAX})")
        data = os.read(fd, SECRET_MAX + 1)
    finally:
        os.close(fd)
    try:
        text = data.splitlines()[0].strip()
    except IndexError:
        text = b""
    if not text:
        raise ValueError(f"convert cookie file {path}: empty")
    return text


def load(path: str) -> dict[str, object]:
    """Read and check a config file: {'table.key' or 'key': value}, every value converted.
    Raises ConfigError listing every error (syntax, unknown table or key, wrong type)."""
    values, errors = _read(path)
    if errors:
        raise ConfigError(path, errors)
    return values


def _read(path: str) -> tuple[dict[str, object], list[tuple[str, int | None, str]]]:
    """(the values that could be read, the errors of the others)."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(path, [("", None, f"cannot read: {e.strerror}")]) from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        line = getattr(e, "lineno", None) or (int(m.group(1)) if (m := re.search(r"line (\d+)", str(e))) else None)
        raise ConfigError(path, [("", line, f"not TOML: {e}")]) from None
    where = _locate(text)
    errors, values = [], {}
    kinds = {name: f.type for name, f in Config.__dataclass_fields__.items() if name in TOP}
    for key, v in doc.items():
        if key in TABLES:
            if not isinstance(v, dict):
                errors.append((key, where.get(key), "must be a table ([%s])" % key))
                continue
            fields = {f.name: f.type for f in dataclasses.fields(TABLES[key])}
            for sub, sv in v.items():
                full = f"{key}.{sub}"
                if full in NOT_IN_FILE:
                    errors.append((full, where.get(full), f"not allowed in the file: use {NOT_IN_FILE[full]}"))
                elif full in FILE_ONLY:
                    if not isinstance(sv, str):
                        errors.append((full, where.get(full), "expected a path (string)"))
                        continue
                    try:
                        values["listener.convert_cookie"] = read_cookie(sv)
                    except ValueError as e:
                        errors.append((full, where.get(full), str(e)))
                elif sub not in fields:
                    errors.append((full, where.get(full), f"unknown key (the keys of [{key}]: {', '.join(_keys(key))})"))
                else:
                    try:
                        values[full] = _convert(full, fields[sub], sv)
                    except ValueError as e:
                        errors.append((full, where.get(full), str(e)))
        elif key in kinds:
            try:
                values[key] = _convert(key, kinds[key], v)
            except ValueError as e:
                errors.append((key, where.get(key), str(e)))
        else:
            errors.append((key, where.get(key), f"unknown {'table' if isinstance(v, dict) else 'key'} "
                                                f"(tables: {', '.join(TABLES)}; top-level keys: {', '.join(TOP)})"))
    return values, errors


def build(values: dict[str, object]) -> Config:
    """A Config from {'table.key' or 'key': value} over the defaults (not validated)."""
    tables = {name: {} for name in TABLES}
    top = {}
    for key, v in values.items():
        table, dot, sub = key.partition(".")
        if dot:
            tables[table][sub] = v
        else:
            top[key] = v
    return Config(**{name: cls(**tables[name]) for name, cls in TABLES.items()}, **top)


def check(path: str, overrides: dict[str, object] | None = None) -> Config:
    """The file's Config (with `overrides`, e.g. flags, on top), checked: ConfigError names every
    problem with its key and line."""
    values, errors = _read(path)
    values.update(overrides or {})
    cfg = build(values)
    if errors and any(line is None and not key for key, line, _ in errors):
        raise ConfigError(path, errors)       # not readable, or not TOML: nothing else to say
    where = _locate(Path(path).read_text())
    errors += [(key, where.get(key), msg) for key, msg in problems(cfg)]
    if errors:
        raise ConfigError(path, sorted(errors, key=lambda e: (e[1] or 0, e[0])))
    return cfg

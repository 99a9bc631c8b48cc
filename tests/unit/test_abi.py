"""The core's exports as C declares them (native/core/core.h) and as Python calls them
(mimbox.converter.layouts.SIGNATURES): the same functions, the same types, argument by argument. ctypes takes
any declaration on trust; a mismatch would pass the wrong width or pointer silently."""
import ctypes
import re
from pathlib import Path

from mimbox.converter import layouts

CORE_H = Path(__file__).resolve().parents[2] / "native" / "core" / "core.h"
SCALARS = {"int": ctypes.c_int, "uint32_t": ctypes.c_uint32, "uint16_t": ctypes.c_uint16, "int64_t": ctypes.c_int64,
           "double": ctypes.c_double, "void": None}
STRUCTS = {"core_config": layouts.CoreConfig, "core_event": layouts.Event, "core_stats": layouts.CoreStats,
           "core_conn_info": layouts.ConnInfo, "syn_info": layouts.SynInfo}


def ctype(decl: str):
    """The ctypes type of one C declaration ('const uint8_t *caddr', 'int *detail', 'void')."""
    words = re.sub(r"\bconst\b", "", decl).replace("*", " ").split()
    base = " ".join(words[:2]) if words[0] == "struct" else words[0]
    if "*" not in decl:
        return SCALARS[base]
    if base in ("struct core", "int64_t"):
        return ctypes.c_void_p            # opaque to Python: the core's own, or a shared counter's address
    if base in ("uint8_t", "char"):
        return ctypes.c_char_p
    if base == "int":
        return ctypes.POINTER(ctypes.c_int)
    return ctypes.POINTER(STRUCTS[base.removeprefix("struct ")])


def exports() -> dict:
    """Every CORE_API prototype of core.h: name -> (result type, [argument types])."""
    text = re.sub(r"^#.*$", "", re.sub(r"/\*.*?\*/", "", CORE_H.read_text(), flags=re.S), flags=re.M)
    out = {}
    for m in re.finditer(r"CORE_API\s+([^;]*?)\b(core_\w+)\s*\(([^)]*)\)\s*;", text):
        result, name, args = m.group(1).strip(), m.group(2), m.group(3)
        out[name] = (ctype(result), [ctype(a) for a in args.split(",") if a.strip() and a.strip() != "void"])
    return out


def test_every_export_is_declared_for_ctypes_with_its_c_types():
    c = exports()
    assert len(c) >= 30
    assert set(c) == set(layouts.SIGNATURES), (set(c) ^ set(layouts.SIGNATURES))
    for name, (res, args) in layouts.SIGNATURES.items():
        assert (res, args) == c[name], f"{name}: C {c[name]}, Python {(res, args)}"


def test_the_parser_sees_a_difference():
    """(the check above can fail: a wrong width is told apart)"""
    assert ctype("uint16_t dport") is ctypes.c_uint16 and ctype("int dport") is ctypes.c_int
    assert ctype("const uint8_t *caddr") is ctypes.c_char_p and ctype("int *detail") != ctypes.c_int
    assert ctype("const struct core_stats *") == ctypes.POINTER(layouts.CoreStats)

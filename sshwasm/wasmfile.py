"""Pure-Python inspection of a `.wasm` binary: imports, exports and initial memory.

It reads only the import, memory and export sections and skips everything else by its
declared size, so checking a module costs microseconds and needs no wasmtime import.
"""

from __future__ import annotations

from dataclasses import dataclass

from sshwasm.errors import InvalidModule

MAGIC = b"\0asm"
CORE_VERSION = b"\x01\x00\x00\x00"
WASM_PAGE_BYTES = 65536

_SECTION_IMPORT = 2
_SECTION_MEMORY = 5
_SECTION_EXPORT = 7

_KIND_FUNC = 0
_KIND_TABLE = 1
_KIND_MEMORY = 2
_KIND_GLOBAL = 3
_KIND_TAG = 4

# Reference types written as a prefix byte followed by a heap type (function-references/GC).
_REF_PREFIXES = (0x63, 0x64)

# Limits flags: bit 0 has a maximum, bit 1 shared, bit 2 64-bit, bit 3 custom page size.
_LIMITS_HAS_MAX = 0x01
_LIMITS_64BIT = 0x04
_LIMITS_PAGE_SIZE = 0x08
_LIMITS_KNOWN = 0x0F


@dataclass(frozen=True)
class ModuleInfo:
    """What sshwasm needs to know about a core WebAssembly module."""

    exports: tuple[str, ...]
    imports: tuple[tuple[str, str], ...]
    initial_memory_bytes: int

    @property
    def is_wasi_command(self) -> bool:
        """True when the module exports `_start`, the entry point of a WASI command."""
        return "_start" in self.exports


class _Reader:
    """Bounds-checked cursor over a byte string; every failure is an InvalidModule."""

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def at_end(self) -> bool:
        return self.pos >= self.end

    def byte(self, what: str) -> int:
        if self.pos >= self.end:
            raise InvalidModule(f"truncated module: unexpected end while reading {what}")
        value = self.data[self.pos]
        self.pos += 1
        return value

    def take(self, count: int, what: str) -> bytes:
        if count > self.end - self.pos:
            raise InvalidModule(f"truncated module: {what} runs past its end")
        chunk = self.data[self.pos : self.pos + count]
        self.pos += count
        return chunk

    def skip(self, count: int, what: str) -> None:
        if count > self.end - self.pos:
            raise InvalidModule(f"truncated module: {what} runs past its end")
        self.pos += count

    def uleb(self, bits: int, what: str) -> int:
        """Unsigned LEB128 of at most `bits` bits, rejecting overlong or oversized encodings."""
        result = 0
        shift = 0
        max_bytes = (bits + 6) // 7
        for index in range(max_bytes):
            value = self.byte(what)
            result |= (value & 0x7F) << shift
            if not value & 0x80:
                if index == max_bytes - 1 and value >> (bits - shift):
                    raise InvalidModule(f"bad LEB128 in {what}: value exceeds {bits} bits")
                return result
            shift += 7
        raise InvalidModule(f"bad LEB128 in {what}: longer than {max_bytes} bytes")

    def skip_sleb(self, bits: int, what: str) -> None:
        """Skip a signed LEB128 of at most `bits` bits (only its validity matters here)."""
        max_bytes = (bits + 6) // 7
        for index in range(max_bytes):
            value = self.byte(what)
            if not value & 0x80:
                if index == max_bytes - 1:
                    # The unused high bits of the last byte must all copy the sign bit.
                    used = bits - 7 * index
                    rest = value >> (used - 1)
                    if rest not in (0, 0x7F >> (used - 1)):
                        raise InvalidModule(f"bad LEB128 in {what}: value exceeds {bits} bits")
                return
        raise InvalidModule(f"bad LEB128 in {what}: longer than {max_bytes} bytes")

    def name(self, what: str) -> str:
        length = self.uleb(32, f"{what} length")
        raw = self.take(length, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidModule(f"{what} is not valid UTF-8") from None


def inspect_module(data: bytes) -> ModuleInfo:
    """Read exports, imports and initial memory of a core module; raise InvalidModule if bad."""
    if len(data) < 8 or data[:4] != MAGIC:
        raise InvalidModule("not a WebAssembly module (bad magic)")
    version = data[4:8]
    if version != CORE_VERSION:
        # Components share the magic; their version word has layer 1 in its upper half.
        if version[2:4] == b"\x01\x00":
            raise InvalidModule(
                "a WebAssembly component, not a core module: components are not supported"
            )
        number = int.from_bytes(version, "little")
        raise InvalidModule(f"unsupported WebAssembly version {number}")

    exports: list[str] = []
    imports: list[tuple[str, str]] = []
    imported_memory_bytes: int | None = None
    defined_memory_bytes: int | None = None

    reader = _Reader(data, 8)
    while not reader.at_end():
        section_id = reader.byte("section id")
        size = reader.uleb(32, "section size")
        if size > reader.end - reader.pos:
            raise InvalidModule(f"truncated module: section {section_id} runs past the end")
        body = _Reader(data, reader.pos, reader.pos + size)
        reader.pos += size
        if section_id == _SECTION_IMPORT:
            first_memory = _parse_imports(body, imports)
            if first_memory is not None and imported_memory_bytes is None:
                imported_memory_bytes = first_memory
        elif section_id == _SECTION_MEMORY:
            first_memory = _parse_memories(body)
            if first_memory is not None and defined_memory_bytes is None:
                defined_memory_bytes = first_memory
        elif section_id == _SECTION_EXPORT:
            _parse_exports(body, exports)
        else:
            continue
        if not body.at_end():
            raise InvalidModule(f"section {section_id} has trailing bytes after its entries")

    # Imported memories come first in the index space, so they are memory 0 when present.
    if imported_memory_bytes is not None:
        initial = imported_memory_bytes
    elif defined_memory_bytes is not None:
        initial = defined_memory_bytes
    else:
        initial = 0
    return ModuleInfo(exports=tuple(exports), imports=tuple(imports), initial_memory_bytes=initial)


def _parse_imports(body: _Reader, imports: list[tuple[str, str]]) -> int | None:
    """Append (module, name) pairs; return the initial bytes of the first imported memory."""
    first_memory: int | None = None
    count = body.uleb(32, "import count")
    for _ in range(count):
        module = body.name("import module name")
        field = body.name("import field name")
        kind = body.byte("import kind")
        if kind == _KIND_FUNC:
            body.uleb(32, "imported function type")
        elif kind == _KIND_TABLE:
            _read_reftype(body, "imported table type")
            _read_limits(body, "imported table limits")
        elif kind == _KIND_MEMORY:
            initial = _read_limits(body, "imported memory limits")
            if first_memory is None:
                first_memory = initial
        elif kind == _KIND_GLOBAL:
            _read_valtype(body, "imported global type")
            mutability = body.byte("imported global mutability")
            if mutability > 1:
                raise InvalidModule(f"bad global mutability {mutability} in import {field!r}")
        elif kind == _KIND_TAG:
            attribute = body.byte("imported tag attribute")
            if attribute != 0:
                raise InvalidModule(f"bad tag attribute {attribute} in import {field!r}")
            body.uleb(32, "imported tag type")
        else:
            raise InvalidModule(f"unknown import kind {kind} for {module!r}.{field!r}")
        imports.append((module, field))
    return first_memory


def _parse_memories(body: _Reader) -> int | None:
    """Return the initial bytes of the first defined memory, if any."""
    first_memory: int | None = None
    count = body.uleb(32, "memory count")
    for _ in range(count):
        initial = _read_limits(body, "memory limits")
        if first_memory is None:
            first_memory = initial
    return first_memory


def _parse_exports(body: _Reader, exports: list[str]) -> None:
    count = body.uleb(32, "export count")
    for _ in range(count):
        name = body.name("export name")
        kind = body.byte("export kind")
        if kind > _KIND_TAG:
            raise InvalidModule(f"unknown export kind {kind} for {name!r}")
        body.uleb(32, "export index")
        exports.append(name)


def _read_limits(body: _Reader, what: str) -> int:
    """Read a limits record and return its minimum in bytes (pages times page size)."""
    flags = body.byte(what)
    if flags & ~_LIMITS_KNOWN:
        raise InvalidModule(f"bad flags 0x{flags:02x} in {what}")
    bits = 64 if flags & _LIMITS_64BIT else 32
    minimum = body.uleb(bits, what)
    if flags & _LIMITS_HAS_MAX:
        body.uleb(bits, what)
    page_bytes = WASM_PAGE_BYTES
    if flags & _LIMITS_PAGE_SIZE:
        log2 = body.uleb(32, f"{what} page size")
        if log2 > 16:
            raise InvalidModule(f"bad page size 2**{log2} in {what}")
        page_bytes = 1 << log2
    return minimum * page_bytes


def _read_reftype(body: _Reader, what: str) -> None:
    code = body.byte(what)
    if code in _REF_PREFIXES:
        body.skip_sleb(33, what)


def _read_valtype(body: _Reader, what: str) -> None:
    # Number, vector and short reference types are one byte; `ref (null) ht` adds a heap type.
    _read_reftype(body, what)

"""One nftables command, in this process through libnftables (ctypes) or else by `nft` exec.

libnftables (``libnftables.so.1``, the library the ``nft`` binary is built on) takes the same
text and JSON input as ``nft -f -`` and writes the same output, without a process: a guest
create's nft work is ~1-2 ms instead of an exec of ~10-30 ms per command. Its netlink socket
belongs to the calling thread's network namespace, so a context is made per command (in the
thread that runs it) and freed after. Where the library cannot be loaded, the ``nft`` binary
runs instead, with the same input; ``backend()`` says which one runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import subprocess
import threading
from typing import Final

from sockmap import tools
from sockmap.errors import SockmapError

NFT_CTX_OUTPUT_JSON: Final = 1 << 4
SONAME: Final = "libnftables.so.1"

_lib: ctypes.CDLL | None = None
_loaded = False
_lock = threading.Lock()


def _load() -> ctypes.CDLL | None:
    global _lib, _loaded
    with _lock:
        if _loaded:
            return _lib
        _loaded = True
        lib: ctypes.CDLL | None
        try:
            lib = ctypes.CDLL(SONAME)
        except OSError:
            found = ctypes.util.find_library("nftables")
            try:
                lib = ctypes.CDLL(found) if found else None
            except OSError:
                lib = None
        if lib is not None:
            lib.nft_ctx_new.restype = ctypes.c_void_p
            lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
            lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
            for f in (lib.nft_ctx_buffer_output, lib.nft_ctx_buffer_error):
                f.argtypes, f.restype = [ctypes.c_void_p], ctypes.c_int
            for f in (lib.nft_ctx_get_output_buffer, lib.nft_ctx_get_error_buffer):
                f.argtypes, f.restype = [ctypes.c_void_p], ctypes.c_char_p
            lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
            lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        _lib = lib
        return lib


def backend() -> str:
    """"libnftables" or "nft exec": what ``run`` uses on this host."""
    return "libnftables" if _load() is not None else "nft exec"


def nft_binary() -> str:
    return tools.need("nft", "sockmap cannot set up NAT",
                      hint="install it with `apt-get install nftables`, or use --no-nat")


def available() -> bool:
    """Whether nftables can be driven at all (the library or the binary)."""
    return _load() is not None or tools.find("nft") is not None


def run(text: str, *, json: bool = False) -> tuple[int, str, str]:
    """Run one nft input (``json``: JSON input, JSON output); (status, stdout, stderr)."""
    lib = _load()
    if lib is None:
        argv = [nft_binary(), *(["-j"] if json else []), "-f", "-"]
        r = subprocess.run(argv, input=text, capture_output=True, text=True, check=False)
        return r.returncode, r.stdout, r.stderr
    ctx = lib.nft_ctx_new(0)
    if not ctx:
        raise SockmapError("libnftables could not make a context (out of memory?)",
                           hint="see the daemon's log")
    try:
        if json:
            lib.nft_ctx_output_set_flags(ctx, NFT_CTX_OUTPUT_JSON)
        lib.nft_ctx_buffer_output(ctx)
        lib.nft_ctx_buffer_error(ctx)
        rc = lib.nft_run_cmd_from_buffer(ctx, text.encode())
        out = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode(errors="replace")
        err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
        return (0 if rc == 0 else 1), out, err
    finally:
        lib.nft_ctx_free(ctx)

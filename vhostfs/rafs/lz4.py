"""Raw LZ4 block decoding through the C decoder in csrc/lz4_block.c."""

from vhostfs._vring import ffi, lib

_REASONS = {
    lib.LZ4B_ERR_TRUNCATED: "input ends inside a sequence",
    lib.LZ4B_ERR_OUTPUT_FULL: "decodes to more bytes than expected",
    lib.LZ4B_ERR_OFFSET: "match offset points before the start of the output",
    lib.LZ4B_ERR_EMPTY: "empty input",
}


def decompress_block(block: bytes, size: int) -> bytes:
    """Decode one raw LZ4 block that must yield exactly `size` bytes; ValueError otherwise."""
    out = bytearray(size)
    written = int(lib.lz4_block_decompress(block, len(block), ffi.from_buffer(out), size))
    if written < 0:
        raise ValueError(_REASONS.get(written, f"decoder error {written}"))
    if written != size:
        raise ValueError(f"decodes to {written} bytes, expected {size}")
    return bytes(out)

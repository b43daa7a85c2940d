"""CRC32C (Castagnoli), as EROFS uses for its superblock checksum.

Only one block is ever checksummed, at open, so a table-driven loop in Python is fast enough
(about a millisecond) and saves a dependency.
"""

_POLYNOMIAL = 0x82F63B78  # reflected


def _make_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _POLYNOMIAL if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_TABLE = _make_table()


def crc32c(data: bytes | bytearray, crc: int = 0xFFFFFFFF) -> int:
    """The raw register after `data`, without the final inversion, as EROFS stores it."""
    table = _TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc

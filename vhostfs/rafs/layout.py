"""On-disk structures of EROFS, RAFS v6 and RAFS v5, as struct formats and constants.

All integers are little-endian. Field order in each format is the on-disk order; the readers
unpack whole structures and name the fields where they use them.
"""

import stat
import struct

# --- EROFS (plain images and the RAFS v6 base) ---------------------------------------------

EROFS_SUPER_OFFSET = 1024
EROFS_MAGIC = 0xE0F5E1E2

# magic, checksum, feature_compat, blkszbits, extslots, root_nid, inos, build_time,
# build_time_nsec, blocks, meta_blkaddr, xattr_blkaddr, uuid, volume_name, feature_incompat,
# compression union, extra_devices, devt_slotoff
EROFS_SUPER = struct.Struct("<IIIBBHQQIIII16s16sIHHH38x")
assert EROFS_SUPER.size == 128
EROFS_MAGIC_COMPAT = struct.Struct("<III")  # magic, checksum, feature_compat: for detection

COMPAT_SB_CHKSUM = 0x1
COMPAT_MTIME = 0x2
COMPAT_RAFS_V6 = 0x4000_0000

# Incompatible features: the reader must understand each one that is set.
INCOMPAT_ZERO_PADDING = 0x1  # compressed data only
INCOMPAT_COMPR_CFGS = 0x2  # compressed data only (also BIG_PCLUSTER)
INCOMPAT_CHUNKED_FILE = 0x4
INCOMPAT_DEVICE_TABLE = 0x8
INCOMPAT_ZTAILPACKING = 0x10  # compressed data only
INCOMPAT_FRAGMENTS = 0x20  # compressed data only (also DEDUPE)
INCOMPAT_XATTR_PREFIXES = 0x40
INCOMPAT_48BIT = 0x80
# Bits that only change how compressed inodes decode; compressed inodes themselves are refused.
INCOMPAT_COMPRESSION_ONLY = (
    INCOMPAT_ZERO_PADDING | INCOMPAT_COMPR_CFGS | INCOMPAT_ZTAILPACKING | INCOMPAT_FRAGMENTS
)
INCOMPAT_UNDERSTOOD = INCOMPAT_COMPRESSION_ONLY | INCOMPAT_CHUNKED_FILE | INCOMPAT_DEVICE_TABLE

# tag (blob id or uuid), blocks, mapped_blkaddr
DEVICE_SLOT = struct.Struct("<64sII56x")
assert DEVICE_SLOT.size == 128

INODE_SLOT_SIZE = 32
# i_format, i_xattr_icount, i_mode, i_nlink, i_size, i_mtime (relative), i_u, i_ino, i_uid, i_gid
INODE_COMPACT = struct.Struct("<HHHHIIIIHH4x")
assert INODE_COMPACT.size == 32
# i_format, i_xattr_icount, i_mode, reserved, i_size, i_u, i_ino, i_uid, i_gid, i_mtime,
# i_mtime_nsec, i_nlink
INODE_EXTENDED = struct.Struct("<HHH2xQIIIIQII16x")
assert INODE_EXTENDED.size == 64
I_FORMAT = struct.Struct("<H")

I_VERSION_EXTENDED = 0x1
I_FORMAT_KNOWN_BITS = 0xF  # bit 0 version, bits 1..3 data layout

LAYOUT_FLAT_PLAIN = 0
LAYOUT_COMPRESSED_FULL = 1
LAYOUT_FLAT_INLINE = 2
LAYOUT_COMPRESSED_COMPACT = 3
LAYOUT_CHUNK_BASED = 4

CHUNK_FORMAT_BLKBITS_MASK = 0x1F
CHUNK_FORMAT_INDEXES = 0x20
NULL_ADDR = 0xFFFF_FFFF  # a chunk that was never written: a hole, reads as zeros

# advise (RAFS: low 16 bits of the chunk-info index), device_id, blkaddr
CHUNK_INDEX = struct.Struct("<HHI")
BLOCK_MAP_ENTRY = struct.Struct("<I")

# nid, nameoff, file_type, reserved
DIRENT = struct.Struct("<QHBx")
assert DIRENT.size == 12
NAME_MAX = 255

# name filter, shared count (then 7 reserved bytes and `shared count` u32 ids)
XATTR_IBODY_HEADER = struct.Struct("<IB7x")
XATTR_ENTRY = struct.Struct("<BBH")  # name_len, name_index, value_size
XATTR_SHARED_ID = struct.Struct("<I")
XATTR_LONG_PREFIX_FLAG = 0x80
XATTR_PREFIXES = {
    1: b"user.",
    2: b"system.posix_acl_access",
    3: b"system.posix_acl_default",
    4: b"trusted.",
    5: b"lustre.",
    6: b"security.",
}

# EROFS dirent file types, mapped to the DT_* values that readdir reports.
DT_UNKNOWN = 0
FILE_TYPE_TO_DT = {0: 0, 1: 8, 2: 4, 3: 2, 4: 6, 5: 1, 6: 12, 7: 10}

# --- RAFS v6 additions ---------------------------------------------------------------------

RAFS_V6_EXT_SUPER_OFFSET = 1152
# flags, blob_table_offset, blob_table_size, chunk_size, chunk_table_offset, chunk_table_size,
# prefetch_table_offset, prefetch_table_size
RAFS_V6_EXT_SUPER = struct.Struct("<QQIIQQQI")
RAFS_V6_SUPERBLOCKS_END = RAFS_V6_EXT_SUPER_OFFSET + 256  # the ext superblock is 256 bytes
RAFS_V6_BLOCK_SIZE = 4096
RAFS_V6_BLOB_ENTRY = struct.Struct("<64sIIIIIIQQIIQQQ32s32sQ8sI36x")
assert RAFS_V6_BLOB_ENTRY.size == 256
RAFS_V6_MAX_BLOBS = 255  # the chunk index keeps blob_index + 1 in 8 bits
PREFETCH_ENTRY = struct.Struct("<I")

# --- RAFS super flags (v5 and v6) ----------------------------------------------------------

FLAG_COMPRESSION_NONE = 0x1
FLAG_COMPRESSION_LZ4 = 0x2
FLAG_HASH_BLAKE3 = 0x4
FLAG_HASH_SHA256 = 0x8
FLAG_EXPLICIT_UID_GID = 0x10
FLAG_HAS_XATTR = 0x20
FLAG_COMPRESSION_GZIP = 0x40
FLAG_COMPRESSION_ZSTD = 0x80
FLAG_INLINED_CHUNK_DIGEST = 0x100
FLAG_TARFS_MODE = 0x200
FLAG_ENCRYPTION_NONE = 0x0100_0000
FLAG_ENCRYPTION_AES_128_XTS = 0x0200_0000
FLAG_RESERVED_COMPAT = 0xFC00_0000  # ignorable by definition
FLAGS_KNOWN = 0x3FF | FLAG_ENCRYPTION_NONE | FLAG_ENCRYPTION_AES_128_XTS | FLAG_RESERVED_COMPAT

# --- Chunk records -------------------------------------------------------------------------

# digest, blob_index, flags, compressed_size, uncompressed_size, compressed_offset,
# uncompressed_offset, file_offset, index, crc32 (v5: reserved)
CHUNK_INFO = struct.Struct("<32sIIIIQQQII")
assert CHUNK_INFO.size == 80
CHUNK_TABLE_KEY = struct.Struct("<32xI36xI4x")  # blob_index and index only, for indexing
assert CHUNK_TABLE_KEY.size == 80

CHUNK_COMPRESSED = 0x1
CHUNK_HOLE = 0x2
CHUNK_ENCRYPTED = 0x4
CHUNK_BATCH = 0x8
CHUNK_HAS_CRC32 = 0x10
CHUNK_FLAGS_KNOWN = 0x1F

MAX_CHUNK_SIZE = 16 << 20
MIN_CHUNK_SIZE = 4096
MAX_CHUNKS_PER_BLOB = 1 << 24

# --- Blob features (v6 blob table, blob meta header) ---------------------------------------

BLOB_ALIGNED = 0x1
BLOB_INLINED_FS_META = 0x2
BLOB_CHUNK_INFO_V2 = 0x4
BLOB_ZRAN = 0x8
BLOB_SEPARATE = 0x10
BLOB_INLINED_CHUNK_DIGEST = 0x20
BLOB_TARFS = 0x40
BLOB_BATCH = 0x80
BLOB_ENCRYPTED = 0x100
BLOB_CHUNKDICT_GENERATED = 0x200
BLOB_SEPARATED_WITH_PREFETCH = 0x400
BLOB_EXTERNAL = 0x800
BLOB_HAS_TAR_HEADER = 0x1000_0000
BLOB_HAS_TOC = 0x2000_0000
BLOB_CAP_TAR_TOC = 0x4000_0000
BLOB_V5_NO_EXT_TABLE = 0x8000_0000
BLOB_FEATURES_KNOWN = 0x0FFF | BLOB_HAS_TAR_HEADER | BLOB_HAS_TOC | BLOB_CAP_TAR_TOC
# Layouts whose chunks this reader cannot fetch, by name for the error message.
BLOB_FEATURES_REFUSED = {
    BLOB_ZRAN: "ZRan (chunks inside a gzip stream)",
    BLOB_TARFS: "tarfs",
    BLOB_BATCH: "batch chunks",
    BLOB_ENCRYPTED: "encryption",
    BLOB_EXTERNAL: "external data",
}

# Blob meta: the chunk-info (CI) array's 4 KiB header.
BLOB_META_MAGIC = 0xB10BB10B
BLOB_META_HEADER_SIZE = 4096
# magic, features, ci_compressor, ci_entries, ci_offset, ci_compressed_size,
# ci_uncompressed_size
BLOB_META_HEADER = struct.Struct("<IIIIQQQ")
BLOB_META_MAGIC2_OFFSET = 4092
CI_ENTRY_V1 = struct.Struct("<QQ")  # uncomp_info, comp_info
CI_ENTRY_V2 = struct.Struct("<QQQ")  # uncomp_info, comp_info, data
CI_V2_COMPRESSED = 0x01
CI_V2_ZRAN = 0x02
CI_V2_BATCH = 0x04
CI_V2_ENCRYPTED = 0x08

# ToC entry: flags, reserved, name, sha256 of content, compressed offset/size, uncompressed size
TOC_ENTRY = struct.Struct("<I4x16s32sQQQ48x")
assert TOC_ENTRY.size == 128
TOC_NAME = b"rafs.blob.toc"
TOC_COMPRESSION_NONE = 0x1
TOC_COMPRESSION_ZSTD = 0x2
TOC_COMPRESSION_LZ4 = 0x4
TAR_HEADER_SIZE = 512
TOC_MAX_SIZE = 4096 - TAR_HEADER_SIZE  # nydusd reads at most the last 4 KiB

# --- RAFS v5 ------------------------------------------------------------------------------

RAFS_V5_MAGIC = 0x52414653
RAFS_V5_VERSION = 0x500
RAFS_V4_VERSION = 0x400
RAFS_V5_SUPER_SIZE = 8192
RAFS_V5_ALIGNMENT = 8
RAFS_V5_ROOT_INO = 1
# magic, version, sb_size, block_size (= chunk size), flags, inodes_count, inode_table_offset,
# prefetch_table_offset, blob_table_offset, inode_table_entries, prefetch_table_entries,
# blob_table_size, extended_blob_table_entries, extended_blob_table_offset
RAFS_V5_SUPER = struct.Struct("<IIIIQQQQQIIIIQ")
RAFS_V5_MAGIC_VERSION = struct.Struct("<II")
# digest, parent, ino, uid, gid, projid, mode, size, blocks, flags, nlink, child_index,
# child_count, name_size, symlink_size, rdev, mtime_nsec, mtime
RAFS_V5_INODE = struct.Struct("<32sQQIIIIQQQIIIHHIIQ8x")
assert RAFS_V5_INODE.size == 128
RAFS_V5_INODE_SYMLINK = 0x1
RAFS_V5_INODE_HARDLINK = 0x2
RAFS_V5_INODE_XATTR = 0x4
RAFS_V5_INODE_HAS_HOLE = 0x8
RAFS_V5_INODE_FLAGS_KNOWN = 0xF
RAFS_V5_INODE_TABLE_ENTRY = struct.Struct("<I")
RAFS_V5_XATTR_SIZE = struct.Struct("<Q")
RAFS_V5_XATTR_PAIR_SIZE = struct.Struct("<I")
RAFS_V5_BLOB_ENTRY_HEAD = struct.Struct("<II")  # readahead offset, readahead size
# chunk_count, reserved, uncompressed_size, compressed_size
RAFS_V5_EXT_BLOB_ENTRY = struct.Struct("<I4xQQ40x")
assert RAFS_V5_EXT_BLOB_ENTRY.size == 64

# --- Algorithm codes (blob table, blob meta) -----------------------------------------------

COMPRESSOR_NONE = 0
COMPRESSOR_LZ4_BLOCK = 1
COMPRESSOR_GZIP = 2
COMPRESSOR_ZSTD = 3
DIGESTER_BLAKE3 = 0
DIGESTER_SHA256 = 1
CIPHER_NONE = 0


# The file types an inode may have in any of the formats (st_mode & S_IFMT).
FILE_TYPES = frozenset(
    {
        stat.S_IFREG,
        stat.S_IFDIR,
        stat.S_IFLNK,
        stat.S_IFCHR,
        stat.S_IFBLK,
        stat.S_IFIFO,
        stat.S_IFSOCK,
    }
)

/*
 * lz4_block.h: a bounds-checked decoder for raw LZ4 blocks (no frame, no size prefix), the
 * "lz4_block" chunk compression of Nydus images.
 *
 * This file is the cffi cdef as well as the C header, so it holds only what cffi's parser
 * accepts: no #include, no function-like macros, only integer #defines.
 *
 * The input comes from a blob that nobody vouched for. The decoder never reads outside
 * [src, src + src_len) nor writes outside [dst, dst + dst_cap), whatever the bytes say.
 */

/* Negative results of lz4_block_decompress. */
#define LZ4B_ERR_TRUNCATED -1     /* the input ends inside a sequence */
#define LZ4B_ERR_OUTPUT_FULL -2   /* the block decodes to more than dst_cap bytes */
#define LZ4B_ERR_OFFSET -3        /* a match offset of 0 or before the start of the output */
#define LZ4B_ERR_EMPTY -4         /* no input at all: even an empty block has one token */

/* Decode one block into dst. Returns the number of bytes written, or an LZ4B_ERR_* code.
 * The caller knows the exact decoded size and must check the count against it. */
int64_t lz4_block_decompress(const uint8_t *src, size_t src_len, uint8_t *dst, size_t dst_cap);

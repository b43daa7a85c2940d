/*
 * lz4_block.c: raw LZ4 block decoder (format: lz4/doc/lz4_Block_format.md).
 *
 * A block is a run of sequences. Each sequence is a token byte (high nibble: literal count,
 * low nibble: match length - 4; 15 means "more length bytes follow, each adding up to 255"),
 * the literals, then a 2-byte little-endian offset back into the output and the match. The last
 * sequence stops after its literals.
 *
 * Every length is compared with what is left of the input or output before it is used, always
 * as "n > remaining" so that no pointer is ever formed past the end of a buffer.
 */

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "lz4_block.h"

#define MIN_MATCH 4u

/* Read an extended length: bytes are added while they are 255. Returns 0 on success, or -1
 * when the input ends first. A hostile block can make the length huge but not overflow size_t:
 * each input byte adds at most 255 and the input is far shorter than SIZE_MAX / 255. */
static int read_length(const uint8_t **ip, const uint8_t *end, size_t *length)
{
    uint8_t byte;

    do {
        if (*ip == end)
            return -1;
        byte = *(*ip)++;
        *length += byte;
    } while (byte == 255);
    return 0;
}

int64_t lz4_block_decompress(const uint8_t *src, size_t src_len, uint8_t *dst, size_t dst_cap)
{
    const uint8_t *ip = src;
    const uint8_t *const in_end = src + src_len;
    uint8_t *op = dst;
    uint8_t *const out_end = dst + dst_cap;

    if (src_len == 0)
        return LZ4B_ERR_EMPTY;

    for (;;) {
        const uint8_t token = *ip++;
        size_t literals = token >> 4;
        size_t match;
        size_t offset;

        if (literals == 15 && read_length(&ip, in_end, &literals) != 0)
            return LZ4B_ERR_TRUNCATED;
        if (literals > (size_t)(in_end - ip))
            return LZ4B_ERR_TRUNCATED;
        if (literals > (size_t)(out_end - op))
            return LZ4B_ERR_OUTPUT_FULL;
        memcpy(op, ip, literals);
        ip += literals;
        op += literals;

        if (ip == in_end)
            break; /* the last sequence has literals only */

        if ((size_t)(in_end - ip) < 2)
            return LZ4B_ERR_TRUNCATED;
        offset = (size_t)ip[0] | ((size_t)ip[1] << 8);
        ip += 2;
        if (offset == 0 || offset > (size_t)(op - dst))
            return LZ4B_ERR_OFFSET;

        match = token & 15u;
        if (match == 15 && read_length(&ip, in_end, &match) != 0)
            return LZ4B_ERR_TRUNCATED;
        match += MIN_MATCH;
        if (match > (size_t)(out_end - op))
            return LZ4B_ERR_OUTPUT_FULL;

        if (offset >= match) {
            memcpy(op, op - offset, match);
            op += match;
        } else {
            /* The match overlaps what it produces (a repeating pattern): copy bytewise. */
            const uint8_t *from = op - offset;
            for (size_t i = 0; i < match; i++)
                op[i] = from[i];
            op += match;
        }

        if (ip == in_end)
            return LZ4B_ERR_TRUNCATED; /* a block must end with a literals-only sequence */
    }
    return (int64_t)(op - dst);
}

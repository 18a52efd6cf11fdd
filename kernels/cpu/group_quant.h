// Low-bit group quantization of the XQuant caches on the CPU: bit packing,
// quantizers for the two group axes of the spec (per token: a group is
// consecutive values of one row; per channel: a group is one column of a block
// of group_size rows), and the dequantizers that attention runs over every
// cached token at every decode step. The per-value math and its error bound
// are in kernels/group_quant.h.
//
// Bit stream (all packed codes): value i occupies bits [i*B, i*B + B) of an
// LSB-first stream, where stream bit k is bit (k % 8) of byte k / 8. So with
// B = 4 value 2j is the low nibble of byte j; with B = 2 value 4j is bits 0-1
// of byte j; with B = 3 values straddle bytes (8 values fill 3 bytes). n values
// take exactly packed_bytes(B, n) = ceil(B * n / 8) bytes; unused bits of the
// last byte are zero. Any 8 consecutive values starting at a multiple of 8
// occupy exactly B whole bytes starting at byte (first index / 8) * B.
#pragma once

#include <cstddef>
#include <cstdint>

namespace xq::cpu {

// Bytes holding `count` codes of `bits` bits: ceil(bits * count / 8).
size_t packed_bytes(int bits, int64_t count);

// Packs codes[0..count) (each < 2^bits; higher bits are ignored) into the
// stream above, writing exactly packed_bytes(bits, count) bytes to out.
void pack_codes(const uint8_t* codes, int64_t count, int bits, uint8_t* out);
// The inverse: count codes from packed (packed_bytes(bits, count) bytes read).
void unpack_codes(const uint8_t* packed, int64_t count, int bits, uint8_t* codes);

// A group's grid as stored: raw fp16 bits, x̂ = code * scale + zero.
struct GroupParams {
  uint16_t scale_fp16;
  uint16_t zero_fp16;
};

// Per token: values [g * group_size, (g + 1) * group_size) form group g, with
// params[g] and its codes at stream indices of the same values (one stream of
// count codes, packed_bytes(bits, count) bytes). count must be a multiple of
// group_size. Throws xq::Error naming the index of the first value that is
// NaN, infinite or beyond the fp16 range (|x| > 65504), before writing
// anything. Throws std::invalid_argument for bits outside 1..8 or a bad
// count/group_size.
//
// When group_size * bits is a multiple of 8 (any group_size that is a multiple
// of 8), group g starts on byte packed_bytes(bits, g * group_size), so any run
// of whole groups, e.g. the tokens of one attention tile, can be dequantized
// on its own by offsetting packed_codes and params.
void quantize_groups(const float* x, int64_t count, int64_t group_size, int bits,
                     uint8_t* packed_codes, GroupParams* params);
void dequantize_groups(const uint8_t* packed_codes, const GroupParams* params, int64_t count,
                       int64_t group_size, int bits, float* out);

// Per channel: x is a block of `rows` tokens (the group size) by `cols`
// channels, row r at x + r * row_stride; each column is one group, params[c].
//
// Layout: codes stay in token-major order, one stream of rows * cols codes
// with the code of (r, c) at index r * cols + c (packed_bytes(bits, rows *
// cols) bytes). Dequantizing then writes each token's row of the fp32 tile
// from a contiguous run of codes against a vector of per-channel scales and
// zeros that stays in L1, which is the order the rebuilt-K matmul consumes;
// a column-major (group-contiguous) layout would make the same tile a
// transpose with strided stores. When cols * bits is a multiple of 8 (cols a
// multiple of 8), row r starts on byte r * cols * bits / 8, so a range of
// rows is dequantized without touching the others.
//
// Errors as for quantize_groups, naming the row and column of the value.
void quantize_strided(const float* x, int64_t rows, int64_t cols, int64_t row_stride, int bits,
                      uint8_t* packed_codes, GroupParams* params);
// Rows [first_row, first_row + row_count) of a block quantized with
// quantize_strided (cols channels) into out, row i at out + i * out_stride.
void dequantize_strided_rows(const uint8_t* packed_codes, const GroupParams* params, int64_t cols,
                             int bits, int64_t first_row, int64_t row_count, float* out,
                             int64_t out_stride);
// The whole block.
void dequantize_strided(const uint8_t* packed_codes, const GroupParams* params, int64_t rows,
                        int64_t cols, int bits, float* out, int64_t out_stride);

// Scalar dequantizers, which the functions above use when the build has no
// AVX2. Always compiled, so the tests compare them with the vector code on
// every machine. The vector paths cover groups (or column runs) in whole
// chunks of 8 values; group_size or cols not a multiple of 8 falls back here.
namespace portable {
void dequantize_groups(const uint8_t* packed_codes, const GroupParams* params, int64_t count,
                       int64_t group_size, int bits, float* out);
void dequantize_strided_rows(const uint8_t* packed_codes, const GroupParams* params, int64_t cols,
                             int bits, int64_t first_row, int64_t row_count, float* out,
                             int64_t out_stride);
}  // namespace portable

}  // namespace xq::cpu

// Per-element math of the XQuant cache quantizer: asymmetric uniform
// quantization of a group of values with B bits (1..8), scale and zero point
// stored as fp16. Shared by the CPU and CUDA backends, so the CPU tests cover
// the formulas the GPU runs. Plain float arithmetic only (no bit casts, no std::
// containers), so the same code compiles for host and device.
//
// Nominally scale = (max - min) / (2^B - 1) and zero = min; code =
// round((x - zero) / scale) clamped to 0..2^B-1; x̂ = code * scale + zero.
// The stored values differ from the nominal ones in three deliberate ways, and
// together they make the error bound exact:
//
//  1. Both are rounded to fp16 *before* any code is chosen, and outward: the
//     zero down (zero <= min) and the scale up, after the zero is known, so
//     zero + (2^B-1) * scale >= max. The grid then covers the whole group, no
//     value is clamped, and every value has a grid point within scale/2. The
//     error of rounding the zero point to fp16 (up to one fp16 ulp of |min|)
//     therefore does not add to the reconstruction error: it is absorbed into
//     the scale, which grows by at most that ulp / (2^B-1).
//  2. Both are also multiples of a power of two `unit` (grid_unit below) chosen
//     so that every grid point zero + c * scale and every midpoint
//     zero + (c + 1/2) * scale is exactly representable in fp32. Decoding is
//     then exact (same result with or without FMA, on every backend), and the
//     encoder can pick the nearest grid point by exact comparisons. unit is
//     at most 2^-20 of the group's largest magnitude, far below fp16's own
//     resolution (2^-11), so this costs nothing measurable; it only sets a
//     floor on the scale of groups whose range is tinier than that.
//  3. Codes are the nearest grid point, decided exactly against midpoints
//     (a tie goes to the upper code).
//
// Guarantee: for every finite x in a group with |x| <= 65504 (the fp16 range),
// |x - x̂| <= scale / 2 exactly, computed in fp32, with scale the stored fp16
// value. A group whose values are all equal gets scale 0 and x̂ == min exactly
// when min is an fp16 value; otherwise (min between two fp16 values) scale is a
// tiny positive number and |x - x̂| <= scale / 2, which is also below half an
// fp16 ulp of |min|. Denormal inputs are fine (the scale then bottoms out at
// the smallest fp16 denormal, 2^-24), provided denormals are not flushed to
// zero (no -ffast-math on the host, no -ftz=true on the device).
//
// What cannot be stored: values beyond the fp16 range (the zero point would not
// fit); choose_group_grid reports them by returning false. One corner differs
// from the nominal grid: with B = 1 a group spanning more than 65504 would
// need a scale beyond fp16, and gets the fixed grid {-32752, +32752} instead
// (see choose_group_grid), which still meets the bound.
#pragma once

#include <cmath>

#include "kernels/elementwise.h"

namespace xq {

// The largest finite fp16 value.
constexpr float kFp16Max = 65504.0f;

// A group's quantization grid: x̂ = code * scale + zero. Both are exact fp16
// values (converting them to fp16 bits with round-to-nearest is lossless).
struct GroupGrid {
  float scale;
  float zero;
};

XQ_HOST_DEVICE inline int group_max_code(int bits) {
  return (1 << bits) - 1;
}

// Distance between adjacent fp16 values at magnitude |v|: 2^(e-11) for |v| in
// [2^(e-1), 2^e), never below the denormal spacing 2^-24.
XQ_HOST_DEVICE inline float fp16_spacing(float v) {
  if (v == 0.0f) return 0x1p-24f;
  int exponent = 0;
  frexpf(v, &exponent);
  return ldexpf(1.0f, exponent - 11 > -24 ? exponent - 11 : -24);
}

// The power of two that every grid point of a group whose largest magnitude
// is `largest_magnitude` is a multiple of. With unit > largest / 2^21 the grid
// spans |zero| + (2^B-1) * scale <= ~3 * largest < 2^23 * unit, so all grid
// points and midpoints are integer multiples of unit/2 below 2^24 * unit/2,
// which fp32 (24-bit significand) holds exactly.
XQ_HOST_DEVICE inline float grid_unit(float largest_magnitude) {
  if (largest_magnitude == 0.0f) return 0x1p-24f;
  int exponent = 0;  // largest_magnitude < 2^exponent
  frexpf(largest_magnitude, &exponent);
  return ldexpf(1.0f, exponent - 21 > -24 ? exponent - 21 : -24);
}

// The largest fp16 value <= v that is a multiple of `unit` (a power of two
// >= 2^-24). Stepping by the coarser of the fp16 spacing and unit keeps the
// result an fp16 value: when unit is the coarser, |v| < 2^11 * unit, so the
// result is k * unit with |k| <= 2^11, which fp16 holds.
XQ_HOST_DEVICE inline float fp16_floor_to_unit(float v, float unit) {
  const float spacing = fp16_spacing(v);
  const float step = spacing > unit ? spacing : unit;
  return floorf(v / step) * step;  // exact: step is a power of two
}

// The smallest fp16 value >= v that is a multiple of `unit` (v >= 0). May
// exceed kFp16Max, which the caller must check.
XQ_HOST_DEVICE inline float fp16_ceil_to_unit(float v, float unit) {
  const float spacing = fp16_spacing(v);
  const float step = spacing > unit ? spacing : unit;
  return ceilf(v / step) * step;
}

// Chooses the grid of a group whose smallest and largest values are min and
// max (finite, min <= max). Returns false only when the group cannot be
// stored: NaN, or a value beyond the fp16 range.
XQ_HOST_DEVICE inline bool choose_group_grid(float min, float max, int bits, GroupGrid* grid) {
  if (!(min >= -kFp16Max && max <= kFp16Max && min <= max)) return false;
  const float largest = -min > max ? -min : max;
  const float unit = grid_unit(largest);
  const float levels = static_cast<float>(group_max_code(bits));
  float zero = fp16_floor_to_unit(min, unit);
  // max - zero and the division round, possibly down, so the scale is checked
  // against the exact coverage condition (exact in fp32, see grid_unit) and
  // stepped up if it falls short; one step suffices, the loop is for safety.
  float scale = fp16_ceil_to_unit((max - zero) / levels, unit);
  while (zero + levels * scale < max) {
    const float spacing = fp16_spacing(scale);
    scale += spacing > unit ? spacing : unit;
  }
  if (scale > kFp16Max) {
    // Only 1 bit gets here: a span beyond 65504 needs a step fp16 cannot
    // hold. Grid points +-32752 with the largest fp16 step 65504 still put
    // every value of [-65504, 65504] within half a step of one of them, so the
    // bound holds, though the grid no longer spans [min, max].
    scale = kFp16Max;
    zero = -kFp16Max / 2;
  }
  // + 0.0f turns a zero of -0 (from min = -0 or max - zero = -0) into +0, so
  // the stored bits do not depend on which of two equal zeros min/max found.
  grid->scale = scale + 0.0f;
  grid->zero = zero + 0.0f;
  return true;
}

// The code of x on the grid: the nearest grid point, ties to the upper one.
// x must lie in the group the grid was chosen for.
XQ_HOST_DEVICE inline int group_encode(float x, GroupGrid grid, int bits) {
  if (!(grid.scale > 0.0f)) return 0;
  const int max_code = group_max_code(bits);
  const float estimate = rintf((x - grid.zero) / grid.scale);
  int code = estimate < 0.0f                           ? 0
             : estimate > static_cast<float>(max_code) ? max_code
                                                       : static_cast<int>(estimate);
  // The estimate rounds twice, so next to a midpoint it can be one step off.
  // Midpoints are exact in fp32 (see grid_unit): comparing against them
  // decides the nearest grid point exactly.
  if (code < max_code && x >= grid.zero + (static_cast<float>(code) + 0.5f) * grid.scale) {
    ++code;
  } else if (code > 0 && x < grid.zero + (static_cast<float>(code) - 0.5f) * grid.scale) {
    --code;
  }
  return code;
}

// x̂ for a code. Exact (every grid point is an fp32 value), so a fused
// multiply-add and separate ones give the same bits.
XQ_HOST_DEVICE inline float group_decode(int code, GroupGrid grid) {
  return static_cast<float>(code) * grid.scale + grid.zero;
}

}  // namespace xq

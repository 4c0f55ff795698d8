// Gaussian noise ops (docs/design.md, "Noise modules"): the element-wise math and the fixed
// reduction order of the σ-gradient, shared by the CPU and CUDA kernels so that both give the
// same bits. Plain C++, no torch headers.
//
// x (contiguous) is viewed as rows × row_width with row_width = channels·inner: element i lies in
// row i / row_width, column i % row_width, and its noise group (σ entry) is channel
// (i / inner) % channels. ε_i = philox::randn(key, i).
//   forward       additive y = x + σ_c ε        multiplicative y = x·(1 + σ_c ε)
//   ∂L/∂x         additive g                     multiplicative g·(1 + σ_c ε)
//   ∂L/∂σ_c       additive Σ_{i∈c} g_i ε_i       multiplicative Σ_{i∈c} g_i x_i ε_i
#pragma once

#include <cstdint>

#include "t1t2/enums.h"
#include "t1t2/philox.h"

namespace t1t2 {
namespace noise {

// y of the forward (and ∂L/∂x of the multiplicative backward, with x = g) in the compute type T,
// each operation rounded on its own.
template <typename T>
T1T2_HOST_DEVICE inline T apply(Mode mode, T x, T sigma, float eps) {
  const T scaled = ieee::mul(sigma, static_cast<T>(eps));
  return mode == Mode::Additive ? ieee::add(x, scaled) : ieee::mul(x, ieee::add(T(1), scaled));
}

// One term of ∂L/∂σ, in double: g·ε (additive) or (g·x)·ε (multiplicative).
T1T2_HOST_DEVICE inline double sigma_term(Mode mode, double g, double x, float eps) {
  return mode == Mode::Additive ? ieee::mul(g, static_cast<double>(eps))
                                : ieee::mul(ieee::mul(g, x), static_cast<double>(eps));
}

// ---- the fixed reduction order of ∂L/∂σ ----
//
// The rows × row_width matrix is cut into tiles of at most tile_rows rows × tile_columns columns
// (tile (rt, ct) starts at row rt·tile_rows, column ct·tile_columns). Within a tile, column j is
// summed in `lanes` row lanes (lane l takes rows first + l, first + l + lanes, … in order, from
// 0.0), the lanes are added in a fixed pairwise tree (stride lanes/2, …, 1: s[l] += s[l + stride]),
// and the column sums of each channel the tile touches are added in column order → one partial per
// (tile, channel). Finally ∂L/∂σ_c adds its partials over row tiles (outer loop) and column tiles
// (inner loop) in order. Every size follows from (numel, channels, inner) and the constants
// below, never from a thread count or launch configuration: the same bits on every run, on CPU
// and GPU. (On the GPU a tile is one block of kBlockThreads = lanes × columns-per-pass threads.)

constexpr int64_t kMaxTileColumns = 1024;
constexpr int64_t kBlockThreads = 256;
constexpr int64_t kTileElements = 16384;

struct Plan {
  int64_t rows, row_width, channels, inner;
  int64_t tile_columns, tile_rows, lanes;
  int64_t row_tiles, column_tiles;
  int64_t partials_per_tile;  // ≥ the channels any one column tile touches
  T1T2_HOST_DEVICE int64_t tiles() const { return row_tiles * column_tiles; }
  T1T2_HOST_DEVICE int64_t partials() const { return tiles() * partials_per_tile; }
};

T1T2_HOST_DEVICE inline Plan make_plan(int64_t numel, int64_t channels, int64_t inner) {
  Plan p{};
  p.channels = channels;
  p.inner = inner;
  p.row_width = channels * inner;
  p.rows = p.row_width > 0 ? numel / p.row_width : 0;
  p.tile_columns = p.row_width < kMaxTileColumns ? p.row_width : kMaxTileColumns;
  int64_t lanes = 1;
  while (lanes * 2 * p.tile_columns <= kBlockThreads) lanes *= 2;
  p.lanes = lanes;
  int64_t tile_rows = kTileElements / (p.tile_columns > 0 ? p.tile_columns : 1);
  tile_rows = tile_rows > lanes ? tile_rows : lanes;
  p.tile_rows = tile_rows < p.rows ? tile_rows : (p.rows > 0 ? p.rows : 1);
  p.row_tiles = (p.rows + p.tile_rows - 1) / p.tile_rows;
  p.column_tiles = p.tile_columns > 0 ? (p.row_width + p.tile_columns - 1) / p.tile_columns : 0;
  // A window of tile_columns consecutive columns touches at most ⌊(tile_columns + inner − 2)/inner⌋ + 1 channels.
  const int64_t touched = inner > 0 ? (p.tile_columns + inner - 2) / inner + 1 : 0;
  p.partials_per_tile = touched < channels ? touched : channels;
  return p;
}

// First channel touched by column tile ct (the partial of channel c in tile (rt, ct) is at
// (rt·column_tiles + ct)·partials_per_tile + c − first_channel(ct)).
T1T2_HOST_DEVICE inline int64_t first_channel(const Plan& p, int64_t ct) { return ct * p.tile_columns / p.inner; }

// The column tiles that hold columns of channel c: [first, last].
T1T2_HOST_DEVICE inline int64_t first_column_tile(const Plan& p, int64_t c) { return c * p.inner / p.tile_columns; }
T1T2_HOST_DEVICE inline int64_t last_column_tile(const Plan& p, int64_t c) {
  return ((c + 1) * p.inner - 1) / p.tile_columns;
}

}  // namespace noise
}  // namespace t1t2

// The row groups of the column-sum kernels (column_sum.cuh): consecutive runs of
// column_sum_group_rows(M) rows, column_sum_row_groups(M) of them, at most
// kColumnSumMaxRowGroups. A kernel stores one fp32 partial per (group, column);
// the torch glue allocates them as [column_sum_row_groups(M), columns] and sums them over the
// groups. Plain C++, so the glue (host compiler) and the kernels (nvcc) share one rule.
#pragma once

#include <cstdint>

namespace deltakern {

constexpr int64_t kColumnSumMinGroupRows = 64;
constexpr int64_t kColumnSumMaxRowGroups = 256;

inline int64_t column_sum_group_rows(int64_t M) {
  const int64_t rows = (M + kColumnSumMaxRowGroups - 1) / kColumnSumMaxRowGroups;
  return rows > kColumnSumMinGroupRows ? rows : kColumnSumMinGroupRows;
}

inline int64_t column_sum_row_groups(int64_t M) {
  const int64_t rows = column_sum_group_rows(M);
  return (M + rows - 1) / rows;
}

}  // namespace deltakern

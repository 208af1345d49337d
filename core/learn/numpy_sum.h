// numpy's np.sum order for a contiguous 1-D array of doubles: pairwise, with 8 running sums over
// blocks of at most 128 values. COBYLA uses it where PRIMA's Python port (the reference's
// optimizer) sums with numpy and the sum decides a tie; the analytic test functions use it so that
// their values equal numpy's bit for bit. Header-only, no dependencies.
#ifndef LORAHUB_CORE_LEARN_NUMPY_SUM_H_
#define LORAHUB_CORE_LEARN_NUMPY_SUM_H_

#include <cstddef>
#include <vector>

namespace lorahub::learn {

inline double NumpyPairwiseSum(const double* a, size_t n) {
  if (n < 8) {
    double s = 0;
    for (size_t i = 0; i < n; ++i) s += a[i];
    return s;
  }
  if (n <= 128) {
    double r[8];
    for (int j = 0; j < 8; ++j) r[j] = a[j];
    size_t i = 8;
    for (; i + 8 <= n; i += 8) {
      for (int j = 0; j < 8; ++j) r[j] += a[i + j];
    }
    double s = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; ++i) s += a[i];
    return s;
  }
  size_t half = n / 2;
  half -= half % 8;
  return NumpyPairwiseSum(a, half) + NumpyPairwiseSum(a + half, n - half);
}

inline double NumpyPairwiseSum(const std::vector<double>& v) {
  return NumpyPairwiseSum(v.data(), v.size());
}

}  // namespace lorahub::learn

#endif  // LORAHUB_CORE_LEARN_NUMPY_SUM_H_

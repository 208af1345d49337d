// Eigendecomposition of a small dense symmetric matrix by cyclic Jacobi rotations.
// Plain C++ so that the optimizers need no linear-algebra library (CMA-ES needs C = B D^2 B^T
// for N up to ~100 once per generation; Jacobi is accurate to machine precision and simple).
#ifndef LORAHUB_CORE_LEARN_SYMMETRIC_EIGEN_H_
#define LORAHUB_CORE_LEARN_SYMMETRIC_EIGEN_H_

#include <vector>

namespace lorahub::learn {

struct SymmetricEigen {
  int n = 0;
  std::vector<double> values;   // n eigenvalues, ascending
  std::vector<double> vectors;  // n x n, row-major; column j is the eigenvector of values[j]
};

// a: n x n row-major; only symmetric input is meaningful (the lower triangle is mirrored from
// the upper one). Deterministic. Converges for any finite input; stops after max_sweeps sweeps.
SymmetricEigen JacobiEigen(const std::vector<double>& a, int n, int max_sweeps = 100);

}  // namespace lorahub::learn

#endif  // LORAHUB_CORE_LEARN_SYMMETRIC_EIGEN_H_

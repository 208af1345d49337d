// Seeded, platform-independent random numbers for the optimizers. The standard library's
// distributions are implementation-defined, so uniforms and normals are derived here from
// std::mt19937_64 (whose output sequence the standard fixes) to keep traces reproducible.
#ifndef LORAHUB_CORE_LEARN_RANDOM_SOURCE_H_
#define LORAHUB_CORE_LEARN_RANDOM_SOURCE_H_

#include <cmath>
#include <cstdint>
#include <random>

namespace lorahub::learn::internal {

class RandomSource {
 public:
  explicit RandomSource(uint64_t seed) : engine_(seed) {}
  // Uniform in [0, 1) with 53 random bits.
  double Uniform() { return static_cast<double>(engine_() >> 11) * 0x1.0p-53; }
  double Uniform(double lo, double hi) { return lo + (hi - lo) * Uniform(); }
  // Standard normal (Box-Muller; the second value is kept for the next call).
  double Normal() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    double u1 = 0;
    while (u1 <= 0) u1 = Uniform();
    const double u2 = Uniform();
    const double r = std::sqrt(-2.0 * std::log(u1));
    spare_ = r * std::sin(2.0 * M_PI * u2);
    has_spare_ = true;
    return r * std::cos(2.0 * M_PI * u2);
  }

 private:
  std::mt19937_64 engine_;
  bool has_spare_ = false;
  double spare_ = 0;
};

}  // namespace lorahub::learn::internal

#endif  // LORAHUB_CORE_LEARN_RANDOM_SOURCE_H_

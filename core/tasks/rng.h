// Seeded pseudo-random numbers for the synthetic tasks, identical on every
// platform.
//
// Why not <random>: std::uniform_int_distribution and friends are
// implementation-defined, so libstdc++ and libc++ give different examples for
// one seed. The generated data sets must be the same on the development
// machine, the GPU host and in CI, so the generator (xoshiro256**, seeded
// through splitmix64, both by Blackman and Vigna) and the uniform integer
// (rejection sampling) are implemented here with fixed-width arithmetic only.
//
// Thread-safety: an Rng is a plain value; use one per thread.
#ifndef LORAHUB_CORE_TASKS_RNG_H_
#define LORAHUB_CORE_TASKS_RNG_H_

#include <cstdint>
#include <string_view>
#include <utility>

namespace lorahub::tasks {

// One step of splitmix64: advances `*state` and returns the next output.
// Used to expand a 64-bit seed into xoshiro's 256-bit state.
inline uint64_t SplitMix64Next(uint64_t* state) {
  uint64_t z = (*state += 0x9E3779B97F4A7C15ULL);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// FNV-1a (64-bit) of `text`: a stable hash for deriving per-task seeds and for
// fingerprinting generated data in tests.
inline uint64_t Fnv1a64(std::string_view text,
                        uint64_t hash = 0xCBF29CE484222325ULL) {
  for (unsigned char c : text) {
    hash ^= c;
    hash *= 0x100000001B3ULL;
  }
  return hash;
}

// Combines a base seed with a purpose label ("pool/reverse_word", "test"):
// different labels give unrelated streams, and adding a task never changes the
// stream of another.
inline uint64_t DeriveSeed(uint64_t seed, std::string_view label) {
  uint64_t state = seed ^ Fnv1a64(label);
  return SplitMix64Next(&state);
}

// xoshiro256**: small, fast, statistically good, and fully specified.
class Rng {
 public:
  explicit Rng(uint64_t seed) {
    uint64_t sm = seed;
    for (uint64_t& word : s_) word = SplitMix64Next(&sm);
  }
  // Starts from an explicit state (for reference-vector tests). The state must
  // not be all zero.
  Rng(uint64_t s0, uint64_t s1, uint64_t s2, uint64_t s3)
      : s_{s0, s1, s2, s3} {}

  // Next 64 random bits.
  uint64_t Next() {
    const uint64_t result = Rotl(s_[1] * 5, 7) * 9;
    const uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = Rotl(s_[3], 45);
    return result;
  }

  // Uniform integer in [lo, hi] (both inclusive; requires lo <= hi). Unbiased:
  // draws that fall in the incomplete top bucket are rejected and redrawn.
  int64_t UniformInt(int64_t lo, int64_t hi) {
    const uint64_t span = static_cast<uint64_t>(hi) - static_cast<uint64_t>(lo);
    if (span == UINT64_MAX) return static_cast<int64_t>(Next());
    const uint64_t range = span + 1;
    const uint64_t limit =
        UINT64_MAX - (UINT64_MAX % range);  // multiple of range
    uint64_t draw = Next();
    while (draw >= limit) draw = Next();
    return static_cast<int64_t>(static_cast<uint64_t>(lo) + draw % range);
  }

  // Uniform index in [0, n) for n > 0.
  size_t Index(size_t n) {
    return static_cast<size_t>(UniformInt(0, static_cast<int64_t>(n) - 1));
  }

  // True with probability 1/2.
  bool Coin() { return (Next() >> 63) != 0; }

 private:
  static uint64_t Rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  uint64_t s_[4];
};

// Fisher-Yates shuffle driven by `rng` (std::shuffle's order is
// implementation-defined).
template <typename Container>
void Shuffle(Container* items, Rng* rng) {
  for (size_t i = items->size(); i > 1; --i) {
    const size_t j = rng->Index(i);
    using std::swap;
    swap((*items)[i - 1], (*items)[j]);
  }
}

}  // namespace lorahub::tasks

#endif  // LORAHUB_CORE_TASKS_RNG_H_

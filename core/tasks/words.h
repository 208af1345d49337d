// Fixed word lists and small helpers shared by the task generators.
//
// The lists are part of the data definition: changing them changes every
// generated data set (the determinism test pins a fingerprint). Words are
// lowercase ASCII, 3-6 letters, common enough that a small sentencepiece
// vocabulary trained on the task corpus covers them.
#ifndef LORAHUB_CORE_TASKS_WORDS_H_
#define LORAHUB_CORE_TASKS_WORDS_H_

#include <string>
#include <vector>

#include "core/tasks/rng.h"

namespace lorahub::tasks::internal {

// Common English words, none of them a palindrome, no duplicates.
const std::vector<std::string>& CommonWords();
// Real palindromic words ("level", "radar", ...).
const std::vector<std::string>& PalindromeWords();

// True for a, e, i, o, u (lowercase or uppercase); 'y' counts as a consonant.
bool IsVowel(char c);

// A uniformly drawn common word with min_len <= length <= max_len.
const std::string& PickWord(Rng& rng, size_t min_len, size_t max_len);
// `n` distinct common words (in draw order) with lengths in [min_len, max_len].
std::vector<std::string> PickDistinctWords(Rng& rng, size_t n, size_t min_len,
                                           size_t max_len);
// Joins with `sep`.
std::string Join(const std::vector<std::string>& items, const std::string& sep);

}  // namespace lorahub::tasks::internal

#endif  // LORAHUB_CORE_TASKS_WORDS_H_

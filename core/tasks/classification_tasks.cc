// Classification by rule: the input maps to one of a few fixed labels (or to
// one of the input words). Generators balance the classes so that always
// answering one label scores about 1 / (number of labels).
#include <algorithm>
#include <string>

#include "core/tasks/task_families.h"
#include "core/tasks/words.h"

namespace lorahub::tasks::internal {
namespace {

Task Make(std::string name, Split split, std::vector<std::string> templates,
          std::function<RawExample(Rng&)> generate,
          std::vector<std::string> near = {}) {
  return MakeTask(std::move(name), Family::kClassification, split,
                  std::move(templates), std::move(generate),
                  /*case_sensitive=*/false, std::move(near));
}

// A word whose letter at `pos(word)` is (or is not) a vowel.
template <typename Pos>
std::string WordWithVowelAt(Rng& rng, bool vowel, Pos pos) {
  while (true) {
    const std::string& w = PickWord(rng, 3, 6);
    if (IsVowel(w[pos(w)]) == vowel) return w;
  }
}

}  // namespace

void AddClassificationTasks(std::vector<Task>* tasks) {
  tasks->push_back(Make(
      "is_palindrome", Split::kPool,
      {"Is the word a palindrome? Answer yes or no: {input}",
       "Does this word read the same backwards? {input}",
       "Answer yes if the word is a palindrome, otherwise no. Word: {input}"},
      [](Rng& rng) {
        // Each answer comes half from real words and half from random letters
        // (random palindromes, random non-palindromes), so neither the word
        // list nor "looks random" gives the answer away.
        const bool yes = rng.Coin();
        if (rng.Coin()) {
          if (!yes) return RawExample{PickWord(rng, 3, 6), "no"};
          const auto& p = PalindromeWords();
          return RawExample{p[rng.Index(p.size())], "yes"};
        }
        const size_t len = static_cast<size_t>(rng.UniformInt(3, 6));
        while (true) {
          std::string w(len, 'a');
          for (char& c : w) c = static_cast<char>('a' + rng.UniformInt(0, 25));
          if (yes) {
            for (size_t i = 0; i < len / 2; ++i) w[len - 1 - i] = w[i];
          }
          if (yes == std::equal(w.begin(), w.end(), w.rbegin())) {
            return RawExample{w, yes ? "yes" : "no"};
          }
        }
      }));
  tasks->push_back(Make(
      "greater_than_50", Split::kPool,
      {"Is the number greater than 50? Answer yes or no: {input}",
       "Is {input} more than 50?",
       "Answer yes if the number exceeds 50, otherwise no. Number: {input}"},
      [](Rng& rng) {
        const int64_t n = rng.UniformInt(0, 100);
        return RawExample{std::to_string(n), n > 50 ? "yes" : "no"};
      }));
  tasks->push_back(Make("longer_word", Split::kPool,
                        {"Which of the two words is longer? {input}",
                         "Give the longer word: {input}",
                         "Write the word with more letters. Words: {input}"},
                        [](Rng& rng) {
                          while (true) {
                            auto w = PickDistinctWords(rng, 2, 3, 6);
                            if (w[0].size() == w[1].size()) continue;
                            return RawExample{
                                Join(w, " "),
                                w[0].size() > w[1].size() ? w[0] : w[1]};
                          }
                        }));
  tasks->push_back(Make(
      "longest_of_three", Split::kHeldOut,
      {"Which of the three words is longest? {input}",
       "Give the longest word: {input}",
       "Write the word with the most letters. Words: {input}"},
      [](Rng& rng) {
        while (true) {
          auto w = PickDistinctWords(rng, 3, 3, 6);
          auto longest =
              std::max_element(w.begin(), w.end(),
                               [](const std::string& a, const std::string& b) {
                                 return a.size() < b.size();
                               });
          const size_t ties =
              std::count_if(w.begin(), w.end(), [&](const std::string& s) {
                return s.size() == longest->size();
              });
          if (ties != 1) continue;
          return RawExample{Join(w, " "), *longest};
        }
      },
      {"longer_word", "sort_words_length"}));
  tasks->push_back(
      Make("vowel_first", Split::kPool,
           {"Does the word start with a vowel or a consonant? {input}",
            "Is the first letter of this word a vowel or a consonant? {input}",
            "Answer vowel or consonant for the first letter. Word: {input}"},
           [](Rng& rng) {
             const bool vowel = rng.Coin();
             return RawExample{
                 WordWithVowelAt(rng, vowel,
                                 [](const std::string&) { return size_t{0}; }),
                 vowel ? "vowel" : "consonant"};
           }));
  tasks->push_back(Make(
      "last_letter_vowel", Split::kHeldOut,
      {"Does the word end with a vowel or a consonant? {input}",
       "Is the last letter of this word a vowel or a consonant? {input}",
       "Answer vowel or consonant for the last letter. Word: {input}"},
      [](Rng& rng) {
        const bool vowel = rng.Coin();
        return RawExample{
            WordWithVowelAt(rng, vowel,
                            [](const std::string& w) { return w.size() - 1; }),
            vowel ? "vowel" : "consonant"};
      },
      {"vowel_first"}));
  tasks->push_back(Make(
      "contains_letter_a", Split::kBase,
      {"Does the word contain the letter a? Answer yes or no: {input}",
       "Is there an a in this word? {input}",
       "Answer yes if the word has the letter a, otherwise no. Word: {input}"},
      [](Rng& rng) {
        const bool want = rng.Coin();
        while (true) {
          const std::string& w = PickWord(rng, 3, 6);
          if ((w.find('a') != std::string::npos) == want) {
            return RawExample{w, want ? "yes" : "no"};
          }
        }
      }));
}

}  // namespace lorahub::tasks::internal

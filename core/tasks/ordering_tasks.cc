// Ordering: a list of words or a string of digits in, the same items reordered
// (or one picked by its position in an order) out.
#include <algorithm>
#include <string>

#include "core/tasks/task_families.h"
#include "core/tasks/words.h"

namespace lorahub::tasks::internal {
namespace {

Task Make(std::string name, Split split, std::vector<std::string> templates,
          std::function<RawExample(Rng&)> generate,
          std::vector<std::string> near = {}) {
  return MakeTask(std::move(name), Family::kOrdering, split,
                  std::move(templates), std::move(generate),
                  /*case_sensitive=*/false, std::move(near));
}

std::string Digits(Rng& rng) {
  const int64_t n = rng.UniformInt(4, 6);
  std::string s;
  for (int64_t i = 0; i < n; ++i)
    s += static_cast<char>('0' + rng.UniformInt(0, 9));
  return s;
}

}  // namespace

void AddOrderingTasks(std::vector<Task>* tasks) {
  tasks->push_back(Make("sort_words_alpha", Split::kPool,
                        {"Sort the words in alphabetical order: {input}",
                         "Put these words in dictionary order: {input}",
                         "Arrange the words from A to Z. Words: {input}"},
                        [](Rng& rng) {
                          auto words = PickDistinctWords(
                              rng, rng.UniformInt(3, 4), 3, 6);
                          const std::string in = Join(words, " ");
                          std::sort(words.begin(), words.end());
                          return RawExample{in, Join(words, " ")};
                        }));
  tasks->push_back(Make(
      "sort_words_length", Split::kPool,
      {"Sort the words from shortest to longest: {input}",
       "Order these words by length, shortest first: {input}",
       "Arrange the words by number of letters, fewest first. Words: {input}"},
      [](Rng& rng) {
        // Three words of distinct lengths, so the order is unique.
        while (true) {
          auto words = PickDistinctWords(rng, 3, 3, 6);
          if (words[0].size() == words[1].size() ||
              words[0].size() == words[2].size() ||
              words[1].size() == words[2].size()) {
            continue;
          }
          const std::string in = Join(words, " ");
          std::sort(words.begin(), words.end(),
                    [](const std::string& a, const std::string& b) {
                      return a.size() < b.size();
                    });
          return RawExample{in, Join(words, " ")};
        }
      }));
  tasks->push_back(Make(
      "reverse_word_order", Split::kPool,
      {"Reverse the order of the words: {input}",
       "Write these words from last to first: {input}",
       "List the words backwards, keeping each word intact. Words: {input}"},
      [](Rng& rng) {
        auto words = PickDistinctWords(rng, rng.UniformInt(3, 5), 3, 6);
        const std::string in = Join(words, " ");
        std::reverse(words.begin(), words.end());
        return RawExample{in, Join(words, " ")};
      }));
  tasks->push_back(
      Make("sort_digits", Split::kPool,
           {"Sort the digits in ascending order: {input}",
            "Arrange these digits from smallest to largest: {input}",
            "Write the digits in increasing order. Digits: {input}"},
           [](Rng& rng) {
             std::string d = Digits(rng);
             std::string out = d;
             std::sort(out.begin(), out.end());
             return RawExample{d, out};
           }));
  tasks->push_back(Make(
      "sort_digits_desc", Split::kHeldOut,
      {"Sort the digits in descending order: {input}",
       "Arrange these digits from largest to smallest: {input}",
       "Write the digits in decreasing order. Digits: {input}"},
      [](Rng& rng) {
        std::string d = Digits(rng);
        std::string out = d;
        std::sort(out.begin(), out.end(), [](char a, char b) { return a > b; });
        return RawExample{d, out};
      },
      {"sort_digits", "reverse_word_order"}));
  tasks->push_back(Make(
      "reverse_digits", Split::kBase,
      {"Reverse the digits: {input}", "Write these digits backwards: {input}",
       "Give the digits in reverse order. Digits: {input}"},
      [](Rng& rng) {
        std::string d = Digits(rng);
        return RawExample{d, std::string(d.rbegin(), d.rend())};
      }));
  tasks->push_back(Make("last_word", Split::kBase,
                        {"What is the last word in the list? {input}",
                         "Give the final word of these words: {input}",
                         "Write only the last word. Words: {input}"},
                        [](Rng& rng) {
                          auto words = PickDistinctWords(
                              rng, rng.UniformInt(3, 5), 3, 6);
                          return RawExample{Join(words, " "), words.back()};
                        }));
  tasks->push_back(
      Make("first_word_alpha", Split::kBase,
           {"Which word comes first in alphabetical order? {input}",
            "Give the word that appears first in a dictionary: {input}",
            "Write the alphabetically smallest word. Words: {input}"},
           [](Rng& rng) {
             auto words = PickDistinctWords(rng, 3, 3, 6);
             return RawExample{Join(words, " "),
                               *std::min_element(words.begin(), words.end())};
           }));
}

}  // namespace lorahub::tasks::internal

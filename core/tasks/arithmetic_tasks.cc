// Arithmetic on small non-negative integers, and statistics of short lists.
#include <algorithm>
#include <string>
#include <vector>

#include "core/tasks/task_families.h"
#include "core/tasks/words.h"

namespace lorahub::tasks::internal {
namespace {

Task Make(std::string name, Split split, std::vector<std::string> templates,
          std::function<RawExample(Rng&)> generate,
          std::vector<std::string> near = {}) {
  return MakeTask(std::move(name), Family::kArithmetic, split,
                  std::move(templates), std::move(generate),
                  /*case_sensitive=*/false, std::move(near));
}

std::string Str(int64_t v) { return std::to_string(v); }

// "a and b": the input format of every two-operand task.
std::string Pair(int64_t a, int64_t b) { return Str(a) + " and " + Str(b); }

// 3-5 distinct numbers in [0, 99], written "12, 7, 45".
std::vector<int64_t> NumberList(Rng& rng, int64_t min_count, int64_t max_count,
                                int64_t max_value) {
  const int64_t n = rng.UniformInt(min_count, max_count);
  std::vector<int64_t> v;
  while (static_cast<int64_t>(v.size()) < n) {
    const int64_t x = rng.UniformInt(0, max_value);
    if (std::find(v.begin(), v.end(), x) == v.end()) v.push_back(x);
  }
  return v;
}

std::string ListText(const std::vector<int64_t>& v) {
  std::vector<std::string> s;
  for (int64_t x : v) s.push_back(Str(x));
  return Join(s, ", ");
}

}  // namespace

void AddArithmeticTasks(std::vector<Task>* tasks) {
  tasks->push_back(
      Make("add", Split::kPool,
           {"Add the two numbers: {input}", "What is the sum of {input}?",
            "Compute the total of the numbers {input}."},
           [](Rng& rng) {
             const int64_t a = rng.UniformInt(0, 50), b = rng.UniformInt(0, 50);
             return RawExample{Pair(a, b), Str(a + b)};
           }));
  tasks->push_back(
      Make("subtract", Split::kPool,
           {"Subtract the second number from the first: {input}",
            "What is the difference of {input}?",
            "Take the second number away from the first. Numbers: {input}"},
           [](Rng& rng) {
             const int64_t a = rng.UniformInt(10, 99), b = rng.UniformInt(0, a);
             return RawExample{Pair(a, b), Str(a - b)};
           }));
  tasks->push_back(Make("double_number", Split::kPool,
                        {"Double the number: {input}", "What is twice {input}?",
                         "Multiply the number by 2. Number: {input}"},
                        [](Rng& rng) {
                          const int64_t a = rng.UniformInt(0, 50);
                          return RawExample{Str(a), Str(2 * a)};
                        }));
  tasks->push_back(
      Make("triple_number", Split::kBase,
           {"Triple the number: {input}", "What is three times {input}?",
            "Multiply the number by 3. Number: {input}"},
           [](Rng& rng) {
             const int64_t a = rng.UniformInt(0, 30);
             return RawExample{Str(a), Str(3 * a)};
           }));
  tasks->push_back(Make("add_then_double", Split::kHeldOut,
                        {"Add the two numbers, then double the result: {input}",
                         "What is twice the sum of {input}?",
                         "Compute the total of the numbers and multiply it by "
                         "2. Numbers: {input}"},
                        [](Rng& rng) {
                          const int64_t a = rng.UniformInt(0, 25),
                                        b = rng.UniformInt(0, 25);
                          return RawExample{Pair(a, b), Str(2 * (a + b))};
                        },
                        {"add", "double_number"}));
  tasks->push_back(
      Make("parity", Split::kBase,
           {"Is the number even or odd? {input}",
            "Say whether this number is even or odd: {input}",
            "Answer even or odd. Number: {input}"},
           [](Rng& rng) {
             const int64_t a = rng.UniformInt(0, 999);
             return RawExample{Str(a), a % 2 == 0 ? "even" : "odd"};
           }));
  tasks->push_back(Make("max_list", Split::kPool,
                        {"What is the largest number in the list? {input}",
                         "Give the maximum of these numbers: {input}",
                         "Write the biggest number. Numbers: {input}"},
                        [](Rng& rng) {
                          auto v = NumberList(rng, 3, 5, 99);
                          return RawExample{
                              ListText(v),
                              Str(*std::max_element(v.begin(), v.end()))};
                        }));
  tasks->push_back(Make("min_list", Split::kPool,
                        {"What is the smallest number in the list? {input}",
                         "Give the minimum of these numbers: {input}",
                         "Write the lowest number. Numbers: {input}"},
                        [](Rng& rng) {
                          auto v = NumberList(rng, 3, 5, 99);
                          return RawExample{
                              ListText(v),
                              Str(*std::min_element(v.begin(), v.end()))};
                        }));
  tasks->push_back(Make("sum_list", Split::kPool,
                        {"Add up all the numbers in the list: {input}",
                         "What is the sum of these numbers? {input}",
                         "Compute the total of the list. Numbers: {input}"},
                        [](Rng& rng) {
                          auto v = NumberList(rng, 3, 3, 20);
                          int64_t s = 0;
                          for (int64_t x : v) s += x;
                          return RawExample{ListText(v), Str(s)};
                        }));
  tasks->push_back(
      Make("range_list", Split::kHeldOut,
           {"What is the largest number minus the smallest number? {input}",
            "Give the range (maximum minus minimum) of these numbers: {input}",
            "Subtract the lowest number from the biggest. Numbers: {input}"},
           [](Rng& rng) {
             auto v = NumberList(rng, 3, 5, 99);
             const auto [lo, hi] = std::minmax_element(v.begin(), v.end());
             return RawExample{ListText(v), Str(*hi - *lo)};
           },
           {"max_list", "min_list", "subtract"}));
  tasks->push_back(Make(
      "count_items", Split::kPool,
      {"How many words are in the list? {input}", "Count the words: {input}",
       "Give the number of words. Words: {input}"},
      [](Rng& rng) {
        auto words = PickDistinctWords(rng, rng.UniformInt(2, 7), 3, 5);
        return RawExample{Join(words, " "),
                          Str(static_cast<int64_t>(words.size()))};
      }));
  tasks->push_back(Make(
      "successor", Split::kBase,
      {"What number comes after {input}?", "Add one to the number: {input}",
       "Give the next integer. Number: {input}"},
      [](Rng& rng) {
        const int64_t a = rng.UniformInt(0, 98);
        return RawExample{Str(a), Str(a + 1)};
      }));
  tasks->push_back(Make("predecessor", Split::kBase,
                        {"What number comes before {input}?",
                         "Subtract one from the number: {input}",
                         "Give the previous integer. Number: {input}"},
                        [](Rng& rng) {
                          const int64_t a = rng.UniformInt(1, 99);
                          return RawExample{Str(a), Str(a - 1)};
                        }));
  tasks->push_back(
      Make("word_length", Split::kBase,
           {"How many letters are in the word? {input}",
            "Count the letters of this word: {input}",
            "Give the length of the word. Word: {input}"},
           [](Rng& rng) {
             const std::string& w = PickWord(rng, 3, 6);
             return RawExample{w, Str(static_cast<int64_t>(w.size()))};
           }));
}

}  // namespace lorahub::tasks::internal

// Formatting: the same content written in another surface form.
#include <string>
#include <vector>

#include "core/tasks/task_families.h"
#include "core/tasks/words.h"

namespace lorahub::tasks::internal {
namespace {

Task Make(std::string name, Split split, std::vector<std::string> templates,
          std::function<RawExample(Rng&)> generate,
          std::vector<std::string> near = {}) {
  return MakeTask(std::move(name), Family::kFormatting, split,
                  std::move(templates), std::move(generate),
                  /*case_sensitive=*/false, std::move(near));
}

std::string TwoDigits(int64_t v) {
  std::string s = std::to_string(v);
  return s.size() < 2 ? "0" + s : s;
}

struct Date {
  int64_t year, month, day;
};

// Days 1-28 so every (month, day) is a valid date without a calendar.
Date RandomDate(Rng& rng) {
  Date d;
  d.year = rng.UniformInt(1990, 2030);
  d.month = rng.UniformInt(1, 12);
  d.day = rng.UniformInt(1, 28);
  return d;
}

std::string Iso(const Date& d) {
  return std::to_string(d.year) + "-" + TwoDigits(d.month) + "-" +
         TwoDigits(d.day);
}

// English numerals 0-99 with a space in compounds ("forty two"): a space keeps
// the pieces as separate words for a small sentencepiece vocabulary.
std::string NumberToWords(int64_t n) {
  static const char* const kOnes[] = {
      "zero",    "one",     "two",       "three",    "four",
      "five",    "six",     "seven",     "eight",    "nine",
      "ten",     "eleven",  "twelve",    "thirteen", "fourteen",
      "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"};
  static const char* const kTens[] = {"",       "",      "twenty", "thirty",
                                      "forty",  "fifty", "sixty",  "seventy",
                                      "eighty", "ninety"};
  if (n < 20) return kOnes[n];
  std::string out = kTens[n / 10];
  if (n % 10 != 0) out += std::string(" ") + kOnes[n % 10];
  return out;
}

}  // namespace

void AddFormattingTasks(std::vector<Task>* tasks) {
  tasks->push_back(Make("wrap_brackets", Split::kPool,
                        {"Wrap the word in square brackets: {input}",
                         "Put the word between [ and ]: {input}",
                         "Enclose this word in brackets. Word: {input}"},
                        [](Rng& rng) {
                          const std::string& w = PickWord(rng, 3, 6);
                          return RawExample{w, "[" + w + "]"};
                        }));
  tasks->push_back(Make("wrap_quotes", Split::kBase,
                        {"Wrap the word in double quotes: {input}",
                         "Put the word in quotation marks: {input}",
                         "Enclose this word in quotes. Word: {input}"},
                        [](Rng& rng) {
                          const std::string& w = PickWord(rng, 3, 6);
                          return RawExample{w, "\"" + w + "\""};
                        }));
  tasks->push_back(Make("join_dashes", Split::kPool,
                        {"Join the words with dashes: {input}",
                         "Connect these words using hyphens: {input}",
                         "Write the words joined by -. Words: {input}"},
                        [](Rng& rng) {
                          auto words = PickDistinctWords(
                              rng, rng.UniformInt(3, 4), 3, 5);
                          return RawExample{Join(words, " "), Join(words, "-")};
                        }));
  tasks->push_back(
      Make("join_commas", Split::kBase,
           {"Join the words with commas: {input}",
            "Separate these words by commas: {input}",
            "Write the words as a comma separated list. Words: {input}"},
           [](Rng& rng) {
             auto words = PickDistinctWords(rng, rng.UniformInt(3, 4), 3, 5);
             return RawExample{Join(words, " "), Join(words, ", ")};
           }));
  tasks->push_back(Make(
      "date_ymd_to_dmy", Split::kPool,
      {"Convert the date from YYYY-MM-DD to DD/MM/YYYY: {input}",
       "Rewrite this date as day/month/year: {input}",
       "Write the date in day, month, year order with slashes. Date: {input}"},
      [](Rng& rng) {
        const Date d = RandomDate(rng);
        return RawExample{Iso(d), TwoDigits(d.day) + "/" + TwoDigits(d.month) +
                                      "/" + std::to_string(d.year)};
      }));
  tasks->push_back(Make(
      "date_ymd_to_mdy", Split::kHeldOut,
      {"Convert the date from YYYY-MM-DD to MM/DD/YYYY: {input}",
       "Rewrite this date as month/day/year: {input}",
       "Write the date in month, day, year order with slashes. Date: {input}"},
      [](Rng& rng) {
        const Date d = RandomDate(rng);
        return RawExample{Iso(d), TwoDigits(d.month) + "/" + TwoDigits(d.day) +
                                      "/" + std::to_string(d.year)};
      },
      {"date_ymd_to_dmy"}));
  tasks->push_back(
      Make("number_to_words", Split::kPool,
           {"Write the number in words: {input}",
            "Spell out this number in English: {input}",
            "Give the English name of the number. Number: {input}"},
           [](Rng& rng) {
             const int64_t n = rng.UniformInt(0, 99);
             return RawExample{std::to_string(n), NumberToWords(n)};
           }));
  tasks->push_back(
      Make("words_to_number", Split::kBase,
           {"Write the number in digits: {input}",
            "Convert these English words to a number: {input}",
            "Give the number as digits. Words: {input}"},
           [](Rng& rng) {
             const int64_t n = rng.UniformInt(0, 99);
             return RawExample{NumberToWords(n), std::to_string(n)};
           }));
}

}  // namespace lorahub::tasks::internal

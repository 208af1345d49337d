// String edits: one word in, an edited word (or letter) out.
#include <algorithm>
#include <cctype>
#include <string>

#include "core/tasks/task_families.h"
#include "core/tasks/words.h"

namespace lorahub::tasks::internal {
namespace {

std::string Upper(std::string s) {
  for (char& c : s)
    c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return s;
}

std::string RotateLeft(const std::string& s, size_t k) {
  return s.substr(k) + s.substr(0, k);
}

Task Make(std::string name, Split split, std::vector<std::string> templates,
          std::function<RawExample(Rng&)> generate, bool case_sensitive = false,
          std::vector<std::string> near = {}) {
  return MakeTask(std::move(name), Family::kStringEdit, split,
                  std::move(templates), std::move(generate), case_sensitive,
                  std::move(near));
}

// Rotations use 4-6 letter words for every k, so the three rotate tasks share
// one input distribution and differ only in the rule.
std::function<RawExample(Rng&)> Rotate(size_t k) {
  return [k](Rng& rng) {
    const std::string& w = PickWord(rng, 4, 6);
    return RawExample{w, RotateLeft(w, k)};
  };
}

}  // namespace

void AddStringEditTasks(std::vector<Task>* tasks) {
  tasks->push_back(Make("reverse_word", Split::kPool,
                        {"Reverse the letters of the word: {input}",
                         "Write this word backwards: {input}",
                         "Spell the word in reverse order. Word: {input}"},
                        [](Rng& rng) {
                          std::string w = PickWord(rng, 3, 6);
                          std::string r(w.rbegin(), w.rend());
                          return RawExample{w, r};
                        }));
  tasks->push_back(Make(
      "uppercase_word", Split::kPool,
      {"Convert the word to uppercase: {input}",
       "Write this word in capital letters: {input}",
       "Make every letter upper case. Word: {input}"},
      [](Rng& rng) {
        const std::string& w = PickWord(rng, 3, 6);
        return RawExample{w, Upper(w)};
      },
      /*case_sensitive=*/true));
  tasks->push_back(Make("drop_vowels", Split::kPool,
                        {"Remove all vowels from the word: {input}",
                         "Delete the vowels in this word: {input}",
                         "Write the word without its vowels. Word: {input}"},
                        [](Rng& rng) {
                          // Redraw until the word has a vowel, so the edit is
                          // never a no-op.
                          while (true) {
                            const std::string& w = PickWord(rng, 3, 6);
                            std::string out;
                            for (char c : w) {
                              if (!IsVowel(c)) out += c;
                            }
                            if (out.size() < w.size() && !out.empty())
                              return RawExample{w, out};
                          }
                        }));
  tasks->push_back(Make("double_letters", Split::kBase,
                        {"Double each letter of the word: {input}",
                         "Write every letter of this word twice: {input}",
                         "Repeat each letter two times. Word: {input}"},
                        [](Rng& rng) {
                          const std::string& w = PickWord(rng, 3, 4);
                          std::string out;
                          for (char c : w) out.append(2, c);
                          return RawExample{w, out};
                        }));
  tasks->push_back(
      Make("swap_first_last", Split::kPool,
           {"Swap the first and last letters of the word: {input}",
            "Exchange the first letter and the last letter: {input}",
            "Switch the first and final letters. Word: {input}"},
           [](Rng& rng) {
             while (true) {
               std::string w = PickWord(rng, 3, 6);
               if (w.front() == w.back()) continue;
               std::string out = w;
               std::swap(out.front(), out.back());
               return RawExample{w, out};
             }
           }));
  tasks->push_back(
      Make("rotate_left_1", Split::kPool,
           {"Rotate the word left by 1 letter: {input}",
            "Move the first letter of the word to the end: {input}",
            "Shift the letters one place to the left, wrapping around. Word: "
            "{input}"},
           Rotate(1)));
  tasks->push_back(
      Make("rotate_left_2", Split::kPool,
           {"Rotate the word left by 2 letters: {input}",
            "Move the first two letters of the word to the end: {input}",
            "Shift the letters two places to the left, wrapping around. Word: "
            "{input}"},
           Rotate(2)));
  tasks->push_back(Make(
      "rotate_left_3", Split::kHeldOut,
      {"Rotate the word left by 3 letters: {input}",
       "Move the first three letters of the word to the end: {input}",
       "Shift the letters three places to the left, wrapping around. Word: "
       "{input}"},
      Rotate(3), /*case_sensitive=*/false, {"rotate_left_1", "rotate_left_2"}));
  tasks->push_back(Make(
      "capitalize_first", Split::kBase,
      {"Capitalize the first letter of the word: {input}",
       "Write the word with an initial capital: {input}",
       "Make only the first letter upper case. Word: {input}"},
      [](Rng& rng) {
        std::string w = PickWord(rng, 3, 6);
        std::string out = w;
        out[0] =
            static_cast<char>(std::toupper(static_cast<unsigned char>(out[0])));
        return RawExample{w, out};
      },
      /*case_sensitive=*/true));
  tasks->push_back(Make("first_letter", Split::kBase,
                        {"What is the first letter of the word? {input}",
                         "Give the first letter of this word: {input}",
                         "Write only the initial letter. Word: {input}"},
                        [](Rng& rng) {
                          const std::string& w = PickWord(rng, 3, 6);
                          return RawExample{w, w.substr(0, 1)};
                        }));
  tasks->push_back(Make("last_letter", Split::kBase,
                        {"What is the last letter of the word? {input}",
                         "Give the final letter of this word: {input}",
                         "Write only the last letter. Word: {input}"},
                        [](Rng& rng) {
                          const std::string& w = PickWord(rng, 3, 6);
                          return RawExample{w, w.substr(w.size() - 1)};
                        }));
  tasks->push_back(
      Make("reverse_uppercase", Split::kHeldOut,
           {"Reverse the word and write it in capital letters: {input}",
            "Write this word backwards in uppercase: {input}",
            "Spell the word in reverse order, all upper case. Word: {input}"},
           [](Rng& rng) {
             const std::string& w = PickWord(rng, 3, 6);
             return RawExample{w, Upper(std::string(w.rbegin(), w.rend()))};
           },
           /*case_sensitive=*/true, {"reverse_word", "uppercase_word"}));
}

}  // namespace lorahub::tasks::internal

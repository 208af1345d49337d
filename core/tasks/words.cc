#include "core/tasks/words.h"

#include <algorithm>
#include <cstdlib>

namespace lorahub::tasks::internal {
namespace {

std::vector<std::string> BuildCommonWords() {
  return {
      "apple",  "bread",  "chair",  "dog",    "earth",  "fish",   "grape",
      "house",  "ice",    "jam",    "kite",   "lemon",  "moon",   "nest",
      "ocean",  "piano",  "queen",  "river",  "stone",  "table",  "umbra",
      "voice",  "water",  "yard",   "zebra",  "cat",    "sun",    "tree",
      "bird",   "cloud",  "green",  "light",  "night",  "plant",  "smile",
      "train",  "world",  "music",  "paper",  "money",  "horse",  "mouse",
      "snake",  "tiger",  "lion",   "bear",   "wolf",   "fox",    "goat",
      "sheep",  "cow",    "pig",    "duck",   "frog",   "crab",   "shark",
      "whale",  "seal",   "owl",    "hawk",   "crow",   "swan",   "ant",
      "bee",    "moth",   "worm",   "rose",   "lily",   "tulip",  "daisy",
      "corn",   "rice",   "bean",   "pea",    "nut",    "plum",   "pear",
      "peach",  "mango",  "melon",  "berry",  "salt",   "sugar",  "honey",
      "milk",   "tea",    "juice",  "soup",   "cake",   "pie",    "egg",
      "meat",   "bowl",   "cup",    "fork",   "knife",  "spoon",  "plate",
      "glass",  "door",   "wall",   "roof",   "floor",  "room",   "bed",
      "lamp",   "desk",   "book",   "pen",    "ink",    "card",   "map",
      "flag",   "ship",   "boat",   "car",    "bus",    "road",   "path",
      "hill",   "field",  "farm",   "town",   "city",   "park",   "lake",
      "sand",   "rock",   "snow",   "rain",   "wind",   "storm",  "fire",
      "smoke",  "gold",   "iron",   "coin",   "ring",   "bell",   "drum",
      "song",   "dance",  "game",   "ball",   "bat",    "hat",    "coat",
      "shoe",   "sock",   "shirt",  "dress",  "belt",   "bag",    "box",
      "key",    "lock",   "clock",  "watch",  "phone",  "radio",  "hand",
      "foot",   "head",   "nose",   "mouth",  "tooth",  "heart",  "blood",
      "bone",   "skin",   "hair",   "face",   "arm",    "leg",    "king",
      "baby",   "child",  "man",    "woman",  "friend", "tall",   "short",
      "happy",  "quick",  "slow",   "warm",   "cold",   "soft",   "hard",
      "sweet",  "sour",   "dark",   "blue",   "red",    "black",  "white",
      "brown",  "pink",   "gray",   "young",  "old",    "new",    "big",
      "small",  "long",   "wide",   "deep",   "clean",  "jump",   "run",
      "walk",   "swim",   "sing",   "read",   "write",  "draw",   "cook",
      "sleep",  "think",  "speak",  "listen", "open",   "close",  "carry",
      "climb",  "throw",  "catch",  "build",  "paint",  "laugh",  "cry",
      "help",   "star",   "sky",    "planet", "forest", "garden", "island",
      "bridge", "tower",  "castle", "candle", "button", "pocket", "window",
      "mirror", "basket", "wagon",  "magnet", "rocket", "spider", "rabbit",
      "turtle", "parrot", "donkey", "camel",  "orange", "banana", "cherry",
      "pepper", "butter", "cookie", "dinner", "lunch",
  };
}

std::vector<std::string> BuildPalindromeWords() {
  return {"level", "radar", "civic", "kayak", "refer", "noon",  "madam",
          "rotor", "stats", "tenet", "wow",   "pop",   "dad",   "mom",
          "eye",   "did",   "nun",   "peep",  "deed",  "sees",  "solos",
          "gig",   "bob",   "pup",   "tot",   "toot",  "sagas", "racecar"};
}

}  // namespace

const std::vector<std::string>& CommonWords() {
  static const auto* const words =
      new std::vector<std::string>(BuildCommonWords());
  return *words;
}

const std::vector<std::string>& PalindromeWords() {
  static const auto* const words =
      new std::vector<std::string>(BuildPalindromeWords());
  return *words;
}

bool IsVowel(char c) {
  switch (c) {
    case 'a':
    case 'e':
    case 'i':
    case 'o':
    case 'u':
    case 'A':
    case 'E':
    case 'I':
    case 'O':
    case 'U':
      return true;
    default:
      return false;
  }
}

const std::string& PickWord(Rng& rng, size_t min_len, size_t max_len) {
  // Filtering per length range once keeps draws uniform over eligible words.
  const auto& words = CommonWords();
  std::vector<const std::string*> eligible;
  for (const auto& w : words) {
    if (w.size() >= min_len && w.size() <= max_len) eligible.push_back(&w);
  }
  if (eligible.empty()) std::abort();  // programmer error in a generator
  return *eligible[rng.Index(eligible.size())];
}

std::vector<std::string> PickDistinctWords(Rng& rng, size_t n, size_t min_len,
                                           size_t max_len) {
  std::vector<std::string> out;
  while (out.size() < n) {
    const std::string& w = PickWord(rng, min_len, max_len);
    if (std::find(out.begin(), out.end(), w) == out.end()) out.push_back(w);
  }
  return out;
}

std::string Join(const std::vector<std::string>& items,
                 const std::string& sep) {
  std::string out;
  for (size_t i = 0; i < items.size(); ++i) {
    if (i > 0) out += sep;
    out += items[i];
  }
  return out;
}

}  // namespace lorahub::tasks::internal

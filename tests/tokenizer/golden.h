// Reads tests/testdata/spm/golden.tsv (written by make_spm.sh from
// spm_encode/spm_decode) for the tokenizer tests.
#ifndef LORAHUB_TESTS_TOKENIZER_GOLDEN_H_
#define LORAHUB_TESTS_TOKENIZER_GOLDEN_H_

#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace lorahub::tokenizer::testing {

inline constexpr char kModelPath[] = "tests/testdata/spm/spiece.model";
inline constexpr char kGoldenPath[] = "tests/testdata/spm/golden.tsv";
// The model is trained with --vocab_size=400 (make_spm.sh).
inline constexpr int kPieceSize = 400;

struct GoldenLine {
  std::string text;
  std::vector<int> ids;  // spm_encode --output_format=id, no eos
  std::string decoded;   // spm_decode of those ids
};

inline std::vector<GoldenLine> ReadGolden() {
  std::vector<GoldenLine> lines;
  std::ifstream in(kGoldenPath);
  std::string line;
  while (std::getline(in, line)) {
    GoldenLine golden;
    size_t tab1 = line.find('\t');
    size_t tab2 = line.find('\t', tab1 + 1);
    golden.text = line.substr(0, tab1);
    std::istringstream ids(line.substr(tab1 + 1, tab2 - tab1 - 1));
    for (int id; ids >> id;) golden.ids.push_back(id);
    golden.decoded = line.substr(tab2 + 1);
    lines.push_back(golden);
  }
  return lines;
}

inline const GoldenLine* FindGolden(const std::vector<GoldenLine>& lines,
                                    const std::string& text) {
  for (const GoldenLine& line : lines) {
    if (line.text == text) return &line;
  }
  return nullptr;
}

}  // namespace lorahub::tokenizer::testing

#endif  // LORAHUB_TESTS_TOKENIZER_GOLDEN_H_

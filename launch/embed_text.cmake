# Turns a text file into a C++ source defining `const char* const <SYMBOL>` and `<SYMBOL>_size`
# (used for the tokenizer corpus of the built-in tiny model).
# Invoked as: cmake -DIN=... -DOUT=... -DSYMBOL=... -P embed_text.cmake
file(READ "${IN}" hex HEX)
string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1," bytes "${hex}")
string(REGEX REPLACE "((0x..,){24})" "\\1\n" bytes "${bytes}")
file(WRITE "${OUT}" "// Generated from ${IN}; do not edit.\n#include <cstddef>\n"
     "static const unsigned char kData[] = {\n${bytes}0x00};\n"
     "extern const char* const ${SYMBOL};\nextern const size_t ${SYMBOL}_size;\n"
     "const char* const ${SYMBOL} = reinterpret_cast<const char*>(kData);\n"
     "const size_t ${SYMBOL}_size = sizeof(kData) - 1;\n")

# Turns a text file into a C++ source defining `const char <SYMBOL>[]` (used for the tokenizer
# corpus of the built-in tiny model). Invoked as: cmake -DIN=... -DOUT=... -DSYMBOL=... -P this.
file(READ "${IN}" hex HEX)
string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1," bytes "${hex}")
string(REGEX REPLACE "((0x..,){24})" "\\1\n" bytes "${bytes}")
file(WRITE "${OUT}" "// Generated from ${IN}; do not edit.\n#include <cstddef>\n"
     "extern const char ${SYMBOL}[];\nextern const size_t ${SYMBOL}_size;\n"
     "const char ${SYMBOL}[] = {\n${bytes}0x00};\n"
     "const size_t ${SYMBOL}_size = sizeof(${SYMBOL}) - 1;\n")

# cmake -DIN=kernel.cu -DOUT=kernel.cc -P cu_to_cc.cmake
# Rewrites a kernel source for the CUDA emulator: each `kernel<<<config>>>(` becomes
# `::sy::emu::launcher("kernel", kernel, config)(`. Lines are kept, so diagnostics point at the
# .cu file's lines (a #line directive names it).
file(READ "${IN}" text)
string(REPLACE ">>>" "@SY_EMU_END@" text "${text}")
string(REGEX REPLACE "([A-Za-z_][A-Za-z0-9_:]*(<[^<>;@]*>)?)<<<([^@;]*)@SY_EMU_END@\\("
                     "::sy::emu::launcher(\"\\1\", \\1, \\3)(" text "${text}")
if(text MATCHES "<<<|@SY_EMU_END@")
  message(FATAL_ERROR "cu_to_cc: a kernel launch in ${IN} has a form this script does not "
                      "rewrite (kernel<<<grid, block, shared, stream>>>(args) on one line)")
endif()
file(WRITE "${OUT}.tmp" "#line 1 \"${IN}\"\n${text}")
file(COPY_FILE "${OUT}.tmp" "${OUT}" ONLY_IF_DIFFERENT)
file(REMOVE "${OUT}.tmp")

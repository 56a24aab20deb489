// What the safetensors reader and writer share: file names, messages and the checked size of a
// tensor. Internal to runtime/formats.
#pragma once

#include <cstdint>
#include <string>
#include <system_error>
#include <vector>

#include "kernels/tensor.h"

namespace sy::safetensors_detail {

inline constexpr const char* kSingleFileName = "model.safetensors";
inline constexpr const char* kIndexFileName = "model.safetensors.index.json";

std::string errno_text(int err);
std::string shape_str(const std::vector<int64_t>& shape);
bool is_float_dtype(DType dtype);
// Bytes of a tensor of `shape` with `elem_bytes`-byte elements. False when a dimension is negative
// or when the product of the non-zero dimensions times elem_bytes overflows int64; checking the
// non-zero product (rather than stopping at a zero) means no partial product of an accepted shape
// can overflow either, whatever order a reader multiplies the dimensions in.
bool checked_bytes(const std::vector<int64_t>& shape, size_t elem_bytes, uint64_t* bytes);

}  // namespace sy::safetensors_detail

// KV-cache blocks and the prefix cache (see kv_blocks.h).
#include "runtime/engine/kv_blocks.h"

#include <algorithm>

#include "kernels/error.h"

namespace sy {

BlockAllocator::BlockAllocator(int64_t n_blocks, int64_t block_size)
    : n_total_(n_blocks), block_size_(block_size) {
  SY_CHECK(n_blocks >= 0 && n_blocks <= INT32_MAX, "BlockAllocator: ", n_blocks, " blocks");
  SY_CHECK(block_size >= 0, "BlockAllocator: block size ", block_size);
  const size_t n = static_cast<size_t>(n_blocks);
  free_.reserve(n);
  for (int64_t b = n_blocks - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
  refs_.assign(n, 0);
  releasing_.assign(n, 0);
  if (!prefix_caching()) return;
  recorded_.assign(n, 0);
  key_.assign(n, 0);
  parent_.assign(n, kNone);
  parent_gen_.assign(n, 0);
  gen_.assign(n, 0);
  tokens_.assign(n * static_cast<size_t>(block_size), 0);
  prev_.assign(n, kNone);
  next_.assign(n, kNone);
  index_.reserve(n);
}

uint64_t BlockAllocator::key(int32_t parent, const int32_t* tokens) const {
  // splitmix64 over (parent, parent's generation, tokens): the index's key. A match is then
  // checked in full (holds()), so a collision costs a miss, never a wrong block.
  auto mix = [](uint64_t h, uint64_t v) {
    h ^= v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
    h ^= h >> 30;
    h *= 0xbf58476d1ce4e5b9ull;
    h ^= h >> 27;
    h *= 0x94d049bb133111ebull;
    return h ^ (h >> 31);
  };
  uint64_t h = mix(0, static_cast<uint32_t>(parent));
  h = mix(h, parent == kNone ? 0 : gen_[static_cast<size_t>(parent)]);
  for (int64_t i = 0; i < block_size_; ++i) h = mix(h, static_cast<uint32_t>(tokens[i]));
  return h;
}

bool BlockAllocator::holds(int32_t block, int32_t parent, const int32_t* tokens) const {
  const size_t b = static_cast<size_t>(block);
  if (!recorded_[b] || parent_[b] != parent) return false;
  if (parent != kNone && parent_gen_[b] != gen_[static_cast<size_t>(parent)]) return false;
  return std::equal(tokens, tokens + block_size_,
                    tokens_.begin() + static_cast<std::ptrdiff_t>(b * block_size_));
}

void BlockAllocator::unlink(int32_t block) {
  const size_t b = static_cast<size_t>(block);
  if (prev_[b] != kNone)
    next_[static_cast<size_t>(prev_[b])] = next_[b];
  else
    head_ = next_[b];
  if (next_[b] != kNone)
    prev_[static_cast<size_t>(next_[b])] = prev_[b];
  else
    tail_ = prev_[b];
  prev_[b] = next_[b] = kNone;
  --n_cached_;
}

void BlockAllocator::forget(int32_t block) {
  const size_t b = static_cast<size_t>(block);
  auto it = index_.find(key_[b]);
  if (it != index_.end() && it->second == block) index_.erase(it);
  recorded_[b] = 0;
  // Blocks recorded with this one as their parent no longer match: their parent's generation
  // has moved on.
  ++gen_[b];
}

bool BlockAllocator::allocate(int64_t n, std::vector<int32_t>& table) {
  if (n > n_free()) return false;
  for (int64_t i = 0; i < n; ++i) {
    int32_t b;
    if (!free_.empty()) {
      b = free_.back();
      free_.pop_back();
    } else {  // the least recently released cached block
      b = head_;
      unlink(b);
      forget(b);
    }
    refs_[static_cast<size_t>(b)] = 1;
    table.push_back(b);
  }
  return true;
}

void BlockAllocator::release(std::vector<int32_t>& table) {
  release(table, 0, static_cast<int64_t>(table.size()));
  table.clear();
}

void BlockAllocator::release(const std::vector<int32_t>& table, int64_t from, int64_t to) {
  SY_CHECK(from >= 0 && from <= to && to <= static_cast<int64_t>(table.size()),
           "BlockAllocator::release: blocks [", from, ", ", to, ") of a table of ", table.size());
  // Checked first, so that a block not held, or released more times than it is held (twice in
  // a range that holds it once), changes nothing.
  bool held = true;
  int32_t bad = kNone;
  for (int64_t i = from; i < to && held; ++i) {
    bad = table[static_cast<size_t>(i)];
    held = bad >= 0 && bad < n_total_ &&
           ++releasing_[static_cast<size_t>(bad)] <= refs_[static_cast<size_t>(bad)];
  }
  for (int64_t i = from; i < to; ++i) {
    const int32_t block = table[static_cast<size_t>(i)];
    if (block >= 0 && block < n_total_) releasing_[static_cast<size_t>(block)] = 0;
  }
  SY_CHECK(held, "BlockAllocator: block ", bad,
           bad >= 0 && bad < n_total_ && refs_[static_cast<size_t>(bad)] > 0
               ? " released more times than it is held"
               : " released but not held");
  // Last block first: of one table, the blocks furthest into the sequence are reused first,
  // so a cached prefix shortens from its end.
  for (int64_t i = to - 1; i >= from; --i) {
    const int32_t block = table[static_cast<size_t>(i)];
    const size_t b = static_cast<size_t>(block);
    if (--refs_[b] > 0) continue;
    if (prefix_caching() && recorded_[b]) {
      prev_[b] = tail_;
      next_[b] = kNone;
      if (tail_ != kNone)
        next_[static_cast<size_t>(tail_)] = block;
      else
        head_ = block;
      tail_ = block;
      ++n_cached_;
    } else {
      free_.push_back(block);
    }
  }
}

int64_t BlockAllocator::match(const int32_t* tokens, int64_t max_blocks,
                              std::vector<int32_t>& table) {
  SY_CHECK(table.empty(), "BlockAllocator::match: the table already holds blocks");
  if (!prefix_caching()) return 0;
  int32_t parent = kNone;
  for (int64_t i = 0; i < max_blocks; ++i) {
    const int32_t* t = tokens + i * block_size_;
    auto it = index_.find(key(parent, t));
    if (it == index_.end() || !holds(it->second, parent, t)) break;
    const int32_t block = it->second;
    if (refs_[static_cast<size_t>(block)]++ == 0) unlink(block);
    table.push_back(block);
    parent = block;
  }
  return static_cast<int64_t>(table.size());
}

int64_t BlockAllocator::commit(const std::vector<int32_t>& table, const int32_t* tokens,
                               int64_t first, int64_t n_full) {
  if (!prefix_caching()) return 0;
  SY_CHECK(first >= 0 && first <= n_full && n_full <= static_cast<int64_t>(table.size()),
           "BlockAllocator::commit: blocks [", first, ", ", n_full, ") of a table of ",
           table.size());
  for (int64_t i = first; i < n_full; ++i) {
    const int32_t block = table[static_cast<size_t>(i)];
    const size_t b = static_cast<size_t>(block);
    const int32_t parent = i == 0 ? kNone : table[static_cast<size_t>(i - 1)];
    const int32_t* t = tokens + i * block_size_;
    if (recorded_[b]) {  // matched: recorded already, with this parent
      SY_CHECK(holds(block, parent, t), "BlockAllocator::commit: block ", block,
               " is recorded with other content");
      continue;
    }
    const uint64_t k = key(parent, t);
    const bool inserted = index_.try_emplace(k, block).second;
    // The same content in another block (or, rarely, other content under the same key): this
    // block and those after it stay unrecorded, and are freed as usual.
    if (!inserted) return i;
    recorded_[b] = 1;
    key_[b] = k;
    parent_[b] = parent;
    parent_gen_[b] = parent == kNone ? 0 : gen_[static_cast<size_t>(parent)];
    std::copy(t, t + block_size_, tokens_.begin() + static_cast<std::ptrdiff_t>(b * block_size_));
  }
  return n_full;
}

}  // namespace sy

// KV-cache blocks and the prefix cache, owned by the scheduler on rank 0. Every rank sees the
// same block ids: the step plan carries the block tables.
//
// A block is in use (held by one or more sequences' tables, counted), free, or cached: no
// sequence holds it, but it keeps the keys and values of a known run of tokens, and a request
// whose tokens begin with that run takes it back instead of recomputing it. When no free block
// is left, allocate() reuses cached blocks, least recently released first (and of one table,
// its last blocks first).
//
// With prefix caching (block_size > 0), commit() records a full block once its keys and values
// are written: its tokens, and the block before it in the table (its parent) with the parent's
// generation, which changes every time a block is reused for other content. match() follows a
// prompt block by block from the first and takes a block only when its tokens, its parent and
// the parent's generation are all equal: a hit is exact, never a hash alone. Only full blocks
// are shared, and a sequence writes only past the blocks it matched, so a shared block is never
// written.
#pragma once

#include <cstdint>
#include <unordered_map>
#include <vector>

namespace sy {

class BlockAllocator {
 public:
  // `n_blocks` blocks; prefix caching of full blocks of `block_size` tokens when it is > 0.
  explicit BlockAllocator(int64_t n_blocks, int64_t block_size = 0);

  // Appends `n` blocks to `table` (free ones first, then the least recently released cached
  // ones, which are forgotten); false, and nothing taken, when fewer than `n` are available.
  bool allocate(int64_t n, std::vector<int32_t>& table);
  // Gives back every block of `table` and clears it. A recorded block no longer held becomes
  // cached; any other becomes free.
  void release(std::vector<int32_t>& table);
  // Gives back table[from, to), last first, and leaves the table as it is: its caller no longer
  // counts those entries as held (blocks that slid out of a sequence's attention window).
  void release(const std::vector<int32_t>& table, int64_t from, int64_t to);

  // Appends to the empty `table` the cached or in-use blocks that hold tokens[0, n * block_size)
  // for the largest n <= max_blocks whose blocks are all recorded, and holds them. Returns n
  // (0 without prefix caching).
  int64_t match(const int32_t* tokens, int64_t max_blocks, std::vector<int32_t>& table);
  // Records table[first, n_full) as holding tokens[i * block_size, (i + 1) * block_size) each,
  // after their keys and values are written; table[0, first) must be recorded already. Returns
  // how many leading blocks of the table are recorded now: it stops early at a block whose
  // content another block already holds (two sequences computed the same prefix at once).
  int64_t commit(const std::vector<int32_t>& table, const int32_t* tokens, int64_t first,
                 int64_t n_full);

  int64_t n_free() const { return static_cast<int64_t>(free_.size()) + n_cached_; }  // available
  int64_t n_cached() const { return n_cached_; }  // recorded and held by no table
  int64_t n_total() const { return n_total_; }
  bool prefix_caching() const { return block_size_ > 0; }

 private:
  static constexpr int32_t kNone = -1;
  uint64_t key(int32_t parent, const int32_t* tokens) const;
  bool holds(int32_t block, int32_t parent, const int32_t* tokens) const;
  void unlink(int32_t block);  // out of the cached list
  void forget(int32_t block);  // no longer recorded: out of the index, next generation

  int64_t n_total_;
  int64_t block_size_;
  std::vector<int32_t> free_;       // held by no table, recorded content none
  std::vector<int32_t> refs_;       // tables holding each block
  std::vector<int32_t> releasing_;  // release's count of each block in its range; 0 between calls
  // Per block: recorded or not, its key, its parent and the parent's generation when recorded,
  // its own generation, and its tokens [n_total, block_size].
  std::vector<uint8_t> recorded_;
  std::vector<uint64_t> key_;
  std::vector<int32_t> parent_;
  std::vector<uint32_t> parent_gen_;
  std::vector<uint32_t> gen_;
  std::vector<int32_t> tokens_;
  std::unordered_map<uint64_t, int32_t> index_;  // key -> recorded block
  // Cached blocks as a doubly linked list, least recently released at the head.
  std::vector<int32_t> prev_, next_;
  int32_t head_ = kNone, tail_ = kNone;
  int64_t n_cached_ = 0;
};

}  // namespace sy

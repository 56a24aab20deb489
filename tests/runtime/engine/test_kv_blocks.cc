// KV blocks and the prefix cache: blocks are handed out all or nothing, recorded full blocks are
// found again by their tokens and their place in the chain, shared while in use, reused least
// recently released first (a cached prefix shortens from its end), and never recorded twice.
#include <gtest/gtest.h>

#include <numeric>

#include "kernels/error.h"
#include "runtime/engine/kv_blocks.h"

namespace sy {
namespace {

constexpr int64_t B = 4;

std::vector<int32_t> tokens_of(std::initializer_list<int32_t> block_firsts) {
  // Each block [f, f + 1, f + 2, f + 3].
  std::vector<int32_t> t;
  for (int32_t f : block_firsts)
    for (int32_t i = 0; i < B; ++i) t.push_back(f + i);
  return t;
}

// Allocates and records blocks for all of `tokens` (whole blocks), as after a prefill.
std::vector<int32_t> computed(BlockAllocator& a, const std::vector<int32_t>& tokens) {
  std::vector<int32_t> table;
  const int64_t n = static_cast<int64_t>(tokens.size()) / B;
  EXPECT_TRUE(a.allocate(n, table));
  EXPECT_EQ(a.commit(table, tokens.data(), 0, n), n);
  return table;
}

TEST(BlockAllocator, WithoutPrefixCachingBlocksAreOnlyHandedOutAndBack) {
  BlockAllocator a(6);
  EXPECT_FALSE(a.prefix_caching());
  std::vector<int32_t> t1, t2;
  EXPECT_TRUE(a.allocate(4, t1));
  EXPECT_FALSE(a.allocate(3, t2));  // all or nothing
  EXPECT_TRUE(t2.empty());
  EXPECT_EQ(a.n_free(), 2);
  const std::vector<int32_t> tokens = tokens_of({10, 20, 30, 40});
  EXPECT_EQ(a.commit(t1, tokens.data(), 0, 4), 0);
  a.release(t1);
  EXPECT_TRUE(t1.empty());
  EXPECT_EQ(a.n_free(), 6);
  EXPECT_EQ(a.n_cached(), 0);
  EXPECT_EQ(a.match(tokens.data(), 4, t2), 0);
  EXPECT_TRUE(t2.empty());
}

TEST(BlockAllocator, ReleasedBlocksAreFoundAgainByTheirTokens) {
  BlockAllocator a(8, B);
  const std::vector<int32_t> tokens = tokens_of({10, 20, 30});
  std::vector<int32_t> first = computed(a, tokens);
  const std::vector<int32_t> blocks = first;
  a.release(first);
  EXPECT_EQ(a.n_free(), 8);  // cached blocks are available
  EXPECT_EQ(a.n_cached(), 3);

  std::vector<int32_t> again;
  EXPECT_EQ(a.match(tokens.data(), 3, again), 3);
  EXPECT_EQ(again, blocks);
  EXPECT_EQ(a.n_cached(), 0);
  EXPECT_EQ(a.n_free(), 5);
  a.release(again);

  // At most max_blocks, and only up to the first block that differs.
  std::vector<int32_t> some;
  EXPECT_EQ(a.match(tokens.data(), 2, some), 2);
  a.release(some);
  const std::vector<int32_t> other = tokens_of({10, 20, 99});
  EXPECT_EQ(a.match(other.data(), 3, some), 2);
  EXPECT_EQ(some, std::vector<int32_t>(blocks.begin(), blocks.begin() + 2));
  a.release(some);
  const std::vector<int32_t> one_off = {10, 11, 12, 14};
  EXPECT_EQ(a.match(one_off.data(), 1, some), 0);
  EXPECT_THROW(a.match(tokens.data(), 1, (some = {0})), Error);  // the table must be empty
}

TEST(BlockAllocator, ABlockMatchesOnlyAfterTheSameBlocks) {
  BlockAllocator a(8, B);
  std::vector<int32_t> x = computed(a, tokens_of({10, 20}));
  const std::vector<int32_t> x_blocks = x;
  a.release(x);
  // The same second block after another first one is another block.
  std::vector<int32_t> t;
  const std::vector<int32_t> other_first = tokens_of({50, 20});
  EXPECT_EQ(a.match(other_first.data(), 2, t), 0);
  std::vector<int32_t> y = computed(a, other_first);
  const std::vector<int32_t> y_blocks = y;
  a.release(y);
  const std::vector<int32_t> second_only = tokens_of({20});
  EXPECT_EQ(a.match(second_only.data(), 1, t), 0);  // a second block is not a first
  EXPECT_EQ(a.match(tokens_of({10, 20}).data(), 2, t), 2);
  EXPECT_EQ(t, x_blocks);
  a.release(t);
  EXPECT_EQ(a.match(other_first.data(), 2, t), 2);
  EXPECT_EQ(t, y_blocks);
  EXPECT_NE(x_blocks[1], y_blocks[1]);
  a.release(t);
}

TEST(BlockAllocator, BlocksInUseAreSharedAndCachedOnceNoTableHoldsThem) {
  BlockAllocator a(6, B);
  const std::vector<int32_t> tokens = tokens_of({10, 20, 30});
  std::vector<int32_t> owner = computed(a, tokens);
  std::vector<int32_t> sharer;
  EXPECT_EQ(a.match(tokens.data(), 2, sharer), 2);  // while the owner still runs
  EXPECT_EQ(a.n_free(), 3);                         // sharing takes nothing more
  // The sharer goes on in a block of its own, and records it.
  ASSERT_TRUE(a.allocate(1, sharer));
  const std::vector<int32_t> longer = tokens_of({10, 20, 77});
  EXPECT_EQ(a.commit(sharer, longer.data(), 2, 3), 3);
  EXPECT_EQ(a.n_free(), 2);
  a.release(owner);
  EXPECT_EQ(a.n_cached(), 1);  // the owner's third block; the first two are still held
  a.release(sharer);
  EXPECT_EQ(a.n_cached(), 4);
  EXPECT_EQ(a.n_free(), 6);
  std::vector<int32_t> t;
  EXPECT_EQ(a.match(longer.data(), 3, t), 3);
  a.release(t);
  EXPECT_EQ(a.match(tokens.data(), 3, t), 3);
  a.release(t);
  EXPECT_THROW(a.release((t = {2})), Error);  // not held
}

// A release that would give back a block not held, or one more times than it is held, is
// refused whole: nothing of the range goes back.
TEST(BlockAllocator, AReleaseOfBlocksNotHeldChangesNothing) {
  for (int64_t block_size : {int64_t{0}, B}) {
    BlockAllocator a(6, block_size);
    std::vector<int32_t> t;
    ASSERT_TRUE(a.allocate(3, t));  // blocks 0, 1, 2
    const std::vector<int32_t> twice = {t[0], t[1], t[1]};
    try {
      a.release(twice, 0, 3);
      ADD_FAILURE() << "a block released twice";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("released more times than it is held"),
                std::string::npos)
          << e.what();
    }
    const std::vector<int32_t> unheld = {t[2], 5};
    EXPECT_THROW(a.release(unheld, 0, 2), Error);
    const std::vector<int32_t> outside = {t[0], 6};
    EXPECT_THROW(a.release(outside, 0, 2), Error);
    EXPECT_EQ(a.n_free(), 3) << "block size " << block_size;
    // Still held, each once: they go back, and only then are they not held.
    a.release(t);
    EXPECT_EQ(a.n_free(), 6);
    std::vector<int32_t> again = twice;
    EXPECT_THROW(a.release(again), Error);
  }
}

TEST(BlockAllocator, FreeBlocksGoFirstThenTheLeastRecentlyReleasedFromTheirEnd) {
  BlockAllocator a(6, B);
  const std::vector<int32_t> old_tokens = tokens_of({10, 20, 30});
  const std::vector<int32_t> new_tokens = tokens_of({40, 50});
  std::vector<int32_t> old_seq = computed(a, old_tokens);
  std::vector<int32_t> new_seq = computed(a, new_tokens);
  a.release(old_seq);
  a.release(new_seq);
  std::vector<int32_t> t;
  ASSERT_TRUE(a.allocate(1, t));  // the one never-used block
  EXPECT_EQ(a.n_cached(), 5);
  ASSERT_TRUE(a.allocate(1, t));  // the older sequence's last block
  EXPECT_EQ(a.n_cached(), 4);
  std::vector<int32_t> m;
  EXPECT_EQ(a.match(old_tokens.data(), 3, m), 2);
  a.release(m);  // now the most recent: the newer sequence's blocks go next
  ASSERT_TRUE(a.allocate(2, t));
  EXPECT_EQ(a.match(new_tokens.data(), 2, m), 0);
  EXPECT_EQ(a.match(old_tokens.data(), 3, m), 2);
  a.release(m);
  EXPECT_FALSE(a.allocate(3, t));  // two available
  EXPECT_EQ(t.size(), 4u);
  a.release(t);
}

TEST(BlockAllocator, TheSameContentIsRecordedOnce) {
  BlockAllocator a(8, B);
  const std::vector<int32_t> tokens = tokens_of({10, 20});
  std::vector<int32_t> first = computed(a, tokens);
  // A second sequence that computed the same prompt in the same step, in blocks of its own.
  std::vector<int32_t> second;
  ASSERT_TRUE(a.allocate(2, second));
  EXPECT_EQ(a.commit(second, tokens.data(), 0, 2), 0);
  a.release(second);
  EXPECT_EQ(a.n_cached(), 0);  // its blocks are plain free blocks
  a.release(first);
  EXPECT_EQ(a.n_cached(), 2);
  // A matched chain extends with commit from where the match ended; committing from the start
  // again checks the matched blocks and changes nothing.
  std::vector<int32_t> t;
  EXPECT_EQ(a.match(tokens.data(), 2, t), 2);
  ASSERT_TRUE(a.allocate(1, t));
  const std::vector<int32_t> longer = tokens_of({10, 20, 30});
  EXPECT_EQ(a.commit(t, longer.data(), 2, 3), 3);
  EXPECT_EQ(a.commit(t, longer.data(), 0, 3), 3);
  const std::vector<int32_t> other = tokens_of({10, 21, 30});
  try {
    a.commit(t, other.data(), 0, 3);
    ADD_FAILURE() << "a recorded block committed with other tokens";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("is recorded with other content"), std::string::npos)
        << e.what();
  }
  EXPECT_THROW(a.commit(t, longer.data(), 0, 4), Error);  // past the table
  EXPECT_THROW(a.commit(t, longer.data(), 3, 2), Error);
  a.release(t);
  EXPECT_EQ(a.n_cached(), 3);
  EXPECT_EQ(a.match(longer.data(), 3, t), 3);
  a.release(t);
}

// A released table whose last block is reused for other content keeps its first blocks: a
// chain that went through the reused block no longer matches past it.
TEST(BlockAllocator, AReusedBlockEndsTheChainsThroughIt) {
  BlockAllocator a(3, B);
  const std::vector<int32_t> tokens = tokens_of({10, 20, 30});
  std::vector<int32_t> x = computed(a, tokens);
  const std::vector<int32_t> x_blocks = x;
  a.release(x);
  std::vector<int32_t> y;
  ASSERT_TRUE(a.allocate(1, y));  // the least recently released: x's last block
  EXPECT_EQ(y[0], x_blocks[2]);
  const std::vector<int32_t> other = tokens_of({70});
  EXPECT_EQ(a.commit(y, other.data(), 0, 1), 1);
  std::vector<int32_t> t;
  EXPECT_EQ(a.match(tokens.data(), 3, t), 2);
  EXPECT_EQ(t, std::vector<int32_t>(x_blocks.begin(), x_blocks.begin() + 2));
  a.release(y);
  EXPECT_EQ(a.n_cached(), 1);  // y's block, recorded as a first block
  std::vector<int32_t> u;
  EXPECT_EQ(a.match(other.data(), 1, u), 1);
  a.release(u);
  // The chain grows back: the third block, computed again in the one block left (y's, which is
  // forgotten), is recorded after the second.
  ASSERT_TRUE(a.allocate(1, t));
  EXPECT_EQ(a.commit(t, tokens.data(), 2, 3), 3);
  a.release(t);
  EXPECT_EQ(a.match(other.data(), 1, t), 0);
  EXPECT_EQ(a.match(tokens.data(), 3, t), 3);
  a.release(t);
  EXPECT_EQ(a.n_cached(), 3);
}

// Part of a table goes back while the rest is held (blocks that left a sliding window): the
// range is checked before anything changes, and a parent reused while its children are still
// recorded ends their chain even when it is recorded again with the same tokens (its
// generation moved on).
TEST(BlockAllocator, ARangeGoesBackAndAReusedParentEndsItsChildren) {
  BlockAllocator a(3, B);
  const std::vector<int32_t> tokens = tokens_of({10, 20, 30});
  std::vector<int32_t> x = computed(a, tokens);
  const std::vector<int32_t> x_blocks = x;
  EXPECT_THROW(a.release(x, 1, 4), Error);
  EXPECT_THROW(a.release(x, 2, 1), Error);
  a.release(x, 0, 1);
  EXPECT_EQ(x, x_blocks);  // the table is left as it is
  EXPECT_EQ(a.n_cached(), 1);
  EXPECT_THROW(a.release(x, 0, 2), Error);  // x[0] is no longer held: nothing changes
  EXPECT_EQ(a.n_cached(), 1);
  EXPECT_EQ(a.n_free(), 1);
  // The first block is reused and records the same first tokens again.
  std::vector<int32_t> y;
  ASSERT_TRUE(a.allocate(1, y));
  EXPECT_EQ(y[0], x_blocks[0]);
  EXPECT_EQ(a.commit(y, tokens.data(), 0, 1), 1);
  a.release(x, 1, 3);
  a.release(y);
  EXPECT_EQ(a.n_cached(), 3);
  std::vector<int32_t> t;
  EXPECT_EQ(a.match(tokens.data(), 3, t), 1);  // the old second block named the old first
  EXPECT_EQ(t[0], x_blocks[0]);
  a.release(t);
}

}  // namespace
}  // namespace sy

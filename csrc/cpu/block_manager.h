// Paged KV cache bookkeeping: which physical blocks hold each sequence's tokens.
// Plain C++17, no torch (csrc/block_manager_bindings.cpp exposes it as engine.BlockManager).
//
// Rules (engine/inference/block_model.py is the Python oracle of the same rules):
//  - A pool of `num_blocks` blocks of `block_size` token slots; each block has a reference
//    count (the sequences whose table holds it).
//  - Free blocks sit in one FIFO queue. Allocation pops the front; a freed block (count 0)
//    goes to the back. A freed *full* block keeps its content hash while it waits, so a
//    later request with the same prefix takes it back out of the queue (prefix caching);
//    it is forgotten only when allocation reaches it (least recently freed goes first).
//  - Full, computed blocks are registered under a chained hash of (parent hash, tokens):
//    equal hashes mean equal prefixes, and tokens plus parent hash are compared on a hit,
//    so a collision can only miss, never alias.
//  - fork() shares every block (n samples of one prompt; CFG rows with a common prefix).
//  - Appending to a shared, partly filled last block copies it first (copy-on-write); the
//    caller copies the KV rows of (src -> dst), since this class never touches KV data.
//  - Nothing changes state when the pool cannot serve a request: add_sequence returns -1
//    and append_token a slot of -1, so the scheduler can preempt and retry.
#pragma once

#include <cstdint>
#include <unordered_map>
#include <vector>

namespace engine {
namespace cpu {

struct AppendResult {
  int64_t slot;     // block * block_size + offset of the new token; -1: out of blocks
  int64_t cow_src;  // block whose first (slot % block_size) rows must be copied, or -1
  int64_t cow_dst;  // ... into this block, or -1
};

class BlockManager {
 public:
  BlockManager(int64_t num_blocks, int64_t block_size);

  // Registers a new sequence holding `tokens` and gives it blocks for all of them,
  // reusing cached full blocks of an identical prefix. Returns how many leading tokens
  // are already computed (a multiple of block_size, always < tokens.size(), so the last
  // token is recomputed and its logits exist), or -1 when the pool is too small now.
  int64_t add_sequence(int64_t seq, const std::vector<int64_t>& tokens);
  // Reserves the slot of one more token of `seq` (copy-on-write if its last block is shared).
  AppendResult append_token(int64_t seq, int64_t token);
  // `child` starts as an exact copy of `parent`, sharing all of its blocks.
  void fork(int64_t parent, int64_t child);
  // Drops the sequence; blocks nobody else holds return to the free queue.
  void free(int64_t seq);
  // The first n tokens of `seq` now have their KV written: full blocks among them become
  // findable by later requests.
  void mark_computed(int64_t seq, int64_t n);

  // Blocks a new sequence of these tokens would take from the free queue (after reuse).
  int64_t blocks_needed(const std::vector<int64_t>& tokens) const;
  std::vector<int64_t> block_table(int64_t seq) const;
  int64_t num_tokens(int64_t seq) const;
  int64_t num_computed(int64_t seq) const;
  bool has_sequence(int64_t seq) const { return seqs_.count(seq) != 0; }
  int64_t refcount(int64_t block) const;
  bool is_cached(int64_t block) const;  // registered under a content hash
  int64_t num_free_blocks() const { return free_count_; }
  int64_t num_blocks() const { return num_blocks_; }
  int64_t block_size() const { return block_size_; }
  std::vector<int64_t> sequences() const;

 private:
  struct Block {
    int32_t refcount = 0;
    bool hashed = false;
    uint64_t hash = 0, parent_hash = 0;
    std::vector<int64_t> tokens;  // kept only while hashed, to verify hits
    int64_t prev = -1, next = -1;  // free queue links; -1 = none
    bool in_queue = false;
  };
  struct Sequence {
    std::vector<int64_t> blocks;
    std::vector<int64_t> tokens;
    std::vector<uint64_t> hashes;  // chained hash of each full, computed block
    int64_t computed = 0;
  };

  uint64_t chain_hash(uint64_t parent, const int64_t* tokens) const;
  // Leading full blocks of `tokens` found in the cache (at most (n - 1) / block_size).
  std::vector<int64_t> lookup(const std::vector<int64_t>& tokens) const;
  void queue_remove(int64_t b);
  void queue_push_back(int64_t b);
  int64_t queue_pop_front();  // forgets the popped block's hash
  Sequence& get(int64_t seq);
  const Sequence& get(int64_t seq) const;
  void check_block(int64_t b) const;

  int64_t num_blocks_, block_size_;
  std::vector<Block> blocks_;
  int64_t head_ = -1, tail_ = -1, free_count_ = 0;
  std::unordered_map<uint64_t, int64_t> cached_;
  std::unordered_map<int64_t, Sequence> seqs_;
};

}  // namespace cpu
}  // namespace engine

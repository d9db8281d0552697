// See block_manager.h for the rules; engine/inference/block_model.py mirrors them.
#include "cpu/block_manager.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace engine {
namespace cpu {

namespace {
constexpr uint64_t kRootHash = 0x6A09E667F3BCC908ull;

uint64_t mix64(uint64_t z) {  // splitmix64 finaliser: every input bit reaches every output bit
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
}  // namespace

BlockManager::BlockManager(int64_t num_blocks, int64_t block_size)
    : num_blocks_(num_blocks), block_size_(block_size) {
  if (num_blocks <= 0) throw std::invalid_argument("BlockManager: num_blocks must be positive");
  if (block_size != 8 && block_size != 16 && block_size != 32)
    throw std::invalid_argument("BlockManager: block_size must be 8, 16 or 32, got " +
                                std::to_string(block_size));
  blocks_.resize(static_cast<size_t>(num_blocks));
  for (int64_t b = 0; b < num_blocks; ++b) queue_push_back(b);
}

uint64_t BlockManager::chain_hash(uint64_t parent, const int64_t* tokens) const {
  uint64_t h = mix64(parent ^ 0x9E3779B97F4A7C15ull);
  for (int64_t i = 0; i < block_size_; ++i)
    h = mix64(h + static_cast<uint64_t>(tokens[i]) * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(i));
  return h;
}

std::vector<int64_t> BlockManager::lookup(const std::vector<int64_t>& tokens) const {
  std::vector<int64_t> hits;
  const int64_t n = static_cast<int64_t>(tokens.size());
  const int64_t reusable = n > 0 ? (n - 1) / block_size_ : 0;
  uint64_t parent = kRootHash;
  for (int64_t i = 0; i < reusable; ++i) {
    const int64_t* t = tokens.data() + i * block_size_;
    const uint64_t h = chain_hash(parent, t);
    auto it = cached_.find(h);
    if (it == cached_.end()) break;
    const Block& blk = blocks_[static_cast<size_t>(it->second)];
    if (blk.parent_hash != parent || !std::equal(blk.tokens.begin(), blk.tokens.end(), t)) break;
    hits.push_back(it->second);
    parent = h;
  }
  return hits;
}

int64_t BlockManager::blocks_needed(const std::vector<int64_t>& tokens) const {
  const int64_t n = static_cast<int64_t>(tokens.size());
  const auto hits = lookup(tokens);
  int64_t revived = 0;  // hits that sit in the free queue still count against it
  for (int64_t b : hits) revived += blocks_[static_cast<size_t>(b)].refcount == 0;
  return (n + block_size_ - 1) / block_size_ - static_cast<int64_t>(hits.size()) + revived;
}

int64_t BlockManager::add_sequence(int64_t seq, const std::vector<int64_t>& tokens) {
  if (seqs_.count(seq)) throw std::invalid_argument("add_sequence: sequence " + std::to_string(seq) + " exists");
  if (tokens.empty()) throw std::invalid_argument("add_sequence: a sequence needs at least one token");
  if (blocks_needed(tokens) > free_count_) return -1;
  const auto hits = lookup(tokens);
  Sequence s;
  s.tokens = tokens;
  uint64_t parent = kRootHash;
  for (int64_t b : hits) {
    Block& blk = blocks_[static_cast<size_t>(b)];
    if (blk.refcount == 0) queue_remove(b);
    ++blk.refcount;
    s.blocks.push_back(b);
    parent = blk.hash;
    s.hashes.push_back(parent);
  }
  const int64_t total = (static_cast<int64_t>(tokens.size()) + block_size_ - 1) / block_size_;
  for (int64_t i = static_cast<int64_t>(hits.size()); i < total; ++i) {
    const int64_t b = queue_pop_front();
    blocks_[static_cast<size_t>(b)].refcount = 1;
    s.blocks.push_back(b);
  }
  s.computed = static_cast<int64_t>(hits.size()) * block_size_;
  seqs_.emplace(seq, std::move(s));
  return static_cast<int64_t>(hits.size()) * block_size_;
}

AppendResult BlockManager::append_token(int64_t seq, int64_t token) {
  Sequence& s = get(seq);
  const int64_t pos = static_cast<int64_t>(s.tokens.size());
  const int64_t offset = pos % block_size_;
  AppendResult r{-1, -1, -1};
  if (offset == 0) {  // the last block is full (or there is none): start a new one
    if (free_count_ == 0) return r;
    const int64_t b = queue_pop_front();
    blocks_[static_cast<size_t>(b)].refcount = 1;
    s.blocks.push_back(b);
  } else {
    const int64_t last = s.blocks.back();
    if (blocks_[static_cast<size_t>(last)].refcount > 1) {
      // Another sequence reads rows [0, offset) of `last`: give this one a private copy.
      if (free_count_ == 0) return r;
      const int64_t b = queue_pop_front();
      blocks_[static_cast<size_t>(b)].refcount = 1;
      --blocks_[static_cast<size_t>(last)].refcount;
      s.blocks.back() = b;
      r.cow_src = last;
      r.cow_dst = b;
    }
  }
  s.tokens.push_back(token);
  r.slot = s.blocks.back() * block_size_ + offset;
  return r;
}

void BlockManager::fork(int64_t parent, int64_t child) {
  if (seqs_.count(child)) throw std::invalid_argument("fork: sequence " + std::to_string(child) + " exists");
  Sequence copy = get(parent);
  for (int64_t b : copy.blocks) ++blocks_[static_cast<size_t>(b)].refcount;
  seqs_.emplace(child, std::move(copy));
}

void BlockManager::free(int64_t seq) {
  Sequence& s = get(seq);
  // Tail blocks first: they are the least likely to be shared again, so they are reused
  // (evicted) before the prefix blocks that precede them.
  for (auto it = s.blocks.rbegin(); it != s.blocks.rend(); ++it) {
    Block& blk = blocks_[static_cast<size_t>(*it)];
    if (blk.refcount <= 0) throw std::logic_error("free: block refcount underflow");
    if (--blk.refcount == 0) queue_push_back(*it);
  }
  seqs_.erase(seq);
}

void BlockManager::mark_computed(int64_t seq, int64_t n) {
  Sequence& s = get(seq);
  if (n < s.computed || n > static_cast<int64_t>(s.tokens.size()))
    throw std::invalid_argument("mark_computed: " + std::to_string(n) + " is outside [" +
                                std::to_string(s.computed) + ", " + std::to_string(s.tokens.size()) + "]");
  s.computed = n;
  for (int64_t i = static_cast<int64_t>(s.hashes.size()); i < n / block_size_; ++i) {
    const uint64_t parent = i == 0 ? kRootHash : s.hashes[static_cast<size_t>(i - 1)];
    const int64_t* t = s.tokens.data() + i * block_size_;
    const uint64_t h = chain_hash(parent, t);
    s.hashes.push_back(h);
    const int64_t b = s.blocks[static_cast<size_t>(i)];
    Block& blk = blocks_[static_cast<size_t>(b)];
    // A block shared by a fork may already be registered; an identical block computed by
    // another request keeps the entry (the first one stays findable).
    if (blk.hashed || cached_.count(h)) continue;
    blk.hashed = true;
    blk.hash = h;
    blk.parent_hash = parent;
    blk.tokens.assign(t, t + block_size_);
    cached_.emplace(h, b);
  }
}

std::vector<int64_t> BlockManager::block_table(int64_t seq) const { return get(seq).blocks; }
int64_t BlockManager::num_tokens(int64_t seq) const { return static_cast<int64_t>(get(seq).tokens.size()); }
int64_t BlockManager::num_computed(int64_t seq) const { return get(seq).computed; }

int64_t BlockManager::refcount(int64_t block) const {
  check_block(block);
  return blocks_[static_cast<size_t>(block)].refcount;
}

bool BlockManager::is_cached(int64_t block) const {
  check_block(block);
  return blocks_[static_cast<size_t>(block)].hashed;
}

std::vector<int64_t> BlockManager::sequences() const {
  std::vector<int64_t> out;
  for (const auto& kv : seqs_) out.push_back(kv.first);
  std::sort(out.begin(), out.end());
  return out;
}

void BlockManager::queue_remove(int64_t b) {
  Block& blk = blocks_[static_cast<size_t>(b)];
  if (!blk.in_queue) throw std::logic_error("queue_remove: block is not free");
  if (blk.prev >= 0) blocks_[static_cast<size_t>(blk.prev)].next = blk.next; else head_ = blk.next;
  if (blk.next >= 0) blocks_[static_cast<size_t>(blk.next)].prev = blk.prev; else tail_ = blk.prev;
  blk.prev = blk.next = -1;
  blk.in_queue = false;
  --free_count_;
}

void BlockManager::queue_push_back(int64_t b) {
  Block& blk = blocks_[static_cast<size_t>(b)];
  if (blk.in_queue) throw std::logic_error("queue_push_back: block is already free (double free)");
  blk.prev = tail_;
  blk.next = -1;
  if (tail_ >= 0) blocks_[static_cast<size_t>(tail_)].next = b; else head_ = b;
  tail_ = b;
  blk.in_queue = true;
  ++free_count_;
}

int64_t BlockManager::queue_pop_front() {
  const int64_t b = head_;
  if (b < 0) throw std::logic_error("queue_pop_front: no free block");
  queue_remove(b);
  Block& blk = blocks_[static_cast<size_t>(b)];
  if (blk.hashed) {  // evict: its old content is about to be overwritten
    cached_.erase(blk.hash);
    blk.hashed = false;
    blk.tokens.clear();
  }
  return b;
}

BlockManager::Sequence& BlockManager::get(int64_t seq) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) throw std::out_of_range("BlockManager: no sequence " + std::to_string(seq));
  return it->second;
}

const BlockManager::Sequence& BlockManager::get(int64_t seq) const {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) throw std::out_of_range("BlockManager: no sequence " + std::to_string(seq));
  return it->second;
}

void BlockManager::check_block(int64_t b) const {
  if (b < 0 || b >= num_blocks_) throw std::out_of_range("BlockManager: no block " + std::to_string(b));
}

}  // namespace cpu
}  // namespace engine

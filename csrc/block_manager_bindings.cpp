// Exposes csrc/cpu/block_manager as the TorchScript class torch.classes.engine.BlockManager.
// The class itself is plain C++; this file only adapts types and turns its std exceptions
// into Python errors with the message intact.
#include <torch/custom_class.h>
#include <torch/library.h>

#include <stdexcept>
#include <tuple>
#include <vector>

#include "cpu/block_manager.h"

namespace {

struct BlockManagerClass : torch::CustomClassHolder {
  engine::cpu::BlockManager impl;
  BlockManagerClass(int64_t num_blocks, int64_t block_size) : impl(num_blocks, block_size) {}
};

using Self = c10::intrusive_ptr<BlockManagerClass>;

template <typename F>
auto guarded(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const std::out_of_range& e) {
    TORCH_CHECK_INDEX(false, e.what());
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  } catch (const std::logic_error& e) {
    TORCH_CHECK(false, "BlockManager invariant broken: ", e.what());
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(engine, m) {
  m.class_<BlockManagerClass>("BlockManager")
      .def(torch::init([](int64_t num_blocks, int64_t block_size) {
        return guarded([&] { return c10::make_intrusive<BlockManagerClass>(num_blocks, block_size); });
      }))
      .def("add_sequence", [](const Self& s, int64_t seq, std::vector<int64_t> tokens) {
        return guarded([&] { return s->impl.add_sequence(seq, tokens); });
      })
      .def("append_token", [](const Self& s, int64_t seq, int64_t token) {
        return guarded([&] {
          const auto r = s->impl.append_token(seq, token);
          return std::make_tuple(r.slot, r.cow_src, r.cow_dst);
        });
      })
      .def("fork", [](const Self& s, int64_t parent, int64_t child) {
        guarded([&] { s->impl.fork(parent, child); return 0; });
      })
      .def("free", [](const Self& s, int64_t seq) { guarded([&] { s->impl.free(seq); return 0; }); })
      .def("mark_computed", [](const Self& s, int64_t seq, int64_t n) {
        guarded([&] { s->impl.mark_computed(seq, n); return 0; });
      })
      .def("blocks_needed", [](const Self& s, std::vector<int64_t> tokens) {
        return s->impl.blocks_needed(tokens);
      })
      .def("block_table", [](const Self& s, int64_t seq) { return guarded([&] { return s->impl.block_table(seq); }); })
      .def("num_tokens", [](const Self& s, int64_t seq) { return guarded([&] { return s->impl.num_tokens(seq); }); })
      .def("num_computed", [](const Self& s, int64_t seq) { return guarded([&] { return s->impl.num_computed(seq); }); })
      .def("has_sequence", [](const Self& s, int64_t seq) { return s->impl.has_sequence(seq); })
      .def("refcount", [](const Self& s, int64_t b) { return guarded([&] { return s->impl.refcount(b); }); })
      .def("is_cached", [](const Self& s, int64_t b) { return guarded([&] { return s->impl.is_cached(b); }); })
      .def("num_free_blocks", [](const Self& s) { return s->impl.num_free_blocks(); })
      .def("num_blocks", [](const Self& s) { return s->impl.num_blocks(); })
      .def("block_size", [](const Self& s) { return s->impl.block_size(); })
      .def("sequences", [](const Self& s) { return s->impl.sequences(); });
}

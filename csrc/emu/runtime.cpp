// Runtime of the CUDA emulator (see cuda_emu.h and README.md): launch checks and log, block schedulers
// (fibers, two concurrent blocks, OS threads), barriers, warp exchange, shared memory, error state.
// The C entry points at the end configure it from Python (tests/cuda_emu.py, through ctypes).
#include "cuda_emu.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

namespace emu {
namespace {

enum Mode { kSequential = 0, kShuffled = 1, kThreads = 2 };

struct Config {
  int mode = kSequential;
  bool dry = false;       // check and log launches, run only the corner blocks of the grid
  int arch = 86;          // launch limits of sm_80 / 86 / 89 / 90
  uint64_t seed = 0;      // block order and thread switches of the shuffled mode
  double watchdog = 10.0; // seconds a thread of the OS-thread mode waits at a rendezvous
};

Config g_cfg;
cudaError_t g_err = cudaSuccess;
std::string g_msg = "no error";
std::string g_log;
uint64_t g_launches = 0;
std::vector<std::pair<char*, size_t>> g_virtual;  // regions of emu_virtual_alloc
std::map<const void*, int> g_opt_in;  // kernel -> cudaFuncAttributeMaxDynamicSharedMemorySize

constexpr size_t kDefaultSmem = 48 * 1024;
constexpr unsigned kMaxThreads = 1024;
constexpr size_t kStack = 128 * 1024;

size_t max_smem_opt_in(int arch) {
  switch (arch) {
    case 80: return 163 * 1024;
    case 90: return 227 * 1024;
    default: return 99 * 1024;  // sm_86, sm_89
  }
}

std::string str3(dim3 d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}
std::string str3(uint3 d) { return str3(dim3(d)); }

struct Abort {};  // unwinds a CUDA thread once its block has failed

struct Block;
struct Thread {
  ThreadState st;
  Block* blk = nullptr;
  unsigned linear = 0, lane = 0, warp = 0;
  uint64_t bar = 0;    // __syncthreads calls so far
  uint64_t wsync = 0;  // warp rendezvous so far
  bool done = false;
  ucontext_t ctx;
};

struct Block {
  const char* kernel = nullptr;
  const std::function<void()>* body = nullptr;
  bool fibers = true;
  bool shuffle = false;
  std::vector<Thread> threads;
  std::unique_ptr<std::max_align_t[]> dyn;
  size_t dyn_bytes = 0;
  std::vector<std::pair<const void*, std::unique_ptr<std::max_align_t[]>>> statics;
  size_t static_bytes = 0;
  std::vector<std::array<uint64_t, 32>> slots;  // one row per warp
  std::recursive_mutex m;
  std::condition_variable_any cv;
  bool failed = false;
  std::string error;
  uint64_t epoch = 0;  // bumped by every arrival, exit and voluntary switch: progress of the block
  uint64_t rng = 0;

  std::string where() const {
    return "kernel " + std::string(kernel) + ", block " + str3(threads[0].st.block_idx);
  }
  std::string who(const Thread& t) const { return "thread " + str3(t.st.thread_idx); }
};

thread_local Thread* t_self = nullptr;
thread_local ucontext_t t_sched;

void block_fail(Block& b, const std::string& msg) {
  std::lock_guard<std::recursive_mutex> lk(b.m);
  if (!b.failed) {
    b.failed = true;
    b.error = b.where() + ": " + msg;
  }
  b.cv.notify_all();
}

Thread& self() {
  if (t_self == nullptr) {
    std::fprintf(stderr, "minissl emulator: a device function was called outside a kernel\n");
    std::abort();
  }
  return *t_self;
}

void arrive(Block& b, uint64_t& counter) {
  std::lock_guard<std::recursive_mutex> lk(b.m);
  ++counter;
  ++b.epoch;
  b.cv.notify_all();
}

// Blocks the calling CUDA thread until pred() holds. Fibers switch to the scheduler (which reports a
// deadlock when no thread of the block can move); OS threads wait on the block's condition variable
// with the watchdog.
template <class P>
void wait_until(Thread& me, const char* what, P pred) {
  Block& b = *me.blk;
  if (b.fibers) {
    while (true) {
      if (b.failed) throw Abort{};
      if (pred()) return;
      swapcontext(&me.ctx, &t_sched);
    }
  }
  std::unique_lock<std::recursive_mutex> lk(b.m);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(g_cfg.watchdog);
  while (true) {
    if (b.failed) throw Abort{};
    if (pred()) return;
    if (b.cv.wait_until(lk, deadline) == std::cv_status::timeout && !pred() && !b.failed) {
      block_fail(b, b.who(me) + " waited " + std::to_string(g_cfg.watchdog) + " s at " + what +
                        " (watchdog): another thread of the block never reached it");
    }
  }
}

std::string state_summary(const Block& b) {
  std::map<std::pair<bool, uint64_t>, std::pair<size_t, const Thread*>> groups;
  for (const Thread& t : b.threads) {
    auto& g = groups[{t.done, t.bar}];
    if (g.first++ == 0) g.second = &t;
  }
  std::string s;
  for (const auto& [key, g] : groups) {
    if (!s.empty()) s += "; ";
    s += std::to_string(g.first) + " thread(s) (first " + str3(g.second->st.thread_idx) + ") " +
         (key.first ? "exited" : "waiting") + " after " + std::to_string(key.second) + " __syncthreads";
  }
  return s;
}

// ---- schedulers ------------------------------------------------------------------------------------

void run_body(Thread& t) {
  try {
    (*t.blk->body)();
  } catch (const Abort&) {
  } catch (const std::exception& e) {
    block_fail(*t.blk, e.what());
  }
}

void mark_done(Thread& t) {
  std::lock_guard<std::recursive_mutex> lk(t.blk->m);
  t.done = true;
  ++t.blk->epoch;
  t.blk->cv.notify_all();
}

// Fiber stacks of the calling OS thread, mapped once (untouched pages cost nothing).
struct Stacks {
  char* base = nullptr;
  Stacks() {
    void* p = mmap(nullptr, kStack * kMaxThreads, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED) {
      std::fprintf(stderr, "minissl emulator: cannot map fiber stacks\n");
      std::abort();
    }
    base = static_cast<char*>(p);
  }
  ~Stacks() { munmap(base, kStack * kMaxThreads); }
};
thread_local Stacks t_stacks;

void fiber_entry() {
  Thread& t = *t_self;
  run_body(t);
  mark_done(t);
}  // returns to t_sched through uc_link

uint64_t next_rand(uint64_t& s) {
  s ^= s << 13;
  s ^= s >> 7;
  s ^= s << 17;
  return s;
}

void run_block_fibers(Block& b) {
  const size_t n = b.threads.size();
  std::vector<size_t> order(n);
  for (size_t i = 0; i < n; ++i) {
    Thread& t = b.threads[i];
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = t_stacks.base + i * kStack;
    t.ctx.uc_stack.ss_size = kStack;
    t.ctx.uc_link = &t_sched;
    makecontext(&t.ctx, fiber_entry, 0);
    order[i] = i;
  }
  while (true) {
    if (b.shuffle)
      for (size_t i = n; i > 1; --i) std::swap(order[i - 1], order[next_rand(b.rng) % i]);
    const uint64_t epoch = b.epoch;
    bool all_done = true;
    for (size_t i : order) {
      Thread& t = b.threads[i];
      if (t.done) continue;
      t_self = &t;
      swapcontext(&t_sched, &t.ctx);
      t_self = nullptr;
      all_done = all_done && t.done;
    }
    if (all_done) return;
    if (b.epoch == epoch && !b.failed) {
      block_fail(b, "deadlock at a rendezvous (__syncthreads or a warp intrinsic not reached by every thread): " +
                        state_summary(b));
    }
  }
}

// A reused set of OS threads for the OS-thread mode: thread i of the pool runs CUDA thread i of the block.
class Pool {
 public:
  void run(Block& b) {
    std::unique_lock<std::mutex> lk(m_);
    while (size_ < b.threads.size()) {
      std::thread(&Pool::worker, this, size_++).detach();
    }
    blk_ = &b;
    pending_ = b.threads.size();
    ++gen_;
    cv_.notify_all();
    done_.wait(lk, [&] { return pending_ == 0; });
    blk_ = nullptr;
  }

 private:
  void worker(size_t i) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lk(m_);
    while (true) {
      cv_.wait(lk, [&] { return gen_ != seen; });
      seen = gen_;
      if (blk_ == nullptr || i >= blk_->threads.size()) continue;
      Thread& t = blk_->threads[i];
      lk.unlock();
      t_self = &t;
      run_body(t);
      mark_done(t);
      t_self = nullptr;
      lk.lock();
      if (--pending_ == 0) done_.notify_all();
    }
  }
  std::mutex m_;
  std::condition_variable cv_, done_;
  Block* blk_ = nullptr;
  size_t size_ = 0, pending_ = 0;
  uint64_t gen_ = 0;
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: its threads outlive static destruction
  return *p;
}

struct LaunchInfo {
  const char* name;
  dim3 grid, block;
  size_t smem;
  const std::function<void()>* body;
};

// Runs one block; returns its error ("" when it ran cleanly).
std::string run_block(const LaunchInfo& L, uint3 bidx, bool shuffle, uint64_t seed) {
  Block b;
  b.kernel = L.name;
  b.body = L.body;
  b.fibers = g_cfg.mode != kThreads;
  b.shuffle = shuffle;
  b.rng = seed | 1;
  const unsigned n = L.block.x * L.block.y * L.block.z;
  b.threads.resize(n);
  b.slots.resize((n + 31) / 32);
  for (unsigned i = 0; i < n; ++i) {
    Thread& t = b.threads[i];
    t.blk = &b;
    t.linear = i;
    t.lane = i % 32;
    t.warp = i / 32;
    t.st.thread_idx = uint3{i % L.block.x, (i / L.block.x) % L.block.y, i / (L.block.x * L.block.y)};
    t.st.block_idx = bidx;
    t.st.block_dim = L.block;
    t.st.grid_dim = L.grid;
  }
  b.dyn_bytes = L.smem;
  if (L.smem > 0) {
    const size_t words = (L.smem + sizeof(std::max_align_t) - 1) / sizeof(std::max_align_t);
    b.dyn.reset(new std::max_align_t[words]);
    std::memset(b.dyn.get(), 0xff, words * sizeof(std::max_align_t));  // uninitialised: NaN / -1 patterns
  }
  if (b.fibers) {
    run_block_fibers(b);
  } else {
    pool().run(b);
  }
  return b.failed ? b.error : std::string();
}

std::string check_limits(const char* name, const void* func, dim3 grid, dim3 block, size_t smem) {
  const std::string head = "emulated sm_" + std::to_string(g_cfg.arch) + " launch of " + name + " with grid " +
                           str3(grid) + ", block " + str3(block) + ", " + std::to_string(smem) +
                           " bytes of dynamic shared memory: ";
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || threads == 0) return head + "a grid or block dimension is 0";
  if (threads > kMaxThreads || block.x > 1024 || block.y > 1024 || block.z > 64)
    return head + "more than the limit of 1024 threads per block (x, y <= 1024, z <= 64)";
  if (grid.x > 2147483647u) return head + "grid x exceeds the limit of 2^31 - 1";
  if (grid.y > 65535) return head + "grid y = " + std::to_string(grid.y) + " exceeds the limit of 65535";
  if (grid.z > 65535) return head + "grid z = " + std::to_string(grid.z) + " exceeds the limit of 65535";
  const auto it = g_opt_in.find(func);
  const size_t limit = it == g_opt_in.end() ? kDefaultSmem : size_t(it->second);
  if (smem > limit) {
    if (it == g_opt_in.end())
      return head + "dynamic shared memory exceeds the 48 KiB (49152 bytes) a kernel gets without opting in " +
             "(cudaFuncSetAttribute MaxDynamicSharedMemorySize, up to " + std::to_string(max_smem_opt_in(g_cfg.arch)) +
             " bytes on this architecture)";
    return head + "dynamic shared memory exceeds the opted-in maximum of " + std::to_string(limit) + " bytes";
  }
  return "";
}

void set_error(cudaError_t err, const std::string& msg) {
  if (g_err != cudaSuccess) return;  // the first error stays until it is read
  g_err = err;
  g_msg = msg;
}

void log_launch(const char* name, dim3 grid, dim3 block, size_t smem, const std::string& status) {
  g_log += std::string(name) + "\t" + std::to_string(grid.x) + " " + std::to_string(grid.y) + " " +
           std::to_string(grid.z) + "\t" + std::to_string(block.x) + " " + std::to_string(block.y) + " " +
           std::to_string(block.z) + "\t" + std::to_string(smem) + "\t" + status + "\n";
}

}  // namespace

ThreadState& current() { return self().st; }

std::string instance_name(const char* pretty) {
  // g++: "void emu::launch_with(...) [with auto K = (anonymous namespace)::dce_fwd_kernel<float>; P = {...}; ...]"
  const std::string s(pretty);
  const size_t a = s.find("K = ");
  if (a == std::string::npos) return "?";
  size_t b = s.find("; ", a);
  if (b == std::string::npos) b = s.find(']', a);
  std::string k = s.substr(a + 4, b - a - 4);
  for (const std::string anon : {"(anonymous namespace)::", "{anonymous}::", "minissl::cuda::"}) {
    for (size_t p; (p = k.find(anon)) != std::string::npos;) k.erase(p, anon.size());
  }
  return k;
}

void launch_erased(const char* name, const void* func, dim3 grid, dim3 block, size_t smem, cudaStream_t,
                   const std::function<void()>& body) {
  ++g_launches;
  if (g_err != cudaSuccess) {
    // A real GPU would run it on whatever the failed launch left; the emulator stops at the first error.
    log_launch(name, grid, block, smem, "skipped: an earlier error was not read");
    return;
  }
  const std::string why = check_limits(name, func, grid, block, smem);
  if (!why.empty()) {
    set_error(cudaErrorInvalidConfiguration, why);
    log_launch(name, grid, block, smem, "refused: " + why);
    return;
  }
  std::vector<uint3> blocks;
  if (g_cfg.dry) {  // the corners of the grid: first and last index along each dimension
    for (unsigned z : {0u, grid.z - 1})
      for (unsigned y : {0u, grid.y - 1})
        for (unsigned x : {0u, grid.x - 1}) {
          const uint3 v{x, y, z};
          bool seen = false;
          for (const uint3& u : blocks) seen = seen || (u.x == x && u.y == y && u.z == z);
          if (!seen) blocks.push_back(v);
        }
  } else {
    const uint64_t nb = uint64_t(grid.x) * grid.y * grid.z;
    blocks.reserve(nb);
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) blocks.push_back(uint3{x, y, z});
  }
  const LaunchInfo L{name, grid, block, smem, &body};
  std::string error;
  if (g_cfg.mode == kShuffled) {
    std::mt19937_64 rng(g_cfg.seed * 1000003u + g_launches);
    std::shuffle(blocks.begin(), blocks.end(), rng);
    std::atomic<size_t> next{0};
    std::mutex em;
    auto worker = [&](uint64_t wseed) {
      while (true) {
        const size_t k = next.fetch_add(1);
        if (k >= blocks.size()) return;
        std::string e = run_block(L, blocks[k], true, wseed + k * 7919);
        if (!e.empty()) {
          std::lock_guard<std::mutex> lk(em);
          if (error.empty()) error = e;
          next = blocks.size();
        }
      }
    };
    std::thread other(worker, rng());
    worker(rng());
    other.join();
  } else {
    for (const uint3& v : blocks) {
      error = run_block(L, v, false, 0);
      if (!error.empty()) break;
    }
  }
  if (!error.empty()) {
    set_error(cudaErrorLaunchFailure, "emulated launch failed: " + error);
    log_launch(name, grid, block, smem, "failed: " + error);
  } else {
    log_launch(name, grid, block, smem, g_cfg.dry ? "dry" : "ran");
  }
}

void* dynamic_shared_raw() {
  Block& b = *self().blk;
  return b.dyn.get();
}

void* static_shared_raw(const void* key, size_t bytes, size_t align) {
  Block& b = *self().blk;
  std::lock_guard<std::recursive_mutex> lk(b.m);
  for (auto& [k, mem] : b.statics)
    if (k == key) return mem.get();
  if (align > alignof(std::max_align_t)) fail("static __shared__ alignment above max_align_t");
  b.static_bytes += bytes;
  if (b.static_bytes > kDefaultSmem)
    fail("static __shared__ memory of " + std::to_string(b.static_bytes) + " bytes exceeds the 48 KiB limit");
  if (b.static_bytes + b.dyn_bytes > max_smem_opt_in(g_cfg.arch))
    fail("static + dynamic shared memory of " + std::to_string(b.static_bytes + b.dyn_bytes) +
         " bytes exceeds the sm_" + std::to_string(g_cfg.arch) + " maximum");
  const size_t words = (bytes + sizeof(std::max_align_t) - 1) / sizeof(std::max_align_t);
  std::unique_ptr<std::max_align_t[]> mem(new std::max_align_t[words]);
  std::memset(mem.get(), 0xff, words * sizeof(std::max_align_t));
  b.statics.emplace_back(key, std::move(mem));
  return b.statics.back().second.get();
}

void fail(const std::string& what) {
  Thread& me = self();
  block_fail(*me.blk, me.blk->who(me) + ": " + what);
  throw Abort{};
}

void syncthreads() {
  Thread& me = self();
  Block& b = *me.blk;
  arrive(b, me.bar);
  const uint64_t target = me.bar;
  wait_until(me, "__syncthreads", [&] {
    for (const Thread& u : b.threads) {
      if (u.bar >= target) continue;
      if (u.done)
        block_fail(b, b.who(u) + " exited without reaching __syncthreads #" + std::to_string(target) + ", where " +
                          b.who(me) + " waits");
      return false;
    }
    return true;
  });
}

namespace {
void warp_rendezvous(Thread& me, unsigned mask, const char* what) {
  Block& b = *me.blk;
  if (!(mask >> me.lane & 1u))
    fail(std::string(what) + " with mask " + std::to_string(mask) + " that excludes the calling lane " +
         std::to_string(me.lane));
  const size_t base = size_t(me.warp) * 32;
  for (unsigned l = 0; l < 32; ++l)
    if ((mask >> l & 1u) && base + l >= b.threads.size())
      fail(std::string(what) + " names lane " + std::to_string(l) + ", which the block does not have");
  arrive(b, me.wsync);
  const uint64_t target = me.wsync;
  wait_until(me, what, [&] {
    for (unsigned l = 0; l < 32; ++l) {
      if (!(mask >> l & 1u)) continue;
      const Thread& u = b.threads[base + l];
      if (u.wsync >= target) continue;
      if (u.done)
        block_fail(b, b.who(u) + " (lane " + std::to_string(l) + ") exited without reaching the warp intrinsic (" +
                          what + ") that " + b.who(me) + " waits at");
      return false;
    }
    return true;
  });
}
}  // namespace

void syncwarp(unsigned mask) { warp_rendezvous(self(), mask, "__syncwarp"); }

uint64_t* warp_exchange(unsigned mask, uint64_t mine) {
  Thread& me = self();
  Block& b = *me.blk;
  {
    std::lock_guard<std::recursive_mutex> lk(b.m);
    b.slots[me.warp][me.lane] = mine;
  }
  warp_rendezvous(me, mask, "warp intrinsic");
  return b.slots[me.warp].data();
}

void warp_exchange_done(unsigned mask) { warp_rendezvous(self(), mask, "warp intrinsic"); }

unsigned active_mask() {
  Thread& me = self();
  Block& b = *me.blk;
  std::lock_guard<std::recursive_mutex> lk(b.m);
  unsigned m = 0;
  const size_t base = size_t(me.warp) * 32;
  for (unsigned l = 0; l < 32 && base + l < b.threads.size(); ++l)
    if (!b.threads[base + l].done) m |= 1u << l;
  return m;
}

unsigned lane_id() { return self().lane; }

void atomic_point() {
  Thread* me = t_self;
  if (me == nullptr || !me->blk->fibers || !me->blk->shuffle) return;
  Block& b = *me->blk;
  if (next_rand(b.rng) % 4 != 0) return;
  ++b.epoch;
  swapcontext(&me->ctx, &t_sched);
  if (b.failed) throw Abort{};
}

cudaError_t set_max_dynamic_smem(const void* func, int value) {
  if (value < 0 || size_t(value) > max_smem_opt_in(g_cfg.arch)) {
    set_error(cudaErrorInvalidValue, "emulated sm_" + std::to_string(g_cfg.arch) +
                                         ": cudaFuncSetAttribute MaxDynamicSharedMemorySize = " +
                                         std::to_string(value) + " exceeds the maximum of " +
                                         std::to_string(max_smem_opt_in(g_cfg.arch)) + " bytes");
    return cudaErrorInvalidValue;
  }
  g_opt_in[func] = value;
  return cudaSuccess;
}

}  // namespace emu

cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::g_err;
  emu::g_err = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError() { return emu::g_err; }

const char* cudaGetErrorString(cudaError_t err) { return err == cudaSuccess ? "no error" : emu::g_msg.c_str(); }

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t) {
  char* p = static_cast<char*>(ptr);
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  bool is_virtual = false;
  for (const auto& [base, size] : emu::g_virtual) is_virtual = is_virtual || (p >= base && p + count <= base + size);
  if (is_virtual && value == 0 && count >= 16 * page) {
    // Virtual extents: zero the partial pages, give the whole pages back (they read as zero again).
    char* lo = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(p) + page - 1) / page * page);
    char* hi = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(p + count)) / page * page);
    std::memset(p, 0, size_t(lo - p));
    std::memset(hi, 0, size_t(p + count - hi));
    madvise(lo, size_t(hi - lo), MADV_DONTNEED);
    return cudaSuccess;
  }
  std::memset(p, value, count);
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, cudaMemcpyKind, cudaStream_t) {
  std::memmove(dst, src, count);
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

// ---- C entry points (tests/cuda_emu.py) -----------------------------------------------------------------
extern "C" {

// mode: 0 sequential blocks, 1 two blocks at once in shuffled order, 2 OS threads (for ThreadSanitizer).
int emu_configure(int mode, int dry, int arch, unsigned long long seed, double watchdog_s) {
  if (mode < 0 || mode > 2 || (arch != 80 && arch != 86 && arch != 89 && arch != 90)) return 1;
  emu::g_cfg = emu::Config{mode, dry != 0, arch, seed, watchdog_s};
  emu::g_opt_in.clear();
  return 0;
}

const char* emu_log_text() { return emu::g_log.c_str(); }
void emu_log_clear() { emu::g_log.clear(); }

// Clears a pending error (as cudaGetLastError does) and returns its text ("" when none).
const char* emu_take_error() {
  static std::string last;
  last = emu::g_err == cudaSuccess ? "" : emu::g_msg;
  emu::g_err = cudaSuccess;
  return last.c_str();
}

// Address space without memory for dry launches on virtual extents (pages appear zeroed when touched).
void* emu_virtual_alloc(unsigned long long bytes) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return nullptr;
  emu::g_virtual.emplace_back(static_cast<char*>(p), bytes);
  return p;
}

}  // extern "C"

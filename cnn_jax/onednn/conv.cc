// A 2-D convolution on oneDNN as three XLA FFI custom calls: the forward pass, the
// input gradient and the kernel gradient; NHWC activations, HWIO kernels, float32 or
// bfloat16 (cnn_jax/onednn/__init__.py makes them one differentiable function).
//
// Each layer shape gets its three primitives once: oneDNN picks its fastest kernels for
// this CPU and the kernel layout they want; the HWIO kernel is reordered to that layout
// on every call (a few KB). Scratch memory belongs to the calling thread, so XLA may
// run several calls at once.
#include <array>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "dnnl_v3.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

void Check(dnnl_status_t status, const char* call) {
  static const char* kStatus[] = {"success",       "out of memory",          "invalid arguments",
                                  "unimplemented", "no implementation left", "runtime error",
                                  "not required"};
  if (status == dnnl_success) return;
  std::string name(call, std::strchr(call, '(') ? std::strchr(call, '(') - call : 0);
  throw std::runtime_error(name + ": " + (status > 0 && status < 7
                                              ? std::string(kStatus[status])
                                              : "status " + std::to_string(status)));
}
#define CHECK_DNNL(call) Check((call), #call)

template <typename T, dnnl_status_t (*Destroy)(T)>
struct Destroyer {
  void operator()(T handle) const { Destroy(handle); }
};
template <typename T, dnnl_status_t (*Destroy)(T)>
using Owned = std::unique_ptr<std::remove_pointer_t<T>, Destroyer<T, Destroy>>;
using MemoryDesc = Owned<dnnl_memory_desc_t, dnnl_memory_desc_destroy>;
using PrimitiveDesc = Owned<dnnl_primitive_desc_t, dnnl_primitive_desc_destroy>;
using Primitive = Owned<dnnl_primitive_t, dnnl_primitive_destroy>;
using Memory = Owned<dnnl_memory_t, dnnl_memory_destroy>;
using Attr = Owned<dnnl_primitive_attr_t, dnnl_primitive_attr_destroy>;
using Stream = Owned<dnnl_stream_t, dnnl_stream_destroy>;

dnnl_engine_t Engine() {
  static dnnl_engine_t engine = [] {
    dnnl_engine_t e;
    CHECK_DNNL(dnnl_engine_create(&e, dnnl_cpu, 0));
    return e;
  }();
  return engine;
}

dnnl_stream_t ThisThreadsStream() {  // streams are not shared between threads
  thread_local Stream stream = [] {
    dnnl_stream_t s;
    CHECK_DNNL(dnnl_stream_create(&s, Engine(), dnnl_stream_default_flags));
    return Stream(s);
  }();
  return stream.get();
}

// 64-byte aligned scratch space of the calling thread: slot 0 for the primitives' own
// scratchpads, slot 1 for the reordered kernel.
void* ThisThreadsScratch(int slot, size_t bytes) {
  struct Block {
    void* data = nullptr;
    size_t size = 0;
    ~Block() { std::free(data); }
  };
  thread_local std::array<Block, 2> blocks;
  Block& b = blocks[slot];
  if (b.size < bytes) {
    std::free(b.data);
    b.size = (bytes + 63) / 64 * 64;
    b.data = std::aligned_alloc(64, b.size);
    if (!b.data) throw std::bad_alloc();
  }
  return b.data;
}

Memory MakeMemory(const_dnnl_memory_desc_t md, void* data) {
  dnnl_memory_t m;
  CHECK_DNNL(dnnl_memory_create(&m, md, Engine(), data));
  return Memory(m);
}

// The layer: input [n, h, w, c], kernel [kh, kw, c, o], output [n, oh, ow, o].
struct Geometry {
  dnnl_data_type_t type;
  int64_t n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr;
  auto Key() const {
    return std::array<int64_t, 16>{type, n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr};
  }
};

// An activation in NHWC memory, described in oneDNN's logical NCHW order.
MemoryDesc Nhwc(int64_t n, int64_t h, int64_t w, int64_t c, dnnl_data_type_t type) {
  dnnl_dims_t dims = {n, c, h, w}, strides = {h * w * c, 1, w * c, c};
  dnnl_memory_desc_t md;
  CHECK_DNNL(dnnl_memory_desc_create_with_strides(&md, 4, dims, type, strides));
  return MemoryDesc(md);
}

// A kernel in HWIO memory, described in oneDNN's logical OIHW order.
MemoryDesc Hwio(const Geometry& g) {
  dnnl_dims_t dims = {g.o, g.c, g.kh, g.kw}, strides = {1, g.o, g.kw * g.c * g.o, g.c * g.o};
  dnnl_memory_desc_t md;
  CHECK_DNNL(dnnl_memory_desc_create_with_strides(&md, 4, dims, g.type, strides));
  return MemoryDesc(md);
}

MemoryDesc AnyKernelLayout(const Geometry& g) {
  dnnl_dims_t dims = {g.o, g.c, g.kh, g.kw};
  dnnl_memory_desc_t md;
  CHECK_DNNL(dnnl_memory_desc_create_with_tag(&md, 4, dims, g.type, dnnl_format_tag_any));
  return MemoryDesc(md);
}

const_dnnl_memory_desc_t ArgDesc(const PrimitiveDesc& pd, int arg) {
  return dnnl_primitive_desc_query_md(pd.get(), dnnl_query_exec_arg_md, arg);
}

// A primitive with its scratchpad size (user-managed: see ThisThreadsScratch).
struct Op {
  PrimitiveDesc pd;
  Primitive primitive;
  size_t scratch = 0;

  explicit Op(dnnl_primitive_desc_t desc) : pd(desc) {
    dnnl_primitive_t p;
    CHECK_DNNL(dnnl_primitive_create(&p, pd.get()));
    primitive.reset(p);
    scratch = dnnl_memory_desc_get_size(ArgDesc(pd, DNNL_ARG_SCRATCHPAD));
  }

  void Run(std::vector<dnnl_exec_arg_t> args) const {
    Memory pad;
    if (scratch) {
      pad = MakeMemory(ArgDesc(pd, DNNL_ARG_SCRATCHPAD), ThisThreadsScratch(0, scratch));
      args.push_back({DNNL_ARG_SCRATCHPAD, pad.get()});
    }
    CHECK_DNNL(dnnl_primitive_execute(primitive.get(), ThisThreadsStream(),
                                      static_cast<int>(args.size()), args.data()));
  }
};

Attr UserScratchpad() {
  dnnl_primitive_attr_t a;
  CHECK_DNNL(dnnl_primitive_attr_create(&a));
  CHECK_DNNL(dnnl_primitive_attr_set_scratchpad_mode(a, dnnl_scratchpad_mode_user));
  return Attr(a);
}

// A reorder between two layouts of the kernel; none where they are the same.
std::unique_ptr<Op> Reorder(const_dnnl_memory_desc_t from, const_dnnl_memory_desc_t to) {
  if (dnnl_memory_desc_equal(from, to)) return nullptr;
  dnnl_primitive_desc_t pd;
  CHECK_DNNL(dnnl_reorder_primitive_desc_create(&pd, from, Engine(), to, Engine(),
                                                UserScratchpad().get()));
  return std::make_unique<Op>(pd);
}

struct Layer {
  MemoryDesc x, y, w;  // the caller's layouts: NHWC, NHWC, HWIO
  std::unique_ptr<Op> forward, input_grad, kernel_grad;
  std::unique_ptr<Op> w_for_forward, w_for_input_grad, kernel_grad_to_hwio;

  explicit Layer(const Geometry& g)
      : x(Nhwc(g.n, g.h, g.w, g.c, g.type)), y(Nhwc(g.n, g.oh, g.ow, g.o, g.type)),
        w(Hwio(g)) {
    MemoryDesc any = AnyKernelLayout(g);
    Attr attr = UserScratchpad();
    dnnl_dims_t strides = {g.sh, g.sw}, dilates = {0, 0}, pad_l = {g.pt, g.pl},
                pad_r = {g.pb, g.pr};
    dnnl_primitive_desc_t pd;
    CHECK_DNNL(dnnl_convolution_forward_primitive_desc_create(
        &pd, Engine(), dnnl_forward_training, dnnl_convolution_direct, x.get(), any.get(),
        nullptr, y.get(), strides, dilates, pad_l, pad_r, attr.get()));
    forward = std::make_unique<Op>(pd);
    CHECK_DNNL(dnnl_convolution_backward_data_primitive_desc_create(
        &pd, Engine(), dnnl_convolution_direct, x.get(), any.get(), y.get(), strides, dilates,
        pad_l, pad_r, forward->pd.get(), attr.get()));
    input_grad = std::make_unique<Op>(pd);
    CHECK_DNNL(dnnl_convolution_backward_weights_primitive_desc_create(
        &pd, Engine(), dnnl_convolution_direct, x.get(), any.get(), nullptr, y.get(), strides,
        dilates, pad_l, pad_r, forward->pd.get(), attr.get()));
    kernel_grad = std::make_unique<Op>(pd);
    w_for_forward = Reorder(w.get(), ArgDesc(forward->pd, DNNL_ARG_WEIGHTS));
    w_for_input_grad = Reorder(w.get(), ArgDesc(input_grad->pd, DNNL_ARG_WEIGHTS));
    kernel_grad_to_hwio = Reorder(ArgDesc(kernel_grad->pd, DNNL_ARG_DIFF_WEIGHTS), w.get());
  }

  // The caller's kernel in the layout `op` reads, through `reorder` if there is one.
  Memory Kernel(const Op& op, const std::unique_ptr<Op>& reorder, void* hwio) const {
    Memory user = MakeMemory(w.get(), hwio);
    if (!reorder) return user;
    const_dnnl_memory_desc_t want = ArgDesc(op.pd, DNNL_ARG_WEIGHTS);
    Memory m = MakeMemory(want, ThisThreadsScratch(1, dnnl_memory_desc_get_size(want)));
    reorder->Run({{DNNL_ARG_FROM, user.get()}, {DNNL_ARG_TO, m.get()}});
    return m;
  }

  void Forward(void* x_data, void* w_data, void* y_data) const {
    Memory src = MakeMemory(x.get(), x_data), dst = MakeMemory(y.get(), y_data);
    Memory wei = Kernel(*forward, w_for_forward, w_data);
    forward->Run({{DNNL_ARG_SRC, src.get()}, {DNNL_ARG_WEIGHTS, wei.get()},
                  {DNNL_ARG_DST, dst.get()}});
  }

  void InputGrad(void* dy_data, void* w_data, void* dx_data) const {
    Memory ddst = MakeMemory(y.get(), dy_data), dsrc = MakeMemory(x.get(), dx_data);
    Memory wei = Kernel(*input_grad, w_for_input_grad, w_data);
    input_grad->Run({{DNNL_ARG_DIFF_DST, ddst.get()}, {DNNL_ARG_WEIGHTS, wei.get()},
                     {DNNL_ARG_DIFF_SRC, dsrc.get()}});
  }

  void KernelGrad(void* x_data, void* dy_data, void* dw_data) const {
    Memory src = MakeMemory(x.get(), x_data), ddst = MakeMemory(y.get(), dy_data);
    Memory hwio = MakeMemory(w.get(), dw_data);
    if (!kernel_grad_to_hwio) {
      kernel_grad->Run({{DNNL_ARG_SRC, src.get()}, {DNNL_ARG_DIFF_DST, ddst.get()},
                        {DNNL_ARG_DIFF_WEIGHTS, hwio.get()}});
      return;
    }
    const_dnnl_memory_desc_t own = ArgDesc(kernel_grad->pd, DNNL_ARG_DIFF_WEIGHTS);
    Memory dw = MakeMemory(own, ThisThreadsScratch(1, dnnl_memory_desc_get_size(own)));
    kernel_grad->Run({{DNNL_ARG_SRC, src.get()}, {DNNL_ARG_DIFF_DST, ddst.get()},
                      {DNNL_ARG_DIFF_WEIGHTS, dw.get()}});
    kernel_grad_to_hwio->Run({{DNNL_ARG_FROM, dw.get()}, {DNNL_ARG_TO, hwio.get()}});
  }
};

const Layer& LayerFor(const Geometry& g) {
  static std::mutex mu;
  static std::map<std::array<int64_t, 16>, std::unique_ptr<Layer>> layers;
  std::lock_guard<std::mutex> lock(mu);
  auto& layer = layers[g.Key()];
  if (!layer) layer = std::make_unique<Layer>(g);
  return *layer;
}

enum class Pass { kForward, kInputGrad, kKernelGrad };

// One pass of the layer whose shapes the operands give: forward (x, w) -> y, input
// gradient (dy, w) -> dx, kernel gradient (x, dy) -> dw.
template <Pass P>
ffi::Error Convolution(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out,
                       int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  try {
    auto x = P == Pass::kInputGrad ? out->dimensions() : a.dimensions();
    auto w = P == Pass::kKernelGrad ? out->dimensions() : b.dimensions();
    auto y = P == Pass::kForward ? out->dimensions() : P == Pass::kInputGrad ? a.dimensions()
                                                                              : b.dimensions();
    if (x.size() != 4 || w.size() != 4 || y.size() != 4)
      throw std::invalid_argument("operands must have rank 4");
    if (a.element_type() != b.element_type() || a.element_type() != out->element_type())
      throw std::invalid_argument("operands of one dtype only");
    dnnl_data_type_t type = a.element_type() == ffi::DataType::F32    ? dnnl_f32
                            : a.element_type() == ffi::DataType::BF16 ? dnnl_bf16
                              : throw std::invalid_argument("float32 or bfloat16 operands only");
    if (!a.element_count() || !b.element_count() || !out->element_count()) {
      std::memset(out->untyped_data(), 0, out->size_bytes());  // oneDNN wants elements
      return ffi::Error::Success();
    }
    const Layer& layer = LayerFor(
        {type, x[0], x[1], x[2], x[3], w[0], w[1], w[3], y[1], y[2], sh, sw, pt, pb, pl, pr});
    void *in0 = a.untyped_data(), *in1 = b.untyped_data(), *result = out->untyped_data();
    if (P == Pass::kForward) layer.Forward(in0, in1, result);
    if (P == Pass::kInputGrad) layer.InputGrad(in0, in1, result);
    if (P == Pass::kKernelGrad) layer.KernelGrad(in0, in1, result);
    CHECK_DNNL(dnnl_stream_wait(ThisThreadsStream()));
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("onednn conv: ") + e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

// (input, input) -> output, with the strides and paddings as attributes.
#define CONV_BINDING                \
  ffi::Ffi::Bind()                  \
      .Arg<ffi::AnyBuffer>()        \
      .Arg<ffi::AnyBuffer>()        \
      .Ret<ffi::AnyBuffer>()        \
      .Attr<int64_t>("sh")          \
      .Attr<int64_t>("sw")          \
      .Attr<int64_t>("pt")          \
      .Attr<int64_t>("pb")          \
      .Attr<int64_t>("pl")          \
      .Attr<int64_t>("pr")

XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnJaxOnednnConvForward, Convolution<Pass::kForward>,
                              CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnJaxOnednnConvInputGrad, Convolution<Pass::kInputGrad>,
                              CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnJaxOnednnConvKernelGrad, Convolution<Pass::kKernelGrad>,
                              CONV_BINDING);

// The CPU kernel of the torch op spike_linear, in C++ so that a decoding step (eager or compiled with
// Inductor's C++ wrapper) reaches the C kernel (spike_linear.c) without a Python call: the Python
// kernel it replaces cost ~20-35 us of interpreter and ctypes work per call against ~2 us here.
//
// It keeps the sparse paths' weight layouts (ops/spike_linear.py describes them and their memory):
// one per (weight, kind), keyed by the weight's TensorImpl, held with a weak reference, the
// weight's version counter, data pointer, dtype and shape, so a layout is remade when the weight
// changes in place, is replaced or is moved to another dtype (Module.to keeps the Parameter), and
// dropped once the weight is freed (at the next sweep: spikelm_layouts_sweep, which ops/spike_linear.py
// runs after each garbage collection, the next layout made, or spikelm_layouts_nbytes).
// Registration is explicit (spikelm_register_spike_linear(namespace)): the op's schema and fake
// kernel are defined in Python, in a namespace that differs for a saved model's remote-code copy.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdio>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

extern "C" {
int64_t spike_linear(const float *s, int64_t rows, int64_t in, const void *wt, int wt_bf16, int64_t out,
                     const float *bias, float *y, int64_t max_fired, int threads);
int64_t spike_linear_int8(const float *s, int64_t rows, int64_t in, const int8_t *q, const float *scale,
                          int64_t out, const float *bias, float *y, int64_t max_fired, int threads);
}

namespace {

constexpr int64_t TOO_DENSE = -1, NEED_WEIGHTS = -2, NO_MEMORY = -3, NOT_INTEGER = -4;
enum Backend { C = 0, C_INT8 = 1, DENSE = 2, NUM_BACKENDS = 3 };
enum Kind { TRANSPOSED = 0, INT8 = 1 };

thread_local int64_t backend_counts[NUM_BACKENDS] = {0, 0, 0};

struct Layout {
  c10::weak_intrusive_ptr<c10::TensorImpl> owner;
  int64_t version;
  const void *data;  // the weight's data, dtype and shape when the layout was made
  at::ScalarType dtype;
  std::vector<int64_t> sizes;
  at::Tensor a, b;  // TRANSPOSED: W^T [in, out] in the weight's dtype; INT8: q^T [in, out] int8, scale [out]

  bool current_for(const at::Tensor &w, int64_t v) const {
    return !owner.expired() && version == v && data == w.const_data_ptr() && dtype == w.scalar_type() &&
           w.sizes().equals(sizes);
  }
};

std::mutex layouts_mutex;
std::unordered_map<const c10::TensorImpl *, Layout> layouts[2];

int64_t version_of(const at::Tensor &w) { return w.is_inference() ? -1 : static_cast<int64_t>(w._version()); }

void sweep_locked() {
  for (auto &map : layouts)
    for (auto it = map.begin(); it != map.end();) it = it->second.owner.expired() ? map.erase(it) : std::next(it);
}

// The same symmetric quantisation as quantize_int8 in ops/spike_linear.py (the torch path's).
std::pair<at::Tensor, at::Tensor> make_layout(const at::Tensor &weight, Kind kind) {
  at::Tensor w = weight.detach();
  if (kind == TRANSPOSED) return {w.t().contiguous(), at::Tensor()};
  at::Tensor f = w.to(at::kFloat);
  at::Tensor scale = f.abs().amax({1}) / 127.0;
  scale = at::where(scale > 0, scale, at::ones_like(scale));
  at::Tensor q = at::round(f / scale.unsqueeze(1)).clamp_(-127, 127).to(at::kChar);
  return {q.t().contiguous(), scale.contiguous()};
}

// The current layout of weight, or undefined tensors when there is none (make=false).
std::pair<at::Tensor, at::Tensor> layout_of(const at::Tensor &weight, Kind kind, bool make) {
  std::lock_guard<std::mutex> guard(layouts_mutex);
  auto &map = layouts[kind];
  const auto *impl = weight.unsafeGetTensorImpl();
  const int64_t version = version_of(weight);
  auto it = map.find(impl);
  if (it != map.end() && it->second.current_for(weight, version)) return {it->second.a, it->second.b};
  if (!make) return {at::Tensor(), at::Tensor()};
  sweep_locked();
  auto made = make_layout(weight, kind);
  map.insert_or_assign(impl, Layout{c10::weak_intrusive_ptr<c10::TensorImpl>(weight.getIntrusivePtr()), version,
                                    weight.const_data_ptr(), weight.scalar_type(), weight.sizes().vec(), made.first,
                                    made.second});
  return made;
}

at::Tensor dense(const at::Tensor &spikes, const at::Tensor &weight, const std::optional<at::Tensor> &bias,
                 at::ScalarType dtype) {
  backend_counts[DENSE]++;
  return at::linear(spikes.to(dtype), weight.to(dtype),
                    bias.has_value() ? std::optional<at::Tensor>(bias->to(dtype)) : std::nullopt);
}

at::Tensor spike_linear_op(const at::Tensor &spikes, const at::Tensor &weight, const std::optional<at::Tensor> &bias,
                           double max_density, bool int8) {
  const bool fits = weight.dim() == 2 && spikes.dim() >= 1 && spikes.size(-1) == weight.size(1) &&
                    (!bias.has_value() || (bias->dim() == 1 && bias->size(0) == weight.size(0)));
  TORCH_CHECK_VALUE(fits, "spike_linear: spikes [..., in_features], weight [out_features, in_features] and bias "
                    "[out_features] do not fit: got spikes ", spikes.sizes(), ", weight ", weight.sizes(), ", bias ",
                    bias.has_value() ? c10::str(bias->sizes()) : std::string("None"));
  TORCH_CHECK_VALUE(spikes.device().is_cpu() && weight.device().is_cpu() && (!bias.has_value() || bias->device().is_cpu()),
                    "spike_linear runs on CPU tensors, got spikes on ", spikes.device(), ", weight on ", weight.device());
  const int64_t out_f = weight.size(0), in_f = weight.size(1);
  const at::ScalarType dtype = at::promote_types(spikes.scalar_type(), weight.scalar_type());
  const auto wdt = weight.scalar_type();
  if (!int8 && wdt != at::kFloat && wdt != at::kBFloat16) return dense(spikes, weight, bias, dtype);
  std::vector<int64_t> shape(spikes.sizes().begin(), spikes.sizes().end());
  shape.back() = out_f;
  const at::Tensor s = spikes.to(at::kFloat).contiguous();
  const at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor y = at::empty(shape, spikes.options().dtype(at::kFloat));
  const int64_t rows = in_f ? s.numel() / in_f : 0;
  if (rows == 0 || in_f == 0) {  // nothing to walk: the bias (or zeros)
    y.zero_();
    if (b.defined()) y.add_(b);
    backend_counts[int8 ? C_INT8 : C]++;
    return y.scalar_type() == dtype ? y : y.to(dtype);
  }
  const auto max_fired = static_cast<int64_t>(max_density * static_cast<double>(in_f));
  const int threads = at::get_num_threads();
  const float *b_ptr = b.defined() ? b.const_data_ptr<float>() : nullptr;
  const Kind kind = int8 ? INT8 : TRANSPOSED;
  auto layout = layout_of(weight, kind, false);
  int64_t status = 0;
  for (int pass = 0; pass < 2; pass++) {  // a second pass only when the layout is made now, for a product that will run
    if (int8)
      status = spike_linear_int8(s.const_data_ptr<float>(), rows, in_f,
                                 layout.first.defined() ? layout.first.const_data_ptr<int8_t>() : nullptr,
                                 layout.second.defined() ? layout.second.const_data_ptr<float>() : nullptr, out_f,
                                 b_ptr, y.mutable_data_ptr<float>(), max_fired, threads);
    else
      status = spike_linear(s.const_data_ptr<float>(), rows, in_f,
                            layout.first.defined() ? layout.first.const_data_ptr() : nullptr, wdt == at::kBFloat16,
                            out_f, b_ptr, y.mutable_data_ptr<float>(), max_fired, threads);
    if (status != NEED_WEIGHTS) break;
    layout = layout_of(weight, kind, true);
  }
  TORCH_CHECK_WITH(OutOfMemoryError, status != NO_MEMORY, "spike_linear: the C kernel could not allocate its index lists");
  if (status == TOO_DENSE || status == NOT_INTEGER) return dense(spikes, weight, bias, dtype);
  backend_counts[int8 ? C_INT8 : C]++;
  return y.scalar_type() == dtype ? y : y.to(dtype);
}

std::mutex registrations_mutex;
std::vector<std::unique_ptr<torch::Library>> registrations;

}  // namespace

extern "C" {

// Register spike_linear_op as the CPU kernel of <ns>::spike_linear (defined beforehand). 0 on success; else -1
// and the reason in error (error_size bytes, NUL-terminated).
int spikelm_register_spike_linear(const char *ns, char *error, int64_t error_size) {
  std::lock_guard<std::mutex> guard(registrations_mutex);
  try {
    auto lib = std::make_unique<torch::Library>(torch::Library::IMPL, std::string(ns),
                                                std::optional<c10::DispatchKey>(c10::DispatchKey::CPU), __FILE__,
                                                __LINE__);
    lib->impl("spike_linear", TORCH_FN(spike_linear_op));
    registrations.push_back(std::move(lib));
    return 0;
  } catch (const std::exception &e) {
    std::snprintf(error, static_cast<size_t>(error_size), "%s", e.what());
    return -1;
  }
}

// Drop the layouts of weights that have been freed.
void spikelm_layouts_sweep() {
  std::lock_guard<std::mutex> guard(layouts_mutex);
  sweep_locked();
}

// Calls of this thread that ran each backend since the library loaded: c, c_int8, dense.
void spikelm_spike_linear_backend_counts(int64_t *out) {
  for (int i = 0; i < NUM_BACKENDS; i++) out[i] = backend_counts[i];
}

// Bytes held by the layouts of live weights (layouts of freed weights are dropped first).
int64_t spikelm_layouts_nbytes() {
  std::lock_guard<std::mutex> guard(layouts_mutex);
  sweep_locked();
  int64_t total = 0;
  for (auto &map : layouts)
    for (auto &entry : map) {
      total += static_cast<int64_t>(entry.second.a.nbytes());
      if (entry.second.b.defined()) total += static_cast<int64_t>(entry.second.b.nbytes());
    }
  return total;
}

}  // extern "C"

// snapmla._C: the nanobind extension behind the `snapmla` Python package.
//
// Tensors arrive through DLPack (nb::ndarray accepts torch tensors, numpy
// arrays and anything with __dlpack__) and become snapmla::TensorView without
// a copy. The Python layer allocates every output and passes the caller's
// stream as an integer, so this file only translates and forwards.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include <cstdint>
#include <exception>
#include <string>

#include "snapmla/snapmla.h"

namespace nb = nanobind;

namespace {

using snapmla::Device;
using snapmla::DType;
using snapmla::KvCacheView;
using snapmla::KvFormat;
using snapmla::StreamHandle;
using snapmla::TensorView;

// DLPack device types (dlpack.h's DLDeviceType).
constexpr int kDLCPU = 1;
constexpr int kDLCUDA = 2;
constexpr int kDLCUDAHost = 3;
constexpr int kDLCUDAManaged = 13;

std::string argument_prefix(const std::string& name) { return "snapmla: argument '" + name + "': "; }

[[noreturn]] void raise_type_error(const std::string& name, const std::string& message) {
  throw nb::type_error((argument_prefix(name) + message).c_str());
}

[[noreturn]] void raise_value_error(const std::string& name, const std::string& message) {
  throw nb::value_error((argument_prefix(name) + message).c_str());
}

std::string dlpack_dtype_string(nb::dlpack::dtype dt) {
  return "DLPack dtype (code " + std::to_string(dt.code) + ", " + std::to_string(dt.bits) + " bits, " +
         std::to_string(dt.lanes) + " lanes)";
}

bool dtype_from_dlpack(nb::dlpack::dtype dt, DType* out) {
  using Code = nb::dlpack::dtype_code;
  if (dt.lanes != 1) return false;
  switch (static_cast<Code>(dt.code)) {
    case Code::Float:
      if (dt.bits == 16) { *out = DType::kFloat16; return true; }
      if (dt.bits == 32) { *out = DType::kFloat32; return true; }
      if (dt.bits == 64) { *out = DType::kFloat64; return true; }
      return false;
    case Code::Bfloat:
      if (dt.bits == 16) { *out = DType::kBFloat16; return true; }
      return false;
    case Code::Float8_E4M3FN:
      if (dt.bits == 8) { *out = DType::kFloat8E4M3; return true; }
      return false;
    case Code::Int:
      if (dt.bits == 32) { *out = DType::kInt32; return true; }
      if (dt.bits == 64) { *out = DType::kInt64; return true; }
      return false;
    case Code::UInt:
      if (dt.bits == 8) { *out = DType::kUInt8; return true; }
      return false;
    default:
      return false;
  }
}

constexpr DType kAllDTypes[] = {DType::kBFloat16, DType::kFloat16, DType::kFloat32, DType::kFloat64,
                                DType::kFloat8E4M3, DType::kInt32,   DType::kInt64,   DType::kUInt8};

bool dtype_from_name(const std::string& name, DType* out) {
  for (DType d : kAllDTypes) {
    if (name == snapmla::dtype_name(d)) {
      *out = d;
      return true;
    }
  }
  return false;
}

// One tensor argument: holds the producer's buffer (through the ndarray
// handle) for as long as the Python object lives, plus its TensorView.
// `reinterpret_as` reads the same bytes as another dtype of equal width:
// numpy has no bfloat16/e4m3, so raw uint16/uint8 bits are passed that way.
struct Array {
  nb::ndarray<nb::ro> array;
  TensorView view;
  std::string name;

  Array(nb::ndarray<nb::ro> a, std::string argument, const std::string& reinterpret_as)
      : array(std::move(a)), name(std::move(argument)) {
    const int rank = static_cast<int>(array.ndim());
    if (rank < 1 || rank > TensorView::kMaxRank)
      raise_value_error(name, "rank " + std::to_string(rank) + " is not supported (1 to " +
                                  std::to_string(TensorView::kMaxRank) + " dimensions)");
    const nb::dlpack::dtype dt = array.dtype();
    DType dtype;
    if (!reinterpret_as.empty()) {
      if (!dtype_from_name(reinterpret_as, &dtype))
        raise_type_error(name, "unknown dtype name '" + reinterpret_as + "'");
      if (dt.lanes != 1 || dt.bits != snapmla::dtype_size(dtype) * 8)
        raise_type_error(name, "cannot read a " + dlpack_dtype_string(dt) + " as " + reinterpret_as +
                                   " (element sizes differ)");
    } else if (!dtype_from_dlpack(dt, &dtype)) {
      raise_type_error(name, "unsupported " + dlpack_dtype_string(dt) +
                                 "; snapmla takes bfloat16, float16, float32, float64, float8_e4m3fn, "
                                 "int32, int64 or uint8");
    }
    view.dtype = dtype;
    switch (array.device_type()) {
      case kDLCPU:
      case kDLCUDAHost:
        view.device = Device::cpu();
        break;
      case kDLCUDA:
      case kDLCUDAManaged:
        view.device = Device::cuda(array.device_id());
        break;
      default:
        raise_value_error(name, "DLPack device type " + std::to_string(array.device_type()) +
                                    " is not supported (CPU or CUDA only)");
    }
    view.rank = rank;
    for (int d = 0; d < rank; ++d) {
      view.shape[d] = static_cast<int64_t>(array.shape(d));
      view.stride[d] = array.stride(d);
    }
    view.data = const_cast<void*>(static_cast<const void*>(array.data()));
  }
};

TensorView view_of(const Array* a) { return a ? a->view : TensorView{}; }

StreamHandle stream_of(uintptr_t stream) { return reinterpret_cast<StreamHandle>(stream); }

KvFormat format_of(const std::string& name) {
  KvFormat format;
  if (!snapmla::parse_kv_format(name.c_str(), &format))
    raise_value_error("kv_format", "expected \"bf16\" or \"fp8\", got \"" + name + "\"");
  return format;
}

KvCacheView cache_of(const std::string& format, const Array* data, const Array* nope, const Array* scale,
                     const Array* rope) {
  KvCacheView cache;
  cache.format = format_of(format);
  cache.data = view_of(data);
  cache.nope = view_of(nope);
  cache.scale = view_of(scale);
  cache.rope = view_of(rope);
  return cache;
}

snapmla::RopeStyle rope_style_of(const std::string& name) {
  if (name.empty() || name == "none") return snapmla::RopeStyle::kNone;
  if (name == "interleaved") return snapmla::RopeStyle::kInterleaved;
  if (name == "neox") return snapmla::RopeStyle::kNeox;
  raise_value_error("rope", "expected None, \"interleaved\" or \"neox\", got \"" + name + "\"");
}

Device device_of(const std::string& type, int index) {
  if (type == "cpu") return Device::cpu();
  if (type == "cuda") return Device::cuda(index);
  raise_value_error("device", "expected \"cpu\" or \"cuda\", got \"" + type + "\"");
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "snapmla native extension (use the `snapmla` package, not this module)";

  // snapmla::Error about an argument: a dtype mismatch is a TypeError in
  // Python's vocabulary, anything else a ValueError. Errors about no argument
  // (a CUDA failure, no CUDA in this build) are RuntimeErrors.
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const snapmla::Error& e) {
      const std::string message = e.what();
      PyObject* type = PyExc_ValueError;
      if (e.argument().empty())
        type = PyExc_RuntimeError;
      else if (message.find("expected dtype") != std::string::npos)
        type = PyExc_TypeError;
      PyErr_SetString(type, message.c_str());
    }
  });

  nb::class_<Array>(m, "Array", "A tensor argument seen through DLPack (keeps its producer alive).")
      .def(nb::init<nb::ndarray<nb::ro>, std::string, const std::string&>(), nb::arg("array"),
           nb::arg("name"), nb::arg("reinterpret_as") = "")
      .def_prop_ro("dtype", [](const Array& a) { return std::string(snapmla::dtype_name(a.view.dtype)); })
      .def_prop_ro("device", [](const Array& a) { return snapmla::device_name(a.view.device); })
      .def_prop_ro("shape", [](const Array& a) { return a.view.shape_string(); })
      .def_prop_ro("strides", [](const Array& a) {
        std::string s = "[";
        for (int d = 0; d < a.view.rank; ++d) s += (d ? ", " : "") + std::to_string(a.view.stride[d]);
        return s + "]";
      });

  m.attr("__version__") = snapmla::kVersion;
  m.def("built_with_cuda", &snapmla::built_with_cuda);
  m.def("hopper_available", &snapmla::hopper_available);
  m.def("kv_bytes_per_page", [](const std::string& format) { return snapmla::kv_bytes_per_page(format_of(format)); },
        nb::arg("kv_format"));
  m.def("kv_bytes_per_token", [](const std::string& format) { return snapmla::kv_bytes_per_token(format_of(format)); },
        nb::arg("kv_format"));

  m.def("decode_num_sm_parts",
        [](const std::string& device_type, int device_index, int q_rows) {
          return snapmla::decode_num_sm_parts(device_of(device_type, device_index), q_rows);
        },
        nb::arg("device_type"), nb::arg("device_index"), nb::arg("q_rows"));
  m.def("decode_workspace_bytes", &snapmla::decode_workspace_bytes, nb::arg("batch"), nb::arg("s_q"),
        nb::arg("h_q"), nb::arg("num_sm_parts"));

  m.def("get_mla_metadata",
        [](const Array& cache_seqlens, int q_rows, const Array& tile_scheduler_metadata, const Array& num_splits,
           uintptr_t stream) {
          snapmla::DecodeSchedule schedule{tile_scheduler_metadata.view, num_splits.view};
          snapmla::get_mla_metadata(cache_seqlens.view, q_rows, schedule, stream_of(stream));
        },
        nb::arg("cache_seqlens"), nb::arg("q_rows"), nb::arg("tile_scheduler_metadata"), nb::arg("num_splits"),
        nb::arg("stream"), nb::call_guard<nb::gil_scoped_release>());

  m.def("mla_decode",
        [](const Array* q, const Array* q_nope, const Array* q_scale, const Array* q_rope,
           const std::string& kv_format, const Array* cache_data, const Array* cache_nope, const Array* cache_scale,
           const Array* cache_rope, const Array& block_table, const Array& cache_seqlens, float softmax_scale,
           bool causal, const Array& out, const Array& lse, const Array* tile_scheduler_metadata,
           const Array* num_splits, const Array* workspace, bool check_indices, uintptr_t stream) {
          snapmla::DecodeParams params;
          params.q = view_of(q);
          params.q_nope = view_of(q_nope);
          params.q_scale = view_of(q_scale);
          params.q_rope = view_of(q_rope);
          params.cache = cache_of(kv_format, cache_data, cache_nope, cache_scale, cache_rope);
          params.block_table = block_table.view;
          params.cache_seqlens = cache_seqlens.view;
          params.softmax_scale = softmax_scale;
          params.causal = causal;
          params.out = out.view;
          params.lse = lse.view;
          params.schedule.tile_scheduler_metadata = view_of(tile_scheduler_metadata);
          params.schedule.num_splits = view_of(num_splits);
          params.workspace = view_of(workspace);
          params.check_indices = check_indices;
          snapmla::mla_decode(params, stream_of(stream));
        },
        nb::arg("q").none(), nb::arg("q_nope").none(), nb::arg("q_scale").none(), nb::arg("q_rope").none(),
        nb::arg("kv_format"), nb::arg("cache_data").none(), nb::arg("cache_nope").none(),
        nb::arg("cache_scale").none(), nb::arg("cache_rope").none(), nb::arg("block_table"),
        nb::arg("cache_seqlens"), nb::arg("softmax_scale"), nb::arg("causal"), nb::arg("out"), nb::arg("lse"),
        nb::arg("tile_scheduler_metadata").none(), nb::arg("num_splits").none(), nb::arg("workspace").none(),
        nb::arg("check_indices"), nb::arg("stream"), nb::call_guard<nb::gil_scoped_release>());

  m.def("write_kv_cache",
        [](const Array& c_kv, const Array& k_pe, const Array& slot_mapping, const std::string& kv_format,
           const Array* cache_data, const Array* cache_nope, const Array* cache_scale, const Array* cache_rope,
           const std::string& rope, const Array* positions, const Array* cos_sin, const Array* nonfinite_count,
           uintptr_t stream) {
          snapmla::KvWriteOptions options;
          options.rope = rope_style_of(rope);
          options.positions = view_of(positions);
          options.cos_sin = view_of(cos_sin);
          options.nonfinite_count = view_of(nonfinite_count);
          snapmla::write_kv_cache(c_kv.view, k_pe.view, slot_mapping.view,
                                  cache_of(kv_format, cache_data, cache_nope, cache_scale, cache_rope), options,
                                  stream_of(stream));
        },
        nb::arg("c_kv"), nb::arg("k_pe"), nb::arg("slot_mapping"), nb::arg("kv_format"),
        nb::arg("cache_data").none(), nb::arg("cache_nope").none(), nb::arg("cache_scale").none(),
        nb::arg("cache_rope").none(), nb::arg("rope"), nb::arg("positions").none(), nb::arg("cos_sin").none(),
        nb::arg("nonfinite_count").none(), nb::arg("stream"), nb::call_guard<nb::gil_scoped_release>());

  m.def("gather_kv_cache",
        [](const std::string& kv_format, const Array* cache_data, const Array* cache_nope, const Array* cache_scale,
           const Array* cache_rope, const Array& indices, const Array& k_nope, const Array& k_pe, uintptr_t stream) {
          snapmla::gather_kv_cache(cache_of(kv_format, cache_data, cache_nope, cache_scale, cache_rope), indices.view,
                                   k_nope.view, k_pe.view, stream_of(stream));
        },
        nb::arg("kv_format"), nb::arg("cache_data").none(), nb::arg("cache_nope").none(),
        nb::arg("cache_scale").none(), nb::arg("cache_rope").none(), nb::arg("indices"), nb::arg("k_nope"),
        nb::arg("k_pe"), nb::arg("stream"), nb::call_guard<nb::gil_scoped_release>());

  m.def("quantize_query",
        [](const Array& q, const Array& q_nope, const Array& q_scale, const Array& q_rope, uintptr_t stream) {
          snapmla::quantize_query(q.view, q_nope.view, q_scale.view, q_rope.view, stream_of(stream));
        },
        nb::arg("q"), nb::arg("q_nope"), nb::arg("q_scale"), nb::arg("q_rope"), nb::arg("stream"),
        nb::call_guard<nb::gil_scoped_release>());
}

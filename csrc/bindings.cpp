// Schemas of the deltakern ops, their CPU and CUDA kernels, and the Python module deltakern._C,
// which holds no functions: importing it loads the library and registers the ops, and its
// attributes say how it was built and name the activation codes.
#include <Python.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "adapter.h"
#include "deltakern/activations.h"
#include "dora_linear.h"
#include "ia3_linear.h"
#include "lora_linear.h"
#include "prefix_attention.h"
#include "qlora_linear.h"
#include "segmented_lora_linear.h"

// The dropout seed is a one-element int64 CPU tensor rather than an int, so that drawing it
// (torch.randint) stays inside a torch.compile graph instead of breaking it with .item().
TORCH_LIBRARY(deltakern, m) {
  m.def(
      "lora_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
      "float scaling, float dropout_p, Tensor seed) -> (Tensor, Tensor)");
  m.def(
      "lora_linear_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, "
      "Tensor xa, float scaling, float dropout_p, Tensor seed) -> (Tensor, Tensor, Tensor)");
  // qlora_linear: lora_linear over an NF4 base weight (packed codes, fp32 absmax, the 16 fp32
  // levels), dequantised tile by tile inside the base GEMMs; the weight gets no gradient.
  m.def(
      "qlora_linear_fwd(Tensor x, Tensor packed, Tensor absmax, Tensor code, int blocksize, "
      "int out_features, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, float dropout_p, "
      "Tensor seed) -> (Tensor, Tensor)");
  m.def(
      "qlora_linear_bwd(Tensor grad_out, Tensor x, Tensor packed, Tensor absmax, Tensor code, "
      "int blocksize, Tensor lora_A, Tensor lora_B, Tensor xa, float scaling, float dropout_p, "
      "Tensor seed) -> (Tensor, Tensor, Tensor)");
  // dora_linear: DoRA's column scale c = magnitude / ‖W + s·B A‖ (computed in Python) around
  // lora_linear's GEMMs; z [M, N] (the term c multiplies, for d_scale) only when save_z, else an
  // empty [0] placeholder, and then d_scale is empty [0] too.
  m.def(
      "dora_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor scale, "
      "float scaling, float dropout_p, Tensor seed, bool save_z) -> (Tensor, Tensor, Tensor)");
  m.def(
      "dora_linear_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor scale, "
      "Tensor xa, Tensor z, float scaling, float dropout_p, Tensor seed) -> (Tensor, Tensor, Tensor, Tensor)");
  // segmented_lora_linear: adapter i's rows are order[offsets[i]:offsets[i+1]]; xa[i] is
  // [M_i, r_i]; seeds holds one dropout seed per adapter (an int64 CPU tensor, as lora_linear's).
  m.def(
      "segmented_lora_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor[] lora_A, Tensor[] lora_B, "
      "float[] scalings, float[] dropout_p, Tensor order, int[] offsets, Tensor seeds) -> (Tensor, Tensor[])");
  m.def(
      "segmented_lora_linear_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor[] lora_A, Tensor[] lora_B, "
      "Tensor[] xa, float[] scalings, float[] dropout_p, Tensor order, int[] offsets, Tensor seeds) "
      "-> (Tensor, Tensor[], Tensor[])");
  m.def(
      "nf4_dequantize(Tensor packed, Tensor absmax, Tensor code, int blocksize, int rows, int cols, "
      "ScalarType dtype) -> Tensor");
  m.def(
      "prefix_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, "
      "Tensor? key_padding_mask, bool causal, float scale) -> (Tensor, Tensor)");
  m.def(
      "prefix_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor prefix_k, "
      "Tensor prefix_v, Tensor? key_padding_mask, Tensor out, Tensor lse, bool causal, "
      "float scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "adapter_fwd(Tensor h, Tensor w_down, Tensor? b_down, Tensor w_up, Tensor? b_up, "
      "Tensor? residual, int activation, float scaling) -> (Tensor, Tensor)");
  m.def(
      "adapter_bwd(Tensor grad_out, Tensor h, Tensor w_down, Tensor w_up, Tensor pre, "
      "int activation, float scaling, bool residual_is_h) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "ia3_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor scale, bool scale_input) "
      "-> (Tensor, Tensor)");
  m.def(
      "ia3_linear_bwd(Tensor grad_out, Tensor unscaled, Tensor weight, Tensor scale, "
      "bool scale_input) -> (Tensor, Tensor)");
  // Takes no tensor, so it has one catch-all kernel: the CPU port of philox.h, for the tests.
  m.def("dropout_keep_mask(int rows, int cols, float p, int seed) -> Tensor",
        &deltakern::dropout_keep_mask_cpu);
  // The SIMD variants of the CPU's keep-mask block, each checked against the reference.
  m.def("keep_block_variants() -> str[]", &deltakern::keep_block_variants);
  m.def("keep_block_bytes(int seed, int first_counter, float p, str variant) -> Tensor",
        &deltakern::keep_block_bytes_cpu);
}

TORCH_LIBRARY_IMPL(deltakern, CPU, m) {
  m.impl("lora_linear_fwd", &deltakern::lora_linear_fwd_cpu);
  m.impl("lora_linear_bwd", &deltakern::lora_linear_bwd_cpu);
  m.impl("qlora_linear_fwd", &deltakern::qlora_linear_fwd_cpu);
  m.impl("qlora_linear_bwd", &deltakern::qlora_linear_bwd_cpu);
  m.impl("nf4_dequantize", &deltakern::nf4_dequantize_cpu);
  m.impl("dora_linear_fwd", &deltakern::dora_linear_fwd_cpu);
  m.impl("dora_linear_bwd", &deltakern::dora_linear_bwd_cpu);
  m.impl("segmented_lora_linear_fwd", &deltakern::segmented_lora_linear_fwd_cpu);
  m.impl("segmented_lora_linear_bwd", &deltakern::segmented_lora_linear_bwd_cpu);
  m.impl("prefix_attention_fwd", &deltakern::prefix_attention_fwd_cpu);
  m.impl("prefix_attention_bwd", &deltakern::prefix_attention_bwd_cpu);
  m.impl("adapter_fwd", &deltakern::adapter_fwd_cpu);
  m.impl("adapter_bwd", &deltakern::adapter_bwd_cpu);
  m.impl("ia3_linear_fwd", &deltakern::ia3_linear_fwd_cpu);
  m.impl("ia3_linear_bwd", &deltakern::ia3_linear_bwd_cpu);
}

#ifdef DELTAKERN_WITH_CUDA
TORCH_LIBRARY_IMPL(deltakern, CUDA, m) {
  m.impl("lora_linear_fwd", &deltakern::lora_linear_fwd_cuda);
  m.impl("lora_linear_bwd", &deltakern::lora_linear_bwd_cuda);
  m.impl("qlora_linear_fwd", &deltakern::qlora_linear_fwd_cuda);
  m.impl("qlora_linear_bwd", &deltakern::qlora_linear_bwd_cuda);
  m.impl("nf4_dequantize", &deltakern::nf4_dequantize_cuda);
  m.impl("dora_linear_fwd", &deltakern::dora_linear_fwd_cuda);
  m.impl("dora_linear_bwd", &deltakern::dora_linear_bwd_cuda);
  m.impl("segmented_lora_linear_fwd", &deltakern::segmented_lora_linear_fwd_cuda);
  m.impl("segmented_lora_linear_bwd", &deltakern::segmented_lora_linear_bwd_cuda);
  m.impl("prefix_attention_fwd", &deltakern::prefix_attention_fwd_cuda);
  m.impl("prefix_attention_bwd", &deltakern::prefix_attention_bwd_cuda);
  m.impl("adapter_fwd", &deltakern::adapter_fwd_cuda);
  m.impl("adapter_bwd", &deltakern::adapter_bwd_cuda);
  m.impl("ia3_linear_fwd", &deltakern::ia3_linear_fwd_cuda);
  m.impl("ia3_linear_bwd", &deltakern::ia3_linear_bwd_cuda);
}
#define DELTAKERN_HAS_CUDA_KERNELS 1
#else
#define DELTAKERN_HAS_CUDA_KERNELS 0
#define DELTAKERN_CUDA_ARCHS ""
#endif

static PyModuleDef deltakern_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                         "deltakern native kernels (ops under torch.ops.deltakern)",
                                         -1, nullptr};

// deltakern._C.activations: the names of the activation codes, in code order, as a tuple of str
// (kActivationNames of activations.h; tests/test_activations.py compares it with
// deltakern.activations.ACTIVATIONS). A new reference, or nullptr with the Python error set.
static PyObject* activation_names() {
  PyObject* names = PyTuple_New(deltakern::kNumActivations);
  if (names == nullptr) return nullptr;
  for (int code = 0; code < deltakern::kNumActivations; ++code) {
    PyObject* name = PyUnicode_FromString(deltakern::kActivationNames[code]);
    if (name == nullptr) {
      Py_DECREF(names);
      return nullptr;
    }
    PyTuple_SET_ITEM(names, code, name);
  }
  return names;
}

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&deltakern_c_module);
  if (module == nullptr) return nullptr;
  PyObject* activations = activation_names();
  const int added_activations =
      activations != nullptr ? PyModule_AddObjectRef(module, "activations", activations) : -1;
  Py_XDECREF(activations);
  if (added_activations < 0 || PyModule_AddObject(module, "has_cpu_kernels", Py_NewRef(Py_True)) < 0 ||
      PyModule_AddObject(module, "has_cuda_kernels",
                         Py_NewRef(DELTAKERN_HAS_CUDA_KERNELS ? Py_True : Py_False)) < 0 ||
      PyModule_AddStringConstant(module, "cuda_archs", DELTAKERN_CUDA_ARCHS) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}

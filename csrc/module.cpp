// The Python module fastlm._C. It holds no Python functions: importing it loads the shared library,
// whose static TORCH_LIBRARY registrations make the kernels available as torch.ops.fastlm.*.
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastlm's compiled kernels (torch.ops.fastlm)", -1, nullptr};
  return PyModule_Create(&module);
}

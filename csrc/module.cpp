// A Python module with no functions: importing t1t2_fast._C loads the shared library, whose static
// initializers register the torch.ops.t1t2 operators. Kept apart so ops.cpp never touches Python.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "t1t2_fast compiled kernels (registered as torch.ops.t1t2.*)", -1, nullptr};
  return PyModule_Create(&module_def);
}

// The Python module engine._C. Importing it loads this library, whose static
// TORCH_LIBRARY_FRAGMENT blocks register every op under torch.ops.engine; the module
// itself exports nothing. torch must be imported first (engine/_native.py does so).
#include <Python.h>

static struct PyModuleDef engine_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&engine_c_module); }
